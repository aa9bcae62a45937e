"""Extreme eigenpairs by (block) Lanczos with thick restarts and an orthogonality kept on
evidence.

Lanczos builds a basis ``V`` of the Krylov space ``span{v, Hv, H^2 v, ...}`` and takes
Ritz pairs of the projection ``T = V^T H V``. Without reorthogonalisation the basis loses
orthogonality as soon as a Ritz value converges and "ghost" copies of it appear (Paige
1971). The basis here (:class:`~hessdiag.curvature.krylov.KrylovBasis`) is a preallocated
buffer; each product costs one sweep of inner products over the basis, which gives the
new column of ``T`` and, with the Gram matrix ``G = V^T V`` kept alongside, the exact
loss of orthogonality of the next vector. A full Gram-Schmidt pass is made only when
that loss would exceed ``ORTHOGONALITY * tol`` (and never more than
``sqrt(eps)``: semi-orthogonality, Simon 1984). Ritz pairs solve ``T s = theta G s``, so a
Ritz value is the Rayleigh quotient of its Ritz vector whatever is left of the loss, and
no ghost appears (a ghost needs a vector the basis counts twice, which ``G`` shows).

Residuals ``||H u - theta u||`` come from the recurrence ``H V = V K + Q R`` (``K`` the
coefficients subtracted, ``Q`` the next vectors): no ``H V`` is stored, so the memory is
the basis and what the products need. They equal the true residuals to rounding, plus
``settings["residual_drift"]``, what thick restarts (Wu & Simon 2000: the basis compressed
in place to the best Ritz vectors, the recurrence continued from the last residual
direction) drop of the relation; the reported residual is an upper bound.

A single starting vector sees one copy of an exactly repeated eigenvalue only (its
Krylov space meets each eigenspace in one direction), and a missed copy is orthogonal to
the converged Ritz vectors ``Y``. So once the wanted pairs have converged, Lanczos is run
on ``H`` compressed to the orthogonal complement of ``Y``, ``(I - Y Y^T) H (I - Y Y^T)``,
from a fresh random vector (``verify``). A missed eigenvector lies in that complement, so
the compression has an eigenvalue at least as large; without one, the compression's top
lies below the ``k``-th found value. The check
runs until its top Ritz value ``mu`` (residual ``r`` for the compression) is resolved:
``mu`` above the ``k``-th value means a missed eigenvalue, and the check's Ritz vector
joins the next block and the iteration continues;
none when ``mu`` lies inside the ``k``-th value by more than a probabilistic bound
(Kuczynski & Wozniakowski 1992: an eigenvalue beyond it would have lifted ``mu`` higher,
except with probability ``MISS_PROBABILITY``) or when ``(mu, r)`` has converged to ``tol``
inside it, the standard by which any Lanczos run accepts its extreme value. With ``k=1``
and a random start no check runs: a missed copy of the one wanted value at an end is that
same value. A start that is not random (``v0``, e.g. the loss gradient) may hold almost
nothing of the top eigenvector, so from it even a top-1 is checked.
The check's Ritz pairs are taken on its own vectors together with the basis's other
Ritz vectors, which already approximate the values below the wanted ones, so its extreme
pair converges sooner than from its vectors alone (the probabilistic bound is applied to
its own vectors only, as the theorem requires). Its vectors live in the basis's own
buffer after the converged ones. The check costs products (about a second
convergence of the next value, for ``k >= 2``; ``settings["check_hvps"]``);
``verify=False`` skips it. ``block_size=b`` starts from ``b`` vectors instead.

The solver's own time (inner products, updates, small dense problems) is
``settings["solver_seconds"]``, the products' ``settings["product_seconds"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessdiag.curvature.krylov import (
    KrylovBasis,
    gram,
    products_into,
    row_norms,
    tensor_like,
)
from hessdiag.curvature.linear import (
    Counter,
    OperatorInfo,
    Progress,
    as_operator,
    gaussian,
    generator,
    matmat,
    operator_info,
    small_blas,
)
from hessdiag.curvature.results import EigenResult

WHICH = ("largest", "smallest", "both")
MISS_PROBABILITY = 1e-3  # the multiplicity check's bound on missing an eigenvalue
ORTHOGONALITY = 0.1  # the basis is kept orthogonal to this fraction of tol (or sqrt(eps))


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual tolerance when none is given: 1e-6 in float64, 1e-3 otherwise."""
    return 1e-6 if dtype == torch.float64 else 1e-3


