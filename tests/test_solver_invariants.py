"""Invariants every Lanczos solve must keep, on the model zoo (a BatchNorm ResNet
included) and on the constructed cases where a start vector misleads it.

After every solve, a fresh Hessian-vector product of each returned vector u gives
- a Rayleigh quotient u^T H u / u^T u equal to the returned value within its residual
  bound (a Ritz value is the Rayleigh quotient of its Ritz vector);
- a true residual ||H u - theta u|| no larger than the reported one (the reported residual
  is a bound), and the returned value within that residual of an eigenvalue of the dense
  float64 Hessian;
and the returned vectors are orthonormal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import dense_hessian

from hessdiag.curvature import HessianOperator, MatrixOperator, lanczos
from hessdiag.spectrum import top_start

F64 = torch.float64


def _fresh_checks(op, result, truth_eigs, dtype):
    eps = torch.finfo(dtype).eps
    U = result.eigenvectors
    anorm = float(np.max(np.abs(truth_eigs)))
    # the operator itself is the float64 Hessian up to its own rounding (float32 products)
    op_error = 0.0 if dtype == F64 else 1e-5 * anorm
    for i, theta in enumerate(result.eigenvalues):
        u = U[:, i]
        hu = op.matvec(u.clone())
        uu = float(u.double() @ u.double())
        quotient = float(u.double() @ hu.double()) / uu
        true_res = float(torch.linalg.vector_norm((hu - float(theta) * u).double()))
        slack = 50 * eps * anorm + op_error
        assert abs(quotient - theta) <= result.residuals[i] + slack, (i, quotient, theta)
        assert true_res <= result.residuals[i] * (1 + 1e-3) + slack, (i, true_res,
                                                                       result.residuals[i])
        nearest = float(np.min(np.abs(truth_eigs - theta)))
        assert nearest <= result.residuals[i] + slack, (i, theta, nearest)
    gram = (U.double().T @ U.double()).numpy()
    assert np.max(np.abs(gram - np.eye(U.shape[1]))) <= (1e-10 if dtype == F64 else 2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_every_returned_pair_checks_out_on_a_fresh_product(zoo_case, dtype):
    name, model, loss_fn, batches = zoo_case
    truth = np.linalg.eigvalsh(dense_hessian(model, loss_fn, batches).numpy())
    op = HessianOperator(model, loss_fn, batches, dtype=dtype)
    tol = 1e-3 if dtype == torch.float32 else 1e-8
    top = lanczos(op, k=3, tol=tol, seed=0)
    bottom = lanczos(op, k=1, which="smallest", tol=tol, seed=1)
    for result in (top, bottom):
        assert result.converged.all(), (name, result.residuals)
        _fresh_checks(op, result, truth, dtype)
    # and they are the top three and the bottom one, not other eigenvalues
    np.testing.assert_allclose(top.eigenvalues, truth[::-1][:3],
                               atol=float(top.residuals.max()) * 2 + 1e-5 * abs(truth).max())
    assert abs(bottom.eigenvalues[0] - truth[0]) <= 2 * bottom.residuals[0] \
        + 1e-5 * abs(truth).max()


def _misleading_operator(dtype, n=1500, seed=0):
    """A spectrum with lambda_1 = 1.1 lambda_2, and a 'loss gradient' that lies along
    v_2 and the bulk but holds nothing of v_1 (the case where a gradient start converges
    to lambda_2 first)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    ev = torch.cat([torch.tensor([11.0, 10.0, 9.0]),
                    torch.rand(n - 3, generator=g, dtype=F64) * 6 - 1]).to(F64)
    A = (Q * ev) @ Q.T
    grad = 3.0 * Q[:, 1] + 0.1 * Q[:, 3:] @ torch.randn(n - 3, generator=g, dtype=F64)

    class WithGradient(MatrixOperator):
        def gradient(self):
            return grad.to(self.dtype)

    return WithGradient(A.to(dtype)), float(ev.max()), Q[:, 0]


@pytest.mark.parametrize("seed", range(4))
def test_a_gradient_start_never_returns_the_second_eigenvalue_as_converged(seed):
    op, lam1, v1 = _misleading_operator(torch.float32, seed=seed)
    v0, how = top_start(op, "gradient", 1, seed=seed)
    assert how == "gradient"
    result = lanczos(op, k=1, tol=1e-3, seed=seed, v0=v0)
    # the multiplicity check runs from a non-random start: lambda_1 is found
    assert result.converged[0]
    assert abs(result.eigenvalues[0] - lam1) <= 1e-3 * lam1, result.eigenvalues
    # even a start holding exactly nothing of v_1 (no random part) does not fool it
    pure = op.gradient() - (op.gradient() @ v1.float()) * v1.float()
    result = lanczos(op, k=1, tol=1e-3, seed=seed, v0=pure)
    assert not (result.converged[0] and abs(result.eigenvalues[0] - lam1) > 1e-3 * lam1)


def test_the_default_start_is_random_and_not_misled():
    op, lam1, _ = _misleading_operator(torch.float32, seed=5)
    v0, how = top_start(op, "auto", 1, seed=0)
    assert v0 is None and how == "random"
    result = lanczos(op, k=1, tol=1e-3, seed=0)
    assert result.converged[0] and abs(result.eigenvalues[0] - lam1) <= 1e-3 * lam1
