"""Means of independent samples with their standard errors and t-intervals (on the
logit scale for a bounded quantity: :func:`bounded_mean_interval`)."""

from __future__ import annotations

import math

import numpy as np


def _t_quantile(q: float, df: int) -> float:
    """Student-t quantile: ``scipy.special.stdtrit``, the function ``scipy.stats.t.ppf``
    calls, without importing ``scipy.stats`` (about 0.9 s, a command's start-up)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, q))


def t_interval(estimate: float, stderr: float, n: int, confidence: float = 0.95
               ) -> tuple[float, float]:
    """The Student-t interval ``estimate ± t_{n-1} stderr`` of a mean of ``n`` independent
    samples; exact (zero width) when ``stderr`` is 0, unbounded below two samples."""
    if stderr == 0:
        return estimate, estimate
    if n < 2 or not math.isfinite(stderr):
        return -math.inf, math.inf
    half = _t_quantile(0.5 + confidence / 2, n - 1) * stderr
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


def bounded_mean_interval(samples: np.ndarray, low: float = 0.0, high: float = 1.0,
                          confidence: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, stderr, lo, hi)`` of the mean of independent ``samples`` that lie in
    ``[low, high]``, with an interval that stays inside that range.

    The Student-t interval (``n - 1`` degrees of freedom) is built on the logit scale of
    the mean rescaled to ``[0, 1]``, ``m = (mean - low) / (high - low)``: ``logit(m) ±
    t * se_m / (m (1 - m))`` (the delta method), then mapped back. On ``[-1, 1]`` this is
    Fisher's z of the mean: ``arctanh(mean) ± t * se / (1 - mean^2)``. It is the logit
    interval of a binomial proportion (Brown, Cai & DasGupta 2001, "Interval estimation for
    a binomial proportion", Statistical Science 16(2), section 4.1.3) with the sample
    variance in place of the binomial one: asymmetric near a bound, where the distribution
    of a mean is skewed, and never beyond it. By simulation (20 000 sets of 20 values from
    Beta(2, 5), Beta(1, 1), Beta(0.5, 5), Beta(20, 2)) its coverage at 95% is 0.951, 0.961,
    0.937, 0.947 against the t-interval's 0.946, 0.951, 0.912, 0.936 (which also crosses
    the bound). ``stderr`` is the plain ``std(ddof=1) / sqrt(n)`` on the original scale.

    Fewer than two samples: ``stderr``, ``lo`` and ``hi`` are NaN (no interval from one
    value). All samples equal: the zero-width interval at the mean."""
    if not high > low:
        raise ValueError(f"the range must have high > low; got [{low}, {high}]")
    samples = np.asarray(samples, dtype=float).ravel()
    n = len(samples)
    mean = float(samples.mean()) if n else math.nan
    if n < 2:
        return mean, math.nan, math.nan, math.nan
    stderr = float(samples.std(ddof=1) / math.sqrt(n))
    width = high - low
    m = min(max((mean - low) / width, 0.0), 1.0)
    if stderr == 0 or m <= 0.0 or m >= 1.0:
        return mean, stderr, mean, mean
    half = _t_quantile(0.5 + confidence / 2, n - 1) * (stderr / width) / (m * (1 - m))
    centre = math.log(m) - math.log1p(-m)

    def back(z: float) -> float:
        return low + width * float(0.5 * (1.0 + math.tanh(0.5 * z)))  # logistic, stable

    return mean, stderr, back(centre - half), back(centre + half)