def lanczos(
    op: Any,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float | None = None,
    max_hvps: int | None = None,
    ncv: int | None = None,
    block_size: int = 1,
    seed: int | None = 0,
    v0: Tensor | None = None,
    return_eigenvectors: bool = True,
    verify: bool = True,
    progress: Progress = None,
    basis_device: torch.device | str | None = None,
) -> EigenResult:
    """The ``k`` algebraically largest (or smallest, or both) eigenpairs of ``op``.

    Parameters
    ----------
    op:
        A symmetric operator (``HessianOperator``, a dense matrix, ...).
    k:
        Eigenpairs wanted at each requested end.
    which:
        ``"largest"`` (algebraic: the top of the spectrum, never ranked by magnitude),
        ``"smallest"`` (most negative), or ``"both"`` (``k`` at each end).
    tol:
        Stop when every wanted pair has
        ``||H u - theta u|| <= tol * max(|theta|, eps**(2/3) ||H||)``; the eigenvalue's
        relative error is then at most ``tol`` (and typically about ``tol**2 / gap``).
        Default :func:`default_tol` of the operator's dtype.
    max_hvps:
        Budget of products; default ``max(300, 20 * ncv)``, capped at ``10 * dim``.
    ncv:
        Largest basis before a restart; default ``max(2 * wanted + 1, 20) * block_size``.
    block_size:
        Starting vectors (see the module docstring).
    seed, v0:
        The random start (Gaussian, from a CPU generator), or an explicit one.
    verify:
        Once the wanted pairs converge, check for eigenvalues the basis missed (a copy of
        a repeated eigenvalue has no component in the start vector's Krylov space): see
        the module docstring. A missed one joins the basis and the iteration continues.
        ``settings["complete"]`` says whether the check confirmed the set (``None`` when
        skipped with ``verify=False``); a set the budget left unconfirmed has
        ``converged=False`` for each pair a missed eigenvalue could still displace.
    basis_device:
        Where the basis ``V`` (``ncv + 2 * block_size`` vectors, in the operator's dtype),
        the Ritz vectors and the returned eigenvectors live; default the operator's device.
        ``"cpu"`` keeps them in host memory for a large model on a GPU: each vector is
        moved to the operator's device for its product and the product moved back (two
        copies of one vector per product); everything else is computed where the basis
        is.

    Returns
    -------
    EigenResult
        Eigenvalues with residual norms (bounds, see the module docstring), converged
        flags, the products used and the Ritz vectors (columns of ``eigenvectors``) unless
        ``return_eigenvectors=False``. ``settings`` adds ``orthogonality`` (the largest
        ``|G - I|`` of the basis, and of the returned vectors measured at the end),
        ``full_reorthogonalisations``, ``residual_drift``, ``solver_seconds`` and
        ``product_seconds``.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, -5.0, 1.0, 2.0], dtype=torch.float64))
    >>> [round(x, 12) for x in lanczos(A, k=2, seed=0).eigenvalues.tolist()]
    [3.0, 2.0]
    >>> [round(x, 12) for x in lanczos(A, k=1, which="smallest", seed=0).eigenvalues.tolist()]
    [-5.0]
    """
    with small_blas():
        return _lanczos(op, k, which, tol=tol, max_hvps=max_hvps, ncv=ncv,
                        block_size=block_size, seed=seed, v0=v0,
                        return_eigenvectors=return_eigenvectors, verify=verify,
                        progress=progress, basis_device=basis_device)


