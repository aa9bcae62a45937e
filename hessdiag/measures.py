"""Measurements shared by the workflows and by users' own training loops.

* :func:`top_eigenpair`: ``lambda_max`` of a loss's Hessian over fixed batches with its
  residual and eigenvector (Lanczos, warm-startable);
* :func:`alignment_row`: ``|cos(e, v)|`` and the signed cosine of a perturbation ``e``;
* :func:`training_gradient`: a minibatch gradient as training takes it, leaving the model
  as it was;
* :class:`AlignmentProbe`: both inside a user's training loop, logged to the store.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from hessdiag.curvature import HessianOperator, lanczos, preserved_state
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
                  seed: int = 0, device: torch.device | str | None = None
                  ) -> tuple[dict[str, float], Tensor]:
    """``lambda_max`` over ``measure_batches`` (Lanczos, warm-started from ``v0``) with its
    residual, and its unit eigenvector (the next warm start)."""
    op = HessianOperator(model, loss_fn, measure_batches, device=device,
                         check_determinism=False,
                         batch_size_fn=getattr(loss_fn, "batch_weight", None))
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


