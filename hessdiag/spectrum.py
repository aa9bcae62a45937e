"""The spectrum workflow: top and bottom eigenvalues, trace and density of one Hessian.

Composes :class:`~hessdiag.curvature.HessianOperator` with the solvers and returns one
frozen :class:`SpectrumResult`. The CLI's ``spectrum`` command and the demo both call
:func:`compute_spectrum`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hessdiag.curvature import (
    EigenResult,
    HessianOperator,
    SLQResult,
    TraceResult,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq,
)
from hessdiag.curvature.linear import Progress

METHODS = ("lanczos", "power")
TRACE_METHODS = ("hutch++", "hutchinson")


@dataclass(frozen=True)
class SpectrumResult:
    """Everything one spectrum analysis measured, with its errors and settings."""

    top: EigenResult
    bottom: EigenResult | None
    trace: TraceResult | None
    density: SLQResult | None
    operator: dict[str, Any]
    hvps: int
    seconds: float
    seed: int | None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def lambda_max(self) -> float:
        return float(self.top.eigenvalues[0])

    @property
    def lambda_min(self) -> float | None:
        return None if self.bottom is None else float(self.bottom.eigenvalues[0])

    @property
    def lambda_ratio(self) -> float | None:
        """``lambda_max / |lambda_min|`` (Li et al. 2018); ``None`` without ``lambda_min``."""
        if self.lambda_min is None or self.lambda_min == 0:
            return None
        return self.lambda_max / abs(self.lambda_min)

    def to_dict(self) -> dict[str, Any]:
        """Stable, JSON-ready fields (documented in docs/cli.md)."""
        out: dict[str, Any] = {
            "eigenvalues": self.top.to_dict()["eigenvalues"],
            "residuals": self.top.to_dict()["residuals"],
            "converged": self.top.to_dict()["converged"],
            "method": self.top.method,
            "tol": self.top.tol,
            "lambda_min": self.lambda_min,
            "lambda_min_residual": (None if self.bottom is None
                                    else float(self.bottom.residuals[0])),
            "lambda_min_converged": (None if self.bottom is None
                                     else bool(self.bottom.converged[0])),
            "lambda_ratio": self.lambda_ratio,
            "trace": None if self.trace is None else self.trace.estimate,
            "trace_stderr": None if self.trace is None else self.trace.stderr,
            "trace_method": None if self.trace is None else self.trace.method,
            "density": None,
            "hvps": self.hvps,
            "seconds": self.seconds,
            "seed": self.seed,
            "dim": self.operator.get("dim"),
            "samples": self.operator.get("samples"),
            "hvp_mode": self.operator.get("mode"),
            "dtype": self.operator.get("dtype"),
            "device": self.operator.get("device"),
        }
        if self.density is not None:
            trace, se = self.density.trace()
            out["density"] = {"n_probes": self.density.n_probes, "steps": self.density.steps,
                              "sigma": self.density.default_sigma(),
                              "trace": trace, "trace_stderr": se}
        return out


def compute_spectrum(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    top_k: int = 5,
    lambda_min: bool = True,
    trace: bool = True,
    density: bool = False,
    method: str = "lanczos",
    tol: float | None = None,
    trace_method: str = "hutch++",
    trace_hvps: int = 99,
    slq_probes: int = 5,
    slq_steps: int = 60,
    params: Any = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    mode: str = "auto",
    seed: int = 0,
    progress: Progress = None,
) -> SpectrumResult:
    """Analyse the Hessian of ``loss_fn`` over ``data`` at the model's current weights.

    ``method="lanczos"`` (default) or ``"power"`` for the top ``top_k``;
    ``lambda_min`` by Lanczos from the bottom; the trace by Hutch++ (or Hutchinson) with
    ``trace_hvps`` products; the density by SLQ with ``slq_probes`` x ``slq_steps``
    products. Every stochastic part is seeded from ``seed``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if trace_method not in TRACE_METHODS:
        raise ValueError(f"trace method must be one of {', '.join(TRACE_METHODS)}; "
                         f"got {trace_method!r}")
    if top_k < 1:
        raise ValueError(f"top-k must be at least 1; got {top_k}")
    start = time.perf_counter()
    op = HessianOperator(model, loss_fn, data, params=params, dtype=dtype, device=device,
                         mode=mode)
    if method == "lanczos":
        top = lanczos(op, k=top_k, which="largest", tol=tol, seed=seed, progress=progress)
    else:
        top = power_iteration(op, k=top_k, tol=tol, seed=seed, progress=progress)
    bottom = (lanczos(op, k=1, which="smallest", tol=tol, seed=seed + 1, progress=progress)
              if lambda_min else None)
    tr = None
    if trace:
        estimator = hutchpp if trace_method == "hutch++" else hutchinson
        tr = estimator(op, trace_hvps, seed=seed + 2, progress=progress)
    dens = slq(op, slq_probes, slq_steps, seed=seed + 3, progress=progress) if density else None
    return SpectrumResult(
        top=top,
        bottom=bottom,
        trace=tr,
        density=dens,
        operator=op.describe(),
        hvps=op.hvp_count,
        seconds=time.perf_counter() - start,
        seed=seed,
        settings={"top_k": top_k, "method": method, "tol": top.tol, "lambda_min": lambda_min,
                  "trace": trace, "trace_method": trace_method, "trace_hvps": trace_hvps,
                  "density": density, "slq_probes": slq_probes, "slq_steps": slq_steps,
                  "mode": mode},
    )


def finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
