"""Sharpness measures that are not eigenvalues: critical, worst-case and adaptive.

All are of the mean loss ``L`` over fixed batches (weighted by the loss's count of terms,
as the Hessian operator defines it; a sum-reduced loss is divided by that count, so it is
on the same per-term scale as the eigenvalues), at the model's weights, in eval mode; the
model is never modified.

critical sharpness (Kalra et al. 2026)
    ``2 / lr_c``, with ``lr_c`` the smallest positive step size at which a gradient step
    raises the loss: ``L(theta - lr_c g) = L(theta)``, ``g = grad L``. On a quadratic
    ``L(theta - eta g) - L(theta) = -eta g.g + eta^2 g.Hg / 2``, so ``2 / lr_c = g.Hg / g.g``:
    the curvature along the gradient, ``lambda_max`` when ``g`` lies in the top
    eigenspace and below it otherwise. Off a quadratic, third- and higher-order terms of
    the loss along ``g`` enter too, and can put it above ``lambda_max``.

    *Search.* One gradient and one Hessian-vector product give the curvature along the
    gradient ``c = g.Hg / g.g``. From ``eta_0 = max(16 noise / g.g, (2 / c) / 256)``
    (``noise = 64 eps |L|``, the loss's rounding; ``2 / c`` the quadratic ``lr_c``) the
    step grows geometrically by ``grid_ratio`` (1.25) until the loss rises, then the root
    is narrowed by regula falsi (Illinois) to ``rtol``. Every interval ``[a, a r]`` above
    ``eta_0`` on which the loss stays above ``L(theta)`` holds a grid point, so the first
    rise is never skipped unless its window is narrower than that (a doubling search, as
    before, could step over a narrow window and report a later root).

    *Undefined.* Where the largest decrease the gradient promises, ``g.g / (2c)``, is
    within the loss's rounding (a numerically exact minimum: zero gradient), no step
    lowers the loss measurably and ``lr_c`` does not exist: the result is ``NaN`` with
    ``reason`` saying so (not an error, so a sweep over checkpoints goes on).
worst-case sharpness (SAM's objective, Foret et al. 2021)
    ``max_{||delta|| <= rho} L(theta + delta) - L(theta)``.
adaptive sharpness
    ``max_{||delta / T|| <= rho} L(theta + delta) - L(theta)``, the ball scaled
    elementwise by ``T``, so the measure is invariant to rescalings that leave the
    function unchanged. ``adaptive`` is the definition of Andriushchenko et al. 2023 ("A
    modern look at the relationship between sharpness and generalization", ICML; after
    Kwon et al. 2021): ``T = |theta|`` for every parameter (biases and normalisation
    scales too; ``+1e-12`` so that zero weights stay movable), L2 ball, over all the
    samples given. ``adaptive-asam`` is ASAM's (Kwon et al. 2021, and its official code):
    ``T = |w| + eta`` with ``eta = 0.01`` on parameters whose name contains ``weight``,
    ``T = 1`` on the others (biases are perturbed unscaled).

*Ascent.* With ``z = delta / T`` the maximum is that of ``f(z) = L(theta + T z) - L(theta)``
over the ball ``||z|| <= rho``. Near a stationary point (where trained networks sit)
``f(z) ~ g.z + z.Hz / 2``, a trust-region problem whose maximum, ``rho^2 lambda_max / 2`` at a
minimum, needs the top eigendirection. Projected gradient ascent (``z <- P(z + rho g/|g|)``)
finds it as power iteration on ``|Hz|/rho I + H`` does: slowly (5 steps came out 11% low
on a quadratic near its minimum, adaptive 43%). The default ``method="krylov"`` instead
builds, at the current ``z``, an orthonormal basis ``V`` of the block Krylov space of
``H_z = T H T`` from ``[z, grad f(z), r]`` (``r`` a seeded random vector, so that a gradient
with little weight on the top eigenvector does not hide it), with ``krylov`` products;
solves the model's trust-region problem in that subspace exactly (secular equation on
``eigh(V^T H_z V)``, :func:`trust_region_max`); and **evaluates the true loss** at the
proposed point, accepting it only if ``f`` rose (else trying half the move). Off a
quadratic the model can be wrong over the ball (ReLU kinks, saturating softmax): when its
step fails, the ascent takes projected gradient steps (``z <- P(z + a rho g/|g|)``,
``a = 1, 1/2, 1/4, 1/8`` until the loss rises) and builds no more models. Every accepted
iterate is feasible, so the value is a lower bound on the maximum of the true loss; on a
quadratic one step is exact to the Krylov space's accuracy. The ascent stops
(``converged``) when the value's relative change was below ``tol`` over the last two
steps, or over the second (which on a quadratic only confirms the first); or after
``max_steps`` steps, or when no step raises the loss (not converged: flagged with a
``reason``, and ``check`` refuses to compare it). ``method="gradient"`` keeps plain
projected gradient ascent (to the same stopping rule, on one step) for comparison.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessdiag._errors import InputError
from hessdiag.objective import MeanLoss
from hessdiag.results import SharpnessResult  # owned by hessdiag.results; see below
from hessdiag.settings import ASCENT_MAX_STEPS, ASCENT_METHODS, ASCENT_TOL, SHARPNESS_MEASURES

# SharpnessResult lives in hessdiag.results beside the other results, so that
# hessdiag.records, which stores it, need not import this module; it is re-exported here,
# where it is documented.

__all__ = ["SharpnessResult", "critical_sharpness", "ascent_sharpness", "measure_sharpness",
           "trust_region_max", "ASCENT_METHODS"]

ASAM_ETA = 0.01
ASCENT_KRYLOV = 12  # the Krylov basis: Hessian-vector products per ascent step


def _step(theta: list[Tensor], direction: list[Tensor], eta: float) -> list[Tensor]:
    return [t + eta * d for t, d in zip(theta, direction, strict=True)]


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True)))


def _noise(loss: float, dtype: torch.dtype) -> float:
    """The loss's rounding: what two forward passes can differ by without meaning it."""
    return 64 * torch.finfo(dtype).eps * max(abs(loss), torch.finfo(dtype).tiny)


