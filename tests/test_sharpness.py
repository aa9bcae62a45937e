"""Critical, worst-case and adaptive sharpness and the Adam-preconditioned operator,
against closed forms on quadratics and dense float64 matrices."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hessdiag._errors import InputError
from hessdiag.curvature import HessianOperator, lanczos
from hessdiag.curvature.preconditioned import (
    PreconditionedOperator,
    adam_preconditioner,
    adam_threshold,
)
from hessdiag.losses import resolve_loss
from hessdiag.sharpness import (
    ascent_sharpness,
    critical_sharpness,
    measure_sharpness,
    trust_region_max,
)

F64 = torch.float64
MSE = resolve_loss("mse")


def regression(n=40, d=5, seed=0, scales=(3.0, 2.0, 1.0, 0.5, 0.25)):
    """Linear least squares ``L(w) = mean (x.w - y)^2``: a quadratic with Hessian
    ``H = 2 X^T X / n`` (closed form)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64) * torch.tensor(scales, dtype=F64)
    y = torch.randn(n, 1, generator=g, dtype=F64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=F64))
    H = 2 * X.T @ X / n
    return model, [(X, y)], H


def test_critical_sharpness_of_a_quadratic_is_the_curvature_along_the_gradient():
    model, data, H = regression()
    X, y = data[0]
    w = model.weight.detach().reshape(-1)
    grad = 2 * X.T @ (X @ w - y.reshape(-1)) / len(y)
    truth = float(grad @ H @ grad / (grad @ grad))
    result = critical_sharpness(model, MSE, data, dtype=F64, rtol=1e-6, max_forward=40)
    assert result.value == pytest.approx(truth, rel=1e-5)
    lo, hi = result.interval
    assert lo <= truth * (1 + 1e-9) and truth <= hi * (1 + 1e-9)
    # and it never exceeds lambda_max (a Rayleigh quotient)
    assert result.value <= float(torch.linalg.eigvalsh(H)[-1]) * (1 + 1e-6)


def test_critical_sharpness_equals_lambda_max_when_the_gradient_is_the_top_eigenvector():
    model, data, H = regression()
    X, y = data[0]
    evals, evecs = torch.linalg.eigh(H)
    # put the weights on the top eigenvector from the minimiser: the gradient is then
    # H (w - w*) = lambda_max (w - w*)
    w_star = torch.linalg.lstsq(X, y).solution.reshape(-1)
    with torch.no_grad():
        model.weight.copy_((w_star + 0.3 * evecs[:, -1]).reshape(1, -1))
    result = critical_sharpness(model, MSE, data, dtype=F64)
    assert result.value == pytest.approx(float(evals[-1]), rel=1e-3)
    # the geometric scan from (2/c)/256 by 1.25 costs about 25 passes, then regula falsi
    assert result.forward_passes <= 40 and result.backward_passes == 1 and result.hvps == 1


def test_critical_sharpness_on_a_network_within_the_forward_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(64, 6, dtype=F64), torch.randint(0, 3, (64,))
    loss = resolve_loss("cross-entropy")
    result = critical_sharpness(model, loss, [(x, y)], dtype=F64)
    lam = lanczos(HessianOperator(model, loss, (x, y), dtype=F64), k=1).eigenvalues[0]
    assert result.forward_passes <= 40
    assert 0 < result.value <= lam * 1.001  # the curvature along g is at most lambda_max
    lo, hi = result.interval
    assert lo <= result.value <= hi and hi / lo < 1.01


