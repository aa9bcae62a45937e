"""Alignment between a SAM-type perturbation and the top Hessian eigenvector.

SAM only flattens the sharpest direction when its perturbation points along the top
eigenvector of the Hessian (Luo et al., NeurIPS 2024, "Explicit Eigenvalue Regularization
Improves Sharpness-Aware Minimization"); Eigen-SAM steers it there. For weights ``w``,
minibatch gradient ``g`` and unit top eigenvector ``v`` of the training-loss Hessian on a
fixed measurement set, the alignment of a perturbation ``e`` is ``|<e, v>| / ||e||``
(reported with its sign too). The perturbation rules (:func:`hessdiag.optim.perturbation`):

``sam``             ``e ∝ g / ||g||`` (Foret et al. 2021)
``asam``            ``e ∝ T^2 g / ||T g||``, ``T = |w|`` (Kwon et al. 2021)
``eigensam``        ``e ∝ g_hat + alpha sign(<g, u>) u_perp`` with ``u`` the eigenvector
                    estimate the Eigen-SAM optimizer holds (saved in the checkpoint's
                    optimizer state): the perturbation the optimizer applies
``eigensam-exact``  the same rule with ``u = v``, the exact top eigenvector of the
                    measurement set: what Eigen-SAM would apply with a perfect estimate
                    (aligned partly by construction, so not a measure of the optimizer)

The cosine does not depend on the radius ``rho``, so none is asked for.

:func:`measure_alignment` averages over ``B`` distinct minibatches (mean of ``|cos|`` and
of the signed cosine, each with a 95% interval inside its range, a Student-t interval on
the logit scale: :func:`hessdiag.curvature.stats.bounded_mean_interval`; a minibatch given
twice counts once, and one minibatch gives no interval) and, with ``top_k > 1``, reports
the share ``||V_k^T e||^2 / ||e||^2`` of the perturbation inside the top-``k``
eigenspace. :func:`align_checkpoint` draws the minibatches with
:func:`hessdiag.data.draw_minibatches` (distinct samples, never one twice; its ``note``
says when a small data set holds fewer than asked).
:class:`AlignmentProbe` measures the same inside a user's own training loop, from
:func:`top_eigenpair` (``lambda_max`` and its eigenvector, warm-startable) and
:func:`alignment_row` (the cosine of one perturbation), which ``hessdiag train`` uses as
well. :func:`checkpoint_alignment` is the measurement at a checkpoint that
``hessdiag align`` and ``hessdiag check`` share.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessdiag._errors import InputError
from hessdiag.curvature import HessianOperator, lanczos, preserved_state
from hessdiag.curvature.stats import bounded_mean_interval
from hessdiag.data import batch_fingerprint, to_device
from hessdiag.distributed import is_main
from hessdiag.monitor import AlignmentProbe, alignment_row, top_eigenpair
from hessdiag.optim import perturbation
from hessdiag.records import provenance, write_alignment
from hessdiag.results import AlignmentResult
from hessdiag.runtime import resolve_device
from hessdiag.settings import RULES, AlignSettings, DataSettings
from hessdiag.task import Task, call_model

__all__ = ["RULES", "AlignSettings", "AlignmentProbe", "CheckpointAlignment", "align_checkpoint",
           "alignment_row", "checkpoint_alignment", "measure_alignment",
           "optimizer_eigenvector", "top_eigenpair", "training_gradient"]


# --------------------------------------------------------------------------- probes


def training_gradient(model: nn.Module, params: list[nn.Parameter], loss_fn, x, y) -> Tensor:
    """The minibatch gradient as training computes it (train mode, batch statistics),
    without changing the model: modes and buffers are restored."""
    with preserved_state(model, eval_mode=False), torch.enable_grad():
        loss = loss_fn(call_model(model, x), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


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
                         loss: str | None = None, output: str | None = None, unsafe: bool = False,
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
                     loss=loss, output=output, unsafe=unsafe,
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


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointAlignment:
    result: AlignmentResult
    task: Task
    final: bool
    analysis_id: str | None


def align_checkpoint(path: str, *, settings: AlignSettings | None = None,
                     data: DataSettings | None = None, model_spec: str | None = None,
                     loss: str | None = None, output: str | None = None, unsafe: bool = False,
                     allow_nonfinite: bool = False, store: Any = None,
                     progress: Callable[[int, int], None] | None = None
                     ) -> CheckpointAlignment:
    """Alignment at one checkpoint; written to ``store`` (kind ``alignment``, with the
    checkpoint's run id) when given. ``data.samples`` is ignored: the measurement set is
    ``settings.samples`` samples, the minibatches come from the whole split."""
    result, task = checkpoint_alignment(path, settings=settings or AlignSettings(),
                                        data=data or DataSettings(), model_spec=model_spec,
                                        loss=loss, output=output, unsafe=unsafe,
                                        allow_nonfinite=allow_nonfinite, progress=progress)
    analysis_id = None
    if store is not None and is_main():  # across processes, rank 0 writes
        origin = provenance(task)
        origin["data"] = {**origin["data"], "measure_samples": task.data.samples}
        analysis_id = write_alignment(store, result, origin)
    return CheckpointAlignment(result=result, task=task, final=bool(task.extra.get("final")),
                               analysis_id=analysis_id)
