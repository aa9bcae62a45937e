"""SAM, ASAM and Eigen-SAM against independent truths: hand-computed perturbations, the
plain base optimizers (rho = 0), a quadratic loss with a known Hessian, and exact resume."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from hessdiag.optim import (
    SAM,
    EigenSAM,
    disable_running_stats,
    enable_running_stats,
    make_base_optimizer,
)

F64 = torch.float64


def _mlp(dtype=F64, seed=0, width=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3)).to(dtype)


def _batches(n=6, dtype=F64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen, dtype=dtype), torch.randint(0, 3, (8,),
                                                                           generator=gen))
            for _ in range(n)]


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _sam_step(model, opt, loss_fn, x, y, eigen=False):
    """The documented training-loop protocol, one step."""
    if eigen:
        opt.maybe_update_eigenvector(model, loss_fn, x, y)
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    disable_running_stats(model)
    loss_fn(model(x), y).backward()
    enable_running_stats(model)
    opt.second_step(zero_grad=True)


class Quadratic(nn.Module):
    """``L(w) = 0.5 w^T A w - c^T w`` with ``w = (a, b)`` split over two parameters, so
    that the Hessian is ``A`` exactly (in the model's parameter order a, b)."""

    def __init__(self, A, c, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(3, generator=gen, dtype=F64))
        self.b = nn.Parameter(torch.randn(2, 2, generator=gen, dtype=F64))
        self.register_buffer("A", A)
        self.register_buffer("c", c)

    def forward(self, x):
        w = torch.cat([self.a, self.b.reshape(-1)])
        return 0.5 * w @ self.A @ w - self.c @ w + 0.0 * x.sum()


def _quadratic_problem(eigenvalues=(10.0, 3.0, 2.0, 1.0, 0.5, -1.0, -2.0), seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(7, 7, generator=gen, dtype=F64))
    A = Q @ torch.diag(torch.tensor(eigenvalues, dtype=F64)) @ Q.T
    A = 0.5 * (A + A.T)
    model = Quadratic(A, torch.randn(7, generator=gen, dtype=F64))
    x, y = torch.zeros(1, 1, dtype=F64), torch.zeros(1, dtype=F64)
    return model, A, (lambda out, target: out), x, y


def _to_optimizer_order(w_model):
    """The quadratic's optimizers below hold [b, a]: reorder a model-order vector."""
    return torch.cat([w_model[3:], w_model[:3]])


# ---------------------------------------------------------------------------- SAM


def test_sam_perturbation_is_rho_along_the_gradient():
    # wide enough (and rho large enough) that w + e - e != w somewhere in floating point
    model, (x, y) = _mlp(width=64), _batches(1)[0]
    rho = 1.7
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.0)
    nn.functional.cross_entropy(model(x), y).backward()
    g = _flat(p.grad for p in model.parameters())
    w0 = _flat(model.parameters())
    opt.first_step()
    e = _flat(model.parameters()) - w0
    cos = float(e @ g / (e.norm() * g.norm()))
    assert cos == pytest.approx(1.0, abs=1e-12)
    assert float(e.norm()) == pytest.approx(rho, abs=1e-6)
    assert torch.allclose(opt.perturbation_vector(), e, atol=1e-15)
    assert opt.last_grad_norm == pytest.approx(float(g.norm()), rel=1e-12)
    applied = opt.perturbation_vector()
    assert not torch.equal(w0 + applied - applied, w0)  # so restoring by subtraction fails
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step()  # lr 0: w must come back exactly
    assert torch.equal(_flat(model.parameters()), w0)