def test_worst_case_sharpness_of_a_quadratic_approaches_its_closed_form():
    """At the minimiser of a quadratic, max_{|d| <= rho} L(w + d) - L(w) is
    lambda_max rho^2 / 2; ascent from the gradient step gets there from below."""
    model, data, H = regression()
    X, y = data[0]
    w_star = torch.linalg.lstsq(X, y).solution.reshape(1, -1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # slightly off the minimiser, so that the gradient is not zero
        model.weight.copy_(w_star + 1e-4 * torch.randn(1, 5, generator=g, dtype=F64))
    rho = 0.1
    lam = float(torch.linalg.eigvalsh(H)[-1])
    result = ascent_sharpness(model, MSE, data, rho=rho, adaptive=False, max_steps=30,
                              dtype=F64)
    truth = lam * rho ** 2 / 2
    assert result.value == pytest.approx(truth, rel=0.05)
    assert result.value <= truth + 2 * rho * 1e-3  # a lower bound (up to the offset's slope)
    assert result.history == sorted(result.history) or result.history[-1] >= result.history[0]


def test_adaptive_sharpness_is_invariant_to_rescaling_that_keeps_the_function():
    """Scaling layer 1 of a ReLU network by a and layer 2 by 1/a keeps the function: the
    adaptive measure is unchanged, the worst-case one changes."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 2, bias=False))
    model = model.double()
    x, y = torch.randn(32, 4, dtype=F64), torch.randint(0, 2, (32,))
    loss, data = resolve_loss("cross-entropy"), [(x, y)]
    kw = dict(rho=0.05, max_steps=3, dtype=F64)
    before = ascent_sharpness(model, loss, data, adaptive=True, **kw).value
    worst_before = ascent_sharpness(model, loss, data, adaptive=False, **kw).value
    with torch.no_grad():
        model[0].weight.mul_(4.0)
        model[2].weight.div_(4.0)
    after = ascent_sharpness(model, loss, data, adaptive=True, **kw).value
    worst_after = ascent_sharpness(model, loss, data, adaptive=False, **kw).value
    assert after == pytest.approx(before, rel=1e-6)
    assert abs(worst_after - worst_before) > 0.05 * abs(worst_before)


def test_the_model_is_left_as_it_was():
    model, data, _ = regression()
    before = model.weight.detach().clone()
    measure_sharpness(model, MSE, data, "critical", dtype=F64)
    measure_sharpness(model, MSE, data, "adaptive", dtype=F64)
    assert torch.equal(model.weight, before)


@pytest.mark.parametrize("kwargs, message", [
    (dict(measure="sharpest"), "unknown sharpness measure"),
    (dict(measure="adaptive", rho=0.0), "rho must be positive"),
])
def test_bad_measures_are_input_errors(kwargs, message):
    model, data, _ = regression()
    with pytest.raises(InputError, match=message):
        measure_sharpness(model, MSE, data, **kwargs)


# --------------------------------------------------------------------------- round 3


def _exact_trust_region(H, g, rho, T=None):
    """The maximum of ``g.z + z.Hz/2`` over ``||z|| <= rho`` in the variable ``z = d/T``,
    certified by its optimality conditions (Moré and Sorensen 1983): ``(nu I - B) y = b``,
    ``nu >= max(0, lambda_max(B))``, ``||y|| = rho`` when ``nu > 0``."""
    T = torch.ones(len(g), dtype=F64) if T is None else T
    B, b = (T[:, None] * H * T[None, :]).numpy(), (T * g).numpy()
    y, value = trust_region_max(B, b, rho)
    nu = float(np.dot(B @ y + b, y) / np.dot(y, y))
    np.testing.assert_allclose(B @ y + b, nu * y, atol=1e-9 * max(1.0, abs(nu)))
    assert nu >= max(0.0, np.linalg.eigvalsh(B)[-1]) - 1e-9
    assert abs(np.linalg.norm(y) - rho) <= 1e-9 * rho
    return value


def test_trust_region_max_meets_its_optimality_conditions_and_the_hard_case():
    rng = np.random.default_rng(0)
    for _ in range(20):
        A = rng.standard_normal((6, 6))
        B = A + A.T
        b = rng.standard_normal(6)
        y, value = trust_region_max(B, b, 0.7)
        nu = float(np.dot(B @ y + b, y) / np.dot(y, y))
        np.testing.assert_allclose(B @ y + b, nu * y, atol=1e-8)
        assert nu >= np.linalg.eigvalsh(B)[-1] - 1e-9
        # no random point of the ball beats it
        z = rng.standard_normal((2000, 6))
        z *= (0.7 * rng.random((2000, 1)) ** (1 / 6)) / np.linalg.norm(z, axis=1,
                                                                         keepdims=True)
        assert (z @ b + 0.5 * np.einsum("ij,jk,ik->i", z, B, z)).max() <= value + 1e-12
    # the hard case: no linear term, the maximum is rho^2 lambda_max / 2
    B = np.diag([3.0, 1.0, -2.0])
    y, value = trust_region_max(B, np.zeros(3), 0.5)
    assert value == pytest.approx(0.5 * 0.25 * 3.0, rel=1e-12)
    assert abs(y[0]) == pytest.approx(0.5)


@pytest.mark.parametrize("offset", [1e-3, 1.0], ids=["near-the-minimum", "away-from-it"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["worst-case", "adaptive"])
def test_ascent_sharpness_of_a_quadratic_is_its_exact_trust_region_value(offset, adaptive):
    """L(w + d) - L(w) = g.d + d.Hd/2 exactly (least squares): the ascent's value is the
    trust-region maximum, to 1%, converged in two steps (the second confirms the first)."""
    model, data, H = regression()
    X, y = data[0]
    w_star = torch.linalg.lstsq(X, y).solution.reshape(1, -1)
    with torch.no_grad():
        model.weight.copy_(w_star + offset * torch.linspace(1, -0.5, 5, dtype=F64))
    w = model.weight.detach().reshape(-1)
    g = 2 * X.T @ (X @ w - y.reshape(-1)) / len(y)
    rho = 0.1
    truth = _exact_trust_region(H, g, rho, w.abs() if adaptive else None)
    result = ascent_sharpness(model, MSE, data, rho=rho, adaptive=adaptive, dtype=F64)
    assert result.value == pytest.approx(truth, rel=1e-2)
    assert result.value <= truth * (1 + 1e-9)  # a feasible point: a lower bound
    assert result.converged and result.steps == 2 and result.reason is None
    assert len(result.history) == result.steps
    assert result.measure == ("adaptive" if adaptive else "worst-case")


def test_plain_projected_ascent_is_flagged_when_its_budget_ends_first():
    """The audit's failure: 5 projected gradient steps on an ill-conditioned quadratic near
    its minimum stop short of the maximum; the result now says it did not converge."""
    model, data, H = regression(scales=(1.0, 0.98, 0.96, 0.5, 0.25))
    X, y = data[0]
    w_star = torch.linalg.lstsq(X, y).solution.reshape(1, -1)
    with torch.no_grad():
        model.weight.copy_(w_star + 1e-4 * torch.ones(5, dtype=F64))
    w = model.weight.detach().reshape(-1)
    g = 2 * X.T @ (X @ w - y.reshape(-1)) / len(y)
    truth = _exact_trust_region(H, g, 0.1)
    short = ascent_sharpness(model, MSE, data, rho=0.1, method="gradient", max_steps=5,
                             dtype=F64)
    assert not short.converged and "raise max_steps" in short.reason
    assert short.value < truth * 0.999
    krylov = ascent_sharpness(model, MSE, data, rho=0.1, dtype=F64)
    assert krylov.converged and krylov.value == pytest.approx(truth, rel=1e-6)


def test_asam_scaling_is_weights_plus_eta_and_biases_unscaled():
    """adaptive-asam on a linear least-squares model with a bias: the exact trust-region
    value in the variable d / T with T = |w| + 0.01 on the weight and 1 on the bias."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 3, generator=g, dtype=F64)
    y = torch.randn(30, 1, generator=g, dtype=F64)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.05, -0.02, 0.1]], dtype=F64))
        model.bias.fill_(0.01)  # |b| = 0.01 (adaptive) against 1 (ASAM): far apart
    Xb = torch.cat([X, torch.ones(30, 1, dtype=F64)], 1)
    w = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    H = 2 * Xb.T @ Xb / 30
    grad = 2 * Xb.T @ (Xb @ w - y.reshape(-1)) / 30
    T = torch.cat([w[:3].abs() + 0.01, torch.ones(1, dtype=F64)])
    truth = _exact_trust_region(H, grad, 0.2, T)
    result = measure_sharpness(model, MSE, [(X, y)], "adaptive-asam", rho=0.2, dtype=F64)
    assert result.measure == "adaptive-asam" and result.settings["scaling"] == "asam"
    assert result.value == pytest.approx(truth, rel=1e-6) and result.converged
    # and it is not the |theta|-on-everything definition
    other = measure_sharpness(model, MSE, [(X, y)], "adaptive", rho=0.2, dtype=F64)
    assert abs(other.value - result.value) > 0.05 * result.value


