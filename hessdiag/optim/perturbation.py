"""The perturbation of SAM, ASAM and Eigen-SAM, shared by the optimizers and by
:mod:`hessdiag.align`.

For gradients ``g`` (one tensor per parameter; norms and inner products are taken over
all of them together, accumulated in float64):

``sam``       ``e = rho g / (||g|| + 1e-12)``                       (Foret et al. 2021)
``asam``      ``e = rho T^2 g / (||T g|| + 1e-12)``, ``T = |w|``    (Kwon et al. 2021)
``eigensam``  ``e = rho d``, ``d = g_hat + alpha s (v - <g_hat, v> g_hat)``,
              ``g_hat = g / (||g|| + 1e-12)``, ``s = sign(<g, v>)`` (Luo et al. 2024);
              ``d / ||d||`` instead of ``d`` with ``renormalize``; without an
              eigenvector yet, as ``sam``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

RULES = ("sam", "asam", "eigensam")


def _dot(a: Sequence[Tensor], b: Sequence[Tensor], device: torch.device) -> Tensor:
    return torch.stack([torch.sum(x.to(torch.float64) * y.to(torch.float64)).to(device)
                        for x, y in zip(a, b, strict=True)]).sum()


def perturbation(rule: str, grads: Sequence[Tensor], *, rho: float | Sequence[float],
                 params: Sequence[Tensor] | None = None,
                 eigenvector: Sequence[Tensor] | None = None, alpha: float = 0.2,
                 renormalize: bool = False) -> list[Tensor]:
    """The perturbation ``e`` of ``rule`` (see the module docstring), one tensor per
    gradient. ``rho`` is one radius or one per tensor (SAM's parameter groups);
    ``params`` (the weights ``w``) are needed for ``asam`` (a ``None`` entry means
    ``T = 1`` for that tensor: a parameter group without ``adaptive``), ``eigenvector``
    (unit, one tensor per gradient) for ``eigensam``."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}; got {rule!r}")
    grads = list(grads)
    if not grads:
        raise ValueError("no gradients to perturb along")
    device = grads[0].device
    radii = [float(rho)] * len(grads) if isinstance(rho, int | float) else list(rho)
    if rule == "asam":
        if params is None:
            raise ValueError("asam needs the weights (params)")
        scaled = [g if p is None else p.abs() * g for p, g in zip(params, grads, strict=True)]
        norm = torch.sqrt(_dot(scaled, scaled, device))
        return [(r / (norm + 1e-12)).to(s.device, s.dtype) * (s if p is None else p.abs() * s)
                for r, p, s in zip(radii, params, scaled, strict=True)]
    norm = torch.sqrt(_dot(grads, grads, device))
    inv = 1.0 / (norm + 1e-12)
    if rule == "sam" or eigenvector is None:
        return [g * (r * inv).to(g.device, g.dtype) for r, g in zip(radii, grads, strict=True)]
    v = list(eigenvector)
    gv = _dot(grads, v, device)
    c = gv * inv           # <g_hat, v>
    s = torch.sign(gv)     # 0 (no eigenvector term) if g is orthogonal to v
    a_g, a_v = (1.0 - alpha * s * c) * inv, alpha * s
    d = [g * a_g.to(g.device, g.dtype) + u.to(g.device, g.dtype) * a_v.to(g.device, g.dtype)
         for g, u in zip(grads, v, strict=True)]
    scale = 1.0 / (torch.sqrt(_dot(d, d, device)) + 1e-12) if renormalize else 1.0
    return [x * (r * scale if isinstance(scale, float) else (r * scale).to(x.device, x.dtype))
            for r, x in zip(radii, d, strict=True)]