def critical_sharpness(model: nn.Module, loss_fn: Any, batches: Any, *, rtol: float = 1e-3,
                       max_forward: int = 60, grid_ratio: float = 1.25, device: Any = None,
                       dtype: torch.dtype = torch.float32) -> SharpnessResult:
    """``2 / lr_c`` by a geometric scan along the gradient and regula falsi (see the
    module docstring); ``NaN`` with ``reason`` where the gradient is zero to the loss's
    rounding. ``max_forward`` bounds the forward passes, ``grid_ratio`` the scan's
    resolution (a rise over a window of relative width below ``grid_ratio - 1`` can be
    missed)."""
    if not grid_ratio > 1:
        raise InputError(f"grid_ratio must be above 1; got {grid_ratio}", param="grid_ratio")
    start = time.perf_counter()
    obj = MeanLoss(model, loss_fn, batches, device or next(model.parameters()).device, dtype)
    loss0, g = obj.grad(obj.theta)
    gg = _dot(g, g)
    settings = {"rtol": rtol, "max_forward": max_forward, "grid_ratio": grid_ratio}
    if not math.isfinite(gg) or not math.isfinite(loss0):
        raise InputError("the loss or its gradient is not finite at these weights: critical "
                         "sharpness is undefined", param="measure")
    noise = _noise(loss0, dtype)

    def undefined(reason: str, curvature: float | None = None) -> SharpnessResult:
        return SharpnessResult(
            measure="critical", value=math.nan, interval=(math.nan, math.nan), loss=loss0,
            forward_passes=obj.forward, backward_passes=obj.backward,
            seconds=time.perf_counter() - start, samples=obj.total, grad_norm=math.sqrt(gg),
            settings={**settings, "curvature_along_gradient": curvature}, converged=False,
            hvps=obj.hvps, reason=reason)

    if gg == 0:
        return undefined("undefined: the gradient is exactly zero (a stationary point); no "
                         "step along it changes the loss")
    try:
        curvature = _dot(g, obj.hvp(obj.theta, g)) / gg
    except RuntimeError:  # an op without a double-backward formula: fit a parabola instead
        probe = 1e-3 * max(abs(loss0), 1e-3) / gg
        fitted = obj.loss(_step(obj.theta, [-x for x in g], probe)) - loss0
        curvature = 2 * (fitted + probe * gg) / probe ** 2 / gg
    if curvature > 0 and gg / (2 * curvature) <= noise:
        return undefined(
            f"undefined: the gradient is zero to working precision (|g| = {math.sqrt(gg):.3g}"
            f"; the largest decrease along it, g.g/(2 g.Hg/g.g) = {gg / (2 * curvature):.3g},"
            f" is within the loss's rounding {noise:.3g}): a numerically exact minimum",
            curvature)
    descent = [-x for x in g]

    def h(eta: float) -> float:
        return obj.loss(_step(obj.theta, descent, eta)) - loss0

    eta0 = 16 * noise / gg
    if curvature > 0:
        quadratic = 2 / curvature
        eta0 = min(max(eta0, quadratic / 256), quadratic / 4)
    lo, hlo = 0.0, 0.0
    eta, he = eta0, h(eta0)
    while he > 0 and obj.forward < max_forward:  # rose already: shrink until it does not
        hi, hhi = eta, he
        eta /= 4
        he = h(eta)
    if he > 0:
        hi, hhi = eta, he
    else:
        while he <= 0 and obj.forward < max_forward:  # the scan: never skip a window
            lo, hlo = eta, he
            eta *= grid_ratio
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
    converged = hi - lo <= rtol * hi
    return SharpnessResult(
        measure="critical", value=2.0 / lr_c,
        interval=(2.0 / hi, math.inf if lo <= 0 else 2.0 / lo), loss=loss0,
        forward_passes=obj.forward, backward_passes=obj.backward,
        seconds=time.perf_counter() - start, samples=obj.total, lr_c=lr_c,
        grad_norm=math.sqrt(gg), settings={**settings, "curvature_along_gradient": curvature},
        converged=converged, hvps=obj.hvps,
        reason=None if converged else f"the bracket of lr_c did not reach rtol {rtol:g} "
        f"within {max_forward} forward passes")