def _sum_batches():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(50, 5, dtype=F64), torch.randint(0, 3, (50,))
    return model, [(x[:20], y[:20]), (x[20:45], y[20:45]), (x[45:], y[45:])]


@pytest.mark.parametrize("measure", ["critical", "worst-case", "adaptive"])
def test_a_sum_reduced_loss_gives_the_same_forward_measures_as_the_mean(measure):
    from hessdiag.losses import Loss, _samples

    model, batches = _sum_batches()
    mean = Loss("mean", nn.CrossEntropyLoss(), _samples, True)
    summed = Loss("sum", nn.CrossEntropyLoss(reduction="sum"), _samples, True)
    assert summed.reduction == "sum" and mean.reduction == "mean"
    a = measure_sharpness(model, mean, batches, measure, rho=0.05, dtype=F64)
    b = measure_sharpness(model, summed, batches, measure, rho=0.05, dtype=F64)
    assert b.value == pytest.approx(a.value, rel=1e-6)
    assert b.loss == pytest.approx(a.loss, rel=1e-12)
    # a raw nn loss (no Loss wrapper) too
    c = measure_sharpness(model, nn.CrossEntropyLoss(reduction="sum"), batches, measure,
                          rho=0.05, dtype=F64)
    assert c.value == pytest.approx(a.value, rel=1e-6)


