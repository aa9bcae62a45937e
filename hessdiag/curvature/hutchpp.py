"""Hutch++ (Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace
Estimation", SOSA 2021).

With ``m`` products: a third sketch the range, ``Q = orth(H S)``; a third give the trace
of the projection exactly, ``tr(Q^T H Q)``; a third estimate the rest,
``tr((I - QQ^T) H (I - QQ^T))``, with Hutchinson. When a few eigenvalues dominate (as
in a trained network's Hessian), the rest is small and so is the variance.

Given ``Q`` the first part is exact and the second unbiased, so the standard error of
the Hutchinson part is the standard error of the whole estimate.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hessdiag.curvature.hutchinson import trace_result
from hessdiag.curvature.linear import (
    Counter,
    Progress,
    as_operator,
    blocks,
    generator,
    operator_info,
    orthonormalize,
    rademacher,
)
from hessdiag.curvature.results import TraceResult


def hutchpp(
    op: Any,
    n_hvps: int = 99,
    *,
    seed: int | None = 0,
    progress: Progress = None,
) -> TraceResult:
    """Estimate ``tr(op)`` with ``n_hvps`` products (at least 6), split in thirds.

    ``n_probes`` of the result counts the Hutchinson probes of the residual part.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([100.0, 10.0, 1.0, 0.1], dtype=torch.float64))
    >>> round(hutchpp(A, 12).estimate, 10)  # the sketch spans all of A: exact
    111.1
    """
    if n_hvps < 6:
        raise ValueError(f"n_hvps must be at least 6 (a third each, two residual probes); "
                         f"got {n_hvps}")
    op = as_operator(op)
    info = operator_info(op)
    n = info.dim
    gen = generator(seed)
    sketch = n_hvps // 3
    probes = n_hvps - 2 * sketch
    counter = Counter(op, progress, n_hvps)
    if n <= sketch:
        # the budget covers the whole space: the trace exactly, from n products with the
        # unit vectors (a random sketch of a rank-deficient operator would miss part of it)
        eye = torch.eye(n, dtype=info.dtype, device=info.device)
        exact = 0.0
        for block in blocks(n):
            products = counter.matmat(eye[:, block.start:block.stop])
            for j, i in enumerate(block):
                exact += float(products[i, j])
        return trace_result(np.zeros(0), "hutch++", counter, seed,
                            {"n_hvps": n_hvps, "sketch": n, "probes": 0,
                             "low_rank_trace": exact, "exact": True}, offset=exact)

    S = rademacher(n, min(sketch, n), gen, info)
    HS = torch.cat([counter.matmat(S[:, b.start:b.stop]) for b in blocks(S.shape[1])], dim=1)
    Q = orthonormalize(HS, None, 1e-12)
    exact = 0.0
    for block in blocks(Q.shape[1]):
        HQ = counter.matmat(Q[:, block.start:block.stop])
        for j, i in enumerate(block):
            exact += float(Q[:, i] @ HQ[:, j].contiguous())

    G = rademacher(n, probes, gen, info)
    samples = np.empty(probes)
    if Q.shape[1] >= n:  # the sketch spans the whole space: nothing is left
        samples[:] = 0.0
    else:
        for block in blocks(probes):
            if Q.shape[1]:
                gs = [G[:, i] - Q @ (Q.T @ G[:, i]) for i in block]
                g = torch.stack(gs).T  # contiguous columns, as each probe was before
            else:
                g = G[:, block.start:block.stop]
                gs = [g[:, j] for j in range(g.shape[1])]
            Hg = counter.matmat(g)
            for j, i in enumerate(block):
                samples[i] = float(gs[j] @ Hg[:, j].contiguous())
    return trace_result(samples, "hutch++", counter, seed,
                        {"n_hvps": n_hvps, "sketch": int(Q.shape[1]), "probes": probes,
                         "low_rank_trace": exact}, offset=exact)
