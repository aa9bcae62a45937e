"""Stability thresholds against real torch.optim steps: GD, heavy ball and Nesterov SGD on
a quadratic just below and above the threshold hessdiag logs; Adam's preconditioner
against the update torch.optim.Adam actually takes (bias corrections, amsgrad, groups in
another order than the model's, per-group learning rates) and the dense
``D^1/2 H D^1/2``; the ratio ``show`` prints at each step's own lr, with its peak."""

import math

import numpy as np
import pytest
import torch
from conftest import dense_hessian
from conftest import run_cli as run
from torch import nn

from hessdiag.curvature.preconditioned import adam_preconditioner, optimizer_entries
from hessdiag.settings import SpectrumSettings
from hessdiag.spectrum import compute_spectrum
from hessdiag.stability import (
    adam_threshold,
    dimensionless_threshold,
    peak_stability,
    sgd_threshold,
    stability_columns,
)
from hessdiag.store import Store
from hessdiag.train import TrainConfig, train

F64 = torch.float64


# --------------------------------------------------------------------------- SGD variants


def _sgd_on_quadratic(lam_top: float, lr: float, momentum: float, nesterov: bool,
                      steps: int = 2000) -> float:
    """The largest ``|x|`` of ``torch.optim.SGD`` on ``1/2 x^T A x`` from ``x = 1``, ``A``
    with top eigenvalue ``lam_top`` (and a rotated basis, lower eigenvalues below it)."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=F64))
    A = q @ torch.diag(torch.tensor([1.0, 0.6, 0.3, 0.05, 1e-3], dtype=F64) * lam_top) @ q.T
    x = nn.Parameter(torch.ones(5, dtype=F64))
    opt = torch.optim.SGD([x], lr=lr, momentum=momentum, nesterov=nesterov)
    peak = 0.0
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * x @ A @ x).backward()
        opt.step()
        peak = max(peak, float(x.detach().norm()))
    return peak


@pytest.mark.parametrize(("momentum", "nesterov", "closed_form"), [
    (0.0, False, lambda lr, b: 2 / lr),
    (0.9, False, lambda lr, b: 2 * (1 + b) / lr),
    (0.9, True, lambda lr, b: 2 * (1 + b) / ((1 + 2 * b) * lr)),
    (0.5, True, lambda lr, b: 2 * (1 + b) / ((1 + 2 * b) * lr)),
])
def test_sgd_is_bounded_just_below_the_logged_threshold_and_diverges_just_above(
        momentum, nesterov, closed_form):
    lr = 0.1
    logged = stability_columns(5.0, lr, momentum, "sgd", nesterov)
    threshold = logged["threshold"]
    assert threshold == pytest.approx(closed_form(lr, momentum), rel=1e-14)
    assert logged["stability"] == pytest.approx(5.0 / threshold, rel=1e-14)
    start = math.sqrt(5.0)
    assert _sgd_on_quadratic(0.98 * threshold, lr, momentum, nesterov) < 10 * start
    assert _sgd_on_quadratic(1.02 * threshold, lr, momentum, nesterov) > 1e6 * start


def test_nesterov_diverges_below_the_heavy_ball_threshold_it_was_logged_with():
    """The audit's finding: 2(1+beta)/lr is 2.8x too high for Nesterov at beta 0.9."""
    heavy, nesterov = sgd_threshold(0.1, 0.9), sgd_threshold(0.1, 0.9, nesterov=True)
    assert heavy / nesterov == pytest.approx(2.8)
    assert _sgd_on_quadratic(0.5 * heavy, 0.1, 0.9, True) > 1e6
    assert dimensionless_threshold("adam", 0.9) == pytest.approx(38.0)
    assert adam_threshold(0.01, 0.9) == pytest.approx(3800.0)


# --------------------------------------------------------------------------- Adam