def test_a_sum_reduced_loss_gives_the_same_landscape_and_hessian_as_the_mean():
    from hessdiag.landscape import compute_landscape
    from hessdiag.losses import Loss, _samples
    from hessdiag.settings import LandscapeSettings

    model, batches = _sum_batches()
    mean = Loss("mean", nn.CrossEntropyLoss(), _samples, True)
    summed = Loss("sum", nn.CrossEntropyLoss(reduction="sum"), _samples, True)
    settings = LandscapeSettings(resolution=5, dtype="float64", device="cpu")
    a = compute_landscape(model, mean, batches, settings)
    b = compute_landscape(model, summed, batches, settings)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-12)
    # the Hessian operator sees the wrapper's reduction as well
    tops = [lanczos(HessianOperator(model, loss, batches, dtype=F64,
                                    batch_size_fn=loss.batch_weight), k=1).eigenvalues[0]
            for loss in (mean, summed)]
    assert tops[1] == pytest.approx(tops[0], rel=1e-8)


def test_critical_sharpness_is_undefined_at_a_numerically_exact_minimum():
    model, data, _ = regression()
    X, y = data[0]
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.reshape(1, -1))
    result = critical_sharpness(model, MSE, data, dtype=F64)
    assert math.isnan(result.value) and not result.converged
    assert result.reason.startswith("undefined") and "minimum" in result.reason
    assert result.forward_passes == 0 and result.backward_passes == 1 and result.hvps == 1


def test_critical_sharpness_does_not_skip_a_narrow_window_where_the_loss_rises():
    """L(w) = 0.2 (w - 1)^2 + a bump of height 1 around w = 0.4. From w = 0 the gradient
    step of size eta lands on w = 0.4 eta: the loss rises first on a window around
    eta = 1 (relative width about 50%), far below the quadratic's lr_c = 5 (2/lr_c = 0.4)
    that a doubling search from the quadratic guess lands on."""
    from scipy.optimize import brentq

    def loss_fn(out, target):
        w = out.mean()
        bump = torch.clamp(1 - ((w - 0.4) / 0.1) ** 2, min=0) ** 2
        return 0.2 * (w - 1) ** 2 + bump

    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    data = [(torch.ones(1, 1, dtype=F64), torch.zeros(1, dtype=F64))]

    def h(eta):
        w = torch.tensor(0.4 * eta, dtype=F64)
        return float(loss_fn(w, None) - loss_fn(torch.tensor(0.0, dtype=F64), None))

    lr_c = brentq(h, 0.5, 1.0, xtol=1e-14)  # the first rise (h < 0 below it)
    assert all(h(e) < 0 for e in np.linspace(1e-4, lr_c * 0.999, 400))
    result = critical_sharpness(model, loss_fn, data, dtype=F64, rtol=1e-6)
    assert result.converged
    assert result.value == pytest.approx(2 / lr_c, rel=1e-5)  # about 2.5, not 0.4
    assert result.settings["curvature_along_gradient"] == pytest.approx(0.4)


