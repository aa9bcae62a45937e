"""Means of independent samples with their standard errors and t-intervals."""

from __future__ import annotations

import math

import numpy as np


def t_interval(estimate: float, stderr: float, n: int, confidence: float = 0.95
               ) -> tuple[float, float]:
    """The Student-t interval ``estimate ± t_{n-1} stderr`` of a mean of ``n`` independent
    samples; exact (zero width) when ``stderr`` is 0, unbounded below two samples."""
    from scipy import stats

    if stderr == 0:
        return estimate, estimate
    if n < 2 or not math.isfinite(stderr):
        return -math.inf, math.inf
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * stderr
    return estimate - half, estimate + half


def mean_interval(samples: np.ndarray, confidence: float = 0.95
                  ) -> tuple[float, float, float, float]:
    """``(mean, stderr, low, high)`` of the mean of independent ``samples``: the standard
    error ``std(ddof=1) / sqrt(n)`` and the Student-t interval with ``n - 1`` degrees of
    freedom at ``confidence``. With fewer than two samples the error is infinite."""
    samples = np.asarray(samples, dtype=float).ravel()
    n = len(samples)
    mean = float(samples.mean()) if n else math.nan
    if n < 2:
        return mean, math.inf, -math.inf, math.inf
    stderr = float(samples.std(ddof=1) / math.sqrt(n))
    return (mean, stderr, *t_interval(mean, stderr, n, confidence))
