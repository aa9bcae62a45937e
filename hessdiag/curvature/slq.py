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
from torch import Tensor

from hessdiag.curvature.lanczos import expand, next_directions, projection
from hessdiag.curvature.linear import (
    Counter,
    Progress,
    as_operator,
    generator,
    operator_info,
    rademacher,
)
from hessdiag.curvature.quadrature import density
from hessdiag.curvature.results import SLQResult

__all__ = ["density", "krylov_projection", "slq"]


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
        v = rademacher(n, 1, gen, info) / math.sqrt(n)
        theta, S = np.linalg.eigh(krylov_projection(counter, v, m))
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


def krylov_projection(matvec: Any, v: Tensor, steps: int) -> np.ndarray:
    """``T = V^T H V`` for the Krylov basis ``V`` of ``steps`` Lanczos steps from the unit
    column ``v`` (:func:`hessdiag.curvature.lanczos.expand`, full reorthogonalisation;
    fewer steps if the Krylov space closes). ``V``'s first column is ``v``, so the
    eigenvectors' first components give the quadrature weights."""
    V = W = v[:, :0]
    block = v
    for _ in range(steps):
        V, W, new_W = expand(matvec, V, W, block)
        if V.shape[1] == steps:
            break
        block = next_directions(new_W, V)
        if block.shape[1] == 0:  # the Krylov space is invariant
            break
    return projection(V, W)
