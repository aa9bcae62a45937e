"""The Krylov basis shared by :func:`~hessdiag.curvature.lanczos` and
:func:`~hessdiag.curvature.slq`: preallocated, measured, and orthogonalised only as far
as needed.

At millions of parameters a Lanczos solver's own work is reading its basis: one pass over
``m`` vectors of ``n`` entries per inner product sweep. Full reorthogonalisation by
classical Gram-Schmidt twice reads the basis four times per step (at ResNet-18 size with
20 vectors, 0.2 s on a 2-core CPU: close to a Hessian-vector product), and a basis that
grows by concatenation copies itself at every step. Here:

- **One buffer.** The vectors are rows of a ``(capacity, n)`` tensor allocated once; a
  step writes the products into the rows after the basis and turns them into the next
  vectors in place. A restart compresses the basis in place, in column chunks.
- **One sweep per product.** After the product ``P = H b`` of the newest vector ``b``,
  one matrix-vector product of the buffer with ``P`` gives ``V^T P``: the new column of
  the projection ``T = V^T H V``. (PyTorch's CPU matrix-matrix product of a few long
  rows measured 5-20x slower than as many matrix-vector products, so every product with
  the basis is done a row at a time.) Inner products and norms are accumulated in float64
  over chunks of :data:`~hessdiag.curvature.linear.CHUNK` entries: a float32 norm of 10^7
  entries summed in float32 is off by about 1e-3, enough to make a unit vector measurably
  not unit.
- **Reorthogonalisation on evidence** (in the spirit of partial reorthogonalisation,
  Simon 1984, with measured instead of estimated inputs): the next vector is the product
  minus its large components (the Lanczos recurrence: the last vectors, and after a
  restart the kept Ritz vectors), then once more minus the components measured to be left
  along those same vectors (rounding in the first subtraction lands mostly there). Its
  overlap with every other basis vector follows from the kept Gram matrix ``G = V^T V``
  and ``V^T P``: ``V^T R = V^T P - G_L c_L``, plus a bound on rounding. Only when that
  overlap would exceed ``bound`` (``sqrt(eps)``, semi-orthogonality, or tighter when
  asked) is a full Gram-Schmidt pass made, repeated while a pass removes more than half
  of the vector (Daniel, Gragg, Kaufman & Stewart 1976); a remainder that stays
  non-orthogonal is rounding noise (the space is exhausted in that direction) and is
  dropped.
- **Rayleigh-Ritz on the basis as it is.** Ritz pairs solve ``T s = theta G s`` with the
  kept ``G``, so a Ritz value is the Rayleigh quotient of its Ritz vector ``V s`` up to
  what ``G`` misses of the true Gram matrix (of the order of rounding, checked in the
  tests against fresh products).
- **Residuals from the recurrence.** Every product is written as ``H V = V K + Q R_b``:
  ``K`` holds the coefficients actually subtracted, ``Q`` the next (not yet multiplied)
  vectors and ``R_b`` their coupling. A Ritz pair's residual ``||H u - theta u||`` is
  then ``||(K s - theta s)||_G`` and ``||R_b s||`` combined, without storing ``H V``
  (which would double the memory). What a restart drops of that relation (the part of
  ``K S`` outside the kept Ritz vectors, of the order of the lost orthogonality) is
  added to every later residual as ``drift``, so a reported residual stays a bound.

The first ``locked`` rows can hold fixed vectors that every new vector is made orthogonal
to but that are not part of the projection (a deflation: the multiplicity check of
:func:`~hessdiag.curvature.lanczos` uses them for the converged eigenvectors).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from hessdiag.curvature.linear import CHUNK, gram, row_norms, takes_out


def _contiguous(index: np.ndarray) -> bool:
    return len(index) > 0 and int(index[-1]) - int(index[0]) + 1 == len(index)


def tensor_like(matrix: np.ndarray, like: Tensor) -> Tensor:
    """``matrix`` as a tensor of ``like``'s dtype and device."""
    return torch.as_tensor(matrix, dtype=like.dtype, device=like.device)


def combine_into(coeffs: np.ndarray, A: Tensor, out: Tensor, subtract: bool = False
                 ) -> None:
    """``out[i] (-)= sum_j coeffs[j, i] A[j]``: one matrix-vector product per output row
    (see :func:`gram` for why not one matrix product)."""
    C = tensor_like(coeffs, A)
    for i in range(out.shape[0]):
        if subtract:
            out[i].addmv_(A.T, C[:, i], alpha=-1.0)
        else:
            torch.mv(A.T, C[:, i], out=out[i])