def _lanczos(op: Any, k: int, which: str, *, tol: float | None, max_hvps: int | None,
             ncv: int | None, block_size: int, seed: int | None, v0: Tensor | None,
             return_eigenvectors: bool, verify: bool, progress: Progress,
             basis_device: torch.device | str | None) -> EigenResult:
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}; got {which!r}")
    op = as_operator(op)
    info = operator_info(op)
    n = info.dim
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    want = 2 * k if which == "both" else k
    if want > n:
        raise ValueError(f"asked for {want} eigenpairs of a {n}-dimensional operator")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1; got {block_size}")
    tol = default_tol(info.dtype) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be positive; got {tol}")
    ncv = min(n, ncv or max(2 * want + 1, 20) * block_size)
    if ncv < min(n, want + block_size):
        raise ValueError(f"ncv={ncv} is too small for {want} eigenpairs with block size "
                         f"{block_size}; use at least {want + block_size}")
    max_hvps = max_hvps or min(max(300, 20 * ncv), 10 * n)
    eps = torch.finfo(info.dtype).eps
    floor = eps ** (2 / 3)

    if basis_device is not None and torch.device(basis_device) != info.device:
        op = _OnDevice(op, info.device, torch.device(basis_device))
        info = OperatorInfo(n, info.dtype, torch.device(basis_device))
    counter = Counter(op, progress, max_hvps)
    product = products_into(counter)
    gen = generator(seed)
    if v0 is not None:
        start = v0.reshape(n, -1).to(info.device, info.dtype)
        if start.shape[1] < block_size:
            extra = gaussian(n, block_size - start.shape[1], gen, info)
            start = torch.cat([start, extra], dim=1)
    else:
        start = gaussian(n, block_size, gen, info)
    basis = KrylovBasis(n, min(n, ncv) + 2 * block_size, info.dtype, info.device,
                        bound=ORTHOGONALITY * tol)
    basis.add_pending(start, fresh=gen)

    restarts = 0
    theta = np.zeros(0)
    S = np.zeros((0, 0))
    idx = np.zeros(0, dtype=int)
    residuals = np.full(want, np.inf)
    converged = np.zeros(want, dtype=bool)
    # the multiplicity check's verdict: None when skipped, False until it confirms the set
    complete: bool | None = False if verify else None
    check_hvps = 0  # products spent by the multiplicity check
    # a start that is not uniformly random (v0, e.g. the loss gradient) may hold almost
    # nothing of the top eigenvector: then even a top-1 is checked
    check_one = v0 is not None
    lowest, highest = math.inf, -math.inf  # the extreme Ritz values seen (restarts drop them)

    def ritz():
        """Ritz pairs of the basis: all values, the wanted ones' residuals and flags."""
        theta, S, res = basis.ritz()
        idx = _wanted(theta, want, which)
        anorm = float(np.max(np.abs(theta))) if len(theta) else 0.0
        scale = np.maximum(np.abs(theta[idx]), floor * anorm)
        return theta, S, idx, res[idx], res[idx] <= tol * scale, scale

    while basis.b:
        b = basis.b
        if counter.hvps + b > max_hvps:  # the budget allows only part of the block
            basis.b = max(0, max_hvps - counter.hvps)
            if basis.b == 0:
                break
        basis.multiply(product)
        basis.absorb(fresh=gen if basis.size + basis.b < n else None)
        theta, S, idx, residuals, converged, scale = ritz()
        lowest, highest = min(lowest, float(theta[0])), max(highest, float(theta[-1]))
        m = basis.size
        if m >= n:
            complete = True if verify else None  # the basis spans the space: nothing missed
            break
        if counter.hvps >= max_hvps:
            break
        if len(idx) == want and converged.all():
            if not verify:
                break
            if k == 1 and not check_one:
                # a random start misses only further copies of the values it found, and a
                # copy of the one wanted value at each end leaves that value unchanged
                complete = True
                break
            found = _unseen(counter, basis, theta, S, idx, tol, floor,
                            _levels(theta[idx], scale, which, tol), (lowest, highest),
                            gen, info, max_hvps)
            check_hvps += found.steps
            # the check rotated the basis to its Ritz vectors (the same space, the same
            # pairs): their coefficients are now the identity's columns
            theta, S, idx, residuals, converged, scale = ritz()
            if found.verdict == "none":
                complete = True
                break
            if found.verdict == "unresolved":  # out of budget before the check could decide
                complete = False
                converged = converged & ~_displaceable(theta[idx], which, found.reach)
                break
            # a missed eigenvalue: the check's Ritz vector joins the next block, and both
            # Krylov sequences continue as one block
            if not basis.add_pending(found.vector[:, None]):
                complete = True  # already in the basis: a tie with the k-th value
                break
            if counter.hvps >= max_hvps:
                complete = False
                break
        if basis.size + 2 * basis.b > ncv + 2 * block_size and basis.b:
            keep = _restart_set(theta, want, which, max(want, ncv - basis.b))
            basis.restart(S[:, keep], theta[keep])
            restarts += 1
            theta, S, idx, residuals, converged, scale = ritz()
        if basis.b == 0 and basis.size < n:  # an invariant subspace: a fresh direction
            basis.add_pending(torch.zeros(n, 1, dtype=info.dtype, device=info.device),
                              fresh=gen)

    order = _output_order(theta[idx], which)
    eigvecs = None
    orthogonality = basis.loss
    if return_eigenvectors or len(idx) > 1:
        Y = basis.combine(S[:, idx[order]])
        Y.div_(tensor_like(row_norms(Y), Y)[:, None])  # in place: k vectors of size n
        if len(idx) > 1:
            gy = gram(Y, Y)
            orthogonality = max(orthogonality, float(np.max(np.abs(gy - np.eye(len(idx))))))
        eigvecs = Y.T if return_eigenvectors else None
    seconds = counter.seconds
    return EigenResult(
        eigenvalues=theta[idx][order],
        residuals=residuals[order],
        converged=converged[order],
        which=which,
        method="lanczos",
        tol=tol,
        hvps=counter.hvps,
        iterations=restarts,
        seconds=seconds,
        seed=seed,
        eigenvectors=eigvecs,
        settings={"k": k, "ncv": ncv, "block_size": block_size, "max_hvps": max_hvps,
                  "restarts": restarts, "v0": v0 is not None, "complete": complete,
                  "check_hvps": check_hvps,
                  "basis_device": str(info.device),
                  "orthogonality": orthogonality,
                  "full_reorthogonalisations": basis.full_passes,
                  "residual_drift": basis.drift,
                  "product_seconds": counter.product_seconds,
                  "solver_seconds": max(0.0, seconds - counter.product_seconds)},
    )


