"""Extreme eigenpairs by (block) Lanczos with full reorthogonalisation and thick restarts.

Lanczos builds an orthonormal basis ``V`` of the Krylov space
``span{v, Hv, H^2 v, ...}`` and takes Ritz pairs of the projection ``T = V^T H V``.
Without reorthogonalisation, the basis loses orthogonality as soon as a Ritz value
converges and "ghost" copies of it appear (Paige 1971); here every new vector is
orthogonalised twice against the whole basis, so ghosts cannot appear.

The products ``W = H V`` are kept beside ``V``. That makes three things exact and free:
the projection ``T = V^T W``; the residual ``||W s - theta V s||`` of every returned
Ritz vector ``u = V s`` (a true residual, not the usual ``|beta_m s_m|`` estimate);
and thick restarts (Wu & Simon 2000): when the basis reaches ``ncv`` vectors it is
compressed to the best Ritz vectors, ``V <- V S``, ``W <- W S``, and the Krylov
recurrence continues from the last residual direction.

A single starting vector sees one copy of an exactly repeated eigenvalue only (its
Krylov space meets each eigenspace in one direction), and a missed copy is orthogonal to
the converged Ritz vectors ``Y``. So once the wanted pairs have converged, Lanczos is run
on ``H`` compressed to the orthogonal complement of ``Y``, ``(I - Y Y^T) H (I - Y Y^T)``,
from a fresh random vector (``verify``). A missed eigenvector lies in that complement, so
the compression has an eigenvalue at least as large; without one, the compression's top
lies below the ``k``-th found value. The check
runs until its top Ritz value ``mu`` (residual ``r`` for the compression) is resolved:
``mu`` above the ``k``-th value means a missed eigenvalue, and the check's vectors and
products join the basis (no product is repeated) and the iteration continues;
none when ``mu`` lies inside the ``k``-th value by more than a probabilistic bound
(Kuczynski & Wozniakowski 1992: an eigenvalue beyond it would have lifted ``mu`` higher,
except with probability ``MISS_PROBABILITY``) or when ``(mu, r)`` has converged to ``tol``
inside it, the standard by which any Lanczos run accepts its extreme value. With ``k=1``
no check runs: a missed copy of the one wanted value at an end is that same value.
The check's Ritz pairs are taken on its own vectors together with the basis's other
Ritz vectors, which already approximate the values below the wanted ones, so its extreme
pair converges sooner than from its vectors alone (the probabilistic bound is applied to
its own vectors only, as the theorem requires). The check costs products (about a second
convergence of the next value, for ``k >= 2``; ``settings["check_hvps"]``);
``verify=False`` skips it. ``block_size=b`` starts from ``b`` vectors instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessdiag.curvature.linear import (
    Counter,
    OperatorInfo,
    Progress,
    as_operator,
    gaussian,
    generator,
    matmat,
    operator_info,
    orthonormalize,
)
from hessdiag.curvature.results import EigenResult

WHICH = ("largest", "smallest", "both")
BREAKDOWN = 1e-10  # a new direction this small relative to its product: the space closed
MISS_PROBABILITY = 1e-3  # the multiplicity check's bound on missing an eigenvalue


def expand(matvec: Any, V: Tensor, W: Tensor, block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Lanczos step, the kernel shared by :func:`lanczos` and
    :func:`hessdiag.curvature.slq`: the products ``H block`` (one ``matvec.matmat`` for a
    :class:`~hessdiag.curvature.linear.Counter`, else one call per column), appended to the
    basis ``V`` and its products ``W = H V``. Returns ``(V, W, new products)``."""
    products = getattr(matvec, "matmat", None)
    new_W = products(block) if callable(products) else torch.stack(
        [matvec(block[:, j]) for j in range(block.shape[1])], dim=1)
    return torch.cat([V, block], dim=1), torch.cat([W, new_W], dim=1), new_W


def next_directions(new_W: Tensor, V: Tensor) -> Tensor:
    """The next block: the new products' components outside the basis, orthonormalised
    twice against all of it (full reorthogonalisation: no ghost eigenvalues); empty when
    the Krylov space is invariant."""
    return orthonormalize(new_W, V, BREAKDOWN)