class KrylovBasis:
    """A basis of ``n``-vectors in a preallocated buffer with its measured Gram matrix,
    projection and Krylov relation (see the module docstring).

    Rows ``[0, locked)`` are deflation vectors, ``[locked, m)`` the basis vectors whose
    products have been taken, ``[m, m + b)`` the pending vectors to multiply next."""

    def __init__(self, n: int, capacity: int, dtype: torch.dtype, device: torch.device,
                 locked: Tensor | None = None, bound: float | None = None,
                 buffer: Tensor | None = None, n_locked: int = 0) -> None:
        """``capacity`` rows after the ``locked`` ones, in a new buffer; or ``buffer``
        (rows of another basis's buffer, reused without a copy) whose first ``n_locked``
        rows are the locked vectors already in place."""
        self.n, self.dtype, self.device = n, dtype, device
        if buffer is not None:
            self.locked = n_locked
            self.buf = buffer
            self.capacity = buffer.shape[0]
        else:
            self.locked = 0 if locked is None else locked.shape[0]
            self.capacity = capacity + self.locked
            self.buf = torch.empty(self.capacity, n, dtype=dtype, device=device)
            if self.locked:
                self.buf[: self.locked] = locked
        size = self.capacity
        self.G = np.eye(size)       # V^T V: measured where new vectors are made, else derived
        self.T = np.zeros((size, size))  # V^T H V (rows and columns with products)
        self.K = np.zeros((size, size))  # H V = V K: coefficients subtracted (and couplings)
        self.m = self.locked
        self.b = 0
        self.eps = torch.finfo(dtype).eps
        # the orthogonality kept: semi-orthogonality (sqrt(eps)), or tighter when asked
        # (a residual estimate is exact up to about this times ||H||)
        self.bound = min(math.sqrt(self.eps), bound) if bound else math.sqrt(self.eps)
        self.bound = max(self.bound, 10 * self.eps)
        self.breakdown = 100 * self.eps   # a remainder this small (relative): no new direction
        self.drift = 0.0                  # residual dropped at restarts (added to estimates)
        self.loss = 0.0                   # largest predicted |G - I| between basis vectors
        self.full_passes = 0              # full Gram-Schmidt passes made
        self.seconds = 0.0                # time spent here (not in products)
        if self.locked:
            rows = self.buf[: self.locked]
            self.G[: self.locked, : self.locked] = gram(rows, rows)

    # ------------------------------------------------------------------ state
    @property
    def rows(self) -> slice:
        """The basis vectors with products."""
        return slice(self.locked, self.m)

    @property
    def size(self) -> int:
        return self.m - self.locked

    def vectors(self) -> Tensor:
        return self.buf[self.rows]

    def pending(self) -> Tensor:
        return self.buf[self.m : self.m + self.b]

    def grow(self, rows: int) -> None:
        """Make room for ``rows`` more rows (a copy: used only when a block outgrows the
        buffer, e.g. by the multiplicity check's additions)."""
        extra = max(rows, self.capacity // 2)
        buf = torch.empty(self.capacity + extra, self.n, dtype=self.dtype, device=self.device)
        buf[: self.m + self.b] = self.buf[: self.m + self.b]
        self.buf = buf
        for name in ("G", "T", "K"):
            old = getattr(self, name)
            new = np.eye(self.capacity + extra) if name == "G" else np.zeros(
                (self.capacity + extra,) * 2)
            new[: self.capacity, : self.capacity] = old
            setattr(self, name, new)
        self.capacity += extra

    # ------------------------------------------------------------------ adding vectors
    def add_pending(self, block: Tensor, *, fresh: torch.Generator | None = None) -> int:
        """Append the columns of ``block`` (``(n, k)``) to the pending vectors, made
        orthogonal (fully, twice if needed) to every row and to each other. Columns that
        vanish are dropped, or replaced by random directions when ``fresh`` is given.
        Returns the number added."""
        start = time.perf_counter()
        added = 0
        for j in range(block.shape[1]):
            if self.m + self.b >= self.n:  # the basis spans the space
                break
            for attempt in range(3):
                if attempt == 0:
                    col = block[:, j].to(self.dtype)
                elif fresh is None:
                    break
                else:
                    col = torch.randn(self.n, generator=fresh, dtype=torch.float64).to(
                        self.dtype)
                if self.m + self.b + 1 > self.capacity:
                    self.grow(1)
                row = self.m + self.b
                self.buf[row] = col.to(self.device)
                if self._orthogonalise_row(row):
                    self.b += 1
                    added += 1
                    break
        self.seconds += time.perf_counter() - start
        return added

    def _orthogonalise_row(self, row: int) -> bool:
        """Row ``row`` made orthogonal to rows ``[0, row)`` (full passes while a pass
        removes more than half of it) and unit; ``False`` if nothing is left."""
        x = self.buf[row]
        before = float(row_norms(x[None, :])[0])
        if not before > 0:
            return False
        norm = before
        for _ in range(3):
            if row == 0:
                break
            c = gram(self.buf[:row], x[None, :])
            combine_into(c, self.buf[:row], x[None, :], subtract=True)
            self.full_passes += 1
            after = float(row_norms(x[None, :])[0])
            if after <= self.breakdown * before:
                return False
            done = after >= 0.5 * norm
            norm = after
            if done:
                break
        x.div_(norm)
        measured = gram(self.buf[:row], x[None, :])[:, 0] if row else np.zeros(0)
        self.G[:row, row] = self.G[row, :row] = measured
        self.G[row, row] = 1.0
        self.K[:, row] = 0.0
        self.K[row, :] = 0.0
        return True

    # ------------------------------------------------------------------ the Lanczos step
    def multiply(self, product: Any) -> None:
        """Write ``H B`` for the pending rows ``B`` into the rows after them;
        ``product(src_rows, dst_rows)`` computes it (see :func:`products_into`)."""
        b = self.b
        if self.m + 2 * b > self.capacity:
            self.grow(self.m + 2 * b - self.capacity)
        product(self.buf[self.m : self.m + b], self.buf[self.m + b : self.m + 2 * b])

    def absorb(self, fresh: torch.Generator | None = None) -> int:
        """The step after :meth:`multiply`: the pending rows join the basis, their
        products become the next pending rows (orthogonal to the basis on the evidence of
        the measured overlaps; see the module docstring). A product with no new direction
        (the Krylov space is invariant) is replaced by a random direction when ``fresh``
        is given, else dropped. Returns the number of new pending rows."""
        start = time.perf_counter()
        m, b = self.m, self.b
        M = m + b
        lo = self.locked
        buf = self.buf
        P = buf[M : M + b]
        C = gram(buf[:M], P)  # V^T P: one read of the basis (per product)
        if M > lo + b:
            off = self.G[lo:M, lo:M] - np.eye(M - lo)
            self.loss = max(self.loss, float(np.max(np.abs(off))))
        self.T[lo:M, m:M] = C[lo:M]
        self.T[m:M, lo:M] = C[lo:M].T
        self.T[m:M, m:M] = 0.5 * (C[m:M] + C[m:M].T)
        # the projection's length stands for the product's (a lower bound: no extra pass)
        pnorm = np.sqrt(np.sum(C * C, axis=0))
        # the recurrence: subtract the large components (and every locked one), then once
        # more the components left along those same vectors, measured (cheap: a few rows;
        # rounding in the first subtraction lands mostly along them). The remainder's
        # overlap with every other row follows from G: V^T R = C - G[:, L] c_L
        big = np.abs(C) > self.bound * np.maximum(pnorm, np.finfo(float).tiny)[None, :]
        big[:lo] = True
        L = np.flatnonzero(big.any(axis=1))
        coef = np.where(big[L], C[L], 0.0)
        K_new = np.zeros((M, b))
        overlap = C.copy()
        if len(L):
            span = buf[L] if not _contiguous(L) else buf[L[0] : L[-1] + 1]
            combine_into(coef, span, P, subtract=True)
            again = gram(span, P)
            combine_into(again, span, P, subtract=True)
            K_new[L] = coef + again
            overlap = C - self.G[:M, L] @ (coef + again)
            overlap[L] = (np.eye(len(L)) - self.G[np.ix_(L, L)]) @ again
        rounding = self.eps * (pnorm + np.abs(coef).sum(axis=0))
        norms = row_norms(P)
        pnorm = np.maximum(pnorm, norms)
        passes = 0
        while passes < 3:
            scale = np.maximum(norms, np.finfo(float).tiny)
            if np.max((np.abs(overlap) + rounding[None, :]) / scale[None, :]) <= self.bound:
                break
            c = gram(buf[:M], P)  # (M, b): the measured overlap
            combine_into(c, buf[:M], P, subtract=True)
            K_new += c
            overlap = c - self.G[:M, :M] @ c
            rounding = self.eps * (norms + np.abs(c).sum(axis=0))
            new_norms = row_norms(P)
            passes += 1
            self.full_passes += 1
            enough = bool(np.all(new_norms >= 0.5 * norms))
            norms = new_norms
            if enough:
                break
        self.K[:M, m:M] = K_new
        # a remainder still not orthogonal after the passes is rounding noise (the Krylov
        # space is numerically exhausted in that direction): no new direction from it
        scale = np.maximum(norms, np.finfo(float).tiny)
        noisy = np.max((np.abs(overlap) + rounding[None, :]) / scale[None, :], axis=0) \
            > 10 * self.bound
        # the next pending block: the remainders made orthonormal among themselves
        # (Gram-Schmidt within the block: P = Q R_b, R_b upper triangular); a remainder with
        # nothing left is dropped and its size kept as drift
        tiny = np.finfo(float).tiny
        Rb = np.zeros((b, b))
        pred = np.zeros((M, b))
        kept: list[int] = []
        for j in range(b):
            row = P[j]
            for i in kept:
                c = float(gram(P[i][None, :], row[None, :])[0, 0])
                row.sub_(P[i], alpha=c)
                Rb[i, j] += c
            norm = float(row_norms(row[None, :])[0])
            if kept:  # a second pass inside the block (cheap: b rows)
                for i in kept:
                    c = float(gram(P[i][None, :], row[None, :])[0, 0])
                    row.sub_(P[i], alpha=c)
                    Rb[i, j] += c
                norm = float(row_norms(row[None, :])[0])
            if noisy[j] or norm <= self.breakdown * max(float(pnorm[j]), tiny):
                self.drift = max(self.drift, norm)
                continue
            pred[:, j] = (overlap[:, j] - pred[:, kept] @ Rb[kept, j]) / norm
            if np.max(np.abs(pred[:, j])) + rounding[j] / norm > 10 * self.bound:
                # what is left after the block's other directions is rounding noise
                self.drift = max(self.drift, norm)
                continue
            row.div_(norm)
            Rb[j, j] = norm
            kept.append(j)
        kept = kept[: max(0, self.n - M)]  # no more directions than the space has left
        new_b = len(kept)
        if new_b < b and kept:  # close the gaps: kept rows to the front
            self.buf[M : M + new_b] = self.buf[[M + j for j in kept]].clone()
        self.m = M
        self.b = new_b
        # couplings of the basis to the new pending rows (H B = V K + Q R_b), and the
        # pending rows' predicted overlaps with the basis (measured at the next step)
        self.K[M:, :] = 0.0
        self.K[:, M:] = 0.0
        self.K[M : M + new_b, m:M] = Rb[kept]
        self.G[:M, M:] = 0.0
        self.G[M:, :M] = 0.0
        self.G[M:, M:] = np.eye(self.capacity - M)
        self.G[:M, M : M + new_b] = pred[:, kept]
        self.G[M : M + new_b, :M] = pred[:, kept].T
        self.seconds += time.perf_counter() - start
        missing = min(b - new_b, self.n - (self.m + self.b))
        if fresh is not None and missing > 0:
            self.add_pending(torch.zeros(self.n, missing, dtype=self.dtype,
                                         device=self.device), fresh=fresh)
        return self.b

    # ------------------------------------------------------------------ Ritz pairs
    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), their coefficient vectors ``S`` (columns,
        ``S^T G S = I``, so ``V S`` has unit columns) and residual norms
        ``||H V s - theta V s||`` from the recurrence (plus ``drift``)."""
        start = time.perf_counter()
        r = self.rows
        T = self.T[r, r]
        G = self.G[r, r]
        try:
            theta, S = scipy.linalg.eigh(0.5 * (T + T.T), 0.5 * (G + G.T))
        except np.linalg.LinAlgError:  # G not positive definite: drop what it cannot hold
            g, E = np.linalg.eigh(0.5 * (G + G.T))
            keep = g > 1e-10 * g[-1]
            C = E[:, keep] / np.sqrt(g[keep])
            theta, W = np.linalg.eigh(C.T @ (0.5 * (T + T.T)) @ C)
            S = C @ W
        E = self.K[r, r] @ S - S * theta  # V (K s - theta s)
        inner = np.einsum("ij,ij->j", E, G @ E)
        coupling = self.K[self.m : self.m + self.b, r] @ S
        outer = np.einsum("ij,ij->j", coupling, coupling)
        residuals = np.sqrt(np.maximum(inner, 0.0) + outer) + self.drift
        self.seconds += time.perf_counter() - start
        return theta, S, residuals

    def combine(self, S: np.ndarray) -> Tensor:
        """``V S`` as rows: the vectors with coefficients in the columns of ``S``."""
        start = time.perf_counter()
        out = torch.empty(S.shape[1], self.n, dtype=self.dtype, device=self.device)
        combine_into(S, self.vectors(), out)
        self.seconds += time.perf_counter() - start
        return out

    def restart(self, S: np.ndarray, theta: np.ndarray) -> None:
        """Compress the basis to the Ritz vectors ``V S`` (columns of ``S``, values
        ``theta``), in place, keeping the pending rows after them (thick restart, Wu &
        Simon 2000)."""
        start = time.perf_counter()
        lo, m, b, k = self.locked, self.m, self.b, S.shape[1]
        rows = self.rows
        tmp = torch.empty(k, min(self.n, CHUNK * 4), dtype=self.dtype, device=self.device)
        for c0 in range(0, self.n, CHUNK * 4):
            cols = slice(c0, min(self.n, c0 + CHUNK * 4))
            part = tmp[:, : cols.stop - cols.start]
            combine_into(S, self.buf[rows, cols], part)
            self.buf[lo : lo + k, cols] = part
        if b:
            self.buf[lo + k : lo + k + b] = self.buf[m : m + b].clone()
        G, K = self.G, self.K
        pend = slice(m, m + b)
        # H V S = V K S + Q (K_Q S): V K S projected onto the kept vectors V S is
        # K_new = S^T G K S; the rest, outside them, is dropped and counted as drift
        KS = K[rows, rows] @ S
        k_new = S.T @ G[rows, rows] @ KS
        E = KS - S @ k_new
        lost = np.sqrt(np.maximum(np.einsum("ij,ij->j", E, G[rows, rows] @ E), 0.0))
        self.drift += float(np.max(lost)) if len(lost) else 0.0
        cross = S.T @ G[rows, pend]         # new basis vs pending (predicted)
        locked_cross = G[:lo, rows] @ S     # locked vs new basis
        coupling = K[pend, rows] @ S        # pending coupling of the new basis
        gram_new = S.T @ G[rows, rows] @ S  # = I to rounding
        size = self.capacity
        self.G, self.T, self.K = np.eye(size), np.zeros((size, size)), np.zeros((size, size))
        self.G[:lo, :lo] = G[:lo, :lo]
        new = slice(lo, lo + k)
        newp = slice(lo + k, lo + k + b)
        self.G[new, new] = 0.5 * (gram_new + gram_new.T)
        self.G[:lo, new], self.G[new, :lo] = locked_cross, locked_cross.T
        self.G[:lo, newp], self.G[newp, :lo] = G[:lo, pend], G[pend, :lo]
        self.G[new, newp], self.G[newp, new] = cross, cross.T
        self.T[new, new] = np.diag(theta)
        self.K[new, new] = k_new
        self.K[newp, new] = coupling
        self.m = lo + k
        self.seconds += time.perf_counter() - start


def products_into(op: Any) -> Any:
    """``product(src_rows, dst_rows)``: ``H`` times each row of ``src`` written into the
    rows of ``dst``: one ``op.matmat`` for several rows when ``op`` has it, else one
    ``op.matvec`` per row, into the row itself when ``op.matvec`` takes ``out=``."""
    out_ok = takes_out(getattr(op, "matvec", None))
    has_matmat = callable(getattr(op, "matmat", None))

    def product(src: Tensor, dst: Tensor) -> None:
        if src.shape[0] > 1 and has_matmat:
            dst.copy_(op.matmat(src.T).T)
            return
        for j in range(src.shape[0]):
            if out_ok:
                out = op.matvec(src[j], out=dst[j])
                if out.data_ptr() != dst[j].data_ptr():
                    dst[j].copy_(out)
            else:
                dst[j].copy_(op.matvec(src[j]))

    return product