class _OnDevice:
    """An operator whose vectors live on another device than its products: each vector is
    moved to ``device`` for the product and the product back to ``basis_device``."""

    def __init__(self, op: Any, device: torch.device, basis_device: torch.device) -> None:
        self.op, self.device, self.basis_device = op, device, basis_device
        self.dim = operator_info(op).dim

    def matvec(self, v: Tensor) -> Tensor:
        return self.op.matvec(v.to(self.device)).to(self.basis_device)

    def matmat(self, block: Tensor) -> Tensor:
        return matmat(self.op, block.to(self.device)).to(self.basis_device)


def _levels(values: np.ndarray, scale: np.ndarray, which: str, tol: float
            ) -> list[tuple[float, float, float]]:
    """For each end the check watches: ``(sign, level, margin)``; an eigenvalue ``mu``
    with ``sign * (mu - level) > margin`` would belong in the wanted set (``level`` is the
    innermost wanted value at that end, ``margin`` its convergence tolerance)."""
    order = np.argsort(values)
    values, scale = values[order], scale[order]
    if which == "largest":
        return [(1.0, float(values[0]), tol * float(scale[0]))]
    if which == "smallest":
        return [(-1.0, float(values[-1]), tol * float(scale[-1]))]
    half = len(values) // 2
    return [(1.0, float(values[half]), tol * float(scale[half])),
            (-1.0, float(values[half - 1]), tol * float(scale[half - 1]))]


@dataclass
class _Check:
    verdict: str                      # "none", "found" or "unresolved"
    vector: Tensor | None = None      # found: the Ritz vector beyond the level
    reach: list[tuple[float, float]] = field(default_factory=list)  # unresolved: bounds
    steps: int = 0                    # the check's products


