"""The smoothed spectral density of stochastic Lanczos quadrature nodes and weights."""

from __future__ import annotations

import math

import numpy as np


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
