"""The mean loss over fixed batches as a function of the trainable parameters.

``L(theta) = sum_b w_b L_b(theta) / sum_b w_b`` with ``w_b`` the loss's count of terms in
batch ``b`` (:meth:`hessdiag.losses.Loss.batch_weight`; the batch's number of samples for a
plain loss function): the same mean the Hessian operator differentiates, so a
measurement by forward passes (critical and ascent sharpness, loss landscapes) is of the
same function as the eigenvalues. A sum-reduced loss (``loss_fn.reduction == "sum"``, as
:class:`~hessdiag.curvature.HessianOperator` detects it) already holds its batch's sum:
it is added with weight one and divided by the same total, ``L = sum_b L_b / sum_b w_b``,
so both reductions give the per-term mean. Forward passes run in eval mode on copies of the
parameters; the model itself is never modified.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessdiag._errors import InputError
from hessdiag._tensors import to_device
from hessdiag.curvature.operator import preserved_state


class MeanLoss:
    """``L(params)`` and ``grad L`` over fixed batches; ``params`` is a list of tensors in
    the order of the model's trainable parameters (:attr:`names`), starting at
    :attr:`theta` (a copy of the model's). Counts its forward and backward passes."""

    def __init__(self, model: nn.Module, loss_fn: Any, batches: Any, device: Any,
                 dtype: torch.dtype) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.theta = [p.detach().to(device, dtype).clone()
                      for n, p in model.named_parameters() if p.requires_grad]
        self.fixed = {n: to_device(t.detach(), device, dtype)
                      for n, t in list(model.named_parameters()) + list(model.named_buffers())
                      if n not in self.names}
        weight = getattr(loss_fn, "batch_weight", None) or (lambda x, y: int(len(y)))
        self.batches = [(to_device(x, device, dtype), to_device(y, device, None), weight(x, y))
                        for x, y in batches]
        if not self.batches:
            raise InputError("no data: there is no loss to measure", param="samples")
        self.total = sum(w for _, _, w in self.batches)
        # a sum-reduced loss already is w_b times its mean (see the module docstring)
        self.sum_reduced = getattr(loss_fn, "reduction", "mean") == "sum"
        self.forward = self.backward = self.hvps = 0

    def _weight(self, w: int) -> float:
        """A batch's weight in the sum divided by :attr:`total`."""
        return 1.0 if self.sum_reduced else float(w)

    def outputs(self, params: list[Tensor], x: Any) -> Any:
        """The model's outputs on inputs ``x`` with parameters ``params``."""
        state = {**self.fixed, **dict(zip(self.names, params, strict=True))}
        if isinstance(x, dict):
            return functional_call(self.model, state, args=(), kwargs=x)
        return functional_call(self.model, state, tuple(x) if isinstance(x, tuple | list)
                               else (x,))

    def loss(self, params: list[Tensor]) -> float:
        """``L(params)`` (a forward pass over every batch)."""
        return self.loss_and_accuracy(params)[0]

    def loss_and_accuracy(self, params: list[Tensor]) -> tuple[float, float | None]:
        """``L(params)`` and the accuracy over the same samples (``None`` for a loss
        without one, such as mse), from one forward pass over every batch."""
        self.forward += 1
        total = 0.0
        correct = counted = 0
        accuracy = getattr(self.loss_fn, "accuracy_counts", None)
        with torch.no_grad(), preserved_state(self.model):
            for x, y, w in self.batches:
                out = self.outputs(params, x)
                total += float(self.loss_fn(out, y)) * self._weight(w)
                counts = accuracy(out, y) if accuracy is not None else None
                if counts is not None:
                    correct += int(counts[0])
                    counted += int(counts[1])
        return total / self.total, (correct / counted if counted else None)

    def grad(self, params: list[Tensor]) -> tuple[float, list[Tensor]]:
        """``(L, grad L)`` at ``params``."""
        self.backward += 1
        params = [p.detach().requires_grad_(True) for p in params]
        grads = [torch.zeros_like(p) for p in params]
        total = 0.0
        with preserved_state(self.model), torch.enable_grad():
            for x, y, w in self.batches:
                value = self.loss_fn(self.outputs(params, x), y) * (self._weight(w) / self.total)
                for g, part in zip(grads, torch.autograd.grad(value, params, allow_unused=True),
                                   strict=True):
                    if part is not None:
                        g += part
                total += float(value.detach())
        return total, grads

    def hvp(self, params: list[Tensor], vector: list[Tensor]) -> list[Tensor]:
        """``H(params) vector`` of ``L`` (double backward, batch by batch)."""
        self.hvps += 1
        params = [p.detach().requires_grad_(True) for p in params]
        out = [torch.zeros_like(p) for p in params]
        with preserved_state(self.model), torch.enable_grad():
            for x, y, w in self.batches:
                value = self.loss_fn(self.outputs(params, x), y) * (self._weight(w) / self.total)
                grads = torch.autograd.grad(value, params, create_graph=True, allow_unused=True)
                pairs = [(g, v) for g, v in zip(grads, vector, strict=True) if g is not None]
                if not pairs or not any(g.requires_grad for g, _ in pairs):
                    continue
                inner = sum((g * v).sum() for g, v in pairs if g.requires_grad)
                parts = torch.autograd.grad(inner, params, allow_unused=True)
                for o, part in zip(out, parts, strict=True):
                    if part is not None:
                        o += part.detach()
        return out