def test_the_default_ascent_converges_on_the_shipped_checkpoint():
    """The audit's 5 steps were still rising there; the default now stops because the
    value stopped changing, and every step's value is at least the one before."""
    from hessdiag.sharpness import sharpness_of_checkpoint

    for measure in ("worst-case", "adaptive"):
        result, _, _ = sharpness_of_checkpoint("checkpoints/digits-mlp.pt", measure,
                                               device="cpu")
        h = result.history
        assert result.converged, (measure, h, result.reason)
        assert len(h) == result.steps and h == sorted(h)
        assert h[-1] - h[-2] <= 1e-3 * h[-1] and h[-2] - h[-3 if len(h) > 2 else -2] <= \
            1e-3 * h[-1] * (len(h) > 2) + (len(h) == 2) * h[-1]
        assert result.value == h[-1] > 0


def test_check_refuses_an_unconverged_ascent(monkeypatch):
    import hessdiag.check as check_module
    from hessdiag.check import NotConverged, make_baseline
    from hessdiag.settings import DataSettings

    real = check_module.measure_sharpness
    monkeypatch.setattr(check_module, "measure_sharpness",
                        lambda *a, **kw: real(*a, **kw, max_steps=1))
    with pytest.raises(NotConverged, match="adaptive_sharpness .*not converged"):
        make_baseline("checkpoints/digits-mlp.pt", metrics=("adaptive_sharpness",),
                      data=DataSettings(samples=128))


def test_check_refuses_a_baseline_of_the_old_fixed_step_ascent():
    from hessdiag.check import compare

    old = {"adaptive_sharpness": {"value": 0.1, "residual": 0.0, "kind": "bracket",
                                  "rho": 0.05, "steps": 5}}
    now = {"adaptive_sharpness": {**old["adaptive_sharpness"], "converged": True}}
    with pytest.raises(InputError, match="record the baseline again"):
        compare(old, now, rtol=0.1)
    assert compare(now, now, rtol=0.1)[0].passed


def test_records_written_before_convergence_was_judged_read_as_unconverged():
    from hessdiag.sharpness import SharpnessResult

    old = {"measure": "adaptive", "value": 0.1, "interval": [0.1, math.inf], "loss": 1.0,
           "forward_passes": 1, "backward_passes": 5, "seconds": 0.1, "samples": 10,
           "rho": 0.05, "history": [0.05, 0.08, 0.09, 0.1, 0.1],
           "settings": {"steps": 5, "eta": 1e-12, "adaptive": True}}
    result = SharpnessResult.from_dict(old)
    assert not result.converged and result.steps == 5 and "before" in result.reason


def test_sharpness_command_flags_an_unconverged_ascent_and_show_says_so(tmp_path):
    from conftest import run_cli

    store = tmp_path / "s.h5"
    code, out, err = run_cli(["sharpness", "checkpoints/digits-mlp.pt", "--measure",
                              "adaptive", "--ascent", "gradient", "--max-steps", "2",
                              "--samples", "128", "--store", store])
    assert code == 0, out + err
    assert "NOT converged" in out and "warning:" in err and "raise max_steps" in err
    code, out, _ = run_cli(["show", store])
    assert code == 0 and "converged no: not converged" in " ".join(out.split())
    row = [line for line in out.splitlines() if "adaptive" in line][0]
    assert row.rstrip(" │").endswith("no")


# --------------------------------------------------------------------------- Adam


def _adam_trained(steps=7):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(48, 5, dtype=F64), torch.randint(0, 3, (48,))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


