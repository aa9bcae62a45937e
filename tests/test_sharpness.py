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
from hessdiag.sharpness import ascent_sharpness, critical_sharpness, measure_sharpness

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
    assert result.forward_passes < 20 and result.backward_passes == 1


def test_critical_sharpness_on_a_network_within_the_forward_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(64, 6, dtype=F64), torch.randint(0, 3, (64,))
    loss = resolve_loss("cross-entropy")
    result = critical_sharpness(model, loss, [(x, y)], dtype=F64)
    lam = lanczos(HessianOperator(model, loss, (x, y), dtype=F64), k=1).eigenvalues[0]
    assert result.forward_passes <= 20
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
    result = ascent_sharpness(model, MSE, data, rho=rho, adaptive=False, steps=30, dtype=F64)
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
    kw = dict(rho=0.05, steps=3, dtype=F64)
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
    assert row["forward_passes"] <= 20
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