# --------------------------------------------------------------------------- ascent


def trust_region_max(B: np.ndarray, b: np.ndarray, rho: float) -> tuple[np.ndarray, float]:
    """``argmax`` and ``max`` of ``b.y + y.By / 2`` over ``||y|| <= rho`` (``B``
    symmetric), exactly: the global maximiser solves ``(nu I - B) y = b`` with
    ``nu >= max(0, lambda_max(B))`` and ``nu (rho - ||y||) = 0`` (Moré and Sorensen 1983);
    ``nu`` from the secular equation ``||y(nu)|| = rho`` on ``eigh(B)`` by bisection,
    including the "hard case" (``b`` orthogonal to the top eigenspace)."""
    B = 0.5 * (np.asarray(B, float) + np.asarray(B, float).T)
    b = np.asarray(b, float)
    lam, U = np.linalg.eigh(B)
    bt = U.T @ b
    top = lam[-1]
    scale = max(np.abs(lam).max(initial=0.0), np.abs(b).max(initial=0.0) / rho, 1e-300)

    def norm(nu: float) -> float:
        return float(np.sqrt(np.sum((bt / (nu - lam)) ** 2)))

    if top < 0 and norm(0.0) <= rho:  # interior maximum of a concave model
        return _value(U @ (bt / (0.0 - lam)), b, B)
    lo = max(0.0, top)
    hi = lo + np.linalg.norm(b) / rho + scale
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if norm(mid) > rho:
                lo = mid
            else:
                hi = mid
    yt = bt / (hi - lam)
    short = rho ** 2 - float(yt @ yt)
    if short > 1e-12 * rho ** 2 and hi - top <= 1e-10 * scale:
        # the hard case (b has no weight on the top eigenvector, e.g. at a stationary
        # point): the top eigenvector's component makes up the rest of the radius
        yt[-1] = math.copysign(math.sqrt(yt[-1] ** 2 + short), bt[-1] if bt[-1] else 1.0)
    return _value(U @ yt, b, B)


