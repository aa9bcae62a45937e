"""Measurements shared by the workflows and by users' own training loops.

* :func:`top_eigenpair`: ``lambda_max`` of a loss's Hessian over fixed batches with its
  residual and eigenvector (Lanczos, warm-startable);
* :func:`alignment_row`: ``|cos(e, v)|`` and the signed cosine of a perturbation ``e``;
* :func:`training_gradient`: a minibatch gradient as training takes it, leaving the model
  as it was;
* :class:`AlignmentProbe`: both inside a user's training loop, logged to the store;
* :func:`compute_spectrum`: the spectrum of one Hessian (``hessdiag spectrum``,
  ``hessdiag check``);
* :func:`measure_alignment`: the alignment of perturbations with the top eigenvector,
  averaged over minibatches (``hessdiag align``, ``hessdiag check``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
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
    preserved_state,
    slq,
)
from hessdiag.curvature.gauss_newton import LIKELIHOODS, likelihood_of
from hessdiag.curvature.linear import Progress, generator
from hessdiag.curvature.preconditioned import (
    PreconditionedOperator,
    adam_preconditioner,
    adam_threshold,
)
from hessdiag.curvature.stats import bounded_mean_interval
from hessdiag.data import batch_fingerprint, to_device
from hessdiag.optim import perturbation
from hessdiag.results import AlignmentResult, LayerSharpness, SpectrumResult
from hessdiag.runtime import PeakMemory, resolve_device, resolve_dtype
from hessdiag.settings import RULES, SpectrumSettings
from hessdiag.task import call_model


def training_gradient(model: nn.Module, params: list[nn.Parameter], loss_fn, x, y) -> Tensor:
    """The minibatch gradient as training computes it (train mode, batch statistics),
    without changing the model: modes and buffers are restored."""
    with preserved_state(model, eval_mode=False), torch.enable_grad():
        loss = loss_fn(call_model(model, x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


def top_eigenpair(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor],
                  measure_batches: Any, *, v0: Tensor | None = None, tol: float = 1e-3,
                  seed: int = 0, device: torch.device | str | None = None,
                  collective: Any = None) -> tuple[dict[str, float], Tensor]:
    """``lambda_max`` over ``measure_batches`` (Lanczos, warm-started from ``v0``) with its
    residual, and its unit eigenvector (the next warm start). ``collective``: see
    :func:`compute_spectrum`."""
    op = HessianOperator(model, loss_fn, measure_batches, device=device,
                         check_determinism=False,
                         batch_size_fn=getattr(loss_fn, "batch_weight", None),
                         collective=collective)
    top = lanczos(op, k=1, tol=tol, seed=seed, v0=v0)
    row = {"lambda_max": float(top.eigenvalues[0]),
           "lambda_max_residual": float(top.residuals[0]),
           "lambda_max_converged": float(top.converged[0]), "hvps": float(top.hvps)}
    return row, top.eigenvectors[:, 0].detach()


def alignment_row(e: Tensor | None, v: Tensor) -> dict[str, float]:
    """``alignment`` (``|cos(e, v)|``) and ``alignment_signed``; ``nan`` for no or a zero
    ``e``."""
    cos = math.nan
    if e is not None:
        e = e.to(v)
        norm = float(torch.linalg.vector_norm(e))
        if norm > 0:
            cos = float(e @ v) / norm
    return {"alignment": abs(cos), "alignment_signed": cos}


def _as_flat(value: Any, params: list[nn.Parameter]) -> Tensor:
    """A perturbation or gradient given as a flat tensor, a list of tensors in parameter
    order, a ``{parameter: tensor}`` dict (as ``SAM.last_perturbation``), or ``None``
    meaning the parameters' current ``.grad``."""
    if value is None:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params]).detach()
    if isinstance(value, Tensor):
        return value.detach().reshape(-1)
    if isinstance(value, dict):
        return torch.cat([value.get(p, torch.zeros_like(p)).detach().reshape(-1)
                          for p in params])
    return torch.cat([t.detach().reshape(-1) for t in value])


