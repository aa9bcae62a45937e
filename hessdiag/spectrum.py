"""The spectrum workflow: top and bottom eigenvalues, trace, density and per-layer
sharpness of one Hessian.

:func:`compute_spectrum` analyses a model, loss and data in memory;
:func:`analyse_checkpoint` does it for the task a checkpoint records
(:func:`hessdiag.task.load_task`) and writes the result to the store. What to compute is
one :class:`SpectrumSettings`, whose defaults are those of ``hessdiag spectrum``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from hessdiag._errors import InputError
from hessdiag.curvature import HessianOperator
from hessdiag.curvature.linear import Progress
from hessdiag.distributed import collective, is_main
from hessdiag.measures import (
    check_curvature,
    compute_spectrum,
    parameterised_modules,
    resolve_basis_device,
)
from hessdiag.records import provenance, write_spectrum
from hessdiag.results import SpectrumResult
from hessdiag.runtime import resolve_device
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


def check_settings(task: Task, settings: SpectrumSettings) -> None:
    """What can be checked before computing: the device, the curvature's loss and the
    parameter selection."""
    resolve_device(settings.device)
    resolve_basis_device(settings.basis_device)
    check_curvature(task.loss, settings)
    if settings.preconditioner == "adam" and not task.optimizer_state:
        raise InputError("--preconditioner adam needs the optimizer state: this checkpoint "
                         "has none (hessdiag train saves it; save yours with "
                         "optimizer.state_dict())", param="preconditioner")
    if settings.params is not None:
        HessianOperator(task.model, task.loss, [task.first_batch()], params=settings.params)


def analyse_checkpoint(
    checkpoint: str,
    *,
    settings: SpectrumSettings | None = None,
    data: DataSettings | None = None,
    model_spec: str | None = None,
    loss: str | None = None,
    unsafe: bool = False, allow_nonfinite: bool = False,
    store: Any = None,
    progress: Progress = None,
) -> CheckpointSpectrum:
    """Spectrum of the Hessian of the checkpoint's task (its loss, mean over the samples
    of ``data``); written to ``store`` (a :class:`hessdiag.store.Store`) when given.

    In a job of several processes (``torchrun``, :mod:`hessdiag.distributed`) each process
    measures its shard of the samples and gets the whole result; only rank 0 writes the
    store (``analysis_id`` is ``None`` elsewhere)."""
    settings = settings or SpectrumSettings()
    data = data or DataSettings()
    task = load_task(checkpoint, data=data, model_spec=model_spec, loss=loss, unsafe=unsafe,
                     allow_nonfinite=allow_nonfinite)
    check_settings(task, settings)
    group = collective()
    result = compute_spectrum(task.model, task.loss,
                              task.batches(data.batch_size, sharded=group is not None),
                              settings, optimizer_state=task.optimizer_state,
                              progress=progress, collective=group)
    result = replace(result, samples=task.data.samples)
    analysis_id = None
    if store is not None and is_main():  # across processes, rank 0 writes
        origin = provenance(task)
        origin["data"] = {**origin["data"], "batch_size": data.batch_size}
        analysis_id = write_spectrum(store, result, origin)
    return CheckpointSpectrum(result=result, task=task, analysis_id=analysis_id)