def _value(y: np.ndarray, b: np.ndarray, B: np.ndarray) -> tuple[np.ndarray, float]:
    return y, float(b @ y + 0.5 * y @ B @ y)


def _scales(obj: MeanLoss, scaling: str) -> list[Tensor]:
    if scaling == "none":
        return [torch.ones_like(t) for t in obj.theta]
    if scaling == "all":
        return [t.abs() + 1e-12 for t in obj.theta]
    return [t.abs() + ASAM_ETA if "weight" in name else torch.ones_like(t)
            for name, t in zip(obj.names, obj.theta, strict=True)]


def _flat(parts: list[Tensor]) -> Tensor:
    """One vector in the parameters' dtype (the Krylov basis is ``2 krylov`` of them)."""
    return torch.cat([p.reshape(-1) for p in parts])


def ascent_sharpness(model: nn.Module, loss_fn: Any, batches: Any, *, rho: float,
                     adaptive: bool | str = False, tol: float = ASCENT_TOL,
                     max_steps: int = ASCENT_MAX_STEPS, method: str = "krylov",
                     krylov: int = ASCENT_KRYLOV, seed: int = 0, device: Any = None,
                     dtype: torch.dtype = torch.float32) -> SharpnessResult:
    """Worst-case (``adaptive=False``) or adaptive (``True`` or ``"andriushchenko"``:
    ``T = |theta|`` on every parameter; ``"asam"``: ASAM's ``|w| + 0.01`` on weights only)
    sharpness of radius ``rho``, by ascent to relative tolerance ``tol`` within
    ``max_steps`` steps (see the module docstring). ``krylov``: the subspace's size
    (Hessian-vector products per step) of ``method="krylov"``."""
    if not rho > 0:
        raise InputError(f"rho must be positive; got {rho}", param="rho")
    if max_steps < 1:
        raise InputError(f"max_steps must be at least 1; got {max_steps}", param="max_steps")
    if not tol > 0:
        raise InputError(f"tol must be positive; got {tol}", param="tol")
    if method not in ASCENT_METHODS:
        raise InputError(f"unknown ascent method {method!r}; choose one of "
                         f"{', '.join(ASCENT_METHODS)}", param="method")
    if krylov < 2:
        raise InputError(f"krylov must be at least 2; got {krylov}", param="krylov")
    scaling = {False: "none", True: "all", "andriushchenko": "all", "asam": "asam"}.get(
        adaptive)
    if scaling is None:
        raise InputError(f"adaptive must be False, True, 'andriushchenko' or 'asam'; got "
                         f"{adaptive!r}", param="adaptive")
    measure = {"none": "worst-case", "all": "adaptive", "asam": "adaptive-asam"}[scaling]
    start = time.perf_counter()
    obj = MeanLoss(model, loss_fn, batches, device or next(model.parameters()).device, dtype)
    shapes = [t.shape for t in obj.theta]
    sizes = [t.numel() for t in obj.theta]
    T = _flat(_scales(obj, scaling))
    work = obj.theta[0].dtype if obj.theta else dtype

    def params(z: Tensor) -> list[Tensor]:
        parts = torch.split((T * z).to(work), sizes)
        return [t + p.reshape(s) for t, p, s in zip(obj.theta, parts, shapes, strict=True)]

    def value_grad(z: Tensor) -> tuple[float, Tensor]:
        value, g = obj.grad(params(z))
        return value, T * _flat(g)

    def hz(z: Tensor, v: Tensor) -> Tensor:
        parts = [p.reshape(s).to(work)
                 for p, s in zip(torch.split(T * v, sizes), shapes, strict=True)]
        return T * _flat(obj.hvp(params(z), parts))

    loss0, g = value_grad(torch.zeros_like(T))
    if not math.isfinite(loss0):
        raise InputError(f"the loss is {loss0} at these weights", param="measure")
    z, f = torch.zeros_like(T), 0.0
    history: list[float] = []
    converged = False
    reason: str | None = None
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(T.numel(), generator=generator, dtype=torch.float64).to(T)
    steps = calm = 0
    previous, model_ok = z, method == "krylov"
    settings_note = None
    while steps < max_steps:
        steps += 1
        if method == "gradient":  # plain projected ascent: always moves, keeps the best
            norm = float(g.norm())
            if norm == 0:
                history.append(f)
                converged, reason = True, "the gradient is zero: nothing to ascend"
                break
            step = z + rho * g / norm
            z = step * min(1.0, rho / float(step.norm()))
            current, g = value_grad(z)
            current -= loss0
            previous = history[-1] if history else 0.0
            history.append(current)
            f = max(f, current)
            if abs(current - previous) <= tol * abs(current) and steps > 1:
                converged = True
                break
            continue
        accepted = built = False
        if model_ok:
            built = True
            try:
                candidate, predicted = _krylov_step(z, g, f, rho, krylov,
                                                    [random, z - previous],
                                                    lambda v, z=z: hz(z, v))
            except RuntimeError:  # no double-backward formula: projected gradient steps
                candidate, predicted, model_ok = z, f, False
                settings_note = "no Hessian-vector products (double backward failed)"
            # the model's point, then halfway back (inside: the ball is convex)
            for _ in range(2 if model_ok else 0):
                f_new, g_new = value_grad(candidate)
                f_new -= loss0
                if f_new > f:
                    accepted = True
                    break
                candidate = 0.5 * (z + candidate)
            # a model that failed over the ball (non-quadratic, e.g. ReLU kinks) is not
            # built again: its products would be spent for nothing
            model_ok = accepted
        if not accepted:
            norm = float(g.norm())
            alpha = 1.0
            while not accepted and norm > 0 and alpha > 0.1:
                # off a quadratic the model can be wrong over the ball: a projected gradient
                # step (an ascent direction) with backtracking instead
                step = z + alpha * rho * g / norm
                candidate = step * min(1.0, rho / float(step.norm()))
                f_new, g_new = value_grad(candidate)
                f_new -= loss0
                accepted = f_new > f
                alpha /= 2
            if not accepted:
                history.append(f)
                # no step rose: converged if the model saw nothing more to gain, or the
                # shortest step changed the value by less than tol (a maximum to tol)
                converged = ((built and predicted - f <= tol * abs(f))
                             or f - f_new <= tol * abs(f))
                reason = None if converged else (
                    "stalled: neither the local model's step nor a projected gradient step "
                    "(down to rho/8) raised the loss")
                break
        change = f_new - f
        if accepted:
            previous, z, g = z, candidate, g_new
            f = f_new
        history.append(f)
        calm = calm + 1 if abs(change) <= tol * abs(f) else 0
        if calm >= 2 or (calm and steps == 2):  # two calm steps (one after the first)
            converged = True
            break
    if not converged and reason is None:
        last = (abs(history[-1] - history[-2]) / abs(history[-1])
                if len(history) > 1 and history[-1] else math.inf)
        reason = (f"not converged: the value still changed by {last:.2g} (relative) at the "
                  f"last of {max_steps} steps; raise max_steps")
    settings = {"tol": tol, "max_steps": max_steps, "method": method, "scaling": scaling,
                "krylov": krylov if method == "krylov" else None, "seed": seed,
                "eta": ASAM_ETA if scaling == "asam" else (1e-12 if scaling == "all"
                                                            else None),
                "note": settings_note}
    return SharpnessResult(
        measure=measure, value=f, interval=(f, math.inf), loss=float(loss0),
        forward_passes=obj.forward, backward_passes=obj.backward,
        seconds=time.perf_counter() - start, samples=obj.total, rho=rho, history=history,
        settings=settings, converged=converged, steps=steps, hvps=obj.hvps, reason=reason)


