"""The spectrum workflow: top and bottom eigenvalues, trace and density of one Hessian.

Composes :class:`~hessdiag.curvature.HessianOperator` with the solvers and returns one
frozen :class:`SpectrumResult`. The CLI's ``spectrum`` command and the demo both call
:func:`compute_spectrum`.
"""

from __future__ import annotations

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


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class SpectrumSettings:
    """What to compute on each checkpoint (the options of ``hessdiag spectrum``)."""

    top_k: int = 5
    lambda_min: bool = True
    trace: bool = True
    density: bool = False
    method: str = "lanczos"
    tol: float | None = None
    trace_method: str = "hutch++"
    trace_hvps: int = 99
    slq_probes: int = 5
    slq_steps: int = 60
    dtype: str = "float32"
    device: str = "auto"
    mode: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class DataSettings:
    """Which samples the Hessian is taken over."""

    spec: str | None = None
    root: str | None = None
    download: bool = False
    split: str = "train"
    samples: int | None = None
    batch_size: int = 256


@dataclass(frozen=True)
class CheckpointSpectrum:
    """One analysed checkpoint: the result, where it came from, and its store id."""

    result: SpectrumResult
    checkpoint: Any  # hessdiag.checkpoints.CheckpointInfo
    data: dict[str, Any]
    analysis_id: str | None


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device, else Apple's MPS, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N, "
                         "mps)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use "
                         "--device cpu or auto")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA "
                         "devices")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise ValueError("--device mps: MPS is not available on this machine")
    return device


def load_for_analysis(checkpoint: str, *, model_spec: str | None, data: DataSettings,
                      unsafe: bool = False):
    """Load a checkpoint, its model and the data to measure on; checks everything that can
    be wrong with the input before any computation. Returns ``(loaded, data_info)``."""
    from hessdiag.checkpoints import load_checkpoint
    from hessdiag.data import load_dataset

    loaded = load_checkpoint(checkpoint, model_spec=model_spec, unsafe=unsafe)
    recorded = loaded.info.data or {}
    spec = data.spec or recorded.get("spec")
    if spec is None:
        raise ValueError(f"checkpoint {checkpoint} does not record its data: pass --data "
                         "(see `hessdiag datasets`)")
    root = data.root if data.root is not None else (recorded.get("root") if not data.spec
                                                     else None)
    if data.samples is not None and data.samples <= 0:
        raise ValueError(f"--samples must be a positive number of samples; got {data.samples}")
    if data.batch_size <= 0:
        raise ValueError(f"--batch-size must be positive; got {data.batch_size}")
    info = load_dataset(spec, split=data.split, root=root, download=data.download,
                        samples=data.samples)
    return loaded, info


def measurement_batches(dataset: Any, batch_size: int, memory_limit: int = 1 << 29) -> Any:
    """Fixed batches in dataset order: held in memory when they fit in ``memory_limit``
    bytes (decoding images once instead of once per product), else a non-shuffling loader."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    first = dataset[0][0] if len(dataset) else None
    size = first.numel() * first.element_size() * len(dataset) if isinstance(
        first, torch.Tensor) else memory_limit + 1
    return list(loader) if size <= memory_limit else loader


def analyse_checkpoint(
    checkpoint: str,
    *,
    settings: SpectrumSettings,
    data: DataSettings,
    model_spec: str | None = None,
    unsafe: bool = False,
    store: Any = None,
    progress: Progress = None,
) -> CheckpointSpectrum:
    """Spectrum of the training-loss Hessian (cross-entropy, mean over the samples) at a
    checkpoint; written to ``store`` (a :class:`hessdiag.store.Store`) when given."""
    loaded, info = load_for_analysis(checkpoint, model_spec=model_spec, data=data,
                                     unsafe=unsafe)
    device = resolve_device(settings.device)
    if settings.dtype not in DTYPES:
        raise ValueError(f"--dtype must be float32 or float64; got {settings.dtype!r}")
    batches = measurement_batches(info.dataset, data.batch_size)
    result = compute_spectrum(
        loaded.model, nn.CrossEntropyLoss(), batches,
        top_k=settings.top_k, lambda_min=settings.lambda_min, trace=settings.trace,
        density=settings.density, method=settings.method, tol=settings.tol,
        trace_method=settings.trace_method, trace_hvps=settings.trace_hvps,
        slq_probes=settings.slq_probes, slq_steps=settings.slq_steps,
        dtype=DTYPES[settings.dtype], device=device, mode=settings.mode, seed=settings.seed,
        progress=progress,
    )
    data_record = {"spec": info.name, "split": info.split, "root": info.root,
                   "samples": info.samples, "batch_size": data.batch_size,
                   "num_classes": info.num_classes, "in_shape": list(info.in_shape),
                   "normalization": info.normalization}
    analysis_id = None
    if store is not None:
        attrs, arrays = spectrum_record(result, loaded.info, data_record, settings)
        analysis_id = store.write_analysis("spectrum", attrs, arrays)
    return CheckpointSpectrum(result=result, checkpoint=loaded.info, data=data_record,
                              analysis_id=analysis_id)


def versions() -> dict[str, str]:
    import platform

    from hessdiag._version import __version__

    return {"hessdiag": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


def spectrum_record(result: SpectrumResult, checkpoint: Any, data: dict[str, Any],
                    settings: SpectrumSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The store record of one spectrum analysis: every number and what produced it."""
    from dataclasses import asdict
    from pathlib import Path

    import numpy as np

    attrs = {
        "checkpoint_path": str(Path(checkpoint.path).resolve()),
        "checkpoint_sha256": checkpoint.sha256,
        "checkpoint_format": checkpoint.format,
        "run_id": checkpoint.run_id,
        "step": -1 if checkpoint.step is None else int(checkpoint.step),
        "epoch": -1 if checkpoint.epoch is None else int(checkpoint.epoch),
        "model": checkpoint.model_spec,
        "model_kwargs": checkpoint.model_kwargs,
        "data": data,
        "samples": int(data["samples"]),
        "seed": result.seed,
        "settings": {**asdict(settings), **result.settings},
        "operator": result.operator,
        "method": result.top.method,
        "tol": result.top.tol,
        "hvps": result.hvps,
        "seconds": result.seconds,
        "versions": versions(),
    }
    arrays: dict[str, Any] = {
        "eigenvalues": result.top.eigenvalues,
        "residuals": result.top.residuals,
        "converged": result.top.converged.astype(np.bool_),
    }
    if result.bottom is not None:
        arrays["lambda_min"] = result.bottom.eigenvalues[0]
        arrays["lambda_min_residual"] = result.bottom.residuals[0]
        arrays["lambda_min_converged"] = bool(result.bottom.converged[0])
    if result.trace is not None:
        arrays["trace"] = result.trace.estimate
        arrays["trace_stderr"] = result.trace.stderr
        arrays["trace_samples"] = result.trace.samples
        attrs["trace_method"] = result.trace.method
    if result.density is not None:
        grid, dens, sigma = result.density.density()
        arrays.update({"slq/nodes": result.density.nodes, "slq/weights": result.density.weights,
                       "slq/sigma": sigma, "slq/grid": grid, "slq/density": dens,
                       "slq/dim": result.density.dim})
    return attrs, arrays
