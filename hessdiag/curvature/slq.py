"""Spectral density by stochastic Lanczos quadrature (Lin, Saad & Yang 2016;
Ghorbani, Krishnan & Xiao 2019, "An Investigation into Neural Net Optimization via
Hessian Eigenvalue Density"; Papyan 2019).

The spectral density ``phi(t) = (1/n) sum_i delta(t - lambda_i)`` is approximated for
each unit probe ``v`` by the Gauss quadrature of its spectral measure
``sum_i (v^T u_i)^2 delta(t - lambda_i)``: ``m`` Lanczos steps from ``v`` give a
tridiagonal ``T``; its eigenvalues are the nodes and the squared first components of its
eigenvectors the weights. The quadrature reproduces ``v^T H^p v`` exactly for
``p < 2m``. Averaging over random probes gives an unbiased estimate of ``phi``'s
moments; the smooth density is the average of Gaussians of width ``sigma`` at the nodes.

Tools disagree on ``sigma`` (and some scale it by the spectrum's width), so
:func:`slq` keeps the raw nodes and weights and :func:`density` takes ``sigma``
explicitly.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessdiag.curvature.linear import (
    Counter,
    Progress,
    as_operator,
    generator,
    operator_info,
    rademacher,
)
from hessdiag.curvature.results import SLQResult


def slq(
    op: Any,
    n_probes: int = 10,
    steps: int = 80,
    *,
    seed: int | None = 0,
    progress: Progress = None,
) -> SLQResult:
    """Run ``steps`` Lanczos steps (full reorthogonalisation) from each of ``n_probes``
    Rademacher probes and return the quadrature nodes and weights of each."""
    if n_probes < 1:
        raise ValueError(f"n_probes must be at least 1; got {n_probes}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1; got {steps}")
    op = as_operator(op)
    info = operator_info(op)
    n = info.dim
    m = min(steps, n)
    gen = generator(seed)
    counter = Counter(op, progress, n_probes * m)
    nodes = np.full((n_probes, m), np.nan)
    weights = np.zeros((n_probes, m))
    for p in range(n_probes):
        v = rademacher(n, 1, gen, info)[:, 0]
        alpha, beta = lanczos_tridiagonal(counter, v / math.sqrt(n), m)
        T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        theta, S = np.linalg.eigh(T)
        nodes[p, : len(theta)] = theta
        weights[p, : len(theta)] = S[0, :] ** 2
    return SLQResult(
        nodes=nodes,
        weights=weights,
        dim=n,
        n_probes=n_probes,
        steps=m,
        hvps=counter.hvps,
        seconds=counter.seconds,
        seed=seed,
        settings={"n_probes": n_probes, "steps": m, "probe": "rademacher"},
    )


def lanczos_tridiagonal(matvec, v: Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``alpha`` (diagonal) and ``beta`` (off-diagonal) of ``steps`` Lanczos steps from the
    unit vector ``v``, with full reorthogonalisation; stops early if the Krylov space closes."""
    n = v.shape[0]
    basis = torch.empty(n, steps, dtype=v.dtype, device=v.device)
    alpha: list[float] = []
    beta: list[float] = []
    q = v / torch.linalg.vector_norm(v)
    eps = torch.finfo(v.dtype).eps
    anorm = 0.0
    for j in range(steps):
        basis[:, j] = q
        w = matvec(q)
        a = float(q @ w)
        alpha.append(a)
        Q = basis[:, : j + 1]
        for _ in range(2):
            w = w - Q @ (Q.T @ w)
        b = float(torch.linalg.vector_norm(w))
        anorm = max(anorm, abs(a), b)
        if j == steps - 1 or b <= 100 * eps * anorm:  # the Krylov space is invariant
            break
        beta.append(b)
        q = w / b
    return np.array(alpha), np.array(beta[: len(alpha) - 1])


def density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Average over probes of ``sum_j w_j N(t; theta_j, sigma^2)`` on ``grid``.

    Integrates to 1 over a grid that extends a few ``sigma`` past the extreme nodes.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive; got {sigma}")
    nodes = np.atleast_2d(nodes)
    weights = np.atleast_2d(weights)
    grid = np.asarray(grid, dtype=float)
    ok = np.isfinite(nodes) & (weights > 0)
    t = nodes[ok][None, :]
    w = weights[ok][None, :]
    z = (grid[:, None] - t) / sigma
    phi = (w * np.exp(-0.5 * z**2)).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))
    return phi / nodes.shape[0]