def _krylov_step(z: Tensor, g: Tensor, f: float, rho: float, size: int,
                 extra: list[Tensor], hvp: Any) -> tuple[Tensor, float]:
    """The maximiser of the quadratic model of ``f`` at ``z`` over the ball, within the
    block Krylov space of ``[z, g, *extra]`` (a random vector, the last step), and the
    model's value there."""
    basis: list[Tensor] = []
    products: list[Tensor] = []

    def add(v: Tensor) -> None:
        norm0 = float(v.norm())
        if norm0 == 0 or len(basis) >= size:
            return
        for _ in range(2):  # twice is enough (Kahan, Parlett)
            for q in basis:
                v = v - (q @ v) * q
        norm = float(v.norm())
        if norm > max(1e-10, 100 * torch.finfo(v.dtype).eps) * norm0:  # independent
            basis.append(v / norm)

    for v in (z, g, *extra):
        add(v)
    i = 0
    while i < len(basis):
        products.append(hvp(basis[i]))
        add(products[i])
        i += 1
    V = torch.stack(basis, 1)
    B = (V.T @ torch.stack(products, 1)).cpu().numpy()
    yz = (V.T @ z).cpu().numpy()
    c = (V.T @ g).cpu().numpy()
    y, _ = trust_region_max(B, c - B @ yz, rho)
    d = y - yz
    predicted = f + float(c @ d + 0.5 * d @ B @ d)
    candidate = V @ torch.as_tensor(y, dtype=V.dtype, device=V.device)
    norm = float(candidate.norm())
    if norm > rho:  # rounding
        candidate = candidate * (rho / norm)
    return candidate, predicted


