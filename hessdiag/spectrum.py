"""The spectrum workflow: top and bottom eigenvalues, trace, density and per-layer
sharpness of one Hessian.

:func:`compute_spectrum` analyses a model, loss and data in memory;
:func:`analyse_checkpoint` does it for the task a checkpoint records
(:func:`hessdiag.task.load_task`) and writes the result to the store. What to compute is
one :class:`SpectrumSettings`, whose defaults are those of ``hessdiag spectrum``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from hessdiag.curvature import HessianOperator, hutchinson, hutchpp, lanczos, power_iteration, slq
from hessdiag.curvature.linear import Progress
from hessdiag.records import provenance, write_spectrum
from hessdiag.results import LayerSharpness, SpectrumResult
from hessdiag.runtime import resolve_device, resolve_dtype
from hessdiag.settings import METHODS, TRACE_METHODS, DataSettings, SpectrumSettings
from hessdiag.task import Task, load_task

__all__ = ["METHODS", "TRACE_METHODS", "CheckpointSpectrum", "DataSettings", "SpectrumSettings",
           "analyse_checkpoint", "compute_spectrum", "parameterised_modules"]


@dataclass(frozen=True)
class CheckpointSpectrum:
    """One analysed checkpoint: the result, the task it was measured on, its store id."""

    result: SpectrumResult
    task: Task
    analysis_id: str | None


def compute_spectrum(model: nn.Module, loss_fn: Any, data: Any,
                     settings: SpectrumSettings | None = None, *,
                     progress: Progress = None) -> SpectrumResult:
    """Analyse the Hessian of ``loss_fn`` (the mean over ``data``'s samples, or terms: a
    :class:`hessdiag.losses.Loss` weights batches by its count) at the model's weights."""
    s = settings or SpectrumSettings()
    start = time.perf_counter()
    weight = getattr(loss_fn, "batch_weight", None)
    dtype, device = resolve_dtype(s.dtype), resolve_device(s.device)
    op = HessianOperator(model, loss_fn, data, params=s.params, dtype=dtype, device=device,
                         mode=s.hvp_mode, batch_size_fn=weight)
    if s.method == "lanczos":
        top = lanczos(op, k=s.top_k, which="largest", tol=s.tol, seed=s.seed, progress=progress)
    else:
        top = power_iteration(op, k=s.top_k, tol=s.tol, seed=s.seed, progress=progress)
    bottom = (lanczos(op, k=1, which="smallest", tol=s.tol, seed=s.seed + 1, progress=progress)
              if s.lambda_min else None)
    estimator = hutchpp if s.trace_method == "hutch++" else hutchinson
    trace = (estimator(op, s.trace_hvps, seed=s.seed + 2, progress=progress)
             if s.trace or s.per_layer else None)
    density = (slq(op, s.slq_probes, s.slq_steps, seed=s.seed + 3, progress=progress)
               if s.density else None)
    hvps = op.hvp_count
    layers: tuple[LayerSharpness, ...] = ()
    if s.per_layer:
        layers = tuple(_layer(model, loss_fn, data, s, names, name, op.mode, progress)
                       for name, names in parameterised_modules(model, op.param_names))
        hvps += sum(layer.top.hvps + (layer.trace.hvps if layer.trace else 0)
                    for layer in layers)
    return SpectrumResult(
        top=top, bottom=bottom, trace=trace, density=density, operator=op.describe(),
        hvps=hvps, seconds=time.perf_counter() - start, seed=s.seed,
        settings={**asdict(s), "tol": top.tol}, layers=layers,
    )


def parameterised_modules(model: nn.Module, selected: list[str]) -> list[tuple[str, list[str]]]:
    """``(module name, its selected parameter names)`` for each module holding selected
    parameters directly, in the model's order."""
    chosen = set(selected)
    out = []
    for name, module in model.named_modules():
        names = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        names = [n for n in names if n in chosen]
        if names:
            out.append((name or "(root)", names))
    return out


def _layer(model: nn.Module, loss_fn: Any, data: Any, s: SpectrumSettings, names: list[str],
           name: str, mode: str | None, progress: Progress) -> LayerSharpness:
    """Top eigenvalue and trace of one module's diagonal Hessian block."""
    op = HessianOperator(model, loss_fn, data, params=names, dtype=resolve_dtype(s.dtype),
                         device=resolve_device(s.device), mode=mode or s.hvp_mode,
                         check_determinism=False,
                         batch_size_fn=getattr(loss_fn, "batch_weight", None))
    top = lanczos(op, k=1, which="largest", tol=s.tol, seed=s.seed, progress=progress)
    estimator = hutchpp if s.trace_method == "hutch++" else hutchinson
    trace = estimator(op, s.trace_hvps, seed=s.seed + 2, progress=progress)
    return LayerSharpness(name=name, params=tuple(names), dim=op.dim, top=top, trace=trace)


def check_settings(task: Task, settings: SpectrumSettings) -> None:
    """What can be checked before computing: the device and the parameter selection."""
    resolve_device(settings.device)
    if settings.params is not None:
        HessianOperator(task.model, task.loss, [task.first_batch()], params=settings.params)


def analyse_checkpoint(
    checkpoint: str,
    *,
    settings: SpectrumSettings | None = None,
    data: DataSettings | None = None,
    model_spec: str | None = None,
    loss: str | None = None,
    unsafe: bool = False,
    store: Any = None,
    progress: Progress = None,
) -> CheckpointSpectrum:
    """Spectrum of the Hessian of the checkpoint's task (its loss, mean over the samples
    of ``data``); written to ``store`` (a :class:`hessdiag.store.Store`) when given."""
    settings = settings or SpectrumSettings()
    data = data or DataSettings()
    task = load_task(checkpoint, data=data, model_spec=model_spec, loss=loss, unsafe=unsafe)
    check_settings(task, settings)
    result = compute_spectrum(task.model, task.loss, task.batches(data.batch_size), settings,
                              progress=progress)
    analysis_id = None
    if store is not None:
        origin = provenance(task)
        origin["data"] = {**origin["data"], "batch_size": data.batch_size}
        analysis_id = write_spectrum(store, result, origin)
    return CheckpointSpectrum(result=result, task=task, analysis_id=analysis_id)