def test_asam_perturbation_matches_hand_computation():
    model, (x, y) = _mlp(), _batches(1)[0]
    rho = 0.5
    opt = SAM(model.parameters(), "sgd", rho=rho, adaptive=True, lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    g = [p.grad.clone() for p in model.parameters()]
    # e = rho T^2 g / ||T g||, T = |w| elementwise
    tg_norm = torch.sqrt(sum(((w.abs() * gi) ** 2).sum() for w, gi in zip(w0, g, strict=True)))
    expected = [rho * w**2 * gi / tg_norm for w, gi in zip(w0, g, strict=True)]
    opt.first_step()
    for p, w, e in zip(model.parameters(), w0, expected, strict=True):
        assert torch.allclose(p.detach() - w, e, rtol=1e-9, atol=1e-15)
    assert opt.last_grad_norm == pytest.approx(float(tg_norm), rel=1e-12)


@pytest.mark.parametrize("base, kwargs", [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    (torch.optim.Adam, dict(lr=0.01, weight_decay=1e-4)),
])
def test_rho_zero_reproduces_base_optimizer_bit_for_bit(base, kwargs):
    ref_model = _mlp(torch.float32)
    sam_model = copy.deepcopy(ref_model)
    ref = base(ref_model.parameters(), **kwargs)
    sam = SAM(sam_model.parameters(), base, rho=0.0, **kwargs)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in _batches(5, torch.float32):
        ref.zero_grad()
        loss_fn(ref_model(x), y).backward()
        ref.step()
        _sam_step(sam_model, sam, loss_fn, x, y)
        for p, q in zip(ref_model.parameters(), sam_model.parameters(), strict=True):
            assert torch.equal(p, q)


def test_step_with_closure_equals_explicit_steps():
    loss_fn = nn.CrossEntropyLoss()
    m1 = _mlp()
    m2 = copy.deepcopy(m1)
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    for x, y in _batches(3):
        _sam_step(m1, o1, loss_fn, x, y)
        loss_fn(m2(x), y).backward()

        def closure(x=x, y=y):
            loss = loss_fn(m2(x), y)
            loss.backward()
            return loss

        with torch.no_grad():  # the closure must still get gradients
            o2.step(closure)
        o2.zero_grad()
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_scheduler_on_sam_reaches_the_base_optimizer():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _batches(1)[0]
    _sam_step(model, opt, nn.CrossEntropyLoss(), x, y)
    with warnings.catch_warnings():
        # no "lr_scheduler.step() before optimizer.step()": second_step is the step
        warnings.simplefilter("error")
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5
    assert opt.param_groups is opt.base_optimizer.param_groups


def _resume_matches(make_opt, eigen, model_factory=_mlp):
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(6)
    model = model_factory()
    opt = make_opt(model)
    for x, y in batches[:3]:
        _sam_step(model, opt, loss_fn, x, y, eigen)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what a checkpoint reader accepts
    resumed_model = model_factory(seed=123)  # different weights until loaded
    resumed_model.load_state_dict(saved["model"])
    resumed = make_opt(resumed_model)
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    for x, y in batches[3:]:
        _sam_step(model, opt, loss_fn, x, y, eigen)
        _sam_step(resumed_model, resumed, loss_fn, x, y, eigen)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    return opt, resumed


def test_sam_resume_is_bit_identical():
    opt, resumed = _resume_matches(
        lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9,
                      weight_decay=5e-4), eigen=False)
    assert resumed.base_optimizer.state  # momentum buffers were restored and used


def test_eigensam_resume_is_bit_identical():
    # eig_every=2 over steps 0..5: refreshes at 0, 2 before the save and at 4 after it
    opt, resumed = _resume_matches(
        lambda m: EigenSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.2, eig_every=2,
                           eig_iters=3, lr=0.1, momentum=0.9), eigen=True)
    assert opt.eig_updates == resumed.eig_updates == 3
    assert opt.global_step == resumed.global_step == 6
    assert torch.equal(opt.eigenvector, resumed.eigenvector)
    assert opt.eig_hvps == resumed.eig_hvps
    # "auto" timed the product modes at the first refresh only, and the choice was saved
    assert opt.hvp_mode in ("forward-over-reverse", "retained-graph")
    assert resumed.hvp_mode == opt.hvp_mode
    assert opt.last_signed_alignment == resumed.last_signed_alignment


