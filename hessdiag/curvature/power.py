"""Power iteration with deflation, for the algebraically largest eigenpairs.

Plain power iteration converges to the eigenvalue of largest *magnitude*, which for a
network's Hessian early in training is often a negative one: reported as "top", it is
wrong. Here each eigenpair is found on the shifted operator ``H - sigma I``: with
``sigma = 0`` first; if the dominant eigenvalue found is below the shift it is the
bottom of the spectrum, so the shift moves there (``H - sigma I`` is then positive
semi-definite and its dominant eigenvalue is the top of ``H``) and the pair is sought
again. Found eigenvectors are deflated by projection (each iterate is orthogonalised
against them), so the next pair is the next algebraically largest.

The stopping rule is the residual ``||H u - theta u|| <= tol * max(|theta|, ...)``,
which works for eigenvalues of either sign (a rule on the relative change of ``theta``
breaks down when ``theta`` is negative or near zero).

Lanczos (:func:`hessdiag.curvature.lanczos`) needs far fewer products for the same
accuracy; power iteration is offered because users know it and because Eigen-SAM runs a
few warm-started steps of it every ``p`` training steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessdiag.curvature.lanczos import default_tol
from hessdiag.curvature.linear import (
    Counter,
    Progress,
    as_operator,
    dot,
    gaussian,
    generator,
    gram,
    norm,
    operator_info,
    row_norms,
)
from hessdiag.curvature.results import EigenResult


def power_iteration(
    op: Any,
    k: int = 1,
    *,
    tol: float | None = None,
    max_iter: int = 1000,
    v0: Tensor | None = None,
    seed: int | None = 0,
    shift: str | float = "auto",
    deflation: str = "projection",
    progress: Progress = None,
) -> EigenResult:
    """The ``k`` algebraically largest eigenpairs by power iteration with deflation.

    Parameters
    ----------
    k:
        Eigenpairs wanted, largest first.
    tol:
        Residual tolerance relative to ``|theta|`` (default :func:`default_tol`).
    max_iter:
        Products per eigenpair at most (a pair that runs out is returned with
        ``converged=False`` and its true residual). Eigen-SAM uses ``max_iter=5`` with a
        warm start and does not wait for convergence.
    v0:
        Warm start for the first eigenvector (e.g. the previous estimate).
    shift:
        ``"auto"`` (see the module docstring), or a number ``sigma`` to iterate on
        ``H - sigma I`` throughout (``0`` gives classic, largest-magnitude power iteration).
    deflation:
        ``"projection"`` (orthogonalise iterates against found vectors) or
        ``"hotelling"`` (subtract ``theta_j u_j u_j^T`` from the operator).

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64))
    >>> r = power_iteration(A, k=1, tol=1e-10, seed=0)
    >>> round(float(r.eigenvalues[0]), 8)
    2.0
    """
    op = as_operator(op)
    info = operator_info(op)
    n = info.dim
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and {n}; got {k}")
    if deflation not in ("projection", "hotelling"):
        raise ValueError(f"deflation must be 'projection' or 'hotelling'; got {deflation!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1; got {max_iter}")
    tol = default_tol(info.dtype) if tol is None else float(tol)
    auto = shift == "auto"
    sigma = 0.0 if auto else float(shift)
    counter = Counter(op, progress, k * max_iter)
    gen = generator(seed)

    vecs: list[Tensor] = []
    products: list[Tensor] = []
    values: list[float] = []
    iterations = 0
    for i in range(k):
        start = v0 if (i == 0 and v0 is not None) else None
        u, hu, theta, its = _one_pair(
            counter, info, vecs, values, deflation, sigma, start, gen, tol, max_iter
        )
        iterations += its
        if auto and theta < sigma - tol * abs(theta):
            # the dominant eigenvalue of H - sigma I is at the bottom of the spectrum:
            # shift there, so that the top of H dominates, and seek this pair again
            sigma = theta
            u, hu, theta, its = _one_pair(  # from the warm start again, if there is one
                counter, info, vecs, values, deflation, sigma, start, gen, tol, max_iter
            )
            iterations += its
        vecs.append(u)
        products.append(hu)
        values.append(theta)

    # Rayleigh-Ritz on the span of the found vectors, from the products already computed:
    # each vector's error lies mostly along the next ones (the slower-converging
    # directions), and deflating with inexact vectors passes that error on; this removes
    # it at no extra product
    U, HU = torch.stack(vecs, dim=1), torch.stack(products, dim=1)
    T = gram(U.T, HU.T)
    theta, S = np.linalg.eigh(0.5 * (T + T.T))
    order = np.argsort(-theta)
    theta, S = theta[order], torch.as_tensor(S[:, order], dtype=info.dtype, device=info.device)
    U, HU = U @ S, HU @ S
    norms = torch.as_tensor(row_norms(U.T.contiguous()), dtype=info.dtype, device=info.device)
    U, HU = U / norms, HU / norms
    th = torch.as_tensor(theta, dtype=info.dtype, device=info.device)
    residuals = row_norms((HU - U * th).T.contiguous())
    floor = torch.finfo(info.dtype).eps ** (2 / 3)
    scale = np.maximum(np.abs(theta), floor * np.abs(theta - sigma))
    converged = residuals <= tol * np.maximum(scale, torch.finfo(info.dtype).tiny)

    return EigenResult(
        eigenvalues=theta,
        residuals=residuals,
        converged=converged,
        which="largest",
        method="power",
        tol=tol,
        hvps=counter.hvps,
        iterations=iterations,
        seconds=counter.seconds,
        seed=seed,
        eigenvectors=U,
        settings={"k": k, "max_iter": max_iter, "shift": sigma, "shift_mode": str(shift),
                  "deflation": deflation, "v0": v0 is not None},
    )


def _one_pair(counter, info, vecs, values, deflation, sigma, start, gen, tol, max_iter):
    n = info.dim
    floor = torch.finfo(info.dtype).eps ** (2 / 3)
    u = (start.reshape(-1).to(info.device, info.dtype) if start is not None
         else gaussian(n, 1, gen, info)[:, 0])
    U = torch.stack(vecs, dim=1) if vecs else None

    def project(x: Tensor) -> Tensor:
        if U is not None and deflation == "projection":
            x = x - U @ (U.T @ x)
        return x

    u = project(u)
    size = norm(u)
    if size == 0:
        u = project(gaussian(n, 1, gen, info)[:, 0])
        size = norm(u)
    u = u / size
    for it in range(1, max_iter + 1):
        hu = counter(u)
        theta = dot(u, hu)
        res = norm(hu - theta * u)
        scale = max(abs(theta), floor * abs(theta - sigma), torch.finfo(info.dtype).tiny)
        ok = res <= tol * scale
        if ok or it == max_iter:
            return u, hu, theta, it
        # the iteration operator: (H - sigma I), deflated
        w = hu - sigma * u
        if U is not None and deflation == "hotelling":
            lam = torch.as_tensor(values, dtype=info.dtype, device=info.device) - sigma
            w = w - U @ (lam * (U.T @ u))
        w = project(w)
        wn = norm(w)
        if wn == 0:  # u spans an eigenspace of eigenvalue sigma in the deflated operator
            return u, hu, theta, it
        u = w / wn
    raise AssertionError("unreachable: the loop returns at max_iter")


def power_steps(op: Any, v0: Tensor, steps: int, *, shift: float = 0.0
                ) -> tuple[Tensor, float, float]:
    """Exactly ``steps`` power steps ``u <- (H - shift I) u / ||.||`` from ``v0``, one
    product each; returns the last iterate (``(H - shift I)^steps v0`` normalised), and
    the Rayleigh quotient ``theta = u^T H u`` and residual ``||H u - theta u||`` of the
    iterate ``u`` the last product was taken of. No convergence test: for a fixed budget
    of products with a warm start (Eigen-SAM's refreshes).

    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64))
    >>> v, theta, residual = power_steps(A, torch.tensor([1.0, 1.0], dtype=torch.float64), 2)
    >>> [round(float(x), 6) for x in v]  # (9, 1) / sqrt(82)
    [0.993884, 0.110432]
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    op = as_operator(op)
    info = operator_info(op)
    u = v0.reshape(-1).to(info.device, info.dtype)
    u = u / norm(u)
    theta = residual = float("nan")
    for _ in range(steps):
        hu = op.matvec(u)
        theta = dot(u, hu)
        residual = norm(hu - theta * u)
        w = hu - shift * u
        size = norm(w)
        if size == 0:  # u is an eigenvector of eigenvalue shift: nowhere to go
            break
        u = w / size
    return u, theta, residual
