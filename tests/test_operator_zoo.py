"""HessianOperator against dense float64 Hessians (torch.func.hessian) on a model zoo."""

import numpy as np
import pytest
import torch
from conftest import dense_hessian
from torch import nn

from hessdiag.curvature import HessianOperator, hutchpp, lanczos, slq

F64 = torch.float64


def _random_vectors(dim, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, k, generator=g, dtype=F64)


@pytest.mark.parametrize("mode", ["forward-over-reverse", "double-backward"])
def test_matvec_matches_dense_hessian_float64(zoo_case, mode):
    name, model, loss_fn, batches = zoo_case
    H = dense_hessian(model, loss_fn, batches)
    op = HessianOperator(model, loss_fn, batches, dtype=F64, mode=mode)
    V = _random_vectors(op.dim, 3)
    got = op.matmat(V)
    want = H @ V
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max())), name


def test_modes_agree_to_1e10_float64(zoo_case):
    name, model, loss_fn, batches = zoo_case
    V = _random_vectors(sum(p.numel() for p in model.parameters()), 2, seed=3)
    products = {}
    for mode in ("forward-over-reverse", "double-backward"):
        op = HessianOperator(model, loss_fn, batches, dtype=F64, mode=mode)
        products[mode] = op.matmat(V)
    single = batches[0]
    for mode in ("forward-over-reverse", "retained-graph"):
        op = HessianOperator(model, loss_fn, single, dtype=F64, mode=mode)
        products[mode + "/one-batch"] = op.matmat(V)
    a, b = products["forward-over-reverse"], products["double-backward"]
    assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(a.abs().max())), name
    a, b = products["forward-over-reverse/one-batch"], products["retained-graph/one-batch"]
    assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(a.abs().max())), name


def test_extreme_eigenvalues_match_eigvalsh(zoo_case):
    name, model, loss_fn, batches = zoo_case
    H = dense_hessian(model, loss_fn, batches)
    truth = torch.linalg.eigvalsh(H).numpy()
    scale = float(np.abs(truth).max())
    op = HessianOperator(model, loss_fn, batches, dtype=F64)
    result = lanczos(op, k=3, which="both", tol=1e-10, seed=0)
    top, bottom = result.eigenvalues[:3], result.eigenvalues[3:]
    assert result.converged.all(), (name, result.residuals)
    np.testing.assert_allclose(top, truth[::-1][:3], rtol=1e-6, atol=1e-9 * scale)
    np.testing.assert_allclose(bottom[::-1], truth[:3], rtol=1e-6, atol=1e-9 * scale)
    # the Ritz vectors are eigenvectors of the dense Hessian
    U = result.eigenvectors
    residual = H @ U - U * torch.as_tensor(result.eigenvalues)
    assert float(residual.norm(dim=0).max()) <= 1e-8 * scale


def test_trace_and_slq_moments_match_dense(zoo_case):
    name, model, loss_fn, batches = zoo_case
    H = dense_hessian(model, loss_fn, batches)
    true_trace = float(torch.trace(H))
    scale = float(torch.linalg.matrix_norm(H, ord=2))
    op = HessianOperator(model, loss_fn, batches, dtype=F64)
    n = op.dim
    # Hutch++ whose sketch spans the whole space is exact (its 3n products in blocks of
    # vectors: batched products where they pass their exactness guard)
    blocks = HessianOperator(model, loss_fn, batches, dtype=F64, batch_vectors="batched")
    exact = hutchpp(blocks, n_hvps=3 * n + 3, seed=0)
    assert abs(exact.estimate - true_trace) <= 1e-6 * max(abs(true_trace), scale), name
    # SLQ: each probe's quadrature reproduces z^T H^p z / z^T z exactly for p < 2m
    steps = 12
    result = slq(op, n_probes=4, steps=steps, seed=7)
    g = torch.Generator().manual_seed(7)
    for p in range(4):
        z = (torch.randint(0, 2, (n, 1), generator=g, dtype=torch.int8).to(F64) * 2 - 1)[:, 0]
        z = z / z.norm()
        Hz = z.clone()
        for power in range(0, 2 * steps - 1, 5):
            if power:
                for _ in range(5):
                    Hz = H @ Hz
            want = float(z @ Hz)
            got = float(result.moments(power)[p])
            assert abs(got - want) <= 1e-6 * scale**power + 1e-12, (name, p, power)
    # the density integrates to 1 and its first moment times dim estimates the trace
    grid, dens, sigma = result.density()
    assert abs(np.trapezoid(dens, grid) - 1.0) < 1e-6
    first_moment = np.trapezoid(grid * dens, grid)
    estimate, stderr = result.trace()
    assert abs(first_moment * n - estimate) <= 1e-6 * max(abs(estimate), scale)
    assert abs(estimate - true_trace) <= 4 * stderr + 1e-9 * scale


def test_slq_with_full_krylov_space_recovers_the_spectrum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = (torch.randn(30, 3), torch.randint(0, 2, (30,)))
    H = dense_hessian(model, nn.CrossEntropyLoss(), [batch])
    op = HessianOperator(model, nn.CrossEntropyLoss(), batch, dtype=F64)
    result = slq(op, n_probes=2, steps=op.dim, seed=1)
    truth = torch.linalg.eigvalsh(H).numpy()
    nodes = result.nodes[0][np.isfinite(result.nodes[0]) & (result.weights[0] > 1e-12)]
    # every node with weight is an eigenvalue of H
    for t in nodes:
        assert np.min(np.abs(truth - t)) <= 1e-8 * np.abs(truth).max()
    # first moment times the dimension is z^T H z for a +-1 probe: the Hutchinson sample
    assert result.trace()[0] == pytest.approx(float(np.mean(op.dim * result.moments(1))))
