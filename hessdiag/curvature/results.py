"""Results of the curvature solvers: frozen, with their errors, settings and cost.

A number never travels alone: eigenvalues come with residual norms and converged flags,
traces with a standard error and a 95% interval, densities with the raw quadrature nodes
and weights they are computed from, and every result with the seed, the number of
Hessian-vector products and the seconds it took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from hessdiag.curvature.quadrature import density
from hessdiag.curvature.stats import mean_interval, t_interval


def _floats(a: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(float(x)) else float(x) for x in np.asarray(a).ravel()]


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator.

    ``eigenvalues`` are ordered from the requested end inward: descending for
    ``which="largest"``, ascending for ``"smallest"``; for ``"both"`` all of them
    descending (the top end first, the most negative last).
    ``residuals[i]`` bounds ``||H u_i - theta_i u_i||`` for the returned unit vector
    ``u_i`` (Lanczos: from its recurrence, equal to the true residual to rounding plus the
    drift its restarts drop; power iteration: from a product of ``u_i``); ``converged[i]`` is
    ``residuals[i] <= tol * max(|theta_i|, eps**(2/3) * ||H||)``.
    """

    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    which: str
    method: str
    tol: float
    hvps: int
    iterations: int
    seconds: float
    seed: int | None
    eigenvectors: Tensor | None = field(default=None, repr=False, compare=False)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_residuals(self) -> np.ndarray:
        return self.residuals / np.maximum(np.abs(self.eigenvalues), np.finfo(float).tiny)

    def to_dict(self) -> dict[str, Any]:
        return {
            "eigenvalues": _floats(self.eigenvalues),
            "residuals": _floats(self.residuals),
            "converged": [bool(c) for c in self.converged],
            "which": self.which,
            "method": self.method,
            "tol": self.tol,
            "hvps": self.hvps,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "seed": self.seed,
            "settings": self.settings,
        }


@dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate with its standard error.

    ``ci95`` is the Student-t interval ``estimate ± t_{n-1, 0.975} stderr`` over the
    ``n_probes`` independent samples (measured coverage: ``benchmarks/bench_coverage.py``).
    For Hutch++ the error is that of the residual Hutchinson part given the sketch, which
    is the whole error of the estimate; an exact trace has ``stderr`` 0.
    """

    estimate: float
    stderr: float
    method: str
    n_probes: int
    hvps: int
    seconds: float
    seed: int | None
    samples: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0))
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ci95(self) -> tuple[float, float]:
        return t_interval(self.estimate, self.stderr, self.n_probes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": self.estimate,
            "trace_stderr": self.stderr,
            "ci95": list(self.ci95),
            "method": self.method,
            "n_probes": self.n_probes,
            "hvps": self.hvps,
            "seconds": self.seconds,
            "seed": self.seed,
            "settings": self.settings,
        }


@dataclass(frozen=True)
class SLQResult:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019; Papyan 2019).

    For probe ``p``, ``nodes[p]`` are the Ritz values of its Lanczos tridiagonal and
    ``weights[p]`` the squared first components of the tridiagonal's eigenvectors: a
    Gauss quadrature for the probe's spectral measure, exact for polynomials of degree
    below ``2 * steps``. Unused slots (a probe whose Krylov space closed early) hold
    ``nan`` nodes with zero weight. The smoothed density is :func:`density`.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    n_probes: int
    steps: int
    hvps: int
    seconds: float
    seed: int | None
    settings: dict[str, Any] = field(default_factory=dict)

    def moments(self, power: int) -> np.ndarray:
        """Per-probe ``sum_j w_j theta_j**power``, i.e. ``z^T H^p z / z^T z`` (exact for p < 2m)."""
        nodes = np.nan_to_num(self.nodes, nan=0.0)
        return (self.weights * nodes**power).sum(axis=1)

    def trace(self) -> tuple[float, float]:
        """Trace estimate ``dim * mean first moment`` and its standard error over probes."""
        mean, stderr, _, _ = mean_interval(self.dim * self.moments(1))
        return mean, stderr

    def trace_ci95(self) -> tuple[float, float]:
        """The 95% Student-t interval of :meth:`trace` over the probes."""
        return mean_interval(self.dim * self.moments(1))[2:]

    def default_sigma(self) -> float:
        """``0.01 * (max node - min node)``: the smoothing used when none is given."""
        lo, hi = np.nanmin(self.nodes), np.nanmax(self.nodes)
        return float(0.01 * (hi - lo)) if hi > lo else 1e-3 * max(abs(float(hi)), 1.0)

    def default_grid(self, sigma: float, points: int = 1000) -> np.ndarray:
        lo, hi = np.nanmin(self.nodes), np.nanmax(self.nodes)
        return np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)

    def density(
        self, grid: np.ndarray | None = None, sigma: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """``(grid, density, sigma)``; see :func:`hessdiag.curvature.density`."""
        sigma = self.default_sigma() if sigma is None else float(sigma)
        grid = self.default_grid(sigma) if grid is None else np.asarray(grid, dtype=float)
        return grid, density(self.nodes, self.weights, grid, sigma), sigma

    def to_dict(self) -> dict[str, Any]:
        trace, se = self.trace()
        return {
            "n_probes": self.n_probes,
            "steps": self.steps,
            "dim": self.dim,
            "nodes": [_floats(row) for row in self.nodes],
            "weights": [_floats(row) for row in self.weights],
            "trace": trace,
            "trace_stderr": se,
            "hvps": self.hvps,
            "seconds": self.seconds,
            "seed": self.seed,
            "settings": self.settings,
        }