class AlignmentProbe:
    """Record the alignment of your optimizer's perturbation with the top Hessian
    eigenvector inside your own training loop, without changing training.

    Every ``every`` steps, :meth:`probe` computes the top eigenvector of the Hessian over
    ``measure_batches`` (Lanczos, warm-started from the previous one, in eval mode, on a
    copy of the weights) and the cosine with the vector you pass. It touches neither the
    weights, their gradients, the model's modes, BatchNorm statistics nor any random
    state. With ``store`` (a :class:`hessdiag.store.Store`) and ``run``, rows go to the
    run's ``alignment`` table (the run is created if the store does not have it).

    Call it where the weights are the unperturbed ``w``: after the first backward and
    before ``first_step``. Pass nothing to use the gradient in ``.grad``: SAM's
    perturbation is parallel to it, so that is the alignment of SAM's ``e``. Any other
    vector (a flat tensor, a list in parameter order, or a ``{parameter: tensor}`` dict)
    is measured the same way.

    >>> probe = AlignmentProbe(model, loss_fn, measure_batches, every=100,
    ...                        store=Store("hessdiag.h5"), run="my-sam-run")  # doctest: +SKIP
    >>> for step, (x, y) in enumerate(loader):                                # doctest: +SKIP
    ...     loss_fn(model(x), y).backward()
    ...     probe.probe(step)                             # alignment of e = rho g / ||g||
    ...     opt.first_step(zero_grad=True)
    ...     loss_fn(model(x), y).backward()
    ...     opt.second_step(zero_grad=True)
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor],
                 measure_batches: Any, *, every: int = 100, store: Any = None,
                 run: str | None = None, tol: float = 1e-3, seed: int = 0) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1; got {every}")
        if store is not None and run is None:
            raise ValueError("AlignmentProbe with a store needs run= (the run id to log to)")
        self.model, self.loss_fn, self.batches = model, loss_fn, measure_batches
        self.every, self.store, self.run, self.tol, self.seed = every, store, run, tol, seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.vector: Tensor | None = None
        self.history: list[dict[str, float]] = []
        if store is not None:
            existing = {r.id for r in store.runs()}
            if run not in existing:
                store.create_run(run, {"kind": "external", "status": "running",
                                       "probe_every": every})

    def probe(self, step: int, perturbation_or_grad: Any = None) -> dict[str, float] | None:
        """Measure at steps that are multiples of ``every``; returns the row (``step``,
        ``alignment``, ``alignment_signed``, ``lambda_max``, residual, HVPs) or ``None``.
        ``perturbation_or_grad``: see :func:`_as_flat` (``None``: the current ``.grad``)."""
        if step % self.every != 0:
            return None
        e = _as_flat(perturbation_or_grad, self.params)
        measured, self.vector = top_eigenpair(self.model, self.loss_fn, self.batches,
                                              v0=self.vector, tol=self.tol, seed=self.seed)
        row = {"step": float(step), **alignment_row(e, self.vector), **measured}
        self.history.append(row)
        if self.store is not None:
            self.store.append_run(self.run, {"alignment": {k: [v_] for k, v_ in row.items()}})
        return row




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


# --------------------------------------------------------------------------- alignment


def _ci95(values: list[float], low: float = 0.0, high: float = 1.0
          ) -> tuple[float, tuple[float, float]]:
    """The mean of values in ``[low, high]`` with its 95% interval inside that range
    (NaN from fewer than two values)."""
    mean, _, lo, hi = bounded_mean_interval(np.asarray(values, dtype=float), low, high)
    return float(mean), (float(lo), float(hi))


def measure_alignment(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    measure_batches: Any,
    minibatches: Iterable[tuple[Any, Any]],
    *,
    rule: str = "sam",
    alpha: float = 0.2,
    eigenvector: Tensor | None = None,
    top_k: int = 1,
    tol: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
    collective: Any = None,
) -> AlignmentResult:
    """Top eigenvector(s) of the Hessian over ``measure_batches`` (Lanczos), then the
    cosine between each minibatch's perturbation and the top eigenvector.

    ``eigenvector``: for ``rule="eigensam"``, the optimizer's estimate ``u`` (flat, in the
    order of the model's trainable parameters). ``collective``: across processes (a
    :class:`hessdiag.distributed.Collective`), ``measure_batches`` is this process's shard
    of the measurement set, ``minibatches`` all of them on every process: each process
    computes the cosines of its contiguous share of the minibatches and they are gathered
    in order, so the result is the single-process one on every process.

    A minibatch whose contents repeat an earlier one (:func:`hessdiag.data.batch_fingerprint`)
    is left out; ``batches`` counts the distinct minibatches used, ``requested`` what was
    asked for (``minibatches.requested`` when given, e.g. by
    :func:`hessdiag.data.draw_minibatches`, whose ``note`` is carried over), and ``note``
    says what was left out. Intervals: :func:`hessdiag.curvature.stats.bounded_mean_interval`
    (inside [0, 1] and [-1, 1]); NaN from a single minibatch."""
    if rule not in RULES:
        raise InputError(f"rule must be one of {', '.join(RULES)}; got {rule!r}", param="rule")
    if top_k < 1:
        raise InputError(f"top_k must be at least 1; got {top_k}", param="top_k")
    if rule == "eigensam" and eigenvector is None:
        raise InputError("rule eigensam measures the optimizer's own eigenvector, and none "
                         "was given (a checkpoint of an Eigen-SAM run holds it); use rule "
                         "eigensam-exact for the exact top eigenvector", param="rule")
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    op = HessianOperator(model, loss_fn, measure_batches, device=device,
                         batch_size_fn=getattr(loss_fn, "batch_weight", None),
                         collective=collective)
    # a random start, never the gradient: the eigenvector's unconverged part would lie along
    # the very direction (the SAM perturbation is the gradient's) whose alignment is measured
    top = lanczos(op, k=top_k, tol=tol, seed=seed, progress=progress)
    V = top.eigenvectors
    v = V[:, 0]
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.cat([p.detach().reshape(-1) for p in params]).to(v)
    u = {"eigensam": None if eigenvector is None else eigenvector.to(v),
         "eigensam-exact": v}.get(rule)
    if u is not None and u.shape != v.shape:
        raise InputError(f"the optimizer's eigenvector has {u.numel()} entries but the model "
                         f"has {v.numel()} trainable parameters: not this model's",
                         param="rule")
    base = "eigensam" if rule.startswith("eigensam") else rule
    cosines, shares = [], []
    requested = int(getattr(minibatches, "requested", 0) or 0)
    note = str(getattr(minibatches, "note", "") or "")
    seen: set[str] = set()
    repeats = given = 0

    def repeated(batch: Any) -> bool:  # a minibatch given again adds nothing
        nonlocal repeats, given
        key = batch_fingerprint(batch)
        if key is not None and key in seen:
            repeats += 1
            return True
        if key is not None:
            seen.add(key)
        given += 1
        return False

    if collective is not None:  # the same repeats left out on every process, then shared
        minibatches = [b for b in minibatches if not repeated(b)]
        minibatches = [minibatches[i] for i in collective.shard(len(minibatches))]
    else:
        minibatches = (b for b in minibatches if not repeated(b))
    error = None
    try:
        for x, y in minibatches:
            x, y = to_device(x, device), to_device(y, device)
            g = training_gradient(model, params, loss_fn, x, y).to(v)
            (e,) = perturbation(base, [g], rho=1.0, params=[w], eigenvector=None if u is None
                                else [u], alpha=alpha)
            norm = float(torch.linalg.vector_norm(e))
            if norm == 0:
                continue  # a zero gradient has no direction
            cosines.append(float(e @ v) / norm)
            if top_k > 1:
                shares.append(float(torch.linalg.vector_norm(V.T @ e) ** 2) / norm**2)
    except Exception as exc:
        if collective is None:
            raise
        error = exc  # reported to the others, then raised here
    if collective is not None:
        collective.counts(error=error)
        parts = collective.gather((cosines, shares))
        cosines = [c for part in parts for c in part[0]]
        shares = [s_ for part in parts for s_ in part[1]]
    if not cosines:
        raise InputError("no minibatch gave a non-zero gradient: nothing to align",
                         param="data")
    cos = np.array(cosines)
    a, a_ci = _ci95(list(np.abs(cos)))
    signed, s_ci = _ci95(cosines, -1.0, 1.0)
    share = share_ci = None
    if shares:
        share, share_ci = _ci95(shares)
    if repeats:
        note = _sentence(note, f"{repeats} minibatches repeated an earlier one and were left "
                               "out")
    if given > len(cos):
        note = _sentence(note, f"{given - len(cos)} minibatches had a zero gradient and were "
                               "left out")
    if len(cos) < 2:
        note = _sentence(note, "no interval from a single minibatch")
    return AlignmentResult(
        alignment=a, ci95=a_ci, alignment_signed=signed, ci95_signed=s_ci,
        cosines=cos, batches=len(cos), top_k=top_k, topk_share=share,
        topk_share_ci95=share_ci, eigenvalues=top.eigenvalues, residuals=top.residuals,
        converged=top.converged, rule=rule, alpha=alpha, hvps=op.hvp_count,
        seconds=time.perf_counter() - start, seed=seed,
        settings={"tol": tol, "hvp_mode": op.mode, "measure_samples": op.n_samples},
        requested=requested or given + repeats, repeats=repeats, note=note,
        interval_method="logit-t",
    )


def _sentence(text: str, more: str) -> str:
    return f"{text}; {more}" if text else more


def optimizer_eigenvector(task: Any) -> Tensor | None:
    """The Eigen-SAM eigenvector estimate a checkpoint's optimizer state holds, if any."""
    state = task.optimizer_state or {}
    extra = state.get("sam") if isinstance(state, dict) else None
    vector = extra.get("eigenvector") if isinstance(extra, dict) else None
    return vector if isinstance(vector, Tensor) else None


