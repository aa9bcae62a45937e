"""What the solvers need of an operator, and the small shared pieces they use.

A solver accepts anything with ``matvec(v) -> H v`` on flat torch vectors and a ``dim``
(or ``shape``); ``dtype`` and ``device`` are read when present. A dense torch tensor,
NumPy array or SciPy ``LinearOperator`` is wrapped with :func:`as_operator`, so every
solver is testable on plain matrices with a known spectrum. An operator may also have
``matmat(V) -> H V`` for the columns of ``V`` (a :class:`HessianOperator` can compute them
in one pass per batch); solvers that have several independent vectors use it through
:meth:`Counter.matmat`, in blocks of at most :data:`PROBE_BLOCK` columns.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

Progress = Callable[[int, int], None] | None
"""``progress(done, total)``: products computed so far and the budget; ``None`` for none."""

PROBE_BLOCK = 8
"""Independent probes multiplied together (one ``matmat``): ``k`` vectors of the operator's
size, and for a batched product about ``k`` times one product's intermediate memory."""


class LinearOperator(Protocol):
    dim: int

    def matvec(self, v: Tensor) -> Tensor: ...


class MatrixOperator:
    """A dense symmetric matrix as an operator (for tests, and for small problems)."""

    def __init__(self, matrix: Any, dtype: torch.dtype | None = None, device=None) -> None:
        m = torch.as_tensor(np.asarray(matrix) if not isinstance(matrix, Tensor) else matrix)
        if m.dim() != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"matrix must be square; got shape {tuple(m.shape)}")
        self.matrix = m.to(dtype=dtype or (m.dtype if m.is_floating_point() else torch.float64),
                           device=device or m.device)
        self.dim = m.shape[0]
        self.shape = (self.dim, self.dim)
        self.dtype = self.matrix.dtype
        self.device = self.matrix.device
        self.hvp_count = 0

    def matvec(self, v: Tensor) -> Tensor:
        self.hvp_count += 1
        return self.matrix @ v.to(self.matrix)

    def matmat(self, vectors: Tensor) -> Tensor:
        self.hvp_count += vectors.shape[1]
        return self.matrix @ vectors.to(self.matrix)


class _ScipyWrapped:
    def __init__(self, op: Any) -> None:
        self.op = op
        self.dim = op.shape[0]
        self.dtype = torch.float64
        self.device = torch.device("cpu")

    def matvec(self, v: Tensor) -> Tensor:
        out = self.op.matvec(v.detach().cpu().double().numpy())
        return torch.as_tensor(np.asarray(out).reshape(-1), dtype=torch.float64)


def as_operator(op: Any) -> Any:
    """Return ``op`` if it has ``matvec``; wrap tensors, arrays and SciPy operators."""
    if isinstance(op, Tensor | np.ndarray):
        return MatrixOperator(op)
    if type(op).__module__.startswith("scipy"):
        return _ScipyWrapped(op)
    if hasattr(op, "matvec") and (hasattr(op, "dim") or hasattr(op, "shape")):
        return op
    raise TypeError(f"expected an operator with matvec(v) and dim, or a matrix; got {type(op)}")


def matmat(op: Any, block: Tensor) -> Tensor:
    """``op.matmat(block)`` when ``op`` has it, else one ``op.matvec`` per column."""
    products = getattr(op, "matmat", None)
    if callable(products):
        return products(block)
    if block.shape[1] == 0:
        return block.clone()
    return torch.stack([op.matvec(block[:, j]) for j in range(block.shape[1])], dim=1)


def blocks(total: int, size: int = PROBE_BLOCK) -> list[range]:
    """``range(total)`` in consecutive pieces of at most ``size``."""
    return [range(start, min(start + size, total)) for start in range(0, total, size)]


@dataclass
class OperatorInfo:
    dim: int
    dtype: torch.dtype
    device: torch.device


def operator_info(op: Any) -> OperatorInfo:
    dim = int(getattr(op, "dim", None) or op.shape[0])
    dtype = getattr(op, "dtype", torch.float64)
    if not isinstance(dtype, torch.dtype):
        dtype = torch.float64
    device = torch.device(getattr(op, "device", "cpu"))
    return OperatorInfo(dim, dtype, device)


