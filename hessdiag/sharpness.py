"""Sharpness measures that are not eigenvalues: critical, worst-case and adaptive.

All are of the mean loss ``L`` over fixed batches (weighted by the loss's count of terms,
as the Hessian operator defines it), at the model's weights, in eval mode; the model is
never modified.

critical sharpness (Kalra et al. 2026)
    ``2 / lr_c``, with ``lr_c`` the smallest positive step size at which a gradient step
    raises the loss: ``L(theta - lr_c g) = L(theta)``, ``g = grad L``. Found by a line
    search on forward passes only (the gradient costs one backward pass). On a quadratic
    ``L(theta - eta g) - L(theta) = -eta g.g + eta^2 g.Hg / 2``, so ``2 / lr_c = g.Hg / g.g``:
    the curvature along the gradient, ``lambda_max`` when ``g`` lies in the top
    eigenspace (which training near the edge of stability tends to produce) and below it
    otherwise. Off a quadratic, third- and higher-order terms of the loss along ``g``
    enter too, and can put it above ``lambda_max``.
worst-case sharpness (SAM's objective, Foret et al. 2021)
    ``max_{||delta|| <= rho} L(theta + delta) - L(theta)``.
adaptive sharpness (ASAM, Kwon et al. 2021; Andriushchenko et al. 2023)
    ``max_{||delta / |theta| || <= rho} L(theta + delta) - L(theta)``: the ball is scaled
    elementwise by ``|theta|`` (plus ``eta``), so the measure is invariant to rescaling
    layers that leave the function unchanged; Jiang et al. 2019 found such
    magnitude-aware measures among the best predictors of generalisation.

The maxima are estimated by projected gradient ascent from the one-step (SAM/ASAM)
perturbation: the value returned is a lower bound on the maximum (every iterate is
feasible), with the value after each step so that its convergence can be judged.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hessdiag._errors import InputError
from hessdiag.objective import MeanLoss
from hessdiag.settings import SHARPNESS_MEASURES

__all__ = ["SharpnessResult", "critical_sharpness", "ascent_sharpness", "measure_sharpness"]


@dataclass
class SharpnessResult:
    """One sharpness measurement with what it needs to be judged.

    ``value``: the measure (critical: ``2 / lr_c``; worst-case and adaptive: the loss
    increase). ``interval``: for critical sharpness, the value's bounds from the final
    bracket of ``lr_c``; for the ascent measures, ``(value, inf)`` (a lower bound)."""

    measure: str
    value: float
    interval: tuple[float, float]
    loss: float
    forward_passes: int
    backward_passes: int
    seconds: float
    samples: int
    rho: float | None = None
    lr_c: float | None = None
    grad_norm: float | None = None
    history: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SharpnessResult:
        d = dict(d)
        d["interval"] = tuple(d["interval"])
        return cls(**d)


def _step(theta: list[Tensor], direction: list[Tensor], eta: float) -> list[Tensor]:
    return [t + eta * d for t, d in zip(theta, direction, strict=True)]


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def critical_sharpness(model: nn.Module, loss_fn: Any, batches: Any, *, rtol: float = 1e-3,
                       max_forward: int = 20, device: Any = None,
                       dtype: torch.dtype = torch.float32) -> SharpnessResult:
    """``2 / lr_c`` by a line search along the gradient (see the module docstring).

    The first trial step is the one the quadratic model predicts from the loss at one
    probe step (``lr_c = 2 g.g / c`` with ``c`` the fitted curvature); the root of
    ``h(eta) = L(theta - eta g) - L(theta)`` is then bracketed (doubling or halving)
    and narrowed by the Illinois variant of regula falsi until the bracket is within
    ``rtol`` (relative) or ``max_forward`` forward passes are spent."""
    start = time.perf_counter()
    obj = MeanLoss(model, loss_fn, batches, device or next(model.parameters()).device, dtype)
    loss0, g = obj.grad(obj.theta)
    gg = _dot(g, g)
    if gg == 0 or not math.isfinite(gg):
        raise InputError("the gradient is zero (or not finite) at these weights: critical "
                         "sharpness is undefined", param="measure")
    descent = [-x for x in g]

    def h(eta: float) -> float:
        return obj.loss(_step(obj.theta, descent, eta)) - loss0

    # a probe step that moves the loss by a small but resolvable amount
    probe = 1e-3 * max(abs(loss0), 1e-3) / gg
    hp = h(probe)
    curvature = 2 * (hp + probe * gg) / probe ** 2
    guess = 2 * gg / curvature if curvature > 0 else 2 * probe
    lo, hlo = probe, hp
    if hlo > 0:  # the probe already raised the loss: shrink until it does not
        hi, hhi = lo, hlo
        lo, hlo = 0.0, 0.0
        while obj.forward < max_forward:
            mid = hi / 4
            hm = h(mid)
            if hm > 0:
                hi, hhi = mid, hm
            else:
                lo, hlo = mid, hm
                break
    else:
        eta, he = guess, h(guess)
        while he <= 0 and obj.forward < max_forward:
            lo, hlo = eta, he
            eta *= 2
            he = h(eta)
        hi, hhi = eta, he
    side = 0
    while hi - lo > rtol * hi and obj.forward < max_forward and hhi > 0:
        # Illinois: regula falsi with the stale end's value halved
        mid = hi - hhi * (hi - lo) / (hhi - hlo) if hhi != hlo else 0.5 * (lo + hi)
        if not lo < mid < hi:
            mid = 0.5 * (lo + hi)
        hm = h(mid)
        if hm > 0:
            hi, hhi = mid, hm
            if side == 1:
                hlo /= 2
            side = 1
        else:
            lo, hlo = mid, hm
            if side == -1:
                hhi /= 2
            side = -1
    if not hhi > 0:
        raise InputError(f"no step size up to {hi:.3g} raises the loss along the gradient in "
                         f"{max_forward} forward passes: raise max_forward", param="measure")
    lr_c = 0.5 * (lo + hi)
    value = 2.0 / lr_c
    interval = (2.0 / hi, math.inf if lo <= 0 else 2.0 / lo)
    return SharpnessResult(
        measure="critical", value=value, interval=interval, loss=loss0,
        forward_passes=obj.forward, backward_passes=obj.backward,
        seconds=time.perf_counter() - start, samples=obj.total, lr_c=lr_c,
        grad_norm=math.sqrt(gg), settings={"rtol": rtol, "max_forward": max_forward},
    )


def ascent_sharpness(model: nn.Module, loss_fn: Any, batches: Any, *, rho: float,
                     adaptive: bool, steps: int = 5, eta: float = 1e-12, device: Any = None,
                     dtype: torch.dtype = torch.float32) -> SharpnessResult:
    """Worst-case (``adaptive=False``) or adaptive sharpness of radius ``rho`` by
    ``steps`` steps of projected gradient ascent (see the module docstring): in the
    scaled variable ``z = delta / T`` (``T = |theta| + eta`` adaptive, 1 otherwise), each
    step moves ``z`` by ``rho`` along the normalised gradient ``T grad L`` and projects it
    back onto ``||z|| <= rho``. The value is the largest loss increase seen."""
    if not rho > 0:
        raise InputError(f"rho must be positive; got {rho}", param="rho")
    if steps < 1:
        raise InputError(f"steps must be at least 1; got {steps}", param="steps")
    start = time.perf_counter()
    obj = MeanLoss(model, loss_fn, batches, device or next(model.parameters()).device, dtype)
    scale = [t.abs() + eta if adaptive else torch.ones_like(t) for t in obj.theta]
    z = [torch.zeros_like(t) for t in obj.theta]
    loss0 = None
    history: list[float] = []
    best = -math.inf
    for _ in range(steps):
        point = [t + s * zi for t, s, zi in zip(obj.theta, scale, z, strict=True)]
        value, g = obj.grad(point)
        if loss0 is None:
            loss0 = value
        else:
            history.append(value - loss0)
            best = max(best, value - loss0)
        tg = [s * gi for s, gi in zip(scale, g, strict=True)]
        norm = math.sqrt(_dot(tg, tg))
        if norm == 0:
            break
        z = [zi + rho * x / norm for zi, x in zip(z, tg, strict=True)]
        zn = math.sqrt(_dot(z, z))
        if zn > rho:
            z = [zi * (rho / zn) for zi in z]
    final = obj.loss([t + s * zi for t, s, zi in zip(obj.theta, scale, z, strict=True)])
    history.append(final - loss0)
    best = max(best, final - loss0)
    return SharpnessResult(
        measure="adaptive" if adaptive else "worst-case", value=best,
        interval=(best, math.inf), loss=float(loss0), forward_passes=obj.forward,
        backward_passes=obj.backward, seconds=time.perf_counter() - start,
        samples=obj.total, rho=rho, history=history,
        settings={"steps": steps, "eta": eta, "adaptive": adaptive},
    )


def measure_sharpness(model: nn.Module, loss_fn: Any, batches: Any, measure: str, *,
                      rho: float = 0.05, steps: int = 5, device: Any = None,
                      dtype: torch.dtype = torch.float32) -> SharpnessResult:
    """One of :data:`hessdiag.settings.SHARPNESS_MEASURES`."""
    if measure not in SHARPNESS_MEASURES:
        raise InputError(f"unknown sharpness measure {measure!r}; choose one of "
                         f"{', '.join(SHARPNESS_MEASURES)}", param="measure")
    if measure == "critical":
        return critical_sharpness(model, loss_fn, batches, device=device, dtype=dtype)
    return ascent_sharpness(model, loss_fn, batches, rho=rho, adaptive=measure == "adaptive",
                            steps=steps, device=device, dtype=dtype)


def sharpness_of_checkpoint(checkpoint: str, measure: str, *, rho: float = 0.05,
                            steps: int = 5, data: Any = None, model_spec: str | None = None,
                            loss: str | None = None, unsafe: bool = False,
                            allow_nonfinite: bool = False,
                            dtype: str = "float32", device: str = "auto",
                            store: Any = None) -> tuple[SharpnessResult, Any, str | None]:
    """One measure at a checkpoint's task (its model, data and loss, as ``spectrum``
    measures them); written to ``store`` when given. Returns ``(result, task, id)``."""
    from hessdiag.records import provenance, write_sharpness
    from hessdiag.runtime import resolve_device, resolve_dtype
    from hessdiag.settings import DataSettings
    from hessdiag.task import load_task

    if measure not in SHARPNESS_MEASURES:
        raise InputError(f"unknown sharpness measure {measure!r}; choose one of "
                         f"{', '.join(SHARPNESS_MEASURES)}", param="measure")
    data = data or DataSettings()
    task = load_task(checkpoint, data=data, model_spec=model_spec, loss=loss, unsafe=unsafe,
                     allow_nonfinite=allow_nonfinite)
    target = resolve_device(device)
    task.model.to(target)
    result = measure_sharpness(task.model, task.loss, task.batches(data.batch_size), measure,
                               rho=rho, steps=steps, device=target,
                               dtype=resolve_dtype(dtype))
    analysis_id = None
    if store is not None:
        origin = provenance(task)
        origin["data"] = {**origin["data"], "batch_size": data.batch_size}
        analysis_id = write_sharpness(store, result, origin)
    return result, task, analysis_id