def measure_sharpness(model: nn.Module, loss_fn: Any, batches: Any, measure: str, *,
                      rho: float = 0.05, tol: float = ASCENT_TOL,
                      max_steps: int = ASCENT_MAX_STEPS, method: str = "krylov",
                      device: Any = None, dtype: torch.dtype = torch.float32
                      ) -> SharpnessResult:
    """One of :data:`hessdiag.settings.SHARPNESS_MEASURES` (``rho``, ``tol``,
    ``max_steps``, ``method``: of the ascent measures)."""
    if measure not in SHARPNESS_MEASURES:
        raise InputError(f"unknown sharpness measure {measure!r}; choose one of "
                         f"{', '.join(SHARPNESS_MEASURES)}", param="measure")
    if measure == "critical":
        return critical_sharpness(model, loss_fn, batches, device=device, dtype=dtype)
    adaptive = {"worst-case": False, "adaptive": True, "adaptive-asam": "asam"}[measure]
    return ascent_sharpness(model, loss_fn, batches, rho=rho, adaptive=adaptive, tol=tol,
                            max_steps=max_steps, method=method, device=device, dtype=dtype)


def sharpness_of_checkpoint(checkpoint: str, measure: str, *, rho: float = 0.05,
                            tol: float = ASCENT_TOL, max_steps: int = ASCENT_MAX_STEPS,
                            method: str = "krylov", data: Any = None, model_spec: str | None = None,
                            loss: str | None = None, output: str | None = None,
                            unsafe: bool = False,
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
    task = load_task(checkpoint, data=data, model_spec=model_spec, loss=loss, output=output,
                     unsafe=unsafe, allow_nonfinite=allow_nonfinite)
    target = resolve_device(device)
    task.model.to(target)
    result = measure_sharpness(task.model, task.loss, task.batches(data.batch_size), measure,
                               rho=rho, tol=tol, max_steps=max_steps, method=method,
                               device=target,
                               dtype=resolve_dtype(dtype))
    analysis_id = None
    if store is not None:
        origin = provenance(task)
        origin["data"] = {**origin["data"], "batch_size": data.batch_size}
        analysis_id = write_sharpness(store, result, origin)
    return result, task, analysis_id