def checkpoint_alignment(path: str, *, settings: Any, data: Any, model_spec: str | None = None,
                         loss: str | None = None, unsafe: bool = False,
                         allow_nonfinite: bool = False,
                         progress: Callable[[int, int], None] | None = None
                         ) -> tuple[AlignmentResult, Any]:
    """The alignment at a checkpoint (``hessdiag align``, ``hessdiag check``):
    ``settings`` an :class:`hessdiag.settings.AlignSettings`, ``data`` a
    :class:`hessdiag.settings.DataSettings` whose ``samples`` is replaced by
    ``settings.samples`` (the measurement set); the minibatches come from the whole split.
    Returns ``(result, task)``."""
    from dataclasses import replace

    from hessdiag.data import draw_minibatches
    from hessdiag.task import load_data, load_task

    task = load_task(path, data=replace(data, samples=settings.samples), model_spec=model_spec,
                     loss=loss, unsafe=unsafe,
                     allow_nonfinite=allow_nonfinite)
    config = task.extra.get("config") or {}
    alpha = settings.alpha if settings.alpha is not None else float(config.get("alpha", 0.2))
    eigenvector = optimizer_eigenvector(task)
    if settings.rule == "eigensam" and eigenvector is None:
        raise InputError(f"checkpoint {path} holds no Eigen-SAM eigenvector (not an Eigen-SAM "
                         "run, or saved before its first estimate): rule eigensam measures "
                         "the optimizer's own perturbation; use rule eigensam-exact",
                         param="rule")
    full = task.data if task.data.batches is not None else load_data(
        replace(data, samples=None), task.checkpoint.data, where=f"checkpoint {path}",
        trusted=unsafe)
    minibatches = draw_minibatches(full, settings.batches, settings.batch_size,
                                   settings.seed)
    from hessdiag.distributed import collective

    group = collective()
    result = measure_alignment(
        task.model, task.loss, task.batches(256, sharded=group is not None), minibatches,
        rule=settings.rule, alpha=alpha, eigenvector=eigenvector, top_k=settings.top_k,
        tol=settings.tol, seed=settings.seed, device=resolve_device(settings.device),
        progress=progress, collective=group)
    result = replace(result, settings={**result.settings, **vars(settings), "alpha": alpha})
    used = task.data.samples
    if task.data.batches is None and settings.samples is not None and used < settings.samples:
        # the measurement set is capped at the data: say so beside the minibatches' note
        result = replace(result, note=_sentence(
            f"the measurement set is all {used} samples of data {task.data.name} instead of "
            f"{settings.samples}", result.note))
    return result, task
