"""Sharpness-Aware Minimization (SAM) and its adaptive variant (ASAM).

SAM (Foret et al., ICLR 2021, "Sharpness-Aware Minimization for Efficiently Improving
Generalization") minimises ``max_{||e|| <= rho} L(w + e)``. To first order the inner
maximiser is

    e(w) = rho * g / ||g||,        g = grad L(w)    (here ``||g|| + 1e-12``)

and SAM's update is the base optimizer's step with the gradient taken at ``w + e``:

    1. g at w                      (the training loop's usual forward and backward)
    2. w <- w + e                  (:meth:`SAM.first_step`)
    3. g_sam = grad L(w + e)       (a second forward and backward)
    4. w <- w - e, then the base optimizer steps with g_sam   (:meth:`SAM.second_step`)

ASAM (Kwon et al., ICML 2021, "ASAM: Adaptive Sharpness-Aware Minimization for
Scale-Invariant Learning of Deep Neural Networks") measures the neighbourhood in the
scale-normalised coordinates ``T^{-1} w`` with ``T = diag(|w|)``; its maximiser is

    e(w) = rho * T^2 g / ||T g||.

BatchNorm: the running statistics should see the first pass only (the second pass is at
perturbed weights); the training loop wraps the second forward with
:func:`disable_running_stats` / :func:`enable_running_stats`.

Gradient clipping belongs between the second backward and :meth:`SAM.second_step` (it
then clips the gradient the base optimizer uses). Clipping before :meth:`SAM.first_step`
does nothing: that gradient is normalised to length ``rho`` anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from functools import reduce
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from hessdiag.optim.perturbation import perturbation

_BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}

# key under which SAM keeps its own (non-base-optimizer) state in ``state_dict()``
_EXTRA_KEY = "sam"
_STATE_FORMAT = 1


def make_base_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The base optimizer class for ``name``: ``"sgd"``, ``"adam"`` or ``"adamw"``.

    Case-insensitive. Momentum, Nesterov, weight decay, betas and so on are passed to
    :class:`SAM` as keyword arguments, which hands them to this class.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _BASE_OPTIMIZERS:
        raise ValueError(
            f"unknown base optimizer {name!r}; choose one of {', '.join(_BASE_OPTIMIZERS)}"
        )
    return _BASE_OPTIMIZERS[key]


def _check_nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
    return float(value)


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around a base optimizer (Foret et al., 2021).

    Parameters
    ----------
    params:
        Parameters or parameter groups, as for any ``torch.optim`` optimizer. A group may
        set its own ``rho`` (and ``adaptive``); the gradient norm is always taken over all
        groups together.
    base_optimizer:
        The base optimizer's class (``torch.optim.SGD``, ``Adam``, ``AdamW``, ...) or its
        name for :func:`make_base_optimizer`. It is built on this optimizer's parameter
        groups, and the two share ``param_groups``: a learning-rate scheduler may step
        either ``sam`` or ``sam.base_optimizer``.
    rho:
        Radius of the neighbourhood (``>= 0``). ``rho = 0`` reproduces the base optimizer
        bit for bit. Typical: 0.05 (CIFAR-10), 0.1 (CIFAR-100); ASAM 0.5 to 2.0.
    adaptive:
        ASAM's perturbation ``e = rho T^2 g / ||T g||``, ``T = |w|`` elementwise (Kwon et
        al., 2021) instead of SAM's ``e = rho g / ||g||``.
    **base_kwargs:
        Passed to the base optimizer (``lr``, ``momentum``, ``nesterov``,
        ``weight_decay``, ``betas``, ...).

    Two ways to drive it. Explicitly, which leaves room for BatchNorm handling and
    gradient clipping::

        loss_fn(model(x), y).backward()          # g at w
        opt.first_step(zero_grad=True)           # w <- w + e
        disable_running_stats(model)
        loss_fn(model(x), y).backward()          # g at w + e
        enable_running_stats(model)
        # (gradient clipping goes here)
        opt.second_step(zero_grad=True)          # w <- w, base step

    Or, after the first backward, ``opt.step(closure)`` with a closure that zeroes nothing
    and does the second forward and backward (it runs with gradients enabled).

    After each step, :attr:`last_grad_norm` (``||g||``, or ``||T g||`` for ASAM) and
    :attr:`last_perturbation` / :meth:`perturbation_vector` hold what was computed anyway,
    for logging at no extra cost.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer] | str,
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        rho = _check_nonnegative("rho", rho)
        if isinstance(base_optimizer, str):
            base_optimizer = make_base_optimizer(base_optimizer)
        if isinstance(base_optimizer, torch.optim.Optimizer):
            raise ValueError(
                "base_optimizer must be an optimizer class (e.g. torch.optim.SGD) or a name, "
                f"not an instance of {type(base_optimizer).__name__}"
            )
        if not (isinstance(base_optimizer, type)
                and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(
                "base_optimizer must be a torch.optim.Optimizer subclass or one of "
                f"{', '.join(_BASE_OPTIMIZERS)}; got {base_optimizer!r}"
            )
        defaults = dict(rho=rho, adaptive=bool(adaptive), **base_kwargs)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            _check_nonnegative(f"rho of parameter group {i}", group["rho"])
        # the base optimizer adopts these very group dicts (add_param_group keeps them),
        # so a scheduler changing ``lr`` through either object changes both
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._perturbed = False
        self._grad_norm_t: Tensor | None = None

    # ------------------------------------------------------------------ helpers
    def _group_params(self) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

    def _params(self) -> list[Tensor]:
        """All parameters, in the optimizer's order (groups in order, then params)."""
        return [p for _, p in self._group_params()]

    def _shared_device(self) -> torch.device:
        # norms from several devices (model parallelism) are summed on one of them
        return self.param_groups[0]["params"][0].device

    def _grad_norm(self) -> Tensor:
        """``||g||`` (``||T g||`` in groups with ``adaptive``) over all groups."""
        device = self._shared_device()
        norms = []
        for group, p in self._group_params():
            if p.grad is None:
                continue
            g = torch.abs(p) * p.grad if group["adaptive"] else p.grad
            norms.append(torch.linalg.vector_norm(g).to(device))
        if not norms:
            raise RuntimeError(
                "no parameter has a gradient: run the forward and backward pass at the "
                "current weights before first_step"
            )
        dtype = reduce(torch.promote_types, [n.dtype for n in norms])
        return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))

    def _perturbation(self) -> dict[Tensor, Tensor]:
        """SAM's ``e = rho g / (||g|| + 1e-12)`` (ASAM: ``rho T^2 g / (||T g|| + 1e-12)``)
        for each parameter with a gradient (:func:`hessdiag.optim.perturbation`)."""
        self._grad_norm_t = self._grad_norm().detach()
        moved = [(group, p) for group, p in self._group_params() if p.grad is not None]
        adaptive = any(group["adaptive"] for group, _ in moved)
        e = perturbation("asam" if adaptive else "sam", [p.grad for _, p in moved],
                         rho=[group["rho"] for group, _ in moved],
                         params=[p if group["adaptive"] else None for group, p in moved])
        return {p: x for (_, p), x in zip(moved, e, strict=True)}

    # ------------------------------------------------------------------ the steps
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to the worst-case neighbour: ``w <- w + e(w)`` from the gradients in
        ``.grad`` (those at ``w``). Parameters without a gradient are not moved."""
        if self._perturbed:
            raise RuntimeError("first_step called twice: call second_step in between")
        perturbation = self._perturbation()
        for p, e in perturbation.items():
            state = self.state[p]
            # keep w itself, not only e: w + e - e is not w in floating point, and
            # rho = 0 must reproduce the base optimizer exactly
            state["old_p"] = p.detach().clone()
            state["e_w"] = e
            p.add_(e)
        # parameters that had a perturbation last step but no gradient now
        for _, p in self._group_params():
            if p not in perturbation:
                self.state[p].pop("e_w", None)
        self._perturbed = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` and step the base optimizer with the gradients in ``.grad``
        (those at ``w + e``)."""
        if not self._perturbed:
            raise RuntimeError("second_step called without first_step before it")
        for _, p in self._group_params():
            old = self.state[p].pop("old_p", None)
            if old is not None:
                p.copy_(old)  # in place: keeps the storage others may hold views of
        self._perturbed = False
        self.base_optimizer.step()
        # an lr scheduler built on this optimizer watches ``step`` to warn about calling it
        # before any optimizer step; second_step is this optimizer's step
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One SAM step: :meth:`first_step`, ``closure()``, :meth:`second_step`.

        The gradients at ``w`` must already be in ``.grad``; ``closure`` does the forward
        and backward pass at the perturbed weights (gradients are zeroed before it is
        called, and it runs under ``torch.enable_grad``). Returns what ``closure``
        returns (the loss at ``w + e``).
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure doing the forward and backward pass (the second, "
                "at the perturbed weights); or call first_step and second_step yourself"
            )
        closure = torch.enable_grad()(closure)
        self.first_step(zero_grad=True)
        try:
            loss = closure()
        except BaseException:
            # never leave the model at the perturbed weights
            self._restore()
            raise
        self.second_step()
        return loss

    @torch.no_grad()
    def _restore(self) -> None:
        for _, p in self._group_params():
            old = self.state[p].pop("old_p", None)
            if old is not None:
                p.copy_(old)
        self._perturbed = False

    # ------------------------------------------------------------------ diagnostics
    @property
    def last_grad_norm(self) -> float | None:
        """``||g||`` at the last :meth:`first_step` (``||T g||`` for ASAM); ``None`` before.
        Reading it synchronises with the device; the step itself does not."""
        return None if self._grad_norm_t is None else float(self._grad_norm_t)

    @property
    def last_perturbation(self) -> dict[Tensor, Tensor]:
        """``{parameter: e}`` of the last :meth:`first_step` (parameters that moved)."""
        return {p: self.state[p]["e_w"] for p in self._params()
                if p in self.state and "e_w" in self.state[p]}

    def perturbation_vector(self) -> Tensor | None:
        """The last perturbation ``e`` as one flat vector over all parameters in the
        optimizer's order (zeros for parameters that did not move), or ``None``."""
        last = self.last_perturbation
        if not last:
            return None
        device = self._shared_device()
        dtype = reduce(torch.promote_types, [e.dtype for e in last.values()])
        return torch.cat([
            (last[p].reshape(-1) if p in last else torch.zeros(p.numel())).to(device, dtype)
            for p in self._params()
        ])

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        return {"format": _STATE_FORMAT, "last_grad_norm": self.last_grad_norm}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        norm = extra.get("last_grad_norm")
        self._grad_norm_t = None if norm is None else torch.tensor(float(norm))

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's ``state_dict()`` (its per-parameter state and the groups,
        with ``rho`` and ``adaptive``) plus this optimizer's own state under ``"sam"``.

        Holds tensors, numbers, strings and ``None`` only, so ``torch.load(...,
        weights_only=True)`` reads it. The last perturbation is a per-step diagnostic
        and is not saved (it would add a full copy of the weights to every checkpoint).
        """
        if self._perturbed:
            raise RuntimeError(
                "state_dict called between first_step and second_step: the weights are "
                "perturbed; save after second_step"
            )
        sd = self.base_optimizer.state_dict()
        sd[_EXTRA_KEY] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (a plain base-optimizer state dict is
        accepted too: SAM's own state then starts afresh)."""
        if self._perturbed:
            raise RuntimeError("load_state_dict called between first_step and second_step")
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict (no 'param_groups' entry)")
        sd = dict(state_dict)
        extra = sd.pop(_EXTRA_KEY, None) or {}
        if extra.get("format", _STATE_FORMAT) > _STATE_FORMAT:
            raise ValueError(
                f"optimizer state format {extra['format']} is newer than this hessdiag "
                f"reads ({_STATE_FORMAT}): upgrade"
            )
        self.base_optimizer.load_state_dict(sd)
        # load_state_dict builds new group dicts: share them again
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
        self.state.clear()
        self._load_extra_state(extra)


def disable_running_stats(model: nn.Module) -> None:
    """Freeze BatchNorm running statistics for SAM's second forward pass.

    Sets ``momentum = 0`` on every ``_BatchNorm`` module (the running mean and variance
    are then ``1 * old + 0 * batch``, unchanged) and remembers the original momentum and
    ``num_batches_tracked``, which :func:`enable_running_stats` restores. Idempotent.
    """
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not hasattr(m, "_hessdiag_saved_stats"):
            tracked = m.num_batches_tracked
            m._hessdiag_saved_stats = (
                m.momentum, None if tracked is None else tracked.detach().clone()
            )
            m.momentum = 0.0


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats`: restore each BatchNorm's momentum, and its
    ``num_batches_tracked`` (the frozen pass still counted itself as a batch)."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and hasattr(m, "_hessdiag_saved_stats"):
            momentum, tracked = m._hessdiag_saved_stats
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                with torch.no_grad():
                    m.num_batches_tracked.copy_(tracked)
            del m._hessdiag_saved_stats
