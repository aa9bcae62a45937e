"""Preconditioned curvature: ``P^-1/2 H P^-1/2`` for a diagonal preconditioner ``P``.

For an optimizer that steps ``theta <- theta - lr P^-1 m`` with ``m`` the (uncorrected)
exponential average of gradients, stability on a quadratic is governed by the eigenvalues
of ``P^-1 H``, which are those of the symmetric ``P^-1/2 H P^-1/2`` (Cohen et al. 2022,
"Adaptive gradient methods at the edge of stability"). ``torch.optim.Adam``'s step is
``theta <- theta - lr m / ((1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps))``, so

    P = (1 - beta1^t) (sqrt(v_hat) + eps),    v_hat = v / (1 - beta2^t)

per parameter, with ``v`` the running maximum ``max_exp_avg_sq`` under ``amsgrad`` and
``t`` that parameter's own step count. Without the ``1 - beta1^t`` factor the
preconditioned sharpness of early training reads low by ``1 / (1 - beta1^t)`` (x3.7 at
step 3, x1.14 at step 20 for ``beta1 = 0.9``).

Parameter groups with different learning rates: the linearised update is ``theta <-
theta - D m`` with ``D = diag(lr_i / P_i)``, stable iff the eigenvalues of ``D H`` (those
of ``D^1/2 H D^1/2``) are below the dimensionless ``(2 + 2 beta1) / (1 - beta1)``.
:func:`adam_preconditioner` returns ``P_i lr_ref / lr_i`` with ``lr_ref`` the largest
group learning rate, so that the operator's eigenvalues compare with
``adam_threshold(lr_ref, beta1)`` exactly as with one learning rate (where the diagonal
is ``P`` itself). Groups with different ``beta1`` have no common threshold: an error.
Weight decay (Adam's L2 term, AdamW's decoupled shrink) is not part of ``P``.

Every solver runs on :class:`PreconditionedOperator` as on ``H``.
:func:`adam_preconditioner` reads ``P`` from a live ``torch.optim.Adam``/``AdamW`` (or
SAM / Eigen-SAM around one), or from its state dict (also the one ``hessdiag train``
saves), matching the optimizer's state to the model's parameters by identity (a live
optimizer) or by the parameter names in the state dict's groups, never by position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hessdiag.curvature.linear import matmat
from hessdiag.stability import adam_threshold

__all__ = ["PreconditionedOperator", "adam_preconditioner", "adam_threshold",
           "name_optimizer_state", "optimizer_entries"]


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


def _groups_and_state(optimizer: Any) -> tuple[list[dict[str, Any]], Any, bool]:
    """``(param_groups, state, live)`` of a live optimizer (SAM's base optimizer's state)
    or of a state dict."""
    if isinstance(optimizer, torch.optim.Optimizer):
        base = getattr(optimizer, "base_optimizer", optimizer)
        return list(base.param_groups), base.state, True
    if not optimizer or not isinstance(optimizer, Mapping) or "state" not in optimizer:
        raise ValueError("the checkpoint holds no optimizer state: the Adam preconditioner "
                         "needs a checkpoint saved with its optimizer (as hessdiag train "
                         "saves them)")
    return list(optimizer.get("param_groups") or []), optimizer["state"], False


def optimizer_entries(optimizer: Any, params: Sequence[tuple[str, Tensor]]
                      ) -> dict[str, tuple[Mapping[str, Any], Mapping[str, Any] | None]]:
    """``{name: (group, state)}`` for the model's ``params`` (``(name, parameter)`` pairs):
    the optimizer's parameter group holding each parameter and its per-parameter state
    (``None`` if it has none yet).

    A live optimizer is matched by identity (``group["params"]`` against the model's
    tensors); a state dict by the ``param_names`` of its groups (an optimizer built on
    ``model.named_parameters()``, or saved by ``hessdiag train``). A state dict without
    names is matched only when it has a single group of exactly the model's trainable
    parameters (how an optimizer on ``model.parameters()`` numbers them), each state's
    shape checked; with several unnamed groups which state is whose cannot be told, and
    that is an error, as is any parameter the optimizer does not hold or holds twice."""
    groups, state, live = _groups_and_state(optimizer)
    entries: dict[str, tuple[Mapping[str, Any], Mapping[str, Any] | None]] = {}
    if live:
        name_of = {id(p): n for n, p in params}
        foreign = 0
        for group in groups:
            for p in group["params"]:
                name = name_of.get(id(p))
                if name is None:
                    foreign += 1
                    continue
                entries[name] = (group, state.get(p))
        if foreign:
            raise ValueError(f"the optimizer holds {foreign} tensors that are not "
                             "parameters of this model: it is not this model's optimizer")
        return entries

    def entry(index: Any) -> Mapping[str, Any] | None:
        return state.get(index, state.get(str(index)))

    named = [g for g in groups if g.get("param_names") is not None]
    if named and len(named) != len(groups):
        raise ValueError("the optimizer state names the parameters of some groups only")
    if named:
        known = {n for n, _ in params}
        for group in groups:
            for name, index in zip(group["param_names"], group["params"], strict=True):
                if name not in known:
                    raise ValueError(f"the optimizer state holds a parameter {name!r} that "
                                     "this model does not have: it is not this model's "
                                     "optimizer")
                if name in entries:
                    raise ValueError(f"the optimizer state names {name!r} twice")
                entries[name] = (group, entry(index))
        return entries
    if len(groups) != 1:
        raise ValueError(
            f"the optimizer state has {len(groups)} parameter groups and no parameter "
            "names: which state belongs to which parameter cannot be told from a state "
            "dict (it numbers parameters by group, not in the model's order); build the "
            "optimizer on named parameters (e.g. torch.optim.Adam([{'params': "
            "list(named_biases)}, ...])) so its state dict carries them, or pass the "
            "live optimizer")
    (group,) = groups
    if len(group["params"]) != len(params):
        raise ValueError(f"the optimizer state has {len(group['params'])} parameters; the "
                         f"model has {len(params)} trainable ones: it is not this model's "
                         "optimizer (or was built on another parameter list)")
    for (name, p), index in zip(params, group["params"], strict=True):
        e = entry(index)
        shapes = [tuple(v.shape) for v in (e or {}).values()
                  if isinstance(v, Tensor) and v.dim() > 0]
        if any(shape != tuple(p.shape) for shape in shapes):
            raise ValueError(f"the optimizer state of parameter {index} does not have the "
                             f"shape of {name} {tuple(p.shape)}: it is not this model's "
                             "optimizer, or its parameters were in another order")
        entries[name] = (group, e)
    return entries


def name_optimizer_state(state_dict: dict[str, Any], optimizer: torch.optim.Optimizer,
                         params: Sequence[tuple[str, Tensor]]) -> dict[str, Any]:
    """``state_dict`` (``optimizer.state_dict()``) with each group's ``param_names``
    (found by identity of the live ``optimizer``'s parameters in ``params``), so that a
    saved checkpoint maps its state to parameters by name. Groups already named, or
    holding tensors not in ``params``, are left as they are."""
    name_of = {id(p): n for n, p in params}
    base = getattr(optimizer, "base_optimizer", optimizer)
    live = base.param_groups
    saved = state_dict.get("param_groups") or []
    if len(live) != len(saved):
        return state_dict
    groups = []
    for group, saved_group in zip(live, saved, strict=True):
        names = [name_of.get(id(p)) for p in group["params"]]
        if "param_names" in saved_group or None in names:
            return state_dict
        groups.append({**saved_group, "param_names": names})
    return {**state_dict, "param_groups": groups}


def adam_preconditioner(optimizer: Any, params: Sequence[tuple[str, Tensor]],
                        selected: Sequence[str]) -> tuple[Tensor, dict[str, Any]]:
    """The diagonal of Adam's preconditioner for the ``selected`` parameters, flattened in
    their order (float64), and ``{"beta1", "beta2", "eps", "lr", "step", "amsgrad",
    "groups", ...}``.

    ``optimizer``: a live ``torch.optim.Adam``/``AdamW`` (SAM/Eigen-SAM around one) or its
    state dict; ``params``: the model's trainable ``(name, parameter)`` pairs. Each entry
    is ``P = (1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps)`` as ``torch.optim.Adam``'s step
    divides by it (``v = max_exp_avg_sq`` with ``amsgrad``; ``t``, betas and eps of that
    parameter and its group), times ``lr / lr_i`` where groups' learning rates differ
    (``lr``, reported, is the largest): the eigenvalues of ``diag^-1/2 H diag^-1/2``
    compare with ``adam_threshold(lr, beta1)``. ``beta2``, ``eps`` and ``step`` are
    reported when all selected parameters share them (else ``None``, with their range
    under ``step_min``/``step_max``)."""
    entries = optimizer_entries(optimizer, params)
    rows = []
    for name in selected:
        group, entry = entries.get(name, (None, None))
        if group is None:
            raise ValueError(f"the optimizer does not hold parameter {name}: it is not in "
                             "any of its parameter groups")
        amsgrad = bool(group.get("amsgrad", False))
        key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
        if entry is None or key not in entry:
            raise ValueError(f"the optimizer state has no Adam second moment ({key}) for "
                             f"{name}: it is not Adam's (or AdamW's), or this parameter "
                             "never took a step")
        step = float(entry.get("step", 0))
        if step < 1:
            raise ValueError(f"the Adam state of {name} is from before the first step")
        beta1, beta2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
        rows.append((name, entry[key], step, beta1, beta2, float(group.get("eps", 1e-8)),
                     float(group.get("lr", 0.0)), amsgrad))
    beta1s = {r[3] for r in rows}
    if len(beta1s) > 1:
        raise ValueError(f"the parameter groups have different beta1 ({sorted(beta1s)}): "
                         "no single stability threshold applies")
    lr_ref = max(r[6] for r in rows)
    if not lr_ref > 0:
        raise ValueError("the optimizer's learning rate is 0: no stability threshold")
    parts = []
    for _, v, step, beta1, beta2, eps, lr, _ in rows:
        v = v.detach().to(dtype=torch.float64)
        p = (1.0 - beta1 ** step) * (v.sqrt() / math.sqrt(1.0 - beta2 ** step) + eps)
        parts.append((p * (lr_ref / lr if lr > 0 else math.inf)).reshape(-1))

    def common(i: int) -> Any:
        values = {r[i] for r in rows}
        return values.pop() if len(values) == 1 else None

    steps = [r[2] for r in rows]
    info = {"beta1": rows[0][3], "beta2": common(4), "eps": common(5), "lr": lr_ref,
            "step": common(2), "step_min": min(steps), "step_max": max(steps),
            "amsgrad": bool(common(7)) if common(7) is not None else None,
            "lrs": sorted({r[6] for r in rows}, reverse=True), "bias_corrected": True}
    return torch.cat(parts), info
