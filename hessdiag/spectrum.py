"""The spectrum workflow: top and bottom eigenvalues, trace, density and per-layer
sharpness of one Hessian.

:func:`compute_spectrum` analyses a model, loss and data in memory;
:func:`analyse_checkpoint` does it for the task a checkpoint records
(:func:`hessdiag.task.load_task`) and writes the result to the store. What to compute is
one :class:`SpectrumSettings`, whose defaults are those of ``hessdiag spectrum``.

The module owns the whole computation: :func:`curvature_operator` (the Hessian, GGN or
Fisher operator the settings name), :func:`top_start` (the top solver's starting vector),
the solvers' calls and :func:`parameterised_modules` (the per-layer blocks).
``hessdiag check`` computes its spectra here too.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from hessdiag._errors import InputError
from hessdiag.curvature import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq,
)
from hessdiag.curvature.gauss_newton import LIKELIHOODS, likelihood_of
from hessdiag.curvature.linear import Progress, generator
from hessdiag.curvature.preconditioned import (
    PreconditionedOperator,
    adam_preconditioner,
    adam_threshold,
)
from hessdiag.distributed import collective, is_main
from hessdiag.records import provenance, write_spectrum
from hessdiag.results import LayerSharpness, SpectrumResult
from hessdiag.runtime import PeakMemory, resolve_device, resolve_dtype
from hessdiag.settings import METHODS, TRACE_METHODS, DataSettings, SpectrumSettings
from hessdiag.task import Task, load_task

__all__ = ["METHODS", "TRACE_METHODS", "CheckpointSpectrum", "DataSettings", "SpectrumSettings",
           "analyse_checkpoint", "compute_spectrum", "curvature_operator",
           "parameterised_modules", "top_start"]


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
    loss: str | None = None, output: str | None = None,
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
    task = load_task(checkpoint, data=data, model_spec=model_spec, loss=loss, output=output,
                     unsafe=unsafe, allow_nonfinite=allow_nonfinite)
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


# --------------------------------------------------------------------------- spectra


# the Hessian's product modes, as the Gauss-Newton and Fisher operators compute J v
_OUTPUT_MODES = {"auto": "auto", "forward-over-reverse": "jvp", "double-backward": "double-vjp",
                 "jvp": "jvp", "double-vjp": "double-vjp"}


def check_curvature(loss_fn: Any, settings: SpectrumSettings, collective: Any = None) -> None:
    """:class:`InputError` (``curvature``) when ``settings.curvature`` cannot be computed
    for this loss: the Fisher needs a loss that is a likelihood."""
    if settings.curvature == "hessian":
        return
    if collective is not None:
        raise InputError(f"curvature {settings.curvature} is computed in one process; use "
                         "curvature hessian across processes", param="curvature")
    if settings.curvature == "fisher" and likelihood_of(loss_fn) is None:
        spec = getattr(loss_fn, "spec", None) or type(loss_fn).__name__
        raise InputError(f"curvature fisher needs a loss that is a likelihood "
                         f"({', '.join(LIKELIHOODS)}); loss {spec} is not one: use curvature "
                         "ggn, which takes any loss", param="curvature")


def curvature_operator(model: nn.Module, loss_fn: Any, data: Any, s: SpectrumSettings, *,
                       params: Any = None, mode: str | None = None,
                       check_determinism: bool = True, memory_budget: int | None = None,
                       collective: Any = None) -> Any:
    """The operator of ``s.curvature`` over ``params``: a :class:`HessianOperator`,
    :class:`GGNOperator` or :class:`FisherOperator` (its targets seeded from ``s.seed``),
    batches weighted by the loss's count. ``mode``: a mode the operator already chose
    (default ``s.hvp_mode``)."""
    check_curvature(loss_fn, s, collective)
    common = {"params": params, "dtype": resolve_dtype(s.dtype),
              "device": resolve_device(s.device), "check_determinism": check_determinism,
              "batch_size_fn": getattr(loss_fn, "batch_weight", None)}
    mode = mode or s.hvp_mode
    if s.curvature == "hessian":
        return HessianOperator(model, loss_fn, data, mode=mode, memory_budget=memory_budget,
                               collective=collective, compile=s.compile,
                               batch_vectors=s.batch_vectors, **common)
    if s.curvature == "ggn":
        return GGNOperator(model, loss_fn, data, mode=_OUTPUT_MODES[mode], **common)
    return FisherOperator(model, loss_fn, data, mode=_OUTPUT_MODES[mode], kind=s.fisher_kind,
                          seed=s.seed + 4, mc_samples=s.fisher_samples, **common)


def resolve_basis_device(name: str | None) -> torch.device | None:
    """``settings.basis_device`` as a device (``None``: the operator's), checked against
    this machine (:class:`InputError` naming ``basis_device``)."""
    if name is None:
        return None
    try:
        return resolve_device(name)
    except InputError as exc:
        raise InputError(str(exc).replace("device ", "basis_device ", 1),
                         param="basis_device") from exc


def compute_spectrum(model: nn.Module, loss_fn: Any, data: Any,
                     settings: SpectrumSettings | None = None, *,
                     optimizer_state: dict[str, Any] | None = None,
                     progress: Progress = None, collective: Any = None) -> SpectrumResult:
    """Analyse the Hessian of ``loss_fn`` (the mean over ``data``'s samples, or terms: a
    :class:`hessdiag.losses.Loss` weights batches by its count) at the model's weights,
    or its generalised Gauss-Newton or Fisher matrix (``settings.curvature``).
    ``optimizer_state``: the state dict of the optimizer that trained the model, for
    ``settings.preconditioner="adam"``. ``collective``: across processes, a
    :class:`hessdiag.distributed.Collective` with ``data`` this process's shard (the result
    is that of all shards together, on every process). The result's ``peak_memory``
    is measured by :class:`hessdiag.runtime.PeakMemory` on the operator's device (with
    several processes: this process's)."""
    s = settings or SpectrumSettings()
    with PeakMemory(resolve_device(s.device)) as memory:
        result = _spectrum(model, loss_fn, data, s, optimizer_state, progress, collective)
    return replace(result, peak_memory=memory.peak, peak_memory_growth=memory.growth,
                   peak_memory_kind=memory.kind if memory.peak is not None else None)


