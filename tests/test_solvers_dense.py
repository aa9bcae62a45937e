"""Solvers on dense symmetric matrices with known spectra (float64)."""

import math

import numpy as np
import pytest
import torch

from hessdiag.curvature import (
    MatrixOperator,
    density,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq,
)

F64 = torch.float64


def with_spectrum(eigenvalues, seed=0):
    """A dense symmetric matrix ``Q diag(eigenvalues) Q^T`` with a random orthogonal Q."""
    ev = torch.as_tensor(eigenvalues, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=g, dtype=F64))
    return (Q * ev) @ Q.T, ev


def assert_residuals_bound(result, A):
    """Lanczos's residuals come from its recurrence: each is the true residual
    ``||A u - theta u||`` of the returned unit vector, to rounding, plus the drift its
    restarts dropped (reported in the settings)."""
    U = result.eigenvectors
    true_res = torch.linalg.vector_norm(A @ U - U * torch.as_tensor(result.eigenvalues),
                                        dim=0).numpy()
    slack = 1e-12 * float(torch.linalg.matrix_norm(A, ord=2))
    assert np.all(true_res <= result.residuals * (1 + 1e-6) + slack), (true_res, result.residuals)
    assert np.all(result.residuals <= true_res * (1 + 1e-6) + result.settings["residual_drift"]
                  + slack), (true_res, result.residuals)


SPECTRA = {
    "separated": np.concatenate([[50.0, 20.0, 10.0, 7.0, 5.0], np.linspace(-1, 2, 195)]),
    "clustered": np.concatenate([[10.0, 10.0 - 1e-4, 10.0 - 2e-4, 9.0, 8.99],
                                 np.linspace(-2, 3, 145)]),
    "indefinite": np.concatenate([[3.0, 2.5, 2.0], np.linspace(-1, 1, 144), [-4.0, -6.0, -9.0]]),
    "repeated": np.concatenate([[5.0, 5.0, 5.0, 4.0, 4.0], np.linspace(-1, 3, 95)]),
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_lanczos_matches_dense_eigvalsh_float64(name, which):
    A, ev = with_spectrum(SPECTRA[name])
    truth = np.sort(ev.numpy())
    k = 4
    block = 3 if name == "repeated" else 1
    result = lanczos(A, k=k, which=which, tol=1e-10, block_size=block, seed=1)
    want = {
        "largest": truth[::-1][:k],
        "smallest": truth[:k],
        "both": np.concatenate([truth[::-1][:k], truth[:k][::-1]]),
    }[which]
    np.testing.assert_allclose(result.eigenvalues, want, rtol=1e-8, atol=1e-12)
    assert result.converged.all()
    # the reported residuals are the true ones of the returned vectors, up to the drift
    # that restarts add (a bound: never below the true residual)
    assert_residuals_bound(result, A)
    U = result.eigenvectors
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=F64), atol=1e-10)


def test_lanczos_has_no_ghost_eigenvalues():
    # a well-separated top and many steps: without reorthogonalisation, Lanczos returns
    # copies of the top eigenvalue here
    ev = np.concatenate([[100.0, 30.0, 10.0, 3.0, 1.0], np.linspace(0, 0.5, 395)])
    A, _ = with_spectrum(ev, seed=3)
    result = lanczos(A, k=5, tol=1e-12, seed=0)
    np.testing.assert_allclose(result.eigenvalues, [100.0, 30.0, 10.0, 3.0, 1.0], rtol=1e-9)
    assert len(set(np.round(result.eigenvalues, 6))) == 5
    U = result.eigenvectors
    assert float((U.T @ U - torch.eye(5, dtype=F64)).abs().max()) < 1e-12


def test_lanczos_with_restarts_keeps_accuracy_for_many_eigenpairs():
    ev = np.concatenate([np.linspace(10, 5, 30), np.linspace(-1, 1, 370)])
    A, _ = with_spectrum(ev, seed=4)
    result = lanczos(A, k=30, tol=1e-9, ncv=45, seed=0, max_hvps=4000)
    assert result.settings["restarts"] > 0
    np.testing.assert_allclose(result.eigenvalues, np.linspace(10, 5, 30), rtol=1e-8)


