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

from hessdiag.curvature.lanczos import expand, next_directions, projection
from hessdiag.curvature.linear import (
    PROBE_BLOCK,
    Counter,
    Progress,
    as_operator,
    blocks,
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
    Rademacher probes and return the quadrature nodes and weights of each.

    When ``op`` multiplies several vectors in one pass (``op.batches_vectors``: a
    :class:`~hessdiag.curvature.HessianOperator` with ``batch_vectors`` batched, or
    ``"auto"`` on CUDA), up to ``PROBE_BLOCK`` probes run in lockstep, one ``matmat`` of
    their current vectors per step, holding all their bases at once (``2 * steps`` vectors
    each; as many as fit, :func:`lockstep_group`); the nodes and weights are those of one
    probe at a time, to rounding."""
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
    (``2 * steps`` vectors each) fit in the memory left free
    (:func:`hessdiag.curvature.operator.default_memory_budget`: half a GPU's free memory,
    a quarter of the available memory)."""
    from hessdiag.curvature.operator import default_memory_budget

    per_probe = 2 * steps * info.dim * torch.empty((), dtype=info.dtype).element_size()
    return int(max(1, min(PROBE_BLOCK, default_memory_budget(info.device) // per_probe)))


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


def _lockstep(counter: Counter, starts: list[Tensor], steps: int) -> list[np.ndarray]:
    """:func:`krylov_projection` of each unit column in ``starts``, the recurrences run
    side by side: each step multiplies every unfinished probe's next vector in one
    ``counter.matmat``. The same steps and stopping rules as one probe at a time."""
    state: list[tuple[Tensor, Tensor, Tensor] | None] = [(v[:, :0], v[:, :0], v)
                                                         for v in starts]
    out: list[np.ndarray | None] = [None] * len(starts)
    active = list(range(len(starts)))
    while active:
        current = [state[p][2] for p in active]  # type: ignore[index]
        products = counter.matmat(torch.cat(current, dim=1))
        parts = torch.split(products, [b.shape[1] for b in current], dim=1)
        unfinished = []
        for p, block, new_W in zip(active, current, parts, strict=True):
            V, W, _ = state[p]  # type: ignore[misc]
            V, W = torch.cat([V, block], dim=1), torch.cat([W, new_W], dim=1)
            nxt = None if V.shape[1] >= steps else next_directions(new_W, V)
            if nxt is None or nxt.shape[1] == 0:  # done, or the Krylov space is invariant
                out[p], state[p] = projection(V, W), None
            else:
                state[p] = (V, W, nxt)
                unfinished.append(p)
        active = unfinished
    return out  # type: ignore[return-value]