def test_adam_preconditioned_operator_matches_the_dense_product():
    from conftest import dense_hessian

    model, opt, x, y = _adam_trained()
    names = [n for n, _ in model.named_parameters()]
    D, info = adam_preconditioner(opt.state_dict(), list(model.named_parameters()), names)
    # the preconditioner from the optimizer's own tensors
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    # as torch.optim.Adam's step divides by it: with the first moment's bias correction
    truth_D = (1 - 0.8 ** 7) * ((v / (1 - 0.95 ** 7)).sqrt() + 1e-6)
    torch.testing.assert_close(D, truth_D)
    assert info["beta1"] == 0.8 and info["step"] == 7
    H = dense_hessian(model, nn.functional.cross_entropy, [(x, y)])
    M = H / D.sqrt()[:, None] / D.sqrt()[None, :]
    op = PreconditionedOperator(HessianOperator(model, nn.functional.cross_entropy, (x, y),
                                                dtype=F64), D)
    result = lanczos(op, k=3, tol=1e-10)
    np.testing.assert_allclose(result.eigenvalues,
                               torch.linalg.eigvalsh(M).flip(0)[:3].numpy(), rtol=1e-8)
    # and equals the eigenvalues of the non-symmetric P^-1 H
    ev = np.sort(np.linalg.eigvals((H / D[:, None]).numpy()).real)[::-1][:3]
    np.testing.assert_allclose(result.eigenvalues, ev, rtol=1e-7)


def test_adam_preconditioner_needs_adam_state():
    model, _, x, y = _adam_trained()
    names = [n for n, _ in model.named_parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(x), y).backward()
    sgd.step()
    with pytest.raises(ValueError, match="no Adam second moment"):
        adam_preconditioner(sgd.state_dict(), list(model.named_parameters()), names)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        adam_preconditioner(None, list(model.named_parameters()), names)


def test_adam_threshold_is_38_over_lr_at_beta1_09():
    assert adam_threshold(0.01, 0.9) == pytest.approx(3800.0)
    assert math.isclose(adam_threshold(1.0, 0.0), 2.0)


# --------------------------------------------------------------------------- CLI and store


def test_sharpness_command_stores_an_analysis_that_reads_back(tmp_path):
    import json

    from hessdiag.cli.app import app
    from typer.testing import CliRunner

    from hessdiag.records import read_result, summary
    from hessdiag.store import Store

    store = tmp_path / "s.h5"
    out = CliRunner().invoke(app, ["sharpness", "checkpoints/digits-mlp.pt", "--samples", "256",
                                   "--store", str(store), "--json"])
    assert out.exit_code == 0, out.output
    printed = json.loads(out.output)
    record = Store(store).analysis(printed["analysis_id"])
    assert read_result(record).to_dict() == {k: v for k, v in printed.items()
                                             if k not in ("checkpoint", "analysis_id")}
    row = summary(record)
    assert row["measure"] == "critical" and row["sharpness"] == printed["value"]
    assert row["forward_passes"] <= 40
    res = CliRunner().invoke(app, ["sharpness", "checkpoints/digits-mlp.pt", "--measure",
                                   "flatness", "--store", str(store)])
    assert res.exit_code == 2 and "unknown sharpness measure 'flatness'" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_sharpness_metrics_in_check_fail_a_sharper_model(tmp_path):
    """A baseline with critical and adaptive sharpness: the same checkpoint passes; the
    checkpoint with its last layer halved (softer outputs: more cross-entropy curvature,
    critical sharpness about 1.8x, adaptive about 3x on these samples) fails both."""
    from hessdiag.check import check, make_baseline
    from hessdiag.checkpoints import load_checkpoint, save_checkpoint
    from hessdiag.settings import DataSettings

    data = DataSettings(samples=256)
    metrics = ("critical_sharpness", "adaptive_sharpness")
    base = make_baseline("checkpoints/digits-mlp.pt", metrics=metrics, data=data)
    assert check("checkpoints/digits-mlp.pt", baseline=base).passed
    loaded = load_checkpoint("checkpoints/digits-mlp.pt")
    model = loaded.model
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(0.5)
    sharper = tmp_path / "sharper.pt"
    save_checkpoint(sharper, model, model_spec=loaded.info.model_spec,
                    model_kwargs=loaded.info.model_kwargs, data=loaded.info.data)
    result = check(str(sharper), baseline=base)
    assert not result.passed
    failed = {row.metric for row in result.rows if not row.passed}
    assert failed == set(metrics), result.table()


