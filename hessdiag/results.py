"""What the workflows return: frozen results with their errors, seeds and settings.

:class:`SpectrumResult` (``hessdiag spectrum``) and :class:`AlignmentResult`
(``hessdiag align``) are written to the store and read back whole by
:mod:`hessdiag.records`; ``to_dict()`` is their JSON form (documented in docs/cli.md).
:class:`LandscapeResult` (``hessdiag landscape``) and :class:`SharpnessResult`
(``hessdiag sharpness``, computed by :mod:`hessdiag.sharpness`) are stored the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hessdiag.curvature import EigenResult, SLQResult, TraceResult


def _float(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class LayerSharpness:
    """The diagonal Hessian block of one parameterised module: its top eigenvalue (with
    residual) and its trace (with standard error)."""

    name: str
    params: tuple[str, ...]
    dim: int
    top: EigenResult
    trace: TraceResult | None

    @property
    def lambda_max(self) -> float:
        return float(self.top.eigenvalues[0])

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.name, "params": list(self.params), "dim": self.dim,
                "lambda_max": self.lambda_max,
                "lambda_max_residual": _float(self.top.residuals[0]),
                "lambda_max_converged": bool(self.top.converged[0]),
                "trace": None if self.trace is None else self.trace.estimate,
                "trace_stderr": None if self.trace is None else _float(self.trace.stderr),
                "hvps": self.top.hvps + (0 if self.trace is None else self.trace.hvps)}


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
    layers: tuple[LayerSharpness, ...] = ()
    # bytes, see :class:`hessdiag.runtime.PeakMemory` (``None``: not measured, or a record
    # written before it was)
    peak_memory: int | None = None
    peak_memory_growth: int | None = None
    peak_memory_kind: str | None = None
    # data set items (sequences, images, graphs) the loss averaged over, when known (the
    # operator counts only the loss's terms: tokens, for a per-token language-model loss)
    samples: int | None = None

    @property
    def loss_terms(self) -> int | None:
        """The terms the loss averaged over (stores before ``loss_terms``: ``samples``)."""
        op = self.operator
        return op.get("loss_terms", op.get("samples"))

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
        top = self.top.to_dict()
        out: dict[str, Any] = {
            "eigenvalues": top["eigenvalues"],
            "residuals": top["residuals"],
            "converged": top["converged"],
            "method": self.top.method,
            "tol": self.top.tol,
            "lambda_min": self.lambda_min,
            "lambda_min_residual": (None if self.bottom is None
                                    else _float(self.bottom.residuals[0])),
            "lambda_min_converged": (None if self.bottom is None
                                     else bool(self.bottom.converged[0])),
            "lambda_ratio": self.lambda_ratio,
            "trace": None if self.trace is None else self.trace.estimate,
            "trace_stderr": None if self.trace is None else _float(self.trace.stderr),
            "trace_ci95": None if self.trace is None else [_float(v) for v in self.trace.ci95],
            "trace_method": None if self.trace is None else self.trace.method,
            "density": None,
            "layers": [layer.to_dict() for layer in self.layers] or None,
            "hvps": self.hvps,
            "seconds": self.seconds,
            "peak_memory": self.peak_memory,
            "peak_memory_growth": self.peak_memory_growth,
            "peak_memory_kind": self.peak_memory_kind,
            "seed": self.seed,
            "started_from": self.settings.get("started_from"),
            "dim": self.operator.get("dim"),
            "samples": self.samples,
            "loss_terms": self.loss_terms,
            "hvp_mode": self.operator.get("mode"),
            "vector_batch": self.operator.get("vector_batch"),
            "dtype": self.operator.get("dtype"),
            "device": self.operator.get("device"),
            "curvature": self.operator.get("curvature", "hessian"),
        }
        if self.operator.get("fisher"):  # the Fisher's kind, and the seed of its targets
            op = self.operator
            out["fisher"] = {"kind": op["fisher"], "seed": op.get("seed"),
                             "samples": op.get("mc_samples")}
        if self.operator.get("preconditioner"):
            # the eigenvalues are of P^-1/2 H P^-1/2; ``threshold`` is its stability bound
            # and ``stability`` lambda_max / threshold (1 at the edge of stability)
            pre = dict(self.operator["preconditioner"])
            if pre.get("threshold"):
                pre["stability"] = self.lambda_max / pre["threshold"]
            out["preconditioner"] = pre
        if self.density is not None:
            trace, se = self.density.trace()
            out["density"] = {"n_probes": self.density.n_probes, "steps": self.density.steps,
                              "sigma": self.density.default_sigma(),
                              "trace": trace, "trace_stderr": _float(se)}
        return out


@dataclass(frozen=True)
class AlignmentResult:
    """Alignment of perturbations with the top eigenvector(s) at one set of weights.

    ``alignment`` is the mean of ``|cos(e, v)|`` over ``batches`` distinct minibatches,
    ``alignment_signed`` the mean of ``cos(e, v)``, each with a 95% interval (``ci95``,
    ``ci95_signed``) that stays in the quantity's range (``interval_method``
    ``"logit-t"``: see :func:`hessdiag.curvature.stats.bounded_mean_interval`; results
    read from stores written before it hold the plain Student-t interval, ``"student-t"``);
    ``topk_share`` the mean share ``||V_k^T e||^2 / ||e||^2`` of ``e`` inside the top-k
    eigenspace. ``eigenvalues`` etc. are those of the measurement set's Hessian;
    ``rule`` names the perturbation measured (see :mod:`hessdiag.align`).

    ``requested``: minibatches asked for (0: not recorded); ``repeats``: minibatches given
    that repeated an earlier one and were left out; ``note``: what was used when it is not
    what was asked (fewer or smaller minibatches), and why an interval is missing. With one
    minibatch the intervals are NaN: no interval is made from a single value.
    """

    alignment: float
    ci95: tuple[float, float]
    alignment_signed: float
    ci95_signed: tuple[float, float]
    cosines: np.ndarray
    batches: int
    top_k: int
    topk_share: float | None
    topk_share_ci95: tuple[float, float] | None
    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    rule: str
    alpha: float
    hvps: int
    seconds: float
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    requested: int = 0
    repeats: int = 0
    note: str = ""
    interval_method: str = "student-t"

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "alignment": self.alignment, "alignment_signed": self.alignment_signed,
            "ci95": [_float(v) for v in self.ci95],
            "ci95_signed": [_float(v) for v in self.ci95_signed],
            "cosines": [float(c) for c in self.cosines],
            "batches": self.batches, "batches_requested": self.requested,
            "repeats_skipped": self.repeats, "note": self.note,
            "interval_method": self.interval_method, "lambda_max": self.lambda_max,
            "eigenvalues": [float(v) for v in self.eigenvalues],
            "residuals": [float(v) for v in self.residuals],
            "converged": [bool(c) for c in self.converged],
            "lambda_max_residual": float(self.residuals[0]),
            "lambda_max_converged": bool(self.converged[0]),
            "top_k": self.top_k, "topk_share": self.topk_share,
            "topk_share_ci95": None if self.topk_share_ci95 is None
            else [_float(v) for v in self.topk_share_ci95],
            "perturbation": self.rule, "alpha": self.alpha,
            "hvps": self.hvps, "seconds": self.seconds, "seed": self.seed,
            "settings": self.settings,
        }


@dataclass(frozen=True)
class LandscapeResult:
    """The loss (and accuracy) on a grid around a checkpoint ``theta``:
    ``loss[i] = L(theta + xs[i] d1)`` (1-D) or ``loss[j, i] = L(theta + xs[i] d1 + ys[j] d2)``
    (2-D: rows are the second coordinate). ``accuracy`` has the grid's shape (NaN for a
    loss without accuracy). ``directions`` says what ``d1``, ``d2`` are: ``kind``
    (random / eigen), ``filter_norm``, ``bias``, their ``norms`` and ``cosine``, and for
    eigen directions their ``eigenvalues``, ``residuals`` and ``converged`` flags.
    ``loss0``: the loss at ``theta``; ``resumed_points``: grid points taken from an
    interrupted run instead of computed."""

    xs: np.ndarray
    ys: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray
    directions: dict[str, Any]
    loss0: float
    samples: int
    forward_passes: int
    seconds: float
    seed: int
    resumed_points: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return 1 if self.ys is None else 2

    def to_dict(self) -> dict[str, Any]:
        def grid(a: np.ndarray) -> Any:
            return [[_float(v) for v in row] for row in a] if a.ndim == 2 \
                else [_float(v) for v in a]

        finite = self.loss[np.isfinite(self.loss)]
        return {
            "dims": self.dims, "x": [float(v) for v in self.xs],
            "y": None if self.ys is None else [float(v) for v in self.ys],
            "loss": grid(self.loss), "accuracy": grid(self.accuracy),
            "loss0": self.loss0,
            "loss_min": _float(finite.min()) if finite.size else None,
            "loss_max": _float(finite.max()) if finite.size else None,
            # ``samples`` (the stored key) counts the loss's terms, as ``loss_terms`` says
            "directions": self.directions, "samples": self.samples, "loss_terms": self.samples,
            "forward_passes": self.forward_passes, "resumed_points": self.resumed_points,
            "seconds": self.seconds, "seed": self.seed, "settings": self.settings,
        }


@dataclass
class SharpnessResult:
    """One sharpness measurement with what it needs to be judged.

    ``value``: the measure (critical: ``2 / lr_c``; worst-case and adaptive: the loss
    increase; ``NaN`` when undefined, with ``reason``). ``interval``: for critical
    sharpness, the value's bounds from the final bracket of ``lr_c``; for the ascent
    measures, ``(value, inf)`` (a lower bound). ``converged``: critical, the bracket
    reached ``rtol``; ascent, the value's relative change over the last step fell below
    ``tol`` within ``max_steps``. ``steps``: ascent steps taken (critical: 0).
    ``history``: the value after each ascent step."""

    measure: str
    value: float
    interval: tuple[float, float]
    loss: float
    forward_passes: int
    backward_passes: int
    seconds: float
    samples: int
    rho: float | None = None
    lr_c: float | None = None
    grad_norm: float | None = None
    history: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    converged: bool = True
    steps: int = 0
    hvps: int = 0
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SharpnessResult:
        d = dict(d)
        d["interval"] = tuple(d["interval"])
        if "converged" not in d and d.get("measure") != "critical":
            # written before ascents were judged: a fixed number of steps, unconverged
            d["converged"] = False
            d["steps"] = int((d.get("settings") or {}).get("steps") or len(d.get("history")
                                                                            or []))
            d["reason"] = "recorded before hessdiag checked the ascent's convergence"
        return cls(**d)
