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
Krylov space meets each eigenspace in one direction). So once the wanted pairs have
converged, the basis is expanded a few steps (``verify``) from a fresh random direction
orthogonal to it, and the set is accepted only if it does not change; a copy that was
missed enters the basis there and is resolved before returning. ``block_size=b``
starts from ``b`` vectors instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from hessdiag.curvature.linear import (
    Counter,
    Progress,
    as_operator,
    gaussian,
    generator,
    operator_info,
    orthonormalize,
)
from hessdiag.curvature.results import EigenResult

WHICH = ("largest", "smallest", "both")
BREAKDOWN = 1e-10  # a new direction this small relative to its product: the space closed


def expand(matvec: Any, V: Tensor, W: Tensor, block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One Lanczos step, the kernel shared by :func:`lanczos` and
    :func:`hessdiag.curvature.slq`: the products ``H block``, appended to the basis ``V``
    and its products ``W = H V``. Returns ``(V, W, new products)``."""
    new_W = torch.stack([matvec(block[:, j]) for j in range(block.shape[1])], dim=1)
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
    verify: int = 2,
    progress: Progress = None,
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
        Once the wanted pairs converge, expand this many more steps from a fresh random
        direction orthogonal to the basis, and accept only if the wanted set does not
        change (else continue, and check again). A missed copy of a repeated eigenvalue
        has no component in the start vector's Krylov space; this check lets it in.
        Costs ``verify * block_size`` products per call; 0 skips it.

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
    checked: np.ndarray | None = None  # wanted values when the multiplicity check began
    checking = 0                       # steps of that check still to take

    while True:
        # expand: products of the new block, projections onto the whole basis
        V, W, new_W = expand(counter, V, W, block)
        m, b = V.shape[1], block.shape[1]
        cols = (V.T @ new_W).double().cpu().numpy()  # T[:, m-b:m]
        T_new = np.zeros((m, m))
        T_new[: m - b, : m - b] = T
        T_new[:, m - b :] = cols
        T_new[m - b :, :] = cols.T
        T = 0.5 * (T_new + T_new.T)

        theta, S = np.linalg.eigh(T)
        idx = _wanted(theta, want, which)
        S_w = torch.as_tensor(S[:, idx], dtype=info.dtype, device=info.device)
        th_w = torch.as_tensor(theta[idx], dtype=info.dtype, device=info.device)
        R = W @ S_w - (V @ S_w) * th_w
        residuals = torch.linalg.vector_norm(R, dim=0).double().cpu().numpy()
        anorm = float(np.max(np.abs(theta))) if len(theta) else 0.0
        scale = np.maximum(np.abs(theta[idx]), floor * anorm)
        converged = residuals <= tol * scale
        if m >= n or counter.hvps >= max_hvps:
            break
        inject = False
        if len(idx) == want and converged.all():
            values = np.sort(theta[idx])
            if checked is not None and checking == 0:
                if np.all(np.abs(values - checked) <= tol * np.sort(scale)):
                    break  # the check found nothing new: the set is complete
            if checked is None or (checking == 0):
                # a missed copy of a repeated eigenvalue is invisible from the start vector's
                # Krylov space: expand a few steps from a fresh random direction orthogonal
                # to the basis, and accept the set only if it does not change
                checked, checking, inject = values, verify, verify > 0
                if not inject:
                    break
            else:
                checking -= 1
        elif checking:
            checking -= 1

        # next block: the new products' components outside the basis (the Lanczos step)
        nxt = next_directions(new_W, V)
        if inject:  # the Lanczos step and a fresh direction, as one block from now on
            nxt = orthonormalize(torch.cat([nxt, gaussian(n, 1, gen, info)], dim=1), V, 1e-10)
            b = nxt.shape[1]
        if nxt.shape[1] < b:  # an invariant subspace: continue from fresh random directions
            fresh = orthonormalize(gaussian(n, b - nxt.shape[1], gen, info),
                                   torch.cat([V, nxt], dim=1), 1e-10)
            nxt = torch.cat([nxt, fresh], dim=1)
        nxt = nxt[:, : max(0, min(nxt.shape[1], n - m))]
        if nxt.shape[1] == 0:
            break
        if m + nxt.shape[1] > ncv:
            keep = _restart_set(theta, want, which, ncv - nxt.shape[1])
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
                  "restarts": restarts, "v0": v0 is not None},
    )


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

