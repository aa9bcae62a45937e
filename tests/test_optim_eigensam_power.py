"""Eigen-SAM's refresh: eig_iters products are eig_iters power steps, exactly the
normalised H^k v0 of the official code (checked against a dense float64 Hessian)."""

import pytest
import torch
from conftest import dense_hessian
from torch import nn

from hessdiag.optim import EigenSAM


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return model, x, y


@pytest.mark.parametrize("k", [1, 2, 5])
def test_k_products_give_the_normalised_k_th_power(k):
    model, x, y = _problem()
    loss_fn = nn.CrossEntropyLoss()
    H = dense_hessian(model, loss_fn, [(x, y)])
    opt = EigenSAM(model.parameters(), "sgd", lr=0.1, eig_iters=k, eig_shift=0.0,
                   hvp_mode="double-backward")  # no timing products
    v0 = torch.randn(H.shape[0], dtype=torch.float64,
                     generator=torch.Generator().manual_seed(1))
    opt.eigenvector = v0 / v0.norm()
    opt.update_eigenvector(model, loss_fn, x, y)
    expected = torch.linalg.matrix_power(H, k) @ v0
    expected = expected / expected.norm()
    torch.testing.assert_close(opt.eigenvector, expected, rtol=0, atol=1e-10)
    assert opt.eig_hvps == k
    # the reported eigenvalue is the Rayleigh quotient of the iterate before the last step
    before = torch.linalg.matrix_power(H, k - 1) @ v0
    before = before / before.norm()
    assert opt.eigenvalue == pytest.approx(float(before @ H @ before), rel=1e-10)


def test_one_power_step_moves_the_vector():
    model, x, y = _problem()
    loss_fn = nn.CrossEntropyLoss()
    opt = EigenSAM(model.parameters(), "sgd", lr=0.1, eig_iters=1)
    opt.update_eigenvector(model, loss_fn, x, y)
    first = opt.eigenvector.clone()
    for _ in range(3):
        opt.update_eigenvector(model, loss_fn, x, y)
    assert abs(float(first @ opt.eigenvector)) < 1 - 1e-6


def test_auto_shift_reaches_the_top_when_a_negative_eigenvalue_dominates():
    """A Hessian whose most negative eigenvalue is largest in magnitude: the shift moves
    below it and later refreshes converge to the algebraic top, from the warm start."""

    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return self.w

    A = torch.diag(torch.tensor([2.0, 0.5, -6.0], dtype=torch.float64))
    model = Quadratic()
    opt = EigenSAM(model.parameters(), "sgd", lr=0.1, eig_iters=5)
    for _ in range(12):
        opt.update_eigenvector(model, lambda w, y: 0.5 * w @ A @ w, torch.zeros(1),
                               torch.zeros(1))
    assert opt.eigenvalue == pytest.approx(2.0, rel=1e-4)
    assert abs(float(opt.eigenvector[0])) == pytest.approx(1.0, abs=1e-4)