def _unseen(counter: Counter, main: KrylovBasis, theta: np.ndarray, S: np.ndarray,
            idx: np.ndarray, tol: float, floor: float,
            levels: list[tuple[float, float, float]], span: tuple[float, float],
            gen: torch.Generator, info: Any, max_hvps: int) -> _Check:
    """The multiplicity check: Lanczos on ``H`` deflated by the converged Ritz vectors
    ``Y``, ``(I - Y Y^T) H (I - Y Y^T)`` on the complement of ``Y``, from a uniformly
    random start, until each watched end ``(sign, level, margin)`` is decided.

    The basis's other Ritz vectors ``Z = V S_Z`` (also in the complement of ``Y``) join
    the check's Ritz pairs, which are taken on the union of ``Z`` and the check's own
    Krylov vectors: ``Z`` already holds the main run's approximations of the values
    below the wanted ones, so the extreme pair of the deflated operator converges in
    fewer products than from the check's vectors alone, at no extra product (the
    union's extreme value is at least the check's own, and at most the deflated
    operator's extreme eigenvalue). Nothing of size ``n`` is formed for the union: its
    projection and Gram matrix come from one inner-product sweep of the main basis per
    check step (``V^T q`` and ``V^T H q`` of the check's vector ``q``), and a union
    pair's residual from both Krylov relations.

    ``"found"`` as soon as that extreme Ritz value lies beyond the level by more than the
    margin (an eigenvalue the basis missed: a missed eigenvector is orthogonal to ``Y``,
    so it is an eigenvector of the deflated operator). ``"none"`` once at every end,
    after ``j`` steps, the check's own extreme Ritz value ``mu`` (its Krylov space from
    the random start alone) is inside by more than ``eps_j * a``, with ``a`` the distance
    from the level (moved out by the margin) to the far end of the spectrum ``span`` and
    ``eps_j = (ln(1.648 sqrt(n) / MISS_PROBABILITY) / (2j - 1))^2``: by Kuczynski &
    Wozniakowski (1992), an eigenvalue beyond the level would have lifted ``mu`` past
    that point except with probability ``MISS_PROBABILITY``; also when the Krylov space
    closes (its Ritz values are then exact), or when the union's extreme Ritz pair (for
    the deflated operator) has converged to ``tol`` inside the level and the check's own
    extreme value has come within ``tol`` of it, as any Lanczos run accepts its extreme
    value. ``"unresolved"`` when the budget runs out first, with
    ``(sign, mu + sign eps_j a)``: how far a missed eigenvalue may still lie."""
    _, _, main_res = main.ritz()
    anorm0 = float(np.max(np.abs(theta)))
    conv = main_res <= tol * np.maximum(np.abs(theta), floor * anorm0)
    conv[idx] = True  # the wanted pairs (converged: the check runs only then)
    # the basis rotated, in place, to its Ritz vectors: [Z, Y]; the check's vectors then
    # follow Y in the same buffer (over the pending rows, kept aside meanwhile), so the
    # check allocates nothing of size n beyond the rows the basis already holds
    order = np.concatenate([np.flatnonzero(~conv), np.flatnonzero(conv)])
    saved = main.pending().clone()
    main.restart(S[:, order], theta[order])
    nz, m_main = int((~conv).sum()), main.m
    theta_Z = theta[order][:nz]
    n = info.dim - (m_main - nz)
    rows = main.rows
    pend = slice(main.m, main.m + main.b)
    G_main = main.G[rows, rows]
    S_Z = np.eye(m_main)[:, :nz]                        # Z = the first nz rows
    E_Z = main.K[rows, :nz] - S_Z * theta_Z             # H Z - Z Theta inside span(V)
    couple_Z = main.K[pend, :nz]                        # H Z's part along the pending rows
    check = KrylovBasis(info.dim, 0, info.dtype, info.device, bound=main.bound,
                        buffer=main.buf[nz:], n_locked=m_main - nz)
    check.add_pending(gaussian(info.dim, 1, gen, info), fresh=gen)
    product = products_into(counter)
    VtQ = np.zeros((main.m + main.b, 0))   # [V, Q_main]^T q_j for the check's vectors
    VtHQ = np.zeros((main.m, 0))           # V^T H q_j
    log_term = math.log(1.648 * math.sqrt(max(n, 1)) / MISS_PROBABILITY)
    try:
        return _check_steps(counter, main, check, product, saved, S_Z, theta_Z, E_Z,
                            couple_Z, G_main, levels, span, log_term, tol, floor,
                            max_hvps, VtQ, VtHQ)
    finally:
        main.buf[main.m : main.m + main.b] = saved  # the pending rows back in place