def test_lanczos_reports_unconverged_pairs_honestly():
    A, _ = with_spectrum(SPECTRA["clustered"])
    result = lanczos(A, k=3, tol=1e-12, max_hvps=8, seed=0)
    assert result.hvps <= 8
    assert not result.converged.all()
    assert_residuals_bound(result, A)


def test_lanczos_is_reproducible_from_seed():
    A, _ = with_spectrum(SPECTRA["separated"])
    a = lanczos(A, k=2, tol=1e-4, seed=5)
    b = lanczos(A, k=2, tol=1e-4, seed=5)
    c = lanczos(A, k=2, tol=1e-4, seed=6)
    assert np.array_equal(a.eigenvalues, b.eigenvalues) and a.hvps == b.hvps
    assert not np.array_equal(a.residuals, c.residuals)


def test_power_iteration_reports_top_not_largest_magnitude():
    # the largest-magnitude eigenvalue is -9: plain power iteration would call it "top"
    A, _ = with_spectrum(SPECTRA["indefinite"])
    result = power_iteration(A, k=3, tol=1e-9, max_iter=5000, seed=0)
    np.testing.assert_allclose(result.eigenvalues, [3.0, 2.5, 2.0], rtol=1e-7)
    assert result.converged.all()
    assert result.settings["shift"] < 0
    classic = power_iteration(A, k=1, tol=1e-9, max_iter=5000, shift=0.0, seed=0)
    assert classic.eigenvalues[0] == pytest.approx(-9.0, rel=1e-7)


@pytest.mark.parametrize("deflation", ["projection", "hotelling"])
def test_power_iteration_deflation_finds_successive_eigenpairs(deflation):
    A, _ = with_spectrum(SPECTRA["separated"])
    result = power_iteration(A, k=4, tol=1e-10, max_iter=3000, deflation=deflation, seed=0)
    np.testing.assert_allclose(result.eigenvalues, [50.0, 20.0, 10.0, 7.0], rtol=1e-7)
    U = result.eigenvectors
    true_res = torch.linalg.vector_norm(A @ U - U * torch.as_tensor(result.eigenvalues), dim=0)
    np.testing.assert_allclose(result.residuals, true_res.numpy(), rtol=1e-6, atol=1e-13)


def test_power_iteration_warm_start_needs_fewer_products():
    A, _ = with_spectrum(SPECTRA["separated"])
    cold = power_iteration(A, k=1, tol=1e-8, max_iter=2000, seed=0)
    near = cold.eigenvectors[:, 0] + 1e-6 * torch.randn(A.shape[0], dtype=F64)
    warm = power_iteration(A, k=1, tol=1e-8, max_iter=2000, v0=near, seed=0)
    assert warm.converged.all() and warm.hvps < cold.hvps / 2
    five = power_iteration(A, k=1, max_iter=5, tol=1e-15, v0=near, seed=0)  # as Eigen-SAM
    assert five.hvps == 5 and five.eigenvalues[0] == pytest.approx(50.0, rel=1e-8)


def test_hutchinson_is_exact_on_diagonal_and_unbiased_with_the_right_stderr():
    diag = torch.diag(torch.arange(1.0, 11.0, dtype=F64))
    exact = hutchinson(diag, 5, seed=0)
    assert exact.estimate == 55.0 and exact.stderr == 0.0
    A, ev = with_spectrum(SPECTRA["indefinite"], seed=2)
    n_probes = 400
    result = hutchinson(A, n_probes, seed=1)
    # Rademacher: Var(z^T A z) = 2 * sum_{i != j} A_ij^2
    off = A - torch.diag(torch.diag(A))
    sd = math.sqrt(2 * float((off**2).sum()))
    assert result.stderr == pytest.approx(sd / math.sqrt(n_probes), rel=0.15)
    assert abs(result.estimate - float(ev.sum())) < 4 * result.stderr
    lo, hi = result.ci95
    # the Student-t interval with n - 1 degrees of freedom, not 1.96 whatever n
    from scipy import stats

    t = float(stats.t.ppf(0.975, n_probes - 1))
    assert lo < result.estimate < hi and hi - lo == pytest.approx(2 * t * result.stderr)
    small = hutchinson(A, 5, seed=1)
    width = small.ci95[1] - small.ci95[0]
    assert width == pytest.approx(2 * 2.776445 * small.stderr, rel=1e-5)  # t_{4, 0.975}