def _reordered_adam(steps: int, *, amsgrad: bool, bias_lr: float, named: bool):
    """An MLP trained ``steps`` full-batch steps by ``torch.optim.Adam`` with the biases in
    their own group, first (the usual no-weight-decay split), at ``bias_lr``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(40, 4, dtype=F64), torch.randint(0, 3, (40,))
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]
    weights = [(n, p) for n, p in model.named_parameters() if not n.endswith("bias")]

    def group(pairs):
        return pairs if named else [p for _, p in pairs]

    opt = torch.optim.Adam([{"params": group(biases), "lr": bias_lr, "eps": 1e-4},
                            {"params": group(weights)}],
                           lr=1e-2, betas=(0.9, 0.99), eps=1e-6, amsgrad=amsgrad)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, x, y


def _step_divisor(model, opt, x, y):
    """``lr_i m_i / (theta_i - theta_i')`` of the next real Adam step, per parameter in
    the model's order: the preconditioner torch.optim.Adam divides by (over lr_i)."""
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    return torch.cat([(opt.state[p]["exp_avg"] / (b - p.detach())).reshape(-1)
                      * lr_of[id(p)] for p, b in zip(model.parameters(), before, strict=True)])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_is_what_torch_adam_divides_by(amsgrad):
    """At step 3 (bias corrections far from 1), with groups in another order than the
    model's and their own lr and eps: the diagonal hessdiag reads from the state, times
    the group's lr over the reference lr, is what the next real step divides by."""
    model, opt, x, y = _reordered_adam(2, amsgrad=amsgrad, bias_lr=3e-2, named=False)
    pairs = list(model.named_parameters())
    names = [n for n, _ in pairs]
    # read after the third step, then compare with the third step's own division
    model3, opt3, _, _ = _reordered_adam(3, amsgrad=amsgrad, bias_lr=3e-2, named=False)
    diag, info = adam_preconditioner(opt3, list(model3.named_parameters()), names)
    assert info["lr"] == 3e-2 and info["step"] == 3 and info["amsgrad"] is amsgrad
    lrs = torch.cat([torch.full((p.numel(),), 3e-2 if n.endswith("bias") else 1e-2,
                                dtype=F64) for n, p in pairs])
    divisor = _step_divisor(model, opt, x, y)  # the third step of the same run
    torch.testing.assert_close(diag * lrs / 3e-2, divisor, rtol=1e-9, atol=0)
    # without the 1 - beta1^t factor P would be 1 - 0.9^3 = 0.271 of the real divisor
    assert float(divisor.min()) > 0


def test_adam_state_is_matched_by_identity_or_name_never_by_position():
    model, opt, x, y = _reordered_adam(4, amsgrad=False, bias_lr=1e-2, named=False)
    pairs = list(model.named_parameters())
    names = [n for n, _ in pairs]
    live = optimizer_entries(opt, pairs)
    for n, p in pairs:  # each parameter gets its own second moment
        assert live[n][1]["exp_avg_sq"] is opt.state[p]["exp_avg_sq"]
    # a state dict of several unnamed groups cannot be matched: one clear error
    with pytest.raises(ValueError, match="2 parameter groups and no parameter names"):
        adam_preconditioner(opt.state_dict(), pairs, names)
    # an optimizer built on named parameters saves the names: matched by name
    model_n, opt_n, _, _ = _reordered_adam(4, amsgrad=False, bias_lr=1e-2, named=True)
    by_name, _ = adam_preconditioner(opt_n.state_dict(), list(model_n.named_parameters()),
                                     names)
    by_identity, _ = adam_preconditioner(opt, pairs, names)
    torch.testing.assert_close(by_name, by_identity, rtol=0, atol=0)
    # the old positional reading gave each parameter another's moment: the sizes differ
    # here, and a single group of another model's parameters is refused too
    other = nn.Linear(4, 5).double()
    with pytest.raises(ValueError, match="not parameters of this model"):
        adam_preconditioner(opt, list(other.named_parameters()), ["weight"])
    one = torch.optim.Adam(list(model.parameters())[::-1], lr=1e-2)
    nn.functional.cross_entropy(model(x), y).backward()
    one.step()
    with pytest.raises(ValueError, match="does not have the shape"):
        adam_preconditioner(one.state_dict(), pairs, names)
    # a parameter the optimizer does not hold
    part = torch.optim.Adam([model[0].weight], lr=1e-2)
    part.step()
    with pytest.raises(ValueError, match="does not hold parameter 0.bias"):
        adam_preconditioner(part, pairs, names)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_preconditioned_sharpness_matches_the_dense_truth_from_real_adam_state(amsgrad):
    """``spectrum --preconditioner adam`` on a real Adam state (biases first, their own
    lr, amsgrad, step 3): its eigenvalues over its threshold equal those of the dense
    ``D^1/2 H D^1/2`` (``D = lr_i / P_i``, P from torch's own tensors) over 38."""
    model, opt, x, y = _reordered_adam(3, amsgrad=amsgrad, bias_lr=3e-2, named=True)
    H = dense_hessian(model, nn.functional.cross_entropy, [(x, y)])
    D = []
    lr_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for p in model.parameters():
        g, s = lr_of[id(p)], opt.state[p]
        b1, b2 = g["betas"]
        t = float(s["step"])
        v = s["max_exp_avg_sq"] if amsgrad else s["exp_avg_sq"]
        P = (1 - b1 ** t) * (v.sqrt() / math.sqrt(1 - b2 ** t) + g["eps"])
        D.append((g["lr"] / P).reshape(-1))
    D = torch.cat(D)
    M = D.sqrt()[:, None] * H * D.sqrt()[None, :]
    truth = torch.linalg.eigvalsh(M).flip(0)[:2].numpy() / dimensionless_threshold("adam",
                                                                                     0.9)
    result = compute_spectrum(model, nn.functional.cross_entropy, [(x, y)],
                              SpectrumSettings(preconditioner="adam", top_k=2, tol=1e-12,
                                               dtype="float64", device="cpu"),
                              optimizer_state=opt.state_dict())
    pre = result.operator["preconditioner"]
    assert pre["lr"] == 3e-2 and pre["threshold"] == pytest.approx(38 / 3e-2)
    np.testing.assert_allclose(np.asarray(result.top.eigenvalues) / pre["threshold"], truth,
                               rtol=1e-6)
    assert result.to_dict()["preconditioner"]["stability"] == pytest.approx(truth[0],
                                                                         rel=1e-6)


def test_groups_with_different_beta1_have_no_common_threshold():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    opt = torch.optim.Adam([{"params": [model.weight], "betas": (0.8, 0.99)},
                            {"params": [model.bias]}], lr=1e-2)
    model(torch.randn(4, 3, dtype=F64)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="different beta1"):
        adam_preconditioner(opt, list(model.named_parameters()), ["weight", "bias"])


# --------------------------------------------------------------------------- train, show


def test_a_nesterov_run_logs_its_threshold_and_show_prints_the_peak_ratio(tmp_path):
    """A cosine-scheduled Nesterov run: every sharpness row's threshold is
    2(1+b)/((1+2b) lr) at that step's lr; ``show`` prints the peak ratio and its step
    (not the last ratio at a learning rate near 0); checkpoints name their parameters."""
    from hessdiag.checkpoints import load_checkpoint

    store = tmp_path / "s.h5"
    cfg = TrainConfig(model="mlp", data="digits", model_kwargs={"hidden": 8}, samples=256,
                      batch_size=64, epochs=3, lr=0.05, momentum=0.9, nesterov=True,
                      schedule="cosine", sharpness_every=2, sharpness_samples=128, seed=1,
                      run_name="nest", checkpoint_dir=str(tmp_path / "ck"))
    result = train(cfg, store=Store(store))
    x = Store(store).run("nest").arrays
    lr = x["sharpness/lr"]
    np.testing.assert_allclose(x["sharpness/threshold"], 2 * 1.9 / (2.8 * lr), rtol=1e-12)
    ratio = x["sharpness/lambda_max"] / x["sharpness/threshold"]
    np.testing.assert_allclose(x["sharpness/stability"], ratio, rtol=1e-12)
    i = int(np.argmax(ratio))
    peak, peak_step = float(ratio[i]), int(x["sharpness/step"][i])
    last, last_step = float(ratio[-1]), int(x["sharpness/step"][-1])
    assert peak > 20 * last  # the last lr of a cosine schedule is near 0
    code, out, _ = run(["show", store])
    assert code == 0
    assert (f"nest: λ_max/threshold (at each step's own lr) peak {peak:.3g} at step "
            f"{peak_step}, last {last:.3g} at step {last_step}") in out
    code, out, _ = run(["show", store, "--json"])
    import json
    row = json.loads(out)["runs"][0]
    assert row["stability_peak"] == pytest.approx(peak) and row["stability_peak_step"] == \
        peak_step
    groups = load_checkpoint(result.final_checkpoint).optimizer_state["param_groups"]
    assert groups[0]["param_names"] == [n for n, _ in
                                        load_checkpoint(result.final_checkpoint)
                                        .model.named_parameters()]


def test_peak_stability_reads_older_stores():
    """A Nesterov store written with the heavy-ball threshold is read with the right one
    (recomputed from lambda_max and the step's lr); a store without the lr column falls
    back to its stored ratio; Adam runs have none."""
    cfg = {"base": "sgd", "momentum": 0.9, "nesterov": True}
    arrays = {"sharpness/step": np.array([0, 10, 20]),
              "sharpness/lambda_max": np.array([5.0, 30.0, 40.0]),
              "sharpness/lr": np.array([0.1, 0.05, 1e-4]),
              "sharpness/stability": np.array([5 / 38, 30 / 76, 40 / 38000])}
    got = peak_stability(cfg, arrays)
    expected = arrays["sharpness/lambda_max"] * arrays["sharpness/lr"] * 2.8 / 3.8
    assert got["peak"] == pytest.approx(expected[1]) and got["peak_step"] == 10
    assert got["last"] == pytest.approx(expected[2]) and got["last_step"] == 20
    old = {k: v for k, v in arrays.items() if k != "sharpness/lr"}
    got = peak_stability({"momentum": 0.9}, old)
    assert got["peak"] == pytest.approx(30 / 76) and got["peak_step"] == 10
    assert peak_stability({"base": "adam"}, arrays)["peak"] is None
    assert peak_stability(cfg, {})["peak"] is None