def _check_steps(counter: Counter, main: KrylovBasis, check: KrylovBasis, product: Any,
                 saved: Tensor, S_Z: np.ndarray, theta_Z: np.ndarray, E_Z: np.ndarray,
                 couple_Z: np.ndarray, G_main: np.ndarray,
                 levels: list[tuple[float, float, float]], span: tuple[float, float],
                 log_term: float, tol: float, floor: float, max_hvps: int,
                 VtQ: np.ndarray, VtHQ: np.ndarray) -> _Check:
    """The iterations of :func:`_unseen` (see there)."""
    rows = main.rows
    lo, hi = span
    reach: list[tuple[float, float]] = []
    steps = 0
    while check.b and counter.hvps < max_hvps:
        check.multiply(product)
        steps += 1
        qp = check.buf[check.m : check.m + 2]  # q_j and H q_j
        X = np.concatenate([gram(main.vectors(), qp), gram(saved, qp)], axis=0)
        VtQ = np.concatenate([VtQ, X[:, :1]], axis=1)
        VtHQ = np.concatenate([VtHQ, X[: main.m, 1:2]], axis=1)
        check.absorb()
        mu, _, _ = check.ritz()
        eps_j = (log_term / (2 * len(mu) - 1)) ** 2
        # the union of Z and the check's vectors: Gram matrix and projection
        crow = check.rows
        G_c, T_c = check.G[crow, crow], check.T[crow, crow]
        G_zc = S_Z.T @ VtQ[rows]
        A_zc = S_Z.T @ VtHQ[rows]
        nz = S_Z.shape[1]
        gram_u = np.block([[np.eye(nz), G_zc], [G_zc.T, G_c]])
        proj_u = np.block([[np.diag(theta_Z), A_zc], [A_zc.T, T_c]])
        g, E = np.linalg.eigh(0.5 * (gram_u + gram_u.T))
        keep = g > 1e-10 * g[-1]
        Cm = E[:, keep] / np.sqrt(g[keep])
        nu, W = np.linalg.eigh(Cm.T @ (0.5 * (proj_u + proj_u.T)) @ Cm)
        B = Cm @ W
        lo, hi = min(lo, float(mu[0]), float(nu[0])), max(hi, float(mu[-1]), float(nu[-1]))
        reach = []
        anorm = max(abs(lo), abs(hi))
        for sign, level, margin in levels:
            j = len(mu) - 1 if sign > 0 else 0
            ju = len(nu) - 1 if sign > 0 else 0
            b1, b2 = B[:nz, ju], B[nz:, ju]
            if sign * (nu[ju] - level) > margin:
                x = main.combine((S_Z @ b1)[:, None])[0] + check.combine(b2[:, None])[0]
                x = x.clone()
                return _Check("found", x, steps=steps)
            edge = level + sign * margin
            a = (edge - lo) if sign > 0 else (hi - edge)
            if sign * (edge - mu[j]) > eps_j * a:
                continue  # decided by the bound
            # or by convergence, as any Lanczos run decides: the union's extreme Ritz pair
            # (for the deflated operator) converged inside the level, and the check's own
            # extreme value has reached it (the union alone may hold a converged pair of
            # the main run's while the random start has not yet lifted a missed copy)
            r = _union_residual(float(nu[ju]), b1, b2, S_Z, theta_Z, E_Z, couple_Z,
                                G_main, main, check, VtQ)
            bar = tol * max(abs(float(nu[ju])), floor * anorm)
            if r > bar or sign * (nu[ju] - mu[j]) > bar:
                reach.append((sign, float(mu[j]) + sign * eps_j * a))
        if not reach:
            return _Check("none", steps=steps)
    if not check.b:  # the Krylov space closed: its Ritz values are exact
        return _Check("none", steps=steps)
    return _Check("unresolved", reach=reach, steps=steps)