def test_hutchinson_confidence_interval_covers_the_trace_about_95_percent():
    A, ev = with_spectrum(SPECTRA["separated"], seed=5)
    covered = [
        hutchinson(A, 30, seed=s).ci95[0] <= float(ev.sum()) <= hutchinson(A, 30, seed=s).ci95[1]
        for s in range(100)
    ]
    assert 85 <= sum(covered) <= 100


def test_hutchpp_is_exact_when_its_budget_covers_a_rank_deficient_operator():
    """A third of the products >= dim: the trace exactly, with zero error, even where a
    random sketch of a low-rank operator cannot span the space."""
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(8, 2, generator=gen, dtype=F64)
    A = B @ B.T - torch.diag(torch.linspace(0, 1, 8, dtype=F64))  # indefinite, rank-rich
    low = B @ B.T  # rank 2
    for M in (A, low):
        r = hutchpp(M, n_hvps=24, seed=3)
        assert r.estimate == pytest.approx(float(torch.trace(M)), rel=1e-12, abs=1e-12)
        assert r.stderr == 0.0 and r.ci95 == (r.estimate, r.estimate) and r.hvps == 8


def test_hutchpp_exact_when_sketch_spans_space_and_better_on_dominant_spectra():
    A, ev = with_spectrum(SPECTRA["repeated"], seed=1)
    full = hutchpp(A, n_hvps=3 * 100 + 3, seed=0)
    assert full.estimate == pytest.approx(float(ev.sum()), rel=1e-12, abs=1e-10)
    # a few dominant eigenvalues: Hutch++ error much smaller at equal products
    dom = np.concatenate([[1000.0, 800.0, 500.0, 300.0, 200.0] * 4, np.linspace(0, 1, 280)])
    B, evb = with_spectrum(dom, seed=2)
    pp = hutchpp(B, n_hvps=90, seed=3)
    plain = hutchinson(B, 90, seed=3)
    assert pp.hvps == plain.hvps == 90
    assert pp.stderr < plain.stderr / 5
    assert abs(pp.estimate - float(evb.sum())) < 4 * pp.stderr + 1e-9


def test_slq_moments_are_exact_per_probe_and_density_integrates_to_one():
    A, ev = with_spectrum(SPECTRA["indefinite"], seed=7)
    steps = 15
    result = slq(A, n_probes=3, steps=steps, seed=2)
    g = torch.Generator().manual_seed(2)
    for p in range(3):
        z = (torch.randint(0, 2, (150, 1), generator=g, dtype=torch.int8).to(F64) * 2 - 1)[:, 0]
        z = z / z.norm()
        for power in (0, 1, 2, 7, 2 * steps - 1):
            want = float(z @ torch.linalg.matrix_power(A, power) @ z)
            assert result.moments(power)[p] == pytest.approx(want, rel=1e-8, abs=1e-10)
    grid, dens, sigma = result.density()
    assert sigma == pytest.approx(result.default_sigma())
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-8)
    estimate, stderr = result.trace()
    assert abs(estimate - float(ev.sum())) < 4 * stderr


def test_density_is_a_sum_of_gaussians_at_the_nodes():
    nodes = np.array([[0.0, 2.0]])
    weights = np.array([[0.25, 0.75]])
    grid = np.array([0.0, 2.0])
    got = density(nodes, weights, grid, sigma=0.5)
    norm = 1 / (0.5 * math.sqrt(2 * math.pi))
    far = math.exp(-0.5 * (2.0 / 0.5) ** 2)
    np.testing.assert_allclose(got, [norm * (0.25 + 0.75 * far), norm * (0.25 * far + 0.75)])
    with pytest.raises(ValueError, match="sigma"):
        density(nodes, weights, grid, sigma=0.0)


