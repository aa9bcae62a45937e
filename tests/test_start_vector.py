"""The loss gradient of HessianOperator, and the gradient start of the top eigenvalues."""

import numpy as np
import pytest
import torch
from conftest import dense_hessian
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hessdiag.curvature import GGNOperator, HessianOperator
from hessdiag.curvature.preconditioned import PreconditionedOperator
from hessdiag.settings import SpectrumSettings
from hessdiag.spectrum import compute_spectrum, top_start

F64 = torch.float64


def _problem(seed=0, n=40):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(n, 5, dtype=F64), torch.randint(0, 3, (n,))
    return model, x, y


def _true_gradient(model, loss_fn, x, y):
    """The gradient of the per-sample mean loss over all of (x, y), by autograd."""
    model.zero_grad()
    loss = loss_fn(model(x), y)
    if getattr(loss_fn, "reduction", "mean") == "sum":
        loss = loss / len(y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("mode", ["auto", "retained-graph", "double-backward",
                                  "forward-over-reverse"])
@pytest.mark.parametrize("layout", ["one batch", "uneven batches", "dataloader", "sum loss"])
def test_gradient_is_the_mean_loss_gradient(mode, layout):
    model, x, y = _problem()
    loss_fn = nn.CrossEntropyLoss(reduction="sum" if layout == "sum loss" else "mean")
    if layout in ("one batch", "sum loss"):
        data = (x, y)
    elif layout == "uneven batches":
        data = [(x[:7], y[:7]), (x[7:30], y[7:30]), (x[30:], y[30:])]
    else:
        data = DataLoader(TensorDataset(x, y), batch_size=16)
    if mode == "retained-graph" and layout == "dataloader":
        pytest.skip("retained-graph needs data in memory")
    op = HessianOperator(model, loss_fn, data, mode=mode)
    got = op.gradient()
    want = _true_gradient(model, loss_fn, x, y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert op.hvp_count == 0  # the gradient is not a product
    # after it the products are still exact (the graphs built for the gradient are reused)
    v = torch.randn(op.dim, dtype=F64, generator=torch.Generator().manual_seed(1))
    H = dense_hessian(model, loss_fn, data if isinstance(data, list) else
                      [(x, y)] if not isinstance(data, tuple) else [data])
    if layout == "sum loss":
        H = H / len(y)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)


def test_auto_keeps_the_graphs_when_asked_for_the_gradient_first():
    model, x, y = _problem()
    op = HessianOperator(model, nn.CrossEntropyLoss(), [(x[:20], y[:20]), (x[20:], y[20:])])
    op.gradient()
    assert op.mode == "retained-graph" and op.memory_estimate > 0
    small = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), memory_budget=1)
    small.gradient()  # over budget: no graphs kept, the gradient by a pass
    assert small.mode is None and small._retained is None
    small.matvec(torch.ones(small.dim, dtype=F64))
    assert small.mode in ("double-backward", "forward-over-reverse")


def test_gauss_newton_operator_gradient_is_the_loss_gradient():
    model, x, y = _problem()
    op = GGNOperator(model, nn.CrossEntropyLoss(), (x, y))
    torch.testing.assert_close(op.gradient(), _true_gradient(model, nn.CrossEntropyLoss(), x, y),
                               rtol=1e-12, atol=1e-14)


def test_gradient_start_finds_the_dense_top_eigenvalue_with_its_start_recorded():
    model, x, y = _problem(seed=3)
    loss_fn = nn.CrossEntropyLoss()
    H = dense_hessian(model, loss_fn, [(x, y)])
    top = float(torch.linalg.eigvalsh(H)[-1])
    for method in ("lanczos", "power"):
        result = compute_spectrum(model, loss_fn, (x, y),
                                  SpectrumSettings(top_k=1, method=method, dtype="float64",
                                                   tol=1e-8, start="gradient"))
        assert result.settings["started_from"] == "gradient"
        np.testing.assert_allclose(result.top.eigenvalues[0], top, rtol=1e-7)
        assert result.top.settings.get("v0", True)
    result = compute_spectrum(model, loss_fn, (x, y), SpectrumSettings(top_k=2, dtype="float64"))
    assert result.settings["started_from"] == "random"  # auto: random
    result = compute_spectrum(model, loss_fn, (x, y), SpectrumSettings(top_k=1, dtype="float64"))
    assert result.settings["started_from"] == "random"


def test_the_gradient_start_is_the_normalised_gradient_plus_a_unit_gaussian():
    model, x, y = _problem()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    g = _true_gradient(model, nn.CrossEntropyLoss(), x, y)
    v0, how = top_start(op, "gradient", 5, seed=0)
    assert how == "gradient"
    z = v0 - g / g.norm()
    np.testing.assert_allclose(float(z.norm()), 1.0, rtol=1e-12)
    assert abs(float(z @ g / g.norm())) < 0.9  # random, not the gradient again
    again, _ = top_start(op, "gradient", 5, seed=0)
    torch.testing.assert_close(v0, again)  # seeded
    other, _ = top_start(op, "gradient", 5, seed=1)
    assert not torch.allclose(v0, other)
    assert top_start(op, "random", 1, seed=0) == (None, "random")
    assert top_start(op, "auto", 3, seed=0) == (None, "random")


def test_preconditioned_gradient_and_a_zero_gradient():
    model, x, y = _problem()
    op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y))
    d = torch.rand(op.dim, dtype=F64, generator=torch.Generator().manual_seed(2)) + 0.5
    pre = PreconditionedOperator(op, d)
    # D^-1/2 H D^-1/2 is the Hessian in y = D^1/2 x, whose gradient is D^-1/2 g
    torch.testing.assert_close(pre.gradient(),
                               _true_gradient(model, nn.CrossEntropyLoss(), x, y) / d.sqrt())
    v0, how = top_start(pre, "gradient", 1, seed=0)
    assert how == "gradient" and v0 is not None
    v0, how = top_start(object(), "gradient", 1, seed=0)
    assert v0 is None and how.startswith("random (")
    # at a stationary point of the loss: a linear model fitting its targets exactly
    lin = nn.Linear(3, 1, bias=False).double()
    xs = torch.randn(10, 3, dtype=F64)
    ys = lin(xs).detach()
    flat = HessianOperator(lin, nn.MSELoss(), (xs, ys))
    v0, how = top_start(flat, "gradient", 1, seed=0)
    assert v0 is None and "zero" in how
    assert top_start(flat, "auto", 1, seed=0) == (None, "random")