def _union_residual(nu: float, b1: np.ndarray, b2: np.ndarray, S_Z: np.ndarray,
                    theta_Z: np.ndarray, E_Z: np.ndarray, couple_Z: np.ndarray,
                    G_main: np.ndarray, main: KrylovBasis, check: KrylovBasis,
                    VtQ: np.ndarray) -> float:
    """A bound on ``||H u - nu u||`` for the union's Ritz vector ``u = Z b1 + V_c b2``,
    from the two Krylov relations ``H V = V K + Q R`` (main basis, ``Z = V S_Z``) and
    ``(I - Y Y^T) H V_c = V_c K_c + Q_c R_c`` (the check), with the Gram matrix of
    ``[V, V_c, Q]`` as measured; the check's pending direction enters by the triangle
    inequality (its overlaps are measured only at the next step)."""
    rows, crow = main.rows, check.rows
    a_V = S_Z @ (theta_Z * b1 - nu * b1) + E_Z @ b1
    a_c = check.K[crow, crow] @ b2 - nu * b2
    a_Q = couple_Z @ b1
    nv, nc, nq = len(a_V), len(a_c), len(a_Q)
    pend = slice(main.m, main.m + main.b)
    gram_all = np.zeros((nv + nc + nq,) * 2)
    gram_all[:nv, :nv] = G_main
    gram_all[nv : nv + nc, nv : nv + nc] = check.G[crow, crow]
    gram_all[nv + nc :, nv + nc :] = np.eye(nq)
    vc = VtQ[rows]
    gram_all[:nv, nv : nv + nc], gram_all[nv : nv + nc, :nv] = vc, vc.T
    qc = VtQ[main.m : main.m + main.b]
    gram_all[nv + nc :, nv : nv + nc], gram_all[nv : nv + nc, nv + nc :] = qc, qc.T
    vq = main.G[rows, pend]
    gram_all[:nv, nv + nc :], gram_all[nv + nc :, :nv] = vq, vq.T
    a = np.concatenate([a_V, a_c, a_Q])
    inner = math.sqrt(max(float(a @ gram_all @ a), 0.0))
    rho_c = check.K[check.m : check.m + check.b, crow] @ b2
    return inner + float(np.linalg.norm(rho_c)) + main.drift + check.drift


def _displaceable(values: np.ndarray, which: str, reach: list[tuple[float, float]]
                  ) -> np.ndarray:
    """Which of the wanted ``values`` (ascending) an eigenvalue the unfinished check could
    not rule out (up to ``bound = mu + r`` at the top, down to ``mu - r`` at the bottom)
    might displace: those at the watched end not beyond ``bound``."""
    out = np.zeros(len(values), dtype=bool)
    half = len(values) // 2
    for sign, bound in reach:
        side = np.ones(len(values), dtype=bool)
        if which == "both":
            side[:half] = sign < 0  # the bottom half is watched from below, the top from above
            side[half:] = sign > 0
        out |= side & (sign * (values - bound) <= 0)
    return out


def _wanted(theta: np.ndarray, want: int, which: str) -> np.ndarray:
    """Indices (into ascending ``theta``) of the wanted Ritz values."""
    m = len(theta)
    if want >= m:
        return np.arange(m)
    if which == "largest":
        return np.arange(m - want, m)
    if which == "smallest":
        return np.arange(want)
    half = want // 2
    return np.concatenate([np.arange(half), np.arange(m - (want - half), m)])


def _restart_set(theta: np.ndarray, want: int, which: str, room: int) -> np.ndarray:
    """Ritz vectors kept at a restart: the wanted ones plus as many neighbours as fit in
    about half of the room (the neighbours speed up convergence of the wanted ones)."""
    keep = max(want, min(room, want + max(1, (room - want) // 2)))
    keep = min(keep, len(theta))
    if which == "both":
        keep = max(2 * (keep // 2), want)
    return _wanted(theta, keep, which)


def _output_order(values: np.ndarray, which: str) -> np.ndarray:
    if which == "smallest":
        return np.argsort(values, kind="stable")
    return np.argsort(-values, kind="stable")