def test_spectrum_with_the_adam_preconditioner_from_a_trained_checkpoint(tmp_path):
    """`hessdiag train --base adam` saves the optimizer state; `spectrum --preconditioner
    adam` gives the eigenvalues of P^-1/2 H P^-1/2 (dense truth) with Adam's threshold."""
    import json

    from conftest import dense_hessian
    from hessdiag.cli.app import app
    from typer.testing import CliRunner

    from hessdiag.settings import DataSettings
    from hessdiag.store import Store
    from hessdiag.task import load_task
    from hessdiag.train import TrainConfig, train

    cfg = TrainConfig(model="mlp", data="digits", model_kwargs={"hidden": 6}, samples=128,
                      batch_size=64, epochs=1, base="adam", lr=3e-3, run_name="adam",
                      checkpoint_dir=str(tmp_path / "ck"))
    result = train(cfg, store=Store(tmp_path / "s.h5"))
    ck = result.final_checkpoint
    out = CliRunner().invoke(app, ["spectrum", ck, "--samples", "64", "--top-k", "2",
                                   "--dtype", "float64", "--preconditioner", "adam",
                                   "--store", str(tmp_path / "s.h5"), "--json"])
    assert out.exit_code == 0, out.output
    printed = json.loads(out.output)
    task = load_task(ck, data=DataSettings(samples=64))
    model = task.model.double()
    names = [n for n, p in model.named_parameters()]
    D, info = adam_preconditioner(task.optimizer_state, list(model.named_parameters()), names)
    H = dense_hessian(model, task.loss, list(task.batches(64)))
    M = H / D.sqrt()[:, None] / D.sqrt()[None, :]
    truth = torch.linalg.eigvalsh(M).flip(0)[:2].numpy()
    np.testing.assert_allclose(printed["eigenvalues"], truth, rtol=1e-5)
    pre = printed["preconditioner"]
    assert pre["kind"] == "adam" and pre["threshold"] == pytest.approx(
        adam_threshold(info["lr"], info["beta1"]))
    # a checkpoint without optimizer state: one line, exit 2
    bad = CliRunner().invoke(app, ["spectrum", "checkpoints/digits-mlp.pt", "--preconditioner",
                                   "adam", "--store", str(tmp_path / "s.h5")])
    assert bad.exit_code == 2 and "needs the optimizer state" in bad.output


def test_a_sum_reduced_factory_loss_on_the_command_line_is_on_the_mean_scale(tmp_path):
    """A loss factory returning nn.CrossEntropyLoss(reduction="sum"), named with --loss:
    critical sharpness and lambda_max equal those of the built-in (mean) cross-entropy,
    over batches of 32 (before, both came out about 32 times too large)."""
    import json

    from conftest import run_cli

    factory = tmp_path / "losses.py"
    factory.write_text("from torch import nn\n\n\ndef summed():\n"
                       "    return nn.CrossEntropyLoss(reduction='sum')\n")
    common = ["--samples", "128", "--batch-size", "32", "--json"]
    values = {}
    for loss in ("cross-entropy", f"{factory}:summed"):
        store = tmp_path / f"{len(values)}.h5"
        code, out, err = run_cli(["sharpness", "checkpoints/digits-mlp.pt", "--loss", loss,
                                  "--store", store, *common])
        assert code == 0, err
        critical = json.loads(out)["value"]
        code, out, err = run_cli(["spectrum", "checkpoints/digits-mlp.pt", "--loss", loss,
                                  "--store", store, "--dtype", "float64", "--tol", "1e-8",
                                  *common])
        assert code == 0, err
        values[loss] = (critical, json.loads(out)["eigenvalues"][0])
    mean, summed = values.values()
    assert summed[0] == pytest.approx(mean[0], rel=1e-4)
    assert summed[1] == pytest.approx(mean[1], rel=1e-6)
