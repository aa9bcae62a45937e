"""HessianOperator against Hessians written in closed form (no autograd in the truth),
and the operator as a snapshot that never writes into the model."""

import pytest
import torch
from torch import nn

from hessdiag.curvature import HessianOperator

F64 = torch.float64
MODES = ("forward-over-reverse", "double-backward", "retained-graph")


def _products(op, n):
    return torch.stack([op.matvec(e) for e in torch.eye(n, dtype=F64)], dim=1)


@pytest.mark.parametrize("mode", MODES)
def test_linear_regression_with_mse_is_the_closed_form(mode):
    """loss = mean over N samples and D outputs of (W x + b - y)^2: the Hessian with
    respect to (W row-major, b) is (2 / (N D)) I_D kron [X 1]^T [X 1], with W's and b's
    entries interleaved as nn.Linear orders them (W first, then b)."""
    gen = torch.Generator().manual_seed(0)
    N, F, D = 12, 3, 2
    x, y = torch.randn(N, F, generator=gen, dtype=F64), torch.randn(N, D, generator=gen,
                                                                     dtype=F64)
    model = nn.Linear(F, D).double()
    op = HessianOperator(model, lambda out, t: ((out - t) ** 2).mean(), (x, y), mode=mode)
    H = _products(op, D * F + D)
    gram = x.T @ x                      # (F, F)
    ones = x.sum(0)                     # (F,)
    c = 2.0 / (N * D)
    truth = torch.zeros(D * F + D, D * F + D, dtype=F64)
    for d in range(D):
        w = slice(d * F, (d + 1) * F)
        b = D * F + d
        truth[w, w] = c * gram
        truth[w, b] = truth[b, w] = c * ones
        truth[b, b] = c * N
    torch.testing.assert_close(H, truth, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_softmax_regression_with_cross_entropy_is_the_closed_form(mode):
    """Multinomial logistic regression: H = (1/N) sum_i (diag(p_i) - p_i p_i^T) kron
    z_i z_i^T for the augmented input z_i = [x_i; 1], in (W row-major, b) order."""
    gen = torch.Generator().manual_seed(1)
    N, F, C = 10, 3, 4
    x = torch.randn(N, F, generator=gen, dtype=F64)
    y = torch.randint(0, C, (N,), generator=gen)
    model = nn.Linear(F, C).double()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode=mode)
    H = _products(op, C * F + C)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    z = torch.cat([x, torch.ones(N, 1, dtype=F64)], dim=1)
    blocks = sum(torch.kron(torch.diag(p[i]) - torch.outer(p[i], p[i]),
                            torch.outer(z[i], z[i])) for i in range(N)) / N
    # kron orders (class, input) with the bias as input F; nn.Linear: all of W, then b
    order = [c * (F + 1) + f for c in range(C) for f in range(F)] + \
        [c * (F + 1) + F for c in range(C)]
    truth = blocks[order][:, order]
    torch.testing.assert_close(H, truth, rtol=0, atol=1e-10)


def test_train_mode_products_leave_the_model_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for mode in MODES:
        op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), train_mode=True, mode=mode)
        for _ in range(3):
            op.matvec(torch.randn(op.dim))
    after = model.state_dict()
    assert int(after["1.num_batches_tracked"]) == 0
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_operator_is_a_snapshot_of_the_weights_it_was_made_at():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode="double-backward")
    v = torch.randn(op.dim)
    first = op.matvec(v)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # in place, same dtype and device
    torch.testing.assert_close(op.matvec(v), first, rtol=0, atol=0)
    fresh = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), mode="double-backward")
    assert not torch.allclose(fresh.matvec(v), first)


def test_auto_mode_falls_back_when_forward_over_reverse_fails_on_a_loss():
    """nn.MSELoss has no working forward-over-reverse formula in torch 2.14: auto mode
    uses a reverse-over-reverse mode, exactly; asking for forward-over-reverse says so."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=gen, dtype=F64), torch.randn(12, 2, generator=gen,
                                                                      dtype=F64)
    model = nn.Linear(3, 2).double()
    auto = HessianOperator(model, nn.MSELoss(), (x, y))
    written = HessianOperator(model, lambda out, t: ((out - t) ** 2).mean(), (x, y),
                              mode="double-backward")
    torch.testing.assert_close(_products(auto, 8), _products(written, 8), rtol=0, atol=1e-12)
    assert auto.mode != "forward-over-reverse"
    forced = HessianOperator(model, nn.MSELoss(), (x, y), mode="forward-over-reverse")
    with pytest.raises(ValueError, match="use mode='double-backward'"):
        forced.matvec(torch.ones(8, dtype=F64))