@dataclass
class Counter:
    """Counts a solver's own products and times it, whatever the operator counts itself."""

    op: Any
    progress: Progress = None
    budget: int = 0
    hvps: int = 0
    started: float = field(default_factory=time.perf_counter)
    product_seconds: float = 0.0  # time inside the operator's products

    def __post_init__(self) -> None:
        self._takes_out = takes_out(getattr(self.op, "matvec", None))

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def matvec(self, v: Tensor, out: Tensor | None = None) -> Tensor:
        """``H v``, written into ``out`` when given (by the operator itself when its
        ``matvec`` takes ``out=``, which saves allocating a vector per product)."""
        start = time.perf_counter()
        if out is not None and self._takes_out:
            result = self.op.matvec(v, out=out)
        else:
            result = self.op.matvec(v)
        if out is not None and result.data_ptr() != out.data_ptr():
            out.copy_(result)
            result = out
        self.product_seconds += time.perf_counter() - start
        self.hvps += 1
        if self.progress is not None:
            self.progress(self.hvps, self.budget)
        return result

    def matmat(self, block: Tensor) -> Tensor:
        """``H block`` for the columns of ``block`` (:func:`matmat`): ``k`` products, one
        progress report."""
        start = time.perf_counter()
        out = matmat(self.op, block)
        self.product_seconds += time.perf_counter() - start
        self.hvps += block.shape[1]
        if self.progress is not None:
            self.progress(self.hvps, self.budget)
        return out

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


def small_blas():
    """A context in which NumPy's and SciPy's BLAS (OpenBLAS) use one thread. The solvers'
    dense work is on matrices of tens of rows, which a multi-threaded BLAS slows down by
    10-100x when its threads compete with PyTorch's on a busy machine (measured: an
    ``eigh`` of 120 rows, 6 ms alone, 0.2-0.45 s beside PyTorch's threads on a loaded
    2-core CPU). PyTorch's own threads are left as they are."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


CHUNK = 1 << 14
"""Entries per partial inner product (accumulated in float64 across chunks)."""


def gram(A: Tensor, B: Tensor) -> np.ndarray:
    """``A @ B.T`` in float64 for vectors stored as rows: one matrix-vector product per
    row of ``B`` (PyTorch's CPU matrix-matrix product of a few long rows is 5-20x slower
    than that many matrix-vector products here), a float32 (or lower) one summed over
    chunks of :data:`CHUNK` entries in float64 (10x more accurate at 10^7 entries, at the
    same speed)."""
    cols = []
    for j in range(B.shape[0]):
        b = B[j]
        if A.dtype == torch.float64 or A.shape[1] <= CHUNK:
            cols.append((A @ b).double())
        else:
            parts = [A[:, s:s + CHUNK] @ b[s:s + CHUNK] for s in range(0, A.shape[1], CHUNK)]
            cols.append(torch.stack(parts).double().sum(0))
    if not cols:
        return np.zeros((A.shape[0], 0))
    return torch.stack(cols, dim=1).cpu().numpy()


def row_norms(A: Tensor) -> np.ndarray:
    """Euclidean norms of the rows of ``A``, accumulated as :func:`gram` does (PyTorch's
    float32 norm of 10^6 entries was measured off by 2e-5 relative: enough to make a
    unit vector measurably not unit)."""
    return np.sqrt(np.maximum([gram(A[j : j + 1], A[j : j + 1])[0, 0]
                               for j in range(A.shape[0])], 0.0)).reshape(-1)


def dot(a: Tensor, b: Tensor) -> float:
    """``a . b`` of two flat vectors, accumulated as :func:`gram` does."""
    return float(gram(a.reshape(1, -1), b.reshape(1, -1))[0, 0])


def norm(a: Tensor) -> float:
    """``||a||`` of a flat vector, accumulated as :func:`gram` does (PyTorch's float32
    norm of 10^7 entries is off by about 1e-3 relative)."""
    return float(row_norms(a.reshape(1, -1))[0])


def takes_out(fn: Any) -> bool:
    """Whether ``fn`` (an operator's ``matvec``) accepts ``out=``."""
    import inspect

    try:
        return "out" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def generator(seed: int | None) -> torch.Generator:
    """A CPU generator: the same seed gives the same probes on every device."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def rademacher(n: int, k: int, gen: torch.Generator, info: OperatorInfo) -> Tensor:
    """``k`` Rademacher (+-1) probe vectors as the columns of an ``(n, k)`` tensor."""
    signs = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int8)
    return (signs.to(info.dtype) * 2 - 1).to(info.device)


def gaussian(n: int, k: int, gen: torch.Generator, info: OperatorInfo) -> Tensor:
    return torch.randn(n, k, generator=gen, dtype=torch.float64).to(info.dtype).to(info.device)


def orthonormalize(block: Tensor, basis: Tensor | None, rtol: float) -> Tensor:
    """Columns of ``block`` made orthonormal and orthogonal to ``basis`` (twice Gram-Schmidt).

    Columns that vanish (relative to their norm before projection, below ``rtol``) are dropped.
    """
    norms_before = torch.linalg.vector_norm(block, dim=0)
    if basis is not None and basis.shape[1]:
        for _ in range(2):
            block = block - basis @ (basis.T @ block)
    kept = []
    for j in range(block.shape[1]):
        col = block[:, j]
        for _ in range(2):
            for q in kept:
                col = col - (q @ col) * q
        norm = torch.linalg.vector_norm(col)
        if norm > rtol * max(float(norms_before[j]), 1e-300):
            kept.append(col / norm)
    if not kept:
        return block[:, :0]
    return torch.stack(kept, dim=1)