def projection(V: Tensor, W: Tensor) -> np.ndarray:
    """``T = V^T H V`` from the stored products, symmetrised, in float64."""
    T = (V.T @ W).double().cpu().numpy()
    return 0.5 * (T + T.T)


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
        Where the basis ``V`` and its products ``W = H V`` (``2 * ncv`` vectors, in the
        operator's dtype), the Ritz vectors and the returned eigenvectors live; default the
        operator's device. ``"cpu"`` keeps them in host memory for a large model on a GPU:
        each vector is moved to the operator's device for its product and the product
        moved back (two copies of one vector per product); everything else is computed
        where the basis is.

    Returns
    -------
    EigenResult
        Eigenvalues with true residual norms, converged flags, the products used and
        the Ritz vectors (columns of ``eigenvectors``) unless ``return_eigenvectors=False``.

    Examples
    --------
    >>> import torch
    >>> A = torch.diag(torch.tensor([3.0, -5.0, 1.0, 2.0], dtype=torch.float64))
    >>> [round(x, 12) for x in lanczos(A, k=2, seed=0).eigenvalues.tolist()]
    [3.0, 2.0]
    >>> [round(x, 12) for x in lanczos(A, k=1, which="smallest", seed=0).eigenvalues.tolist()]
    [-5.0]
    """
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
    gen = generator(seed)
    if v0 is not None:
        start = v0.reshape(n, -1).to(info.device, info.dtype)
        if start.shape[1] < block_size:
            extra = gaussian(n, block_size - start.shape[1], gen, info)
            start = torch.cat([start, extra], dim=1)
    else:
        start = gaussian(n, block_size, gen, info)
    block = orthonormalize(start, None, 1e-10)

    V = torch.empty(n, 0, dtype=info.dtype, device=info.device)
    W = torch.empty_like(V)
    T = np.zeros((0, 0))
    restarts = 0
    theta = np.zeros(0)
    S = np.zeros((0, 0))
    idx = np.zeros(0, dtype=int)
    residuals = np.full(want, np.inf)
    converged = np.zeros(want, dtype=bool)
    # the multiplicity check's verdict: None when skipped, False until it confirms the set
    complete: bool | None = False if verify else None
    check_hvps = 0  # products spent by the multiplicity check

    lowest, highest = math.inf, -math.inf  # the extreme Ritz values seen (restarts drop them)

    def ritz():
        """Ritz pairs of the basis: all values, the wanted ones' residuals and flags."""
        theta, S = np.linalg.eigh(T)
        idx = _wanted(theta, want, which)
        S_w = torch.as_tensor(S[:, idx], dtype=info.dtype, device=info.device)
        th_w = torch.as_tensor(theta[idx], dtype=info.dtype, device=info.device)
        R = W @ S_w - (V @ S_w) * th_w
        residuals = torch.linalg.vector_norm(R, dim=0).double().cpu().numpy()
        anorm = float(np.max(np.abs(theta))) if len(theta) else 0.0
        scale = np.maximum(np.abs(theta[idx]), floor * anorm)
        return theta, S, idx, residuals, residuals <= tol * scale, scale

    while True:
        # expand: products of the new block, projections onto the whole basis
        V, W, new_W = expand(counter, V, W, block)
        m = V.shape[1]
        b = block.shape[1]
        cols = (V.T @ new_W).double().cpu().numpy()  # T[:, m-b:m]
        T_new = np.zeros((m, m))
        T_new[: m - b, : m - b] = T
        T_new[:, m - b :] = cols
        T_new[m - b :, :] = cols.T
        T = 0.5 * (T_new + T_new.T)
        theta, S, idx, residuals, converged, scale = ritz()
        lowest, highest = min(lowest, float(theta[0])), max(highest, float(theta[-1]))
        if m >= n:
            complete = True if verify else None  # the basis spans the space: nothing missed
            break
        if counter.hvps >= max_hvps:
            break

        continuation = new_W
        if len(idx) == want and converged.all():
            if not verify:
                break
            if k == 1:
                # a random start misses only further copies of the values it found, and a
                # copy of the one wanted value at each end leaves that value unchanged
                complete = True
                break
            found = _unseen(counter, _split_ritz(V, W, theta, S, tol, floor),
                            _levels(theta[idx], scale, which, tol), (lowest, highest),
                            gen, info, max_hvps, tol, floor)
            check_hvps += found.steps
            if found.verdict == "none":
                complete = True
                break
            if found.verdict == "unresolved":  # out of budget before the check could decide
                complete = False
                converged = converged & ~_displaceable(theta[idx], which, found.reach)
                break
            # a missed eigenvalue: its Ritz vector from the check joins the basis (with its
            # product: none is repeated), and both Krylov sequences continue as one block
            V, W, added = _append(V, W, found.vector, found.product)
            if added is None:  # already in the basis: a tie with the k-th value
                complete = True
                break
            T = projection(V, W)
            m = V.shape[1]
            theta, S, idx, residuals, converged, scale = ritz()
            continuation = torch.cat([new_W, added], dim=1)
            b += 1
            if m >= n or counter.hvps >= max_hvps:
                complete = m >= n  # the basis spans the space, or the budget is spent
                break

        # next block: the new products' components outside the basis (the Lanczos step)
        nxt = next_directions(continuation, V)
        if nxt.shape[1] < b:  # an invariant subspace: continue from fresh random directions
            fresh = orthonormalize(gaussian(n, b - nxt.shape[1], gen, info),
                                   torch.cat([V, nxt], dim=1), 1e-10)
            nxt = torch.cat([nxt, fresh], dim=1)
        nxt = nxt[:, : max(0, min(nxt.shape[1], n - m))]
        if nxt.shape[1] == 0:
            break
        if m + nxt.shape[1] > ncv:
            keep = _restart_set(theta, want, which, max(want, ncv - nxt.shape[1]))
            S_k = torch.as_tensor(S[:, keep], dtype=info.dtype, device=info.device)
            V, W = V @ S_k, W @ S_k
            T = np.diag(theta[keep])
            restarts += 1
            nxt = orthonormalize(nxt, V, 1e-10)
        block = nxt
        if counter.hvps + block.shape[1] > max_hvps:
            block = block[:, : max_hvps - counter.hvps]
            if block.shape[1] == 0:
                break

    order = _output_order(theta[idx], which)
    eigvecs = None
    if return_eigenvectors:
        Y = V @ torch.as_tensor(S[:, idx[order]], dtype=info.dtype, device=info.device)
        eigvecs = Y / torch.linalg.vector_norm(Y, dim=0)
    return EigenResult(
        eigenvalues=theta[idx][order],
        residuals=residuals[order],
        converged=converged[order],
        which=which,
        method="lanczos",
        tol=tol,
        hvps=counter.hvps,
        iterations=restarts,
        seconds=counter.seconds,
        seed=seed,
        eigenvectors=eigvecs,
        settings={"k": k, "ncv": ncv, "block_size": block_size, "max_hvps": max_hvps,
                  "restarts": restarts, "v0": v0 is not None, "complete": complete,
                  "check_hvps": check_hvps,
                  "basis_device": str(info.device)},
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


def _split_ritz(V: Tensor, W: Tensor, theta: np.ndarray, S: np.ndarray, tol: float,
                floor: float) -> tuple[Tensor, Tensor, Tensor]:
    """The basis's Ritz vectors split by the convergence test: ``(Y, Z, HZ)``, the
    converged ones ``Y`` (eigenvectors to working accuracy, so that deflating them leaves
    every other eigenvector in place), the others ``Z`` and their products ``HZ``."""
    S_t = torch.as_tensor(S, dtype=V.dtype, device=V.device)
    Y, HY = V @ S_t, W @ S_t
    th = torch.as_tensor(theta, dtype=V.dtype, device=V.device)
    residuals = torch.linalg.vector_norm(HY - Y * th, dim=0).double().cpu().numpy()
    anorm = float(np.max(np.abs(theta)))
    ok = torch.as_tensor(residuals <= tol * np.maximum(np.abs(theta), floor * anorm),
                         device=V.device)
    return Y[:, ok], Y[:, ~ok], HY[:, ~ok]


@dataclass
class _Check:
    verdict: str                      # "none", "found" or "unresolved"
    vector: Tensor | None = None      # found: the Ritz vector beyond the level
    product: Tensor | None = None     # and H times it
    reach: list[tuple[float, float]] = field(default_factory=list)  # unresolved: bounds
    steps: int = 0                    # the check's products


def _unseen(counter: Counter, split: tuple[Tensor, Tensor, Tensor],
            levels: list[tuple[float, float, float]], span: tuple[float, float],
            gen: torch.Generator, info: Any, max_hvps: int, tol: float, floor: float
            ) -> _Check:
    """The multiplicity check: Lanczos on ``H`` deflated by the converged Ritz vectors
    ``Y``, ``(I - Y Y^T) H (I - Y Y^T)`` on the complement of ``Y``, from a uniformly
    random start, until each watched end ``(sign, level, margin)`` is decided.

    ``split = (Y, Z, HZ)``: besides ``Y``, the basis's other Ritz vectors ``Z`` (also in
    the complement of ``Y``) and their products. The check's Ritz pairs are taken on the
    union of ``Z`` and its own Krylov vectors: ``Z`` already holds the main run's
    approximations of the values below the wanted ones, so the extreme pair of the
    deflated operator converges in fewer products than from the check's vectors alone,
    at no extra product (the union's extreme value is at least the check's own, and at
    most the deflated operator's extreme eigenvalue).

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
    Y, Z, HZ = split
    n = info.dim - Y.shape[1]
    q = orthonormalize(gaussian(info.dim, 1, gen, info), Y, 1e-10)
    V_c, W_c = Y[:, :0], Y[:, :0]
    reach: list[tuple[float, float]] = []
    log_term = math.log(1.648 * math.sqrt(max(n, 1)) / MISS_PROBABILITY)
    lo, hi = span
    steps = 0
    while q.shape[1] and counter.hvps < max_hvps:
        V_c, W_c, new_W = expand(counter, V_c, W_c, q)
        steps += 1
        mu, _ = np.linalg.eigh(projection(V_c, W_c))
        eps_j = (log_term / (2 * len(mu) - 1)) ** 2
        U, HU, nu, B = _union_ritz(Z, HZ, V_c, W_c)
        lo, hi = min(lo, float(mu[0]), float(nu[0])), max(hi, float(mu[-1]), float(nu[-1]))
        reach = []
        anorm = max(abs(lo), abs(hi))
        for sign, level, margin in levels:
            j = len(mu) - 1 if sign > 0 else 0
            ju = len(nu) - 1 if sign > 0 else 0
            coeffs = torch.as_tensor(B[:, ju], dtype=Y.dtype, device=Y.device)
            x, hx = U @ coeffs, HU @ coeffs
            if sign * (nu[ju] - level) > margin:
                return _Check("found", x, hx, steps=steps)
            edge = level + sign * margin
            a = (edge - lo) if sign > 0 else (hi - edge)
            if sign * (edge - mu[j]) > eps_j * a:
                continue  # decided by the bound
            # or by convergence, as any Lanczos run decides: the union's extreme Ritz pair
            # (for the deflated operator) converged inside the level, and the check's own
            # extreme value has reached it (the union alone may hold a converged pair of
            # the main run's while the random start has not yet lifted a missed copy)
            hx = hx - Y @ (Y.T @ hx)
            r = float(torch.linalg.vector_norm(hx - float(nu[ju]) * x))
            bar = tol * max(abs(float(nu[ju])), floor * anorm)
            if r > bar or sign * (nu[ju] - mu[j]) > bar:
                reach.append((sign, float(mu[j]) + sign * eps_j * a))
        if not reach:
            return _Check("none", steps=steps)
        q = next_directions(new_W, torch.cat([Y, V_c], dim=1))
    if not q.shape[1]:  # the Krylov space closed: its Ritz values are exact
        return _Check("none", steps=steps)
    return _Check("unresolved", reach=reach, steps=steps)


def _union_ritz(Z: Tensor, HZ: Tensor, V_c: Tensor, W_c: Tensor
                ) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray]:
    """Rayleigh-Ritz of ``H`` on ``span(Z, V_c)`` (``Z`` orthonormal, ``V_c`` orthonormal,
    not orthogonal to each other): ``(U, HU, values, B)`` with the Ritz vectors
    ``U @ B[:, i]`` and their products ``HU @ B[:, i]``. The Gram matrix of ``U = [Z, V_c]``
    is diagonalised and directions it holds to less than ``1e-10`` (relative) dropped, so
    a check vector already in ``span(Z)`` adds nothing."""
    U, HU = torch.cat([Z, V_c], dim=1), torch.cat([HZ, W_c], dim=1)
    G = (U.T @ U).double().cpu().numpy()
    A = (U.T @ HU).double().cpu().numpy()
    g, E = np.linalg.eigh(0.5 * (G + G.T))
    keep = g > 1e-10 * g[-1]
    C = E[:, keep] / np.sqrt(g[keep])  # U C is orthonormal
    values, S = np.linalg.eigh(C.T @ (0.5 * (A + A.T)) @ C)
    return U, HU, values, C @ S


def _append(V: Tensor, W: Tensor, x: Tensor, hx: Tensor
            ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``x`` made orthogonal to ``V`` (twice) and unit, appended to the basis, with its
    product carried along by the same combination (no new product). Returns the new
    basis, its products and the appended product (``None``: ``x`` was in the basis)."""
    norm = torch.linalg.vector_norm(x)
    for _ in range(2):
        c = V.T @ x
        x, hx = x - V @ c, hx - W @ c
    left = torch.linalg.vector_norm(x)
    if left <= BREAKDOWN * norm:
        return V, W, None
    x, hx = x / left, hx / left
    return torch.cat([V, x[:, None]], dim=1), torch.cat([W, hx[:, None]], dim=1), hx[:, None]


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