def test_batchnorm_running_stats_follow_the_first_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model.add_module("bn_cumulative", nn.BatchNorm1d(3, momentum=None))
    reference = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)
    x, y = _batches(1, torch.float32)[0]
    loss_fn = nn.CrossEntropyLoss()
    _sam_step(model, opt, loss_fn, x, y)
    reference(x)  # one forward at the same (unchanged: lr 0) weights
    for name in ("1", "bn_cumulative"):
        bn, ref = getattr(model, name), getattr(reference, name)
        assert torch.equal(bn.running_mean, ref.running_mean)
        assert torch.equal(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    assert model[1].momentum == 0.1 and model.bn_cumulative.momentum is None
    # and they are live again afterwards
    before = model[1].running_mean.clone()
    model(x * 2 + 1)
    assert not torch.equal(before, model[1].running_mean)


# ---------------------------------------------------------------------------- Eigen-SAM


def _eigensam(model, **kwargs):
    defaults = dict(rho=0.05, alpha=0.2, eig_every=1, eig_iters=5, lr=0.01,
                    hvp_mode="double-backward")
    defaults.update(kwargs)
    base = defaults.pop("base", torch.optim.SGD)
    # the optimizer holds the parameters in the reverse of the model's order
    return EigenSAM([model.b, model.a], base, **defaults)


def _expected_eigensam_e(g, v, rho, alpha, renormalize=False):
    s = torch.sign(g @ v)
    g_hat = g / (g.norm() + 1e-12)
    v_perp = v - (g_hat @ v) * g_hat
    d = g_hat + alpha * s * v_perp
    return rho * d / d.norm() if renormalize else rho * d


def _quadratic_grad_in_optimizer_order(model):
    model.zero_grad()
    model(torch.zeros(1, 1, dtype=F64)).backward()
    return torch.cat([model.b.grad.reshape(-1), model.a.grad])


def test_eigensam_finds_the_top_eigenvector_and_perturbs_by_the_formula():
    model, A, loss_fn, x, y = _quadratic_problem()
    evals, evecs = torch.linalg.eigh(A)
    top = _to_optimizer_order(evecs[:, -1])
    opt = _eigensam(model)
    for _ in range(6):
        _sam_step(model, opt, loss_fn, x, y, eigen=True)
    assert opt.eig_updates == 6
    assert opt.eig_hvps == 6 * 5
    v = opt.eigenvector
    assert abs(float(v @ top)) > 1 - 1e-6
    assert opt.eigenvalue == pytest.approx(float(evals[-1]), rel=1e-8)
    assert opt.eigen_residual < 1e-6

    # the perturbation of the next step, against the formula with the true eigenvector
    rng = torch.get_rng_state()
    opt.maybe_update_eigenvector(model, loss_fn, x, y)
    assert torch.equal(rng, torch.get_rng_state())  # the training's random stream is intact
    g = _quadratic_grad_in_optimizer_order(model)
    w0 = _flat([model.b, model.a])
    opt.first_step()
    e = _flat([model.b, model.a]) - w0
    expected = _expected_eigensam_e(g, top, rho=0.05, alpha=0.2)
    assert torch.allclose(e, expected, rtol=0, atol=1e-10)
    assert float(e.norm()) > 0.05  # not renormalised: slightly longer than rho
    assert torch.allclose(opt.perturbation_vector(), e, atol=1e-15)
    signed = float(e @ opt.eigenvector / e.norm())
    assert opt.last_signed_alignment == pytest.approx(signed, abs=1e-12)
    assert opt.last_alignment == pytest.approx(abs(signed), abs=1e-12)
    # and SAM's alignment with the same gradient is lower: the point of the method
    assert abs(float(g @ top / g.norm())) < opt.last_alignment


def test_eigensam_renormalize_and_before_the_first_estimate():
    model, A, loss_fn, x, y = _quadratic_problem()
    twin = copy.deepcopy(model)
    opt = _eigensam(model, renormalize=True, rho=0.3, alpha=0.5)
    sam = SAM([twin.b, twin.a], torch.optim.SGD, rho=0.3, lr=0.01)

    # no estimate yet: exactly SAM's rho g / ||g||
    _quadratic_grad_in_optimizer_order(model)
    _quadratic_grad_in_optimizer_order(twin)
    opt.first_step()
    sam.first_step()
    assert torch.equal(opt.perturbation_vector(), sam.perturbation_vector())
    assert opt.eigenvector is None and opt.last_alignment is None
    opt.second_step(zero_grad=True)

    opt.maybe_update_eigenvector(model, loss_fn, x, y)
    g = _quadratic_grad_in_optimizer_order(model)
    w0 = _flat([model.b, model.a])
    opt.first_step()
    e = _flat([model.b, model.a]) - w0
    assert float(e.norm()) == pytest.approx(0.3, abs=1e-12)
    expected = _expected_eigensam_e(g, opt.eigenvector, 0.3, 0.5, renormalize=True)
    assert torch.allclose(e, expected, rtol=0, atol=1e-10)


def test_eigensam_top_means_largest_algebraic_even_when_a_negative_one_dominates():
    # |-8| > 5: plain power iteration would settle on -8; warm starts must not be lost
    model, A, loss_fn, x, y = _quadratic_problem((5.0, 3.0, 2.0, 1.0, 0.5, -1.0, -8.0))
    top = _to_optimizer_order(torch.linalg.eigh(A)[1][:, -1])
    opt = _eigensam(model)
    for _ in range(12):
        _sam_step(model, opt, loss_fn, x, y, eigen=True)
    assert abs(float(opt.eigenvector @ top)) > 1 - 1e-8
    assert opt.eigenvalue == pytest.approx(5.0, rel=1e-6)


def test_global_step_counter_schedules_refreshes_and_survives_state_dict():
    model, _, loss_fn, x, y = _quadratic_problem()
    opt = _eigensam(model, eig_every=3, eig_iters=2)
    refreshed = []
    for step in range(8):
        if opt.maybe_update_eigenvector(model, loss_fn, x, y):
            refreshed.append(step)
        assert not opt.maybe_update_eigenvector(model, loss_fn, x, y)  # once per step
        _sam_step(model, opt, loss_fn, x, y)
    assert refreshed == [0, 3, 6]
    assert opt.eig_updates == 3 and opt.global_step == 8

    state = opt.state_dict()
    fresh = _eigensam(model, eig_every=3, eig_iters=2)
    fresh.load_state_dict(state)
    assert fresh.global_step == 8 and fresh.eig_updates == 3
    assert torch.equal(fresh.eigenvector, opt.eigenvector)
    later = []
    for step in range(8, 10):
        if fresh.maybe_update_eigenvector(model, loss_fn, x, y):
            later.append(step)
        _sam_step(model, fresh, loss_fn, x, y)
    assert later == [9]


def test_eigensam_refuses_foreign_parameters_and_misuse():
    model, _, loss_fn, x, y = _quadratic_problem()
    other, *_ = _quadratic_problem(seed=1)
    opt = _eigensam(model)
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.maybe_update_eigenvector(other, loss_fn, x, y)
    _quadratic_grad_in_optimizer_order(model)
    opt.first_step()
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.update_eigenvector(model, loss_fn, x, y)
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()


# ---------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("make, message", [
    (lambda ps: SAM(ps, torch.optim.SGD, rho=-0.1, lr=0.1), "rho must be a finite number >= 0"),
    (lambda ps: SAM([{"params": ps, "rho": -1.0}], "sgd", lr=0.1),
     "rho of parameter group 0 must be a finite number >= 0"),
    (lambda ps: SAM(ps, torch.optim.SGD(ps, lr=0.1), lr=0.1), "not an instance"),
    (lambda ps: EigenSAM(ps, "sgd", alpha=-1.0, lr=0.1), "alpha must be a finite number >= 0"),
    (lambda ps: EigenSAM(ps, "sgd", eig_every=0, lr=0.1), "eig_every must be an integer >= 1"),
    (lambda ps: EigenSAM(ps, "sgd", eig_iters=0, lr=0.1), "eig_iters must be an integer >= 1"),
    (lambda ps: EigenSAM(ps, "sgd", adaptive=True, lr=0.1), "does not support adaptive"),
    (lambda ps: EigenSAM(ps, "sgd", hvp_mode="fast", lr=0.1), "hvp_mode must be one of"),
    (lambda ps: SAM(ps, "rmsprop", lr=0.1), "unknown base optimizer 'rmsprop'"),
])
def test_bad_arguments_raise_clear_value_errors(make, message):
    params = list(_mlp().parameters())
    with pytest.raises(ValueError, match=message):
        make(params)


def test_make_base_optimizer():
    assert make_base_optimizer("sgd") is torch.optim.SGD
    assert make_base_optimizer("Adam") is torch.optim.Adam
    assert make_base_optimizer("adamw") is torch.optim.AdamW
    with pytest.raises(ValueError, match="choose one of sgd, adam, adamw"):
        make_base_optimizer("lbfgs")