def test_matrix_operator_counts_products_and_solvers_count_their_own():
    A, _ = with_spectrum(SPECTRA["separated"])
    op = MatrixOperator(A)
    result = lanczos(op, k=1, tol=1e-6, seed=0)
    assert op.hvp_count == result.hvps > 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda A: lanczos(A, k=0), "k must be"),
        (lambda A: lanczos(A, k=3, which="middle"), "which must be"),
        (lambda A: lanczos(A, k=201), "eigenpairs"),
        (lambda A: lanczos(A, k=1, tol=-1), "tol must be positive"),
        (lambda A: power_iteration(A, k=0), "k must be"),
        (lambda A: hutchinson(A, 1), "at least 2"),
        (lambda A: hutchpp(A, 3), "at least 6"),
        (lambda A: slq(A, 0), "n_probes"),
    ],
)
def test_solver_arguments_are_checked(call, message):
    A, _ = with_spectrum(SPECTRA["separated"])
    with pytest.raises(ValueError, match=message):
        call(A)


@pytest.mark.parametrize("top", [[10.0, 10.0, 9.0, 5.0, 4.8], [10.0, 10.0, 10.0, 9.0, 5.0]])
@pytest.mark.parametrize("dim", [30, 100])
def test_lanczos_returns_every_copy_of_a_repeated_top_eigenvalue(top, dim):
    """Multiplicities 2 and 3 at the top, the default block size: the returned top-5 is
    the true top-5 (a missed copy would leave a smaller eigenvalue in the set, itself a
    true eigenpair with a small residual, so only the values tell)."""
    import numpy as np

    spectrum = top + list(np.linspace(-1.0, 4.5, dim - 5))
    for seed in range(5):
        A, ev = with_spectrum(spectrum, seed=seed)
        result = lanczos(A, k=5, seed=seed)
        truth = torch.sort(ev, descending=True).values[:5].numpy()
        np.testing.assert_allclose(result.eigenvalues, truth, rtol=1e-8)
        assert result.converged.all()


@pytest.mark.parametrize("top, k", [([10.0, 10.0, 9.0, 8.0, 7.0], 3), ([10.0, 10.0, 9.0], 2),
                                    ([10.0, 10.0, 10.0, 9.0, 8.0, 7.0], 4)])
@pytest.mark.parametrize("dim", [30, 100])
def test_lanczos_finds_a_missed_copy_whatever_the_gap_below_the_kth_value(top, k, dim):
    """Multiplicities 2 and 3 where the k-th value converges within a few steps (the bulk
    well below it): a check of a few steps from a fresh direction cannot see the missed
    copy; the returned values must still be eigvalsh's top k."""
    for seed in range(6):
        A, ev = with_spectrum(top + list(np.linspace(-1.0, 4.0, dim - len(top))), seed=seed)
        result = lanczos(A, k=k, seed=seed)
        truth = torch.sort(ev, descending=True).values[:k].numpy()
        np.testing.assert_allclose(result.eigenvalues, truth, rtol=1e-8)
        assert result.converged.all() and result.settings["complete"] is True
        Y = result.eigenvectors
        torch.testing.assert_close(Y.T @ Y, torch.eye(k, dtype=F64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("copies", [2, 3])
def test_lanczos_finds_copies_inside_a_tight_cluster(copies):
    """A repeated k-th value with a tight cluster just below it, as at the top of a
    network's spectrum: the check's Ritz pairs use the main run's other Ritz vectors, which
    hold converged-looking approximations of the cluster; the missed copies must still be
    found, and the check must stop (``complete``) with the true top-k."""
    k = 4
    for seed in range(6):
        g = np.random.default_rng(seed)
        cluster = list(2.9 - np.sort(g.uniform(0.0, 0.3, 20))[::-1])
        top = [4.0, 3.5] + [3.0] * copies
        A, ev = with_spectrum(top + cluster + list(np.linspace(-2.0, 2.0, 120 - len(top) - 20)),
                              seed=seed)
        result = lanczos(A, k=k, seed=seed)
        truth = torch.sort(ev, descending=True).values[:k].numpy()
        np.testing.assert_allclose(result.eigenvalues, truth, rtol=1e-8)
        assert result.settings["complete"] is True and result.converged.all()
        assert 0 < result.settings["check_hvps"] < result.hvps
