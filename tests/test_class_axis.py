"""The class axis of a class-index likelihood in the Gauss-Newton and Fisher operators:
torch's nn.CrossEntropyLoss / nn.NLLLoss take classes on dimension 1 for (B, C, d1, ...)
outputs, with or without an explicit ``likelihood=``; a square (B, C, C) output is the case
where taking the wrong axis goes unnoticed. Truths are dense float64 matrices built here:
J by torch.autograd.functional.jacobian, the loss's output Hessian by
torch.autograd.functional.hessian of torch's own loss, per-term gradients by jacobian of the
unreduced loss."""

import pytest
import torch
from torch import nn

from hessdiag.curvature import FisherOperator, GGNOperator
from hessdiag.losses import resolve_loss

F64 = torch.float64
C = 4


class Square(nn.Module):
    """(B, 3) -> (B, C, C): logits with classes on dimension 1, C positions on the last."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, C * C))

    def forward(self, x):
        return self.body(x).view(-1, C, C)


def _setup(seed=0, sizes=(6, 5)):
    torch.manual_seed(seed)
    model = Square().to(F64)
    batches = [(torch.randn(n, 3, dtype=F64), torch.randint(0, C, (n, C))) for n in sizes]
    return model, batches


def _jacobian(model, x):
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    shapes, sizes = [params[n].shape for n in names], [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(flat):
        chunks = torch.split(flat, sizes)
        state = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return torch.func.functional_call(model, state, (x,))

    out = f(flat0).detach()
    return out, torch.autograd.functional.jacobian(f, flat0).reshape(out.numel(), -1)


def _torch_loss(kind):
    return nn.functional.cross_entropy if kind == "cross-entropy" else nn.functional.nll_loss


def dense_ggn(model, batches, kind):
    """sum_b (m_b / M) J_b^T H_b J_b, H_b the Hessian of torch's mean loss w.r.t. the
    outputs (torch's semantics: classes on dimension 1)."""
    fn, total, M = _torch_loss(kind), 0, sum(int(y.numel()) for _, y in batches)
    for x, y in batches:
        out, J = _jacobian(model, x)
        if kind == "cross-entropy":
            H = torch.autograd.functional.hessian(
                lambda o, y=y, shape=out.shape: fn(o.view(shape), y), out.reshape(-1))
        else:  # nll is linear in its inputs: the Fisher of the categorical, diag(softmax) / m
            p = torch.softmax(out, dim=1)  # softmax over the classes, dimension 1
            H = torch.diag(p.reshape(-1)) / y.numel()
        total = total + (y.numel() / M) * (J.T @ H @ J)
    return total


def dense_empirical_fisher(model, batches, kind):
    """sum_b (m_b / M) (1 / m_b) sum_i J^T g_i g_i^T J, g_i the gradient of term i's loss
    (torch's unreduced loss) w.r.t. the outputs."""
    fn, total, M = _torch_loss(kind), 0, sum(int(y.numel()) for _, y in batches)
    for x, y in batches:
        out, J = _jacobian(model, x)
        G = torch.autograd.functional.jacobian(
            lambda o, y=y, shape=out.shape: fn(o.view(shape), y, reduction="none").reshape(-1),
            out.reshape(-1))                                   # (terms, outputs)
        total = total + (1.0 / M) * (J.T @ (G.T @ G) @ J)
    return total


def _dense(op):
    eye = torch.eye(op.dim, dtype=F64)
    return torch.stack([op.matvec(eye[i]) for i in range(op.dim)], dim=1)


@pytest.mark.parametrize("kind", ["cross-entropy", "nll"])
@pytest.mark.parametrize("explicit", [False, True])
def test_square_outputs_ggn_follows_torchs_class_axis(kind, explicit):
    model, batches = _setup()
    loss = nn.CrossEntropyLoss() if kind == "cross-entropy" else nn.NLLLoss()
    op = GGNOperator(model, loss, batches, dtype=F64, mode="double-vjp",
                     likelihood=kind if explicit else None)
    want = dense_ggn(model, batches, kind)
    got = _dense(op)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), float((got - want).abs().max())
    # the last axis would be a different matrix: the test can tell
    assert (want - dense_ggn_last(model, batches, kind)).abs().max() > 1e-3


def dense_ggn_last(model, batches, kind):
    """The same with the classes on the last axis (the wrong axis for torch's loss)."""
    moved = [(x, y) for x, y in batches]

    class Moved(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model.body

        def forward(self, x):
            return model(x).movedim(-1, 1)

    return dense_ggn(Moved(), moved, kind)


@pytest.mark.parametrize("kind", ["cross-entropy", "nll"])
def test_square_outputs_empirical_fisher_with_explicit_likelihood(kind):
    model, batches = _setup(1)
    loss = nn.CrossEntropyLoss() if kind == "cross-entropy" else nn.NLLLoss()
    op = FisherOperator(model, loss, batches, dtype=F64, mode="double-vjp", kind="empirical",
                        likelihood=kind)
    want = dense_empirical_fisher(model, batches, kind)
    assert torch.allclose(_dense(op), want, rtol=1e-9, atol=1e-12)


def test_square_outputs_mc_fisher_with_explicit_likelihood_averages_to_the_ggn():
    model, batches = _setup(2, sizes=(4,))
    op = FisherOperator(model, nn.CrossEntropyLoss(), batches, dtype=F64, mode="double-vjp",
                        kind="mc", mc_samples=1000, likelihood="cross-entropy", seed=3)
    want = dense_ggn(model, batches, "cross-entropy")
    err = (_dense(op) - want).norm() / want.norm()
    # 1,000 draws: err 0.033 at this seed (0.030-0.035 at seeds 3-5; 0.016 with 4,000
    # draws, at a quarter of the speed), a third of the bound
    assert err < 0.1, float(err)


def test_a_plain_callable_is_resolved_by_its_value_on_square_outputs():
    model, batches = _setup(3)
    want = dense_ggn(model, batches, "cross-entropy")
    op = GGNOperator(model, lambda f, y: nn.functional.cross_entropy(f, y), batches,
                     dtype=F64, mode="double-vjp", likelihood="cross-entropy")
    assert torch.allclose(_dense(op), want, rtol=1e-9, atol=1e-12)
    assert op._class_dim == 1


def test_a_callable_whose_value_cannot_tell_the_axis_is_refused():
    model, batches = _setup(4)
    with torch.no_grad():  # constant logits: every axis gives log C
        for p in model.parameters():
            p.zero_()
    op = GGNOperator(model, lambda f, y: nn.functional.cross_entropy(f, y), batches,
                     dtype=F64, mode="double-vjp", likelihood="cross-entropy")
    with pytest.raises(ValueError, match="cannot tell the class axis"):
        op.matvec(torch.ones(op.dim, dtype=F64))


def test_hessdiags_own_loss_keeps_classes_last():
    """hessdiag's cross-entropy is per token: (B, L, C) with targets (B, L)."""
    model, batches = _setup(5)
    op = GGNOperator(model, resolve_loss("cross-entropy"), batches, dtype=F64,
                     mode="double-vjp", likelihood="cross-entropy")
    want = dense_ggn_last(model, batches, "cross-entropy")
    assert torch.allclose(_dense(op), want, rtol=1e-9, atol=1e-12)
