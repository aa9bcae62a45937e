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

:func:`measure_alignment` averages over ``B`` minibatches (mean of ``|cos|`` and of the
signed cosine, each with a 95% t-interval) and, with ``top_k > 1``, reports the share
``||V_k^T e||^2 / ||e||^2`` of the perturbation inside the top-``k`` eigenspace.
:class:`AlignmentProbe` measures the same inside a user's own training loop.
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
from hessdiag.curvature import HessianOperator, lanczos
from hessdiag.curvature.stats import mean_interval
from hessdiag.data import random_minibatches, to_device
from hessdiag.measures import AlignmentProbe, training_gradient
from hessdiag.optim import perturbation
from hessdiag.records import provenance, write_alignment
from hessdiag.results import AlignmentResult
from hessdiag.runtime import resolve_device
from hessdiag.settings import RULES, AlignSettings, DataSettings
from hessdiag.task import Task, load_data, load_task

__all__ = ["RULES", "AlignSettings", "AlignmentProbe", "CheckpointAlignment", "align_checkpoint",
           "measure_alignment", "optimizer_eigenvector"]


def _ci95(values: list[float]) -> tuple[float, tuple[float, float]]:
    mean, _, lo, hi = mean_interval(np.asarray(values, dtype=float))
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
) -> AlignmentResult:
    """Top eigenvector(s) of the Hessian over ``measure_batches`` (Lanczos), then the
    cosine between each minibatch's perturbation and the top eigenvector.

    ``eigenvector``: for ``rule="eigensam"``, the optimizer's estimate ``u`` (flat, in the
    order of the model's trainable parameters)."""
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
                         batch_size_fn=getattr(loss_fn, "batch_weight", None))
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
    if not cosines:
        raise InputError("no minibatch gave a non-zero gradient: nothing to align",
                         param="data")
    cos = np.array(cosines)
    a, a_ci = _ci95(list(np.abs(cos)))
    signed, s_ci = _ci95(cosines)
    share = share_ci = None
    if shares:
        share, share_ci = _ci95(shares)
    return AlignmentResult(
        alignment=a, ci95=a_ci, alignment_signed=signed, ci95_signed=s_ci,
        cosines=cos, batches=len(cos), top_k=top_k, topk_share=share,
        topk_share_ci95=share_ci, eigenvalues=top.eigenvalues, residuals=top.residuals,
        converged=top.converged, rule=rule, alpha=alpha, hvps=op.hvp_count,
        seconds=time.perf_counter() - start, seed=seed,
        settings={"tol": tol, "hvp_mode": op.mode, "measure_samples": op.n_samples},
    )


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointAlignment:
    result: AlignmentResult
    task: Task
    final: bool
    analysis_id: str | None


def optimizer_eigenvector(task: Task) -> Tensor | None:
    """The Eigen-SAM eigenvector estimate a checkpoint's optimizer state holds, if any."""
    state = task.optimizer_state or {}
    extra = state.get("sam") if isinstance(state, dict) else None
    vector = extra.get("eigenvector") if isinstance(extra, dict) else None
    return vector if isinstance(vector, Tensor) else None


def align_checkpoint(path: str, *, settings: AlignSettings | None = None,
                     data: DataSettings | None = None, model_spec: str | None = None,
                     loss: str | None = None, unsafe: bool = False, store: Any = None,
                     progress: Callable[[int, int], None] | None = None
                     ) -> CheckpointAlignment:
    """Alignment at one checkpoint; written to ``store`` (kind ``alignment``, with the
    checkpoint's run id) when given. ``data.samples`` is ignored: the measurement set is
    ``settings.samples`` samples, the minibatches come from the whole split."""
    from dataclasses import replace

    settings = settings or AlignSettings()
    data = data or DataSettings()
    task = load_task(path, data=replace(data, samples=settings.samples), model_spec=model_spec,
                     loss=loss, unsafe=unsafe)
    config = task.extra.get("config") or {}
    alpha = settings.alpha if settings.alpha is not None else float(config.get("alpha", 0.2))
    eigenvector = optimizer_eigenvector(task)
    if settings.rule == "eigensam" and eigenvector is None:
        raise InputError(f"checkpoint {path} holds no Eigen-SAM eigenvector (not an Eigen-SAM "
                         "run, or saved before its first estimate): rule eigensam measures "
                         "the optimizer's own perturbation; use rule eigensam-exact",
                         param="rule")
    device = resolve_device(settings.device)
    full = task.data if task.data.batches is not None else load_data(
        replace(data, samples=None), task.checkpoint.data, where=f"checkpoint {path}")
    minibatches = random_minibatches(full, settings.batches, settings.batch_size,
                                     settings.seed)
    result = measure_alignment(
        task.model, task.loss, task.batches(256), minibatches, rule=settings.rule,
        alpha=alpha, eigenvector=eigenvector, top_k=settings.top_k, tol=settings.tol,
        seed=settings.seed, device=device, progress=progress)
    result = replace(result, settings={**result.settings, **vars(settings), "alpha": alpha})
    analysis_id = None
    if store is not None:
        origin = provenance(task)
        origin["data"] = {**origin["data"], "measure_samples": task.data.samples}
        analysis_id = write_alignment(store, result, origin)
    return CheckpointAlignment(result=result, task=task, final=bool(task.extra.get("final")),
                               analysis_id=analysis_id)
