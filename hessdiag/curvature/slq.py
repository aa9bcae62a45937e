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

from hessdiag.curvature.krylov import KrylovBasis, products_into
from hessdiag.curvature.linear import (
    PROBE_BLOCK,
    Counter,
    Progress,
    as_operator,
    blocks,
    generator,
    operator_info,
    rademacher,
    small_blas,
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
    Rademacher probes and return the quadrature nodes and weights of each.

    When ``op`` multiplies several vectors in one pass (``op.batches_vectors``: a
    :class:`~hessdiag.curvature.HessianOperator` with ``batch_vectors`` batched, or
    ``"auto"`` on CUDA), up to ``PROBE_BLOCK`` probes run in lockstep, one ``matmat`` of
    their current vectors per step, holding all their bases at once (``steps + 2`` vectors
    each; as many as fit, :func:`lockstep_group`); the nodes and weights are those of one
    probe at a time, to rounding."""
    with small_blas():
        return _slq(op, n_probes, steps, seed=seed, progress=progress)


def _slq(op: Any, n_probes: int, steps: int, *, seed: int | None, progress: Progress
         ) -> SLQResult:
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
    probes = [rademacher(n, 1, gen, info) / math.sqrt(n) for _ in range(n_probes)]
    # an operator that multiplies several vectors in one pass gets the probes' recurrences in
    # lockstep (all their bases held at once); otherwise one probe after the other
    group = lockstep_group(op, info, m) if getattr(op, "batches_vectors", False) else 1
    for block in blocks(n_probes, group):
        chosen = [probes[p] for p in block]
        projections = (_lockstep(counter, chosen, m) if len(chosen) > 1
                       else [krylov_projection(counter, chosen[0], m)])
        for p, T in zip(block, projections, strict=True):
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


def lockstep_group(op: Any, info: Any, steps: int) -> int:
    """Probes run in lockstep: at most ``PROBE_BLOCK``, and no more than the bases of
    (``steps + 2`` vectors each) fit in the memory left free
    (:func:`hessdiag.curvature.operator.default_memory_budget`: half a GPU's free memory,
    a quarter of the available memory)."""
    from hessdiag.curvature.operator import default_memory_budget

    per_probe = (steps + 2) * info.dim * torch.empty((), dtype=info.dtype).element_size()
    return int(max(1, min(PROBE_BLOCK, default_memory_budget(info.device) // per_probe)))


def krylov_projection(matvec: Any, v: Tensor, steps: int) -> np.ndarray:
    """``T = W^T H W`` for an orthonormal basis ``W`` of the Krylov space of ``steps``
    Lanczos steps from the unit column ``v`` (:class:`~hessdiag.curvature.krylov.KrylovBasis`:
    the measured Gram matrix ``G`` of the stored vectors ``V`` orthonormalises them,
    ``W = V L^{-T}`` with ``G = L L^T``; fewer steps if the Krylov space closes). ``W``'s
    first column is ``v``, so the eigenvectors' first components give the quadrature
    weights."""
    info = v.shape[0]
    basis = KrylovBasis(info, steps + 2, v.dtype, v.device)
    basis.add_pending(v)
    product = products_into(matvec)
    while basis.b and basis.size < steps:
        basis.multiply(product)
        basis.absorb()
    return orthonormal_projection(basis)


def orthonormal_projection(basis: KrylovBasis) -> np.ndarray:
    """The basis's projection ``V^T H V`` expressed in the orthonormal basis
    ``V L^{-T}`` (``G = L L^T``, the measured Gram matrix): ``L^{-1} T L^{-T}``."""
    r = basis.rows
    T, G = basis.T[r, r], basis.G[r, r]
    L = np.linalg.cholesky(0.5 * (G + G.T))
    X = np.linalg.solve(L, 0.5 * (T + T.T))
    out = np.linalg.solve(L, X.T)
    return 0.5 * (out + out.T)


def _lockstep(counter: Counter, starts: list[Tensor], steps: int) -> list[np.ndarray]:
    """:func:`krylov_projection` of each unit column in ``starts``, the recurrences run
    side by side: each step multiplies every unfinished probe's next vector in one
    ``counter.matmat``. The same steps and stopping rules as one probe at a time."""
    bases = []
    for v in starts:
        basis = KrylovBasis(v.shape[0], steps + 2, v.dtype, v.device)
        basis.add_pending(v)
        bases.append(basis)
    active = [p for p, basis in enumerate(bases) if basis.b]
    while active:
        current = torch.cat([bases[p].pending().T for p in active], dim=1)
        products = counter.matmat(current)
        offset = 0
        for p in active:
            basis = bases[p]
            b = basis.b
            basis.multiply(lambda src, dst, o=offset, b=b, out=products:
                           dst.copy_(out[:, o:o + b].T))
            offset += b
            basis.absorb()
        active = [p for p in active if bases[p].b and bases[p].size < steps]
    return [orthonormal_projection(basis) for basis in bases]
