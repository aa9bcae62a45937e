"""Hutchinson's trace estimator (Hutchinson 1989).

``tr(H) = E[z^T H z]`` for probes with ``E[z z^T] = I``. With Rademacher probes the
variance of one sample is ``2 * sum_{i != j} H_ij^2`` (lower than Gaussian probes'
``2 ||H||_F^2``). The estimate is the mean of ``n_probes`` samples and its standard
error their standard deviation over ``sqrt(n_probes)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hessdiag.curvature.linear import (
    Counter,
    Progress,
    as_operator,
    blocks,
    gaussian,
    generator,
    operator_info,
    rademacher,
)
from hessdiag.curvature.results import TraceResult
from hessdiag.curvature.stats import mean_interval

DISTRIBUTIONS = ("rademacher", "gaussian")


def hutchinson(
    op: Any,
    n_probes: int = 100,
    *,
    seed: int | None = 0,
    distribution: str = "rademacher",
    progress: Progress = None,
) -> TraceResult:
    """Estimate ``tr(op)`` from ``n_probes`` products with random probes (multiplied
``PROBE_BLOCK`` at a time through ``op.matmat`` when it has one).

    Examples
    --------
    >>> import torch
    >>> r = hutchinson(torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64)), 10)
    >>> r.estimate, r.stderr  # a diagonal matrix: every Rademacher sample is exact
    (15.0, 0.0)
    """
    if n_probes < 2:
        raise ValueError(f"n_probes must be at least 2 (for a standard error); got {n_probes}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}; got {distribution!r}")
    op = as_operator(op)
    info = operator_info(op)
    gen = generator(seed)
    counter = Counter(op, progress, n_probes)
    draw = rademacher if distribution == "rademacher" else gaussian
    samples = np.empty(n_probes)
    for block in blocks(n_probes):  # several probes per matmat, drawn one by one as ever
        zs = [draw(info.dim, 1, gen, info)[:, 0] for _ in block]
        HZ = counter.matmat(torch.stack(zs).T)  # contiguous columns: the same arithmetic
        for j, i in enumerate(block):
            samples[i] = float(zs[j] @ HZ[:, j].contiguous())
    return trace_result(samples, "hutchinson", counter, seed,
                        {"n_probes": n_probes, "distribution": distribution})


def trace_result(samples: np.ndarray, method: str, counter: Counter, seed: int | None,
                 settings: dict, offset: float = 0.0) -> TraceResult:
    mean, stderr, _, _ = mean_interval(samples)
    return TraceResult(
        estimate=offset + (mean if len(samples) else 0.0),
        stderr=stderr if len(samples) else 0.0,
        method=method,
        n_probes=len(samples),
        hvps=counter.hvps,
        seconds=counter.seconds,
        seed=seed,
        samples=samples,
        settings=settings,
    )
