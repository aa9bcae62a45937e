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


# elements converted to float64 at a time by _dot: exact products and float64 sums without
# a float64 copy of each whole tensor, which at ResNet-18 scale (11M parameters) cost 5x
# the arithmetic (182 ms against 36 ms a product on a CPU core) and made SAM's and
# Eigen-SAM's steps measurably slower than SGD's
_CHUNK = 1 << 18


def _dot(a: Sequence[Tensor], b: Sequence[Tensor], device: torch.device) -> Tensor:
    """``sum_i <a_i, b_i>`` on ``device``, products and sums in float64."""
    parts = []
    for x, y in zip(a, b, strict=True):
        xf, yf = x.reshape(-1), y.reshape(-1)
        for i in range(0, xf.numel(), _CHUNK):
            parts.append(torch.dot(xf[i:i + _CHUNK].to(torch.float64),
                                   yf[i:i + _CHUNK].to(torch.float64)).to(device))
    if not parts:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(parts).sum()


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
    if rule == "sam" or eigenvector is None:
        norm = torch.sqrt(_dot(grads, grads, device))
        inv = 1.0 / (norm + 1e-12)
        return [g * (r * inv).to(g.device, g.dtype) for r, g in zip(radii, grads, strict=True)]
    return eigensam_perturbation(grads, list(eigenvector), radii, alpha, renormalize)[0]


def eigensam_perturbation(grads: Sequence[Tensor], v: Sequence[Tensor], radii: Sequence[float],
                          alpha: float, renormalize: bool
                          ) -> tuple[list[Tensor], Tensor, Tensor]:
    """Eigen-SAM's ``e`` (see the module docstring) with ``<e, v>`` and ``||e||`` (float64,
    on the first gradient's device), for the optimizer's diagnostics. With one radius
    for all tensors these follow from the inner products ``e`` is made of, with no pass
    over ``e``: ``e = r k (a_g g + a_v v)``, so ``<e, v> = r k (a_g <g, v> + a_v ||v||^2)``
    and ``||e||^2 = (r k)^2 (a_g^2 ||g||^2 + 2 a_g a_v <g, v> + a_v^2 ||v||^2)``."""
    device = grads[0].device
    gg, gv, vv = _dot(grads, grads, device), _dot(grads, v, device), _dot(v, v, device)
    inv = 1.0 / (torch.sqrt(gg) + 1e-12)
    c = gv * inv           # <g_hat, v>
    s = torch.sign(gv)     # 0 (no eigenvector term) if g is orthogonal to v
    a_g, a_v = (1.0 - alpha * s * c) * inv, alpha * s  # d = a_g g + a_v v
    dd = a_g * a_g * gg + 2 * a_g * a_v * gv + a_v * a_v * vv  # ||d||^2
    scale = 1.0 / (torch.sqrt(dd) + 1e-12) if renormalize else 1.0
    # e = r k d, one new tensor each: r k a_g g, then r k a_v v added in place
    e = [torch.mul(g, (r * scale * a_g).to(g.device, g.dtype)).addcmul_(
             u.to(g.device, g.dtype), (r * scale * a_v).to(g.device, g.dtype))
         for r, g, u in zip(radii, grads, v, strict=True)]
    if len(set(radii)) == 1:
        k = radii[0] * scale
        return e, k * (a_g * gv + a_v * vv), k * torch.sqrt(dd)
    # radii per parameter group: e is no multiple of d
    return e, _dot(e, v, device), torch.sqrt(_dot(e, e, device))