def _spectrum(model: nn.Module, loss_fn: Any, data: Any, s: SpectrumSettings,
              optimizer_state: dict[str, Any] | None, progress: Progress,
              collective: Any) -> SpectrumResult:
    """:func:`compute_spectrum` without the memory measurement."""
    start = time.perf_counter()
    budget = None if s.memory_budget is None else int(s.memory_budget * (1 << 30))
    op = curvature_operator(model, loss_fn, data, s, params=s.params, memory_budget=budget,
                            collective=collective)
    if s.preconditioner == "adam":
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        try:
            diagonal, adam = adam_preconditioner(optimizer_state, trainable, op.param_names)
        except ValueError as exc:
            raise InputError(str(exc), param="preconditioner") from exc
        # with several group learning rates, the diagonal is P_i lr / lr_i (lr the
        # largest): its eigenvalues still compare with adam_threshold(lr, beta1)
        op = PreconditionedOperator(op, diagonal, {
            "kind": "adam", **adam, "threshold": adam_threshold(adam["lr"], adam["beta1"])})
    basis = resolve_basis_device(s.basis_device)
    v0, started = top_start(op, s.start, s.top_k, s.seed)
    if s.method == "lanczos":
        top = lanczos(op, k=s.top_k, which="largest", tol=s.tol, seed=s.seed, progress=progress,
                      basis_device=basis, v0=v0)
    else:
        top = power_iteration(op, k=s.top_k, tol=s.tol, seed=s.seed, progress=progress, v0=v0)
    bottom = (lanczos(op, k=1, which="smallest", tol=s.tol, seed=s.seed + 1, progress=progress,
                      basis_device=basis)
              if s.lambda_min else None)
    estimator = hutchpp if s.trace_method == "hutch++" else hutchinson
    trace = (estimator(op, s.trace_hvps, seed=s.seed + 2, progress=progress)
             if s.trace or s.per_layer else None)
    density = (slq(op, s.slq_probes, s.slq_steps, seed=s.seed + 3, progress=progress)
               if s.density else None)
    hvps = op.hvp_count
    layers: tuple[LayerSharpness, ...] = ()
    if s.per_layer:
        layers = tuple(_layer(model, loss_fn, data, s, names, name, op.mode, progress,
                              collective)
                       for name, names in parameterised_modules(model, op.param_names))
        hvps += sum(layer.top.hvps + (layer.trace.hvps if layer.trace else 0)
                    for layer in layers)
    return SpectrumResult(
        top=top, bottom=bottom, trace=trace, density=density,
        operator={"curvature": s.curvature, **op.describe()},
        hvps=hvps, seconds=time.perf_counter() - start, seed=s.seed,
        settings={**asdict(s), "tol": top.tol, "started_from": started}, layers=layers,
    )


