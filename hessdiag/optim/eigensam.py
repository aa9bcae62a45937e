"""Eigen-SAM: SAM with the top Hessian eigenvector added to the perturbation.

Luo et al., NeurIPS 2024, "Explicit Eigenvalue Regularization Improves Sharpness-Aware
Minimization". SAM regularises the top Hessian eigenvalue only insofar as its
perturbation ``e ∝ g`` is aligned with the top eigenvector ``v``, and in practice the
alignment ``|<e, v>| / ||e||`` is poor. Eigen-SAM adds the part of ``v`` orthogonal to
the gradient:

    s      = sign(<g, v>)
    g_hat  = g / (||g|| + 1e-12)
    v_perp = v - <g_hat, v> g_hat
    d      = g_hat + alpha * s * v_perp
    e      = rho * d          (renormalize=True: e = rho * d / ||d||)

then proceeds as SAM: gradient at ``w + e``, back to ``w``, base-optimizer step. The
official code does not renormalise ``d``, so ``||e|| = rho sqrt(1 + alpha^2 ||v_perp||^2)``
is slightly above ``rho``; ``renormalize`` is offered, off by default so that results
compare with the paper.

Every ``eig_every`` optimizer steps (a global count, not reset per epoch, starting with
step 0), ``v`` is refreshed by ``eig_iters`` steps of power iteration on the Hessian of
the current minibatch loss, model in eval mode, warm-started from the previous ``v``
(from a seeded random vector the first time). Before the first estimate the perturbation
is SAM's ``rho g / ||g||`` (the official code uses the unnormalised ``rho g`` there, a
bug this implementation does not reproduce).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from hessdiag.curvature.linear import generator
from hessdiag.curvature.operator import MODES, HessianOperator
from hessdiag.curvature.power import power_steps
from hessdiag.optim.perturbation import eigensam_perturbation
from hessdiag.optim.sam import SAM, _check_nonnegative


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


class EigenSAM(SAM):
    """Eigen-SAM (Luo et al., NeurIPS 2024) around a base optimizer.

    Parameters
    ----------
    params, base_optimizer, rho, **base_kwargs:
        As for :class:`SAM`.
    alpha:
        Weight of the eigenvector's gradient-orthogonal part (``>= 0``; the paper tunes
        it over {0.05, 0.1, 0.2}). ``alpha = 0`` is SAM.
    eig_every:
        Refresh the eigenvector every this many optimizer steps (the paper's ``p``, 100).
    eig_iters:
        Power-iteration steps (Hessian-vector products) per refresh (the paper's ``k``, 5).
        They are always all spent: the estimate is warm-started and not expected to
        converge within one refresh.
    renormalize:
        Scale ``e`` to length ``rho`` exactly (off by default, as in the paper).
    adaptive:
        Must be ``False``: the method is defined for the Euclidean neighbourhood only
        (an ASAM version would need the eigenvector of ``T H T``, ``T = |w|``).
    eig_seed:
        Seed of the random starting vector of the first estimate.
    eig_shift:
        ``"auto"`` (default): seek the algebraically largest eigenvalue ("top" in this
        project). Each refresh takes ``eig_iters`` steps ``v <- (H - sigma I) v / ||.||``
        from the warm start (:func:`hessdiag.curvature.power_steps`), with ``sigma = 0``
        until an estimate comes out below the shift in use: a negative eigenvalue then
        dominates, and ``sigma`` becomes that estimate for later refreshes (lowered again
        whenever an estimate falls below it), so that the top dominates ``H - sigma I``.
        The warm start is never thrown away; the shift is saved in the state dict. A
        number: iterate on ``H - eig_shift I`` throughout; ``0.0`` is the official code's
        plain power iteration (the eigenvalue of largest magnitude, which may be
        negative).
    hvp_mode:
        Hessian-vector product mode for :class:`hessdiag.curvature.HessianOperator`.
        ``"auto"`` times the candidates at the first refresh only (a few extra products)
        and keeps the winner for the rest of training; it is saved in the state dict, so
        a resumed run uses the same mode.

    Training loop, each step::

        opt.maybe_update_eigenvector(model, loss_fn, x, y)   # before first_step
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        ...                                                  # as SAM

    Refresh schedule, compared with the official code: there the counter is the step
    within the epoch and a refresh happens when ``step > 0 and step % p == 0``, so the
    first epoch runs ``p`` steps as SAM and the schedule restarts every epoch; here the
    counter is the global optimizer step (not reset per epoch) and the first refresh is
    at step 0, so the eigenvector is used from the first step and refreshed every ``p``
    steps throughout.

    Diagnostics: :attr:`eigenvector` (flat, the optimizer's parameter order; after a
    refresh exactly ``(H - sigma I)^k v_prev`` normalised), :attr:`eigenvalue` and
    :attr:`eigen_residual`: the Rayleigh quotient ``theta`` and ``||H u - theta u||`` of
    the iterate ``u`` the last product was taken of (the final vector has no product of
    its own, which would cost one more), :attr:`last_alignment` ``|<e, v>| / ||e||`` and
    :attr:`last_signed_alignment` of the last perturbation, :attr:`eig_updates`,
    :attr:`eig_hvps` (Hessian-vector products spent, mode timing included) and
    :attr:`global_step`. All of them are saved by :meth:`state_dict`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer] | str,
        rho: float = 0.05,
        alpha: float = 0.2,
        eig_every: int = 100,
        eig_iters: int = 5,
        renormalize: bool = False,
        adaptive: bool = False,
        *,
        eig_seed: int = 0,
        eig_shift: str | float = "auto",
        hvp_mode: str = "auto",
        **base_kwargs: Any,
    ) -> None:
        self.alpha = _check_nonnegative("alpha", alpha)
        self.eig_every = _check_positive_int("eig_every", eig_every)
        self.eig_iters = _check_positive_int("eig_iters", eig_iters)
        if adaptive:
            raise ValueError(
                "EigenSAM does not support adaptive=True: Eigen-SAM is defined for SAM's "
                "Euclidean perturbation (use SAM(adaptive=True) for ASAM)"
            )
        if not (eig_shift == "auto" or (isinstance(eig_shift, int | float)
                                        and not isinstance(eig_shift, bool)
                                        and math.isfinite(eig_shift))):
            raise ValueError(f"eig_shift must be 'auto' or a finite number; got {eig_shift!r}")
        if hvp_mode not in MODES:
            raise ValueError(f"hvp_mode must be one of {', '.join(MODES)}; got {hvp_mode!r}")
        if isinstance(eig_seed, bool) or not isinstance(eig_seed, int):
            raise ValueError(f"eig_seed must be an integer; got {eig_seed!r}")
        self.renormalize = bool(renormalize)
        self.eig_seed = eig_seed
        self.eig_shift = eig_shift
        self.hvp_mode = hvp_mode
        super().__init__(params, base_optimizer, rho=rho, adaptive=False, **base_kwargs)

        self.global_step = 0
        self.eig_updates = 0
        self.eig_hvps = 0
        self.eigenvector: Tensor | None = None
        self.eigenvalue: float | None = None
        self.eigen_residual: float | None = None
        self._last_eig_step: int | None = None
        self._shift: float | None = None     # the kept power-iteration shift (see below)
        self._dot_ev: Tensor | None = None   # <e, v> of the last perturbation
        self._norm_e: Tensor | None = None   # ||e|| of the last perturbation

    # ------------------------------------------------------------------ eigenvector
    def maybe_update_eigenvector(
        self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], inputs: Any,
        targets: Tensor, *, collective: Any = None,
    ) -> bool:
        """Refresh the eigenvector if this step is due (``global_step % eig_every == 0``
        and not refreshed at this step yet). Call it every step, before
        :meth:`first_step`, with the step's minibatch. Returns whether it refreshed.

        ``global_step`` counts completed optimizer steps (:meth:`second_step` calls), so
        calling this twice in one step refreshes once, and skipping it on a due step skips
        that refresh.
        """
        if self.global_step % self.eig_every != 0 or self._last_eig_step == self.global_step:
            return False
        self.update_eigenvector(model, loss_fn, inputs, targets, collective=collective)
        return True

    def update_eigenvector(
        self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], inputs: Any,
        targets: Tensor, *, collective: Any = None,
    ) -> None:
        """Refresh the eigenvector now: ``eig_iters`` power-iteration steps on the Hessian
        of ``loss_fn(model(inputs), targets)`` with respect to this optimizer's parameters
        (the model's other parameters held fixed), model in eval mode, warm-started from
        the current estimate.

        ``model`` must hold the optimizer's parameters; pass the bare module, not a
        ``DistributedDataParallel`` wrapper (the products need no gradient all-reduce).
        The global RNG is not touched, so the training's random stream is unaffected.

        ``collective``: across processes (a :class:`hessdiag.distributed.Collective`),
        ``inputs`` and ``targets`` are this process's part of the minibatch; the products
        are of the whole minibatch's Hessian (parts weighted by the loss's count), the same
        on every process.
        """
        if self._perturbed:
            raise RuntimeError(
                "update_eigenvector called between first_step and second_step: the weights "
                "are perturbed; call it before first_step"
            )
        params = self._params()
        name_of = {id(p): n for n, p in model.named_parameters()}
        missing = [i for i, p in enumerate(params) if id(p) not in name_of]
        if missing:
            raise ValueError(
                f"{len(missing)} of the optimizer's {len(params)} parameters (the first at "
                f"position {missing[0]}) are not parameters of the model passed to "
                "update_eigenvector: pass the model the optimizer trains"
            )
        # the operator takes the trainable ones; the others get zero eigenvector entries
        selected = {id(p) for p in params if p.requires_grad}
        if not selected:
            raise ValueError("none of the optimizer's parameters requires a gradient")
        # a tuple input of two items would read as a list of batches: wrap explicitly
        data = ((inputs, targets) if isinstance(inputs, Tensor | Mapping)
                else [(inputs, targets)])
        op = HessianOperator(
            model, loss_fn, data,
            params=lambda name, p: id(p) in selected,
            mode=self.hvp_mode,
            check_determinism=False,
            **({} if collective is None else {
                "collective": collective,
                "batch_size_fn": getattr(loss_fn, "batch_weight", None)}),
        )

        def to_operator(flat: Tensor) -> Tensor:
            # the optimizer orders parameters by group, the operator by model.named_parameters
            chunks = dict(zip((id(p) for p in params),
                              torch.split(flat, [p.numel() for p in params]), strict=True))
            return op.flatten({n: chunks[id(op_p)] for n, op_p in _named(model, op)})

        if self.eigenvector is None:
            # the same numbers on every device and dtype: drawn on the CPU in float64
            v0_flat = torch.randn(sum(p.numel() for p in params), generator=generator(
                self.eig_seed), dtype=torch.float64)
            v0_flat = v0_flat * torch.cat([
                torch.full((p.numel(),), float(id(p) in selected), dtype=torch.float64)
                for p in params
            ])
        else:
            v0_flat = self.eigenvector
        v0 = to_operator(v0_flat)

        # exactly eig_iters products, eig_iters power steps: v <- (H - sigma I) v / ||.||
        # (the official code's H^k v0 / ||H^k v0|| when sigma = 0)
        auto = self.eig_shift == "auto"
        sigma = (self._shift or 0.0) if auto else float(self.eig_shift)
        # in full precision inside a user's autocast region: the products are of the
        # float32 (or float64) model, not of its bfloat16 rounding
        with torch.autocast(params[0].device.type, enabled=False):
            vector, theta, residual = power_steps(op, v0, self.eig_iters, shift=sigma)
        if auto and theta < sigma:
            # the iterate fell towards the bottom of the spectrum: a negative eigenvalue
            # dominates H - sigma I. Shift to it for the next refreshes (H - theta I then
            # favours the top) and keep the warm start rather than restarting at random
            self._shift = theta
        u = op.unflatten(vector)
        u_by_id = {id(op_p): u[n] for n, op_p in _named(model, op)}
        device, dtype = self._shared_device(), op.dtype
        v = torch.cat([
            (u_by_id[id(p)].reshape(-1) if id(p) in u_by_id
             else torch.zeros(p.numel())).to(device, dtype)
            for p in params
        ])
        self.eigenvector = v / torch.linalg.vector_norm(v)
        self.eigenvalue = theta
        self.eigen_residual = residual
        self.eig_hvps += op.hvp_count
        self.eig_updates += 1
        self._last_eig_step = self.global_step
        if self.hvp_mode == "auto" and op.mode is not None:
            self.hvp_mode = op.mode  # measured once; keep it (and save it) from now on

    # ------------------------------------------------------------------ the perturbation
    def _perturbation(self) -> dict[Tensor, Tensor]:
        """Eigen-SAM's ``e`` (see the module docstring and
        :func:`hessdiag.optim.perturbation`); SAM's before the first estimate."""
        if self.eigenvector is None:
            self._dot_ev = self._norm_e = None
            return super()._perturbation()
        chunks = torch.split(self.eigenvector, [q.numel() for q in self._params()])
        moved = [(group, p, v.view_as(p).to(p.device, p.dtype))
                 for (group, p), v in zip(self._group_params(), chunks, strict=True)
                 if p.grad is not None]
        if not moved:
            raise RuntimeError(
                "no parameter has a gradient: run the forward and backward pass at the "
                "current weights before first_step"
            )
        self._grad_norm_t = self._grad_norm().detach()
        # e with <e, v> and ||e|| (the alignment of what is applied; v has unit length)
        # from the inner products e is made of: no pass over e for the diagnostics
        e, dot_ev, norm_e = eigensam_perturbation(
            [p.grad for _, p, _ in moved], [v for _, _, v in moved],
            [float(group["rho"]) for group, _, _ in moved], self.alpha, self.renormalize)
        device = self._shared_device()
        self._dot_ev, self._norm_e = dot_ev.to(device), norm_e.to(device)
        return {p: x for (_, p, _), x in zip(moved, e, strict=True)}

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        super().second_step(zero_grad=zero_grad)
        self.global_step += 1

    # ------------------------------------------------------------------ diagnostics
    @property
    def last_signed_alignment(self) -> float | None:
        """``<e, v> / ||e||`` for the last perturbation ``e`` and the eigenvector ``v`` it
        used; ``None`` before the first estimate."""
        if self._dot_ev is None or self._norm_e is None:
            return None
        norm = float(self._norm_e)
        return float(self._dot_ev) / norm if norm > 0 else 0.0

    @property
    def last_alignment(self) -> float | None:
        """``|<e, v>| / ||e||`` (the paper's alignment) for the last perturbation."""
        signed = self.last_signed_alignment
        return None if signed is None else abs(signed)

    # ------------------------------------------------------------------ state
    def _extra_state(self) -> dict[str, Any]:
        state = super()._extra_state()
        state.update(
            global_step=self.global_step,
            last_eig_step=self._last_eig_step,
            eig_updates=self.eig_updates,
            eig_hvps=self.eig_hvps,
            hvp_mode=self.hvp_mode,
            shift=self._shift,
            eigenvector=None if self.eigenvector is None else self.eigenvector.detach().clone(),
            eigenvalue=self.eigenvalue,
            eigen_residual=self.eigen_residual,
            dot_ev=None if self._dot_ev is None else float(self._dot_ev),
            norm_e=None if self._norm_e is None else float(self._norm_e),
        )
        return state

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        self.global_step = int(extra.get("global_step", 0))
        self._last_eig_step = extra.get("last_eig_step")
        self.eig_updates = int(extra.get("eig_updates", 0))
        self.eig_hvps = int(extra.get("eig_hvps", 0))
        if extra.get("hvp_mode") in MODES:
            self.hvp_mode = extra["hvp_mode"]
        shift = extra.get("shift")
        self._shift = None if shift is None else float(shift)
        self.eigenvalue = extra.get("eigenvalue")
        self.eigen_residual = extra.get("eigen_residual")
        v = extra.get("eigenvector")
        if v is not None:
            dim = sum(p.numel() for p in self._params())
            if not isinstance(v, Tensor) or v.shape != (dim,):
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(
                    f"the saved eigenvector has shape {shape}, but this optimizer's "
                    f"parameters have {dim} entries: not the same model"
                )
            v = v.detach().clone().to(self._shared_device())
        self.eigenvector = v
        dot, norm = extra.get("dot_ev"), extra.get("norm_e")
        self._dot_ev = None if dot is None else torch.tensor(dot, dtype=torch.float64)
        self._norm_e = None if norm is None else torch.tensor(norm, dtype=torch.float64)


def _named(model: nn.Module, op: HessianOperator) -> list[tuple[str, Tensor]]:
    """The operator's parameters as ``(name, live parameter)``, in the operator's order."""
    live = dict(model.named_parameters())
    return [(n, live[n]) for n in op.param_names]
