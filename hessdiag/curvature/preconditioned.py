"""Preconditioned curvature: ``P^-1/2 H P^-1/2`` for a diagonal preconditioner ``P``.

For an optimizer that steps ``theta <- theta - lr P^-1 m`` (Adam: ``P = diag(sqrt(v_hat)
+ eps)``), stability on a quadratic is governed by the eigenvalues of ``P^-1 H``, which are
those of the symmetric ``P^-1/2 H P^-1/2`` (Cohen et al. 2022, "Adaptive gradient methods
at the edge of stability"). Every solver runs on :class:`PreconditionedOperator` as on
``H``; :func:`adam_preconditioner` reads ``P`` from a ``torch.optim.Adam``/``AdamW`` state
dict (also the one ``hessdiag train`` saves, SAM and Eigen-SAM around Adam included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hessdiag.curvature.linear import matmat
from hessdiag.stability import adam_threshold

__all__ = ["PreconditionedOperator", "adam_preconditioner", "adam_threshold"]


class PreconditionedOperator:
    """``x -> D^-1/2 H D^-1/2 x`` for an operator ``H`` and a positive vector ``D``;
    ``details`` (what ``D`` is) are reported by :meth:`describe`."""

    def __init__(self, op: Any, diagonal: Tensor, details: dict[str, Any] | None = None
                 ) -> None:
        d = diagonal.reshape(-1).to(device=op.device, dtype=op.dtype)
        if d.shape != (op.dim,):
            raise ValueError(f"the preconditioner has {d.numel()} entries; the operator "
                             f"acts on {op.dim} parameters")
        if not bool((d > 0).all()):
            raise ValueError("the preconditioner must be positive everywhere")
        self.op = op
        self.details = dict(details or {})
        self.scale = d.rsqrt()
        self.dim, self.dtype, self.device = op.dim, op.dtype, op.device
        self.shape = (op.dim, op.dim)

    def matvec(self, v: Tensor) -> Tensor:
        return self.scale * self.op.matvec(self.scale * v)

    __matmul__ = matvec

    def matmat(self, vectors: Tensor) -> Tensor:
        scale = self.scale[:, None]
        return scale * matmat(self.op, scale * vectors)

    def gradient(self) -> Tensor:
        """The loss gradient in the coordinates ``y = D^1/2 x`` this operator is the Hessian
        in: ``D^-1/2 g``."""
        return self.scale * self.op.gradient()

    def __getattr__(self, name: str) -> Any:  # hvp_count, mode, describe, ... of ``H``
        if name == "op":
            raise AttributeError(name)
        return getattr(self.op, name)

    def describe(self) -> dict[str, Any]:
        return {**self.op.describe(), "preconditioner": self.details}


def adam_preconditioner(optimizer_state: Mapping[str, Any] | None,
                        params: Sequence[tuple[str, Tensor]], selected: Sequence[str]
                        ) -> tuple[Tensor, dict[str, float]]:
    """Adam's ``sqrt(v_hat) + eps`` for the ``selected`` parameters, flattened in their
    order, and ``{"beta1", "beta2", "eps", "lr", "step"}``.

    ``params``: the model's trainable ``(name, parameter)`` pairs in the order the
    optimizer was built on (``hessdiag train`` builds it on ``model.parameters()`` that
    require grad), which is how a state dict numbers them."""
    if not optimizer_state or "state" not in optimizer_state:
        raise ValueError("the checkpoint holds no optimizer state: the Adam preconditioner "
                         "needs a checkpoint saved with its optimizer (as hessdiag train "
                         "saves them)")
    groups = optimizer_state.get("param_groups") or []
    state = optimizer_state["state"]
    index = {name: i for i, (name, _) in enumerate(params)}
    group_of = {int(i): g for g in groups for i in g.get("params", [])}
    parts, info = [], {}
    for name in selected:
        i = index[name]
        entry, group = state.get(i, state.get(str(i))), group_of.get(i)
        if entry is None or "exp_avg_sq" not in entry or group is None:
            raise ValueError(f"the optimizer state has no Adam second moment for {name}: "
                             "it is not Adam's (or AdamW's), or this parameter never "
                             "took a step")
        beta1, beta2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
        eps, step = float(group.get("eps", 1e-8)), float(entry.get("step", 0))
        if step < 1:
            raise ValueError(f"the Adam state of {name} is from before the first step")
        v_hat = entry["exp_avg_sq"].double() / (1.0 - beta2 ** step)
        parts.append((v_hat.sqrt() + eps).reshape(-1))
        info = {"beta1": beta1, "beta2": beta2, "eps": eps, "lr": float(group.get("lr", 0)),
                "step": step}
    return torch.cat(parts), info