def top_start(op: Any, start: str, top_k: int, seed: int) -> tuple[Tensor | None, str]:
    """The starting vector of the top eigenvalues' solver and what it is.

    ``start="auto"`` and ``"random"``: a Gaussian start from the solver's seed (``None``
    here). A uniformly random start has a component along every eigenvector with
    probability one, which is what Lanczos's convergence to the *top* eigenvalue rests
    on.

    ``start="gradient"``: the operator's loss gradient
    (:meth:`hessdiag.curvature.HessianOperator.gradient`, free when the gradient graphs are
    kept) normalised, plus a Gaussian vector of norm one drawn from ``seed`` in a stream of
    its own (apart from the solver's). The gradient of a network's loss lies mostly in the
    top eigenspace of its Hessian (Gur-Ari et al. 2018), which saves a few products on
    small networks; but where the gradient holds little of the top eigenvector the run
    converges first to the eigenvalue below it, and on a ResNet-18 at initialisation it
    cost more products than a random start (see ``docs/benchmarks.md``). It is therefore
    not the default, and a solve started from it runs Lanczos's multiplicity check even
    for a top-1 (:func:`hessdiag.curvature.lanczos` with ``v0``), so a missed top
    eigenvalue is found rather than returned as converged.
    An operator without a gradient (a preconditioned one), or a gradient of zero or not
    finite, starts at random; the second value says which start was taken.
    Returns ``(v0 or None, "gradient" | "random" | "random (...)")``."""
    if start in ("random", "auto"):
        return None, "random"
    gradient = getattr(op, "gradient", None)
    if not callable(gradient):
        return None, "random (this operator has no loss gradient)"
    g = gradient()
    norm = float(torch.linalg.vector_norm(g, dtype=torch.float64))
    if not math.isfinite(norm) or norm == 0.0:
        return None, "random (the loss gradient is zero or not finite)"
    gen = generator(int(seed) + 104729)  # a stream apart from the solver's
    z = torch.randn(g.shape[0], generator=gen, dtype=torch.float64).to(g.device, g.dtype)
    return g / norm + z / torch.linalg.vector_norm(z), "gradient"


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
           name: str, mode: str | None, progress: Progress,
           collective: Any = None) -> LayerSharpness:
    """Top eigenvalue and trace of one module's diagonal block of the curvature."""
    op = curvature_operator(model, loss_fn, data, s, params=names, mode=mode,
                            check_determinism=False, collective=collective)
    v0, _ = top_start(op, s.start, 1, s.seed)  # a block's top is a top-1
    top = lanczos(op, k=1, which="largest", tol=s.tol, seed=s.seed, progress=progress,
                  basis_device=resolve_basis_device(s.basis_device), v0=v0)
    estimator = hutchpp if s.trace_method == "hutch++" else hutchinson
    trace = estimator(op, s.trace_hvps, seed=s.seed + 2, progress=progress)
    return LayerSharpness(name=name, params=tuple(names), dim=op.dim, top=top, trace=trace)
