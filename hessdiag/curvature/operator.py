"""Hessian-vector products of a model's mean loss, as a symmetric linear operator.

The operator acts on the flat vector of the selected parameters. For batches
``B_1 .. B_m`` with ``n_b`` samples each and a mean-reduced loss ``L_b``, the loss is
the mean over all ``N = sum n_b`` samples, ``L = sum_b (n_b / N) L_b``, and so is its
Hessian: ``H v = sum_b (n_b / N) H_b v``. A sum-reduced loss (``reduction="sum"``)
is divided by ``N`` instead, so both describe the per-sample mean.

Three ways to compute ``H_b v`` (Pearlmutter 1994):

``forward-over-reverse``
    ``torch.func.jvp`` of ``torch.func.grad`` through ``functional_call``: one forward,
    one backward, both carrying a tangent.
``double-backward``
    reverse-over-reverse: build the gradient with ``create_graph=True`` and
    differentiate ``<g, v>`` again. Works for every op with a double-backward formula.
``retained-graph``
    as ``double-backward`` on a single batch, but the gradient's graph is built once and
    kept, so each product is one extra backward pass. Costs the memory of that graph.

``mode="auto"`` keeps the gradient graphs (``retained-graph``) when the data is fixed in
memory (one batch, or a list or tuple of batches) and the graphs fit ``memory_budget``,
estimated from the tensors the first batch's graph saves; a product is then one backward
pass per batch, the cheapest of the three. Otherwise it times ``double-backward`` and
``forward-over-reverse`` on the first batch and keeps the faster, falling back to
reverse-over-reverse when an op of the model lacks a forward-mode formula. The choice,
the timings and the memory estimate are in :meth:`HessianOperator.describe`.

:meth:`HessianOperator.matmat` can compute several products in one pass per batch
(``batch_vectors``): the ``k`` vectors go through one batched backward
(``torch.autograd.grad(..., is_grads_batched=True)``) of the kept or rebuilt gradient
graph, or through ``torch.func.vmap`` of the forward-over-reverse product. The first time,
the batched block's first column is checked against the looped product of that column
(one extra product); a difference or an error switches the operator to the loop for good.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from hessdiag._errors import InputError, first_line
from hessdiag._tensors import to_device

MODES = ("auto", "forward-over-reverse", "double-backward", "retained-graph")
BATCH_VECTORS = ("auto", "loop", "batched")
AUTO_BATCH_GAIN = 0.9  # auto keeps batched products costing at most this per vector of a loop's

ParamSelector = None | str | Sequence[str] | Callable[[str, nn.Parameter], bool]


class NondeterministicOperatorError(ValueError):
    """Two products of the same vector disagreed: the operator is not a fixed matrix."""


def _is_batch(obj: Any) -> bool:
    return (
        isinstance(obj, tuple | list)
        and len(obj) == 2
        and isinstance(obj[0], Tensor | Mapping | tuple | list)
        and isinstance(obj[1], Tensor)
    ) and not (isinstance(obj[0], tuple | list) and len(obj[0]) == 2 and _is_batch(obj[0]))


def _select_params(model: nn.Module, params: ParamSelector) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    if not trainable:
        raise ValueError(
            f"model {type(model).__name__} has no trainable parameters "
            "(all have requires_grad=False): nothing to differentiate"
        )
    if params is None:
        chosen = trainable
    elif isinstance(params, str):
        regex = _compile(params)
        chosen = {
            n: p
            for n, p in trainable.items()
            if fnmatch.fnmatchcase(n, params)
            or n.startswith(params + ".")
            or (regex is not None and regex.fullmatch(n) is not None)
        }
    elif callable(params):
        chosen = {n: p for n, p in trainable.items() if params(n, p)}
    else:
        wanted = list(params)
        unknown = [n for n in wanted if n not in trainable]
        if unknown:
            raise ValueError(
                f"parameter {unknown[0]!r} is not a trainable parameter of the model; "
                f"available: {_preview(trainable)}"
            )
        chosen = {n: trainable[n] for n in wanted}
    if not chosen:
        raise ValueError(
            f"parameter filter {params!r} selects no trainable parameter; "
            f"available: {_preview(trainable)}"
        )
    return chosen


def _compile(pattern: str) -> re.Pattern | None:
    try:
        return re.compile(pattern)
    except re.error:
        return None


def _preview(names: Mapping[str, Any], n: int = 8) -> str:
    keys = list(names)
    text = ", ".join(keys[:n])
    return text + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


class HessianOperator:
    """The Hessian of a model's mean loss over a fixed set of batches.

    Parameters
    ----------
    model:
        Any ``nn.Module``. It is put in ``eval()`` mode for each product (BatchNorm uses
        its running statistics, dropout is off) and restored afterwards, unless
        ``train_mode=True``.
    loss_fn:
        ``loss_fn(outputs, targets) -> scalar``, mean-reduced over the batch (e.g.
        ``nn.CrossEntropyLoss()``); an ``nn`` loss with ``reduction="sum"`` is accepted too.
    data:
        One batch ``(inputs, targets)`` or an iterable of such batches (a list, a
        ``DataLoader``). ``inputs`` is a tensor, a tuple of tensors (passed as positional
        arguments) or a dict (passed as keyword arguments). The iterable is iterated once
        per product, so it must yield the same samples every time.
    params:
        Which parameters the Hessian is taken over: ``None`` (all trainable ones), a name
        pattern (glob, regular expression, or a module prefix such as ``"fc1"``), a list of
        names, or a predicate ``(name, parameter) -> bool``. The others are held fixed.
    dtype, device:
        Where and in what precision products are computed (default: the parameters').
        ``torch.float64`` gives a float64 copy of parameters, buffers and inputs.
    mode:
        One of ``"auto"``, ``"forward-over-reverse"``, ``"double-backward"``,
        ``"retained-graph"`` (see the module docstring).
    check_determinism:
        Compute the first product twice and raise :class:`NondeterministicOperatorError`
        if the two differ by more than ``determinism_rtol`` (relative): a shuffling or
        augmenting data pipeline, or dropout in train mode, makes the operator random.
        Skipped for data fixed in memory in eval mode (nothing there can change between
        passes) unless ``determinism_rtol`` is given.
    memory_budget:
        Bytes the kept graphs of ``retained-graph`` may use in ``auto`` mode; default
        :func:`default_memory_budget` (half the free CUDA memory, or a quarter of the
        available memory).
    batch_size_fn:
        ``(inputs, targets) -> int`` samples in a batch; default: ``len(targets)``.
    compile:
        Compute forward-over-reverse products through ``torch.compile`` (the mode is then
        ``forward-over-reverse``; ``"auto"`` is accepted and means it). The first product
        compiles the product function (tens of seconds on a CPU), a batch of another shape
        compiles again; the products are the same to rounding. torch.compile cannot
        differentiate twice in reverse, so the other modes refuse it.
    collective:
        Across processes (``torch.distributed``): a :class:`hessdiag.distributed.Collective`,
        with ``data`` this process's shard of the samples. Each product sums this
        process's weighted partial products and its count, reduces both over all
        processes and divides, so every process gets the product of the whole data set;
        the mode choice and the determinism check are taken identically everywhere, and a
        product that fails on one process raises on all. Every process must compute the
        same products in the same order. ``None`` (default): this process's data only.
    batch_vectors:
        How :meth:`matmat` computes several products: ``"loop"`` one :meth:`matvec` per column;
        ``"batched"`` all of a block's columns in one pass per batch (retained-graph and
        double-backward: one ``torch.autograd.grad(..., is_grads_batched=True)`` of the gradient
        graph; forward-over-reverse: ``torch.func.vmap`` of the product), checked the first time
        against a looped product of the block's first column (one extra product, counted in
        ``hvp_count``): if the two differ by more than 1e-6 (float64; 1e-3 otherwise) in max-abs
        relative to the looped product, or the batched pass raises, the operator loops from then on.
        ``"auto"`` (default): batched on CUDA, kept only if that first block cost at most
        ``AUTO_BATCH_GAIN`` (0.9) of the looped product per vector; the loop elsewhere (on a CPU the
        batched pass measured slower for a CNN, see ``docs/benchmarks.md``). The very first product
        is always a :meth:`matvec` (mode choice, determinism check). Across processes
        (``collective``) and with ``compile`` products loop, as do the Gauss-Newton and Fisher
        operators. The outcome is ``vector_batch`` (``"batched"``, ``"loop"``, or ``None`` before it
        is decided) and ``vector_batch_reason`` in :meth:`describe`.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from hessdiag.curvature import HessianOperator, lanczos
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> op = HessianOperator(model, nn.CrossEntropyLoss(), (x, y), dtype=torch.float64)
    >>> op.dim
    23
    >>> result = lanczos(op, k=2, seed=0)
    >>> bool(result.converged.all())
    True
    """

    product_name = "Hessian-vector product"
    retains_graphs = True  # the retained-graph mode exists (kept gradients: a free gradient)
    forward_mode, reverse_mode = "forward-over-reverse", "double-backward"  # for messages

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        data: Any,
        *,
        params: ParamSelector = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        mode: str = "auto",
        train_mode: bool = False,
        check_determinism: bool = True,
        determinism_rtol: float | None = None,
        memory_budget: int | None = None,
        batch_size_fn: Callable[[Any, Tensor], int] | None = None,
        collective: Any = None,
        compile: bool = False,
        batch_vectors: str = "auto",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if batch_vectors not in BATCH_VECTORS:
            raise ValueError(f"batch_vectors must be one of {', '.join(BATCH_VECTORS)}; "
                             f"got {batch_vectors!r}")
        if compile and mode not in ("auto", "forward-over-reverse"):
            raise InputError(
                f"compile applies to forward-over-reverse products; mode {mode} differentiates "
                "twice in reverse, which torch.compile does not support (use mode "
                "forward-over-reverse or auto)", param="compile")
        self.compile = bool(compile)
        self._compiled: Callable[..., Any] | None = None
        if self.compile:
            mode = "forward-over-reverse"
        self.model = model
        self.loss_fn = loss_fn
        self.train_mode = train_mode
        self.requested_mode = mode
        self.check_determinism = check_determinism
        self.collective = collective
        self._check_requested = check_determinism
        self._batch_size_fn = batch_size_fn or (lambda inputs, targets: int(targets.shape[0]))

        selected = _select_params(model, params)
        first = next(iter(selected.values()))
        self.dtype = dtype or first.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type; got {self.dtype}")
        self.device = torch.device(device) if device is not None else first.device
        self.determinism_rtol = (
            determinism_rtol
            if determinism_rtol is not None
            else (1e-8 if self.dtype == torch.float64 else 1e-3)
        )

        self.param_names = list(selected)
        self.shapes = [p.shape for p in selected.values()]
        self.numels = [p.numel() for p in selected.values()]
        self.dim = sum(self.numels)
        self.shape = (self.dim, self.dim)
        # a snapshot: the operator is the Hessian at the weights it was made at, whatever
        # happens to the model afterwards (and products never write into the model)
        self.params = {
            n: p.detach().to(device=self.device, dtype=self.dtype).clone()
            for n, p in selected.items()
        }
        self.fixed = {
            n: to_device(t.detach(), self.device, self.dtype).clone()
            for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if n not in selected
        }

        if _is_batch(data):
            self._batches: Iterable[Any] = [data]
            self.single_batch = True
        elif isinstance(data, Iterable) and not isinstance(data, Tensor | str | bytes):
            self._batches = data
            self.single_batch = False
        else:
            self._batches = None
        if self._batches is None:
            raise ValueError(
                "data must be one batch (inputs, targets) or an iterable of such batches; "
                f"got {type(data).__name__}"
            )
        # fixed tensors in memory (one batch, or a list or tuple of batches) cannot shuffle
        # or augment: their graphs may be kept, and products need no determinism check
        self.in_memory = isinstance(self._batches, list | tuple)
        if self.in_memory and not train_mode and determinism_rtol is None:
            self.check_determinism = False
        self.memory_budget = int(memory_budget if memory_budget is not None
                                 else default_memory_budget(self.device))
        self.memory_estimate: int | None = None
        self._sum_reduction = getattr(loss_fn, "reduction", "mean") == "sum"
        self.n_samples: int | None = None
        self.n_batches: int | None = None
        self.mode: str | None = None if mode == "auto" else mode
        self.mode_timings: dict[str, float] = {}
        self.hvp_count = 0
        self.hvp_seconds = 0.0
        self._checked = False
        self._retained: list[tuple[list[Tensor], list[Tensor], int, Tensor]] | None = None
        self._retain_refused = False  # the graphs were measured over the budget
        self.batch_vectors = batch_vectors
        # None: batched, not yet checked against the loop
        self.vector_batch, self.vector_batch_reason = self._batch_policy()

    # ------------------------------------------------------------------ vectors
    def flatten(self, tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors (dict by name, or in order) into one vector."""
        items = [tensors[n] for n in self.param_names] if isinstance(tensors, Mapping) else tensors
        return torch.cat([t.reshape(-1).to(self.device, self.dtype) for t in items])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into tensors shaped like the selected parameters."""
        if vector.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},); got {tuple(vector.shape)}")
        parts = torch.split(vector, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.param_names, parts, self.shapes, strict=True)}

    def parameter_vector(self) -> Tensor:
        """The selected parameters' current values as one flat vector."""
        return self.flatten(self.params)

    # ------------------------------------------------------------------ products
    def matvec(self, v: Tensor, out: Tensor | None = None) -> Tensor:
        """``H v`` for a flat vector ``v`` (shape ``(dim,)``), in the operator's dtype.

        ``out``: a flat tensor of shape ``(dim,)`` (operator's dtype and device) to write
        the product into, so that a solver reuses one buffer instead of allocating a
        vector per product (at millions of parameters a fresh allocation costs page
        faults comparable to a tenth of the product). Returned."""
        if isinstance(v, Mapping):
            return self.unflatten(self.matvec(self.flatten(v)))  # type: ignore[return-value]
        v = v.to(device=self.device, dtype=self.dtype)
        if v.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},); got {tuple(v.shape)}")
        start = time.perf_counter()
        if not self._checked:
            result = self._first_matvec(v)
        else:
            result = self._matvec_with(self.mode, v, out=out)  # type: ignore[arg-type]
        self._check_finite(result)
        if out is not None and result.data_ptr() != out.data_ptr():
            out.copy_(result)
            result = out
        self.hvp_seconds += time.perf_counter() - start
        return result

    __matmul__ = matvec

    def matmat(self, vectors: Tensor) -> Tensor:
        """``H V`` for the columns of ``V`` (shape ``(dim, k)``): one :meth:`matvec` per
        column, or all of them in one pass per batch (``batch_vectors``)."""
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        if vectors.dim() != 2 or vectors.shape[0] != self.dim:
            raise ValueError(f"vectors must have shape ({self.dim}, k); "
                             f"got {tuple(vectors.shape)}")
        if self.vector_batch == "loop" or vectors.shape[1] < 2:
            return self._looped(vectors)
        first = []
        if not self._checked:  # the first product chooses the mode and checks determinism
            first, vectors = [self.matvec(vectors[:, 0])[:, None]], vectors[:, 1:]
        if vectors.shape[1] < 2:
            rest = self._looped(vectors)
        elif self.vector_batch is None:
            rest = self._guarded(vectors)
        else:
            rest = self._timed_batched(vectors)
        return torch.cat([*first, rest], dim=1)

    def _looped(self, vectors: Tensor) -> Tensor:
        if vectors.shape[1] == 0:
            return vectors.clone()
        return torch.stack([self.matvec(vectors[:, j]) for j in range(vectors.shape[1])], dim=1)

    # ------------------------------------------------------------------ batched products
    _has_batched_path = True  # False: a subclass whose products always loop

    def _batch_policy(self) -> tuple[str | None, str]:
        """``(vector_batch, reason)`` as far as the settings decide it: ``"loop"``, or
        ``None`` (batched once the guard has compared it with the loop)."""
        if self.batch_vectors == "loop":
            return "loop", "batch_vectors='loop'"
        if not self._has_batched_path:
            return "loop", f"{self.product_name}s have no batched path"
        if self.collective is not None:
            return "loop", "products across processes loop"
        if self.compile:
            return "loop", "compiled products loop"
        if self.batch_vectors == "auto" and self.device.type != "cuda":
            return "loop", (f"batch_vectors='auto' loops on {self.device.type} (the batched "
                            "pass measured slower on a CPU)")
        return None, "not used yet"

    @property
    def batches_vectors(self) -> bool:
        """Whether :meth:`matmat` computes (or will try to compute) a block in one pass."""
        return self.vector_batch != "loop"

    def _guarded(self, vectors: Tensor) -> Tensor:
        """The first batched block: its first column against a looped product of that
        column; on a difference or an error, the loop from now on."""
        tol = 1e-6 if self.dtype == torch.float64 else 1e-3
        start = time.perf_counter()
        try:
            out = self._batched_matmat(vectors)
        except Exception as exc:  # no batching rule, randomness under vmap, memory, ...
            self.hvp_seconds += time.perf_counter() - start
            self.vector_batch = "loop"
            self.vector_batch_reason = (f"the batched product raised {type(exc).__name__}: "
                                        f"{first_line(exc)}")
            return self._looped(vectors)
        self._check_finite(out)  # (synchronises a CUDA device: the time is the pass's)
        batched_seconds = time.perf_counter() - start
        self.hvp_seconds += batched_seconds
        self.hvp_count += vectors.shape[1]
        start = time.perf_counter()
        looped = self.matvec(vectors[:, 0])
        looped_seconds = time.perf_counter() - start
        scale = float(looped.abs().max())
        diff = float((out[:, 0] - looped).abs().max())
        rel = diff / scale if scale > 0 else diff
        if not rel <= tol:  # NaN too
            self.vector_batch = "loop"
            self.vector_batch_reason = (f"batched product differs from looped by {rel:.1e} "
                                        f"(max-abs relative; tolerance {tol:.0e})")
            return torch.cat([looped[:, None], self._looped(vectors[:, 1:])], dim=1)
        agrees = (f"batched product agrees with looped to {rel:.1e} (max-abs relative; "
                  f"tolerance {tol:.0e})")
        per_vector = batched_seconds / vectors.shape[1]
        timing = (f"{per_vector:.3g} s per vector batched, {looped_seconds:.3g} s looped, "
                  "on the first block")
        if self.batch_vectors == "auto" and per_vector > AUTO_BATCH_GAIN * looped_seconds:
            # exact but not faster here: the loop from now on (this block is kept)
            self.vector_batch = "loop"
            self.vector_batch_reason = f"batch_vectors='auto': not faster ({timing}); {agrees}"
            return out
        self.vector_batch = "batched"
        self.vector_batch_reason = f"{agrees}; {timing}"
        return out

    def _timed_batched(self, vectors: Tensor) -> Tensor:
        start = time.perf_counter()
        out = self._batched_matmat(vectors)
        self.hvp_count += vectors.shape[1]
        self._check_finite(out)
        self.hvp_seconds += time.perf_counter() - start
        return out

    def _check_finite(self, out: Tensor) -> None:
        # the sum is finite when every entry is (one pass, no mask); only a non-finite sum
        # (a NaN or inf, or an overflowing sum of finite entries) is looked at entry by entry
        if math.isfinite(float(out.sum())):
            return
        if not bool(torch.isfinite(out).all()):
            raise ValueError(
                f"the {self.product_name} has NaN or inf entries: the loss or the model "
                "overflows at these parameters (try dtype=torch.float64)"
            )

    def _stacked(self, vectors: Tensor) -> list[Tensor]:
        """The columns of ``vectors`` ``(dim, k)`` as per-parameter ``(k, *shape)`` tensors."""
        k = vectors.shape[1]
        parts = torch.split(vectors, self.numels, dim=0)
        return [p.T.reshape(k, *s) for p, s in zip(parts, self.shapes, strict=True)]

    def _flatten_stacked(self, parts: Sequence[Tensor | None], k: int) -> Tensor:
        """Per-parameter ``(k, *shape)`` products (``None``: zero) as ``(dim, k)``."""
        return torch.cat([
            (torch.zeros(k, numel, device=self.device, dtype=self.dtype) if h is None
             else h.reshape(k, numel)) for h, numel in zip(parts, self.numels, strict=True)
        ], dim=1).T

    def _batched_matmat(self, vectors: Tensor) -> Tensor:
        """``H V`` for ``k`` columns in one pass per batch, weighted and divided as
        :meth:`matvec`; no guard, no count, no finiteness check (see :meth:`matmat`)."""
        k = vectors.shape[1]
        stacked = self._stacked(vectors)
        with self._modes(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                                    category=FutureWarning)
            # an op without a batching rule runs one vector at a time: slower, still exact
            warnings.filterwarnings("ignore", message=r".*performance drop.*")
            total = torch.zeros(self.dim, k, device=self.device, dtype=self.dtype)
            sizes = []
            for n, hv in self._batched_by_batch(stacked):
                total.add_(self._flatten_stacked(hv, k),
                           alpha=self._weight(n))
                sizes.append(n)
        self._record_samples(sum(sizes), len(sizes))
        return total / sum(sizes)

    def _batched_by_batch(self, stacked: list[Tensor]):
        """``(samples, per-parameter (k, *shape) products)`` of each batch in turn."""
        if self.mode == "retained-graph":
            if self._retained is None:
                self._build_retained()
            for leaves, grads, n, _ in self._retained:
                yield n, torch.autograd.grad(grads, leaves, grad_outputs=stacked,
                                             retain_graph=True, allow_unused=True,
                                             is_grads_batched=True)
            return
        hvp = (self._fwd_rev_batched if self.mode == "forward-over-reverse"
               else self._double_backward_batched)
        for inputs, targets, n in self._iter_batches():
            yield n, hvp(stacked, inputs, targets)

    def _double_backward_batched(self, stacked: list[Tensor], inputs, targets
                                 ) -> Sequence[Tensor | None]:
        leaves, loss = self._leaf_loss(inputs, targets)
        with torch.enable_grad():
            grads = _gradient_graph(loss, leaves)
            return torch.autograd.grad(grads, leaves, grad_outputs=stacked, allow_unused=True,
                                       is_grads_batched=True)

    def _fwd_rev_batched(self, stacked: list[Tensor], inputs, targets) -> list[Tensor]:
        def product(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return self._fwd_rev_product(self.params, v, inputs, targets)[0]

        out = torch.func.vmap(product)(dict(zip(self.param_names, stacked, strict=True)))
        return [out[n] for n in self.param_names]

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 (for ``eigsh`` and friends)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            x = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(x).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, dtype=np.float64)

    # ------------------------------------------------------------------ internals
    def _iter_batches(self):
        count = 0
        for batch in self._batches:
            if not (isinstance(batch, tuple | list) and len(batch) >= 2):
                raise ValueError(
                    "each batch must be a pair (inputs, targets); "
                    f"batch {count} is a {type(batch).__name__}"
                )
            inputs, targets = batch[0], batch[1]
            n = self._batch_size_fn(inputs, targets)
            count += 1
            yield to_device(inputs, self.device, self.dtype), targets.to(self.device), n
        if count == 0:
            raise ValueError("no batches: the data is empty, so there is no loss to differentiate")

    def _outputs(self, params: dict[str, Tensor], inputs: Any) -> Any:
        """The model's outputs with the selected parameters replaced by ``params``."""
        fixed = self.fixed
        if self.train_mode:
            # a train-mode forward updates BatchNorm's running statistics in place: give it
            # copies, so that the snapshot stays what it was
            fixed = {n: t.clone() for n, t in fixed.items()}
        state = {**fixed, **params}
        if isinstance(inputs, Mapping):
            return functional_call(self.model, state, args=(), kwargs=dict(inputs))
        if isinstance(inputs, tuple | list):
            return functional_call(self.model, state, tuple(inputs))
        return functional_call(self.model, state, (inputs,))

    def _loss(self, params: dict[str, Tensor], inputs: Any, targets: Tensor) -> Tensor:
        loss = self.loss_fn(self._outputs(params, inputs), targets)
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar; got shape {tuple(loss.shape)} "
                "(use reduction='mean')"
            )
        return loss

    def _leaf_loss(self, inputs: Any, targets: Tensor) -> tuple[list[Tensor], Tensor]:
        """Fresh leaves of the selected parameters and the batch's loss at them, with its
        graph (for a gradient, or a gradient graph)."""
        leaves = [p.detach().requires_grad_(True) for p in self.params.values()]
        with torch.enable_grad():
            loss = self._loss(dict(zip(self.param_names, leaves, strict=True)), inputs, targets)
        return leaves, loss

    def _weight(self, n: int) -> float:
        """A batch's weight in the sum that is divided by the samples: its size for a
        mean-reduced loss, one for a sum-reduced loss (see the module docstring)."""
        return 1.0 if self._sum_reduction else float(n)

    def _hvp_fwd_rev(self, v: dict[str, Tensor], inputs, targets) -> tuple[dict, Tensor]:
        product = self._fwd_rev_product
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self._fwd_rev_product)
            product = self._compiled
        with warnings.catch_warnings():
            # torch.func.jvp registers its decompositions through torch.jit.script on first
            # use, which warns about its own deprecation: nothing a user can act on
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                                    category=FutureWarning)
            if not self.compile:
                return product(self.params, v, inputs, targets)
            from torch._dynamo.exc import TorchDynamoException

            try:
                return product(self.params, v, inputs, targets)
            except TorchDynamoException as exc:  # no C compiler, an op it cannot trace, ...
                raise ValueError(f"torch.compile could not compile the product "
                                 f"({first_line(exc)}); run without compile") from exc

    def _fwd_rev_product(self, params: dict[str, Tensor], v: dict[str, Tensor], inputs,
                         targets) -> tuple[dict, Tensor]:
        """``H v`` and the loss of one batch by ``jvp`` of ``grad`` (what ``compile``
        compiles: nothing in it may break the graph)."""
        def grad_and_loss(p):
            def f(q):
                loss = self._loss(q, inputs, targets)
                return loss, loss.detach()

            return torch.func.grad(f, has_aux=True)(p)

        _, hv, loss = torch.func.jvp(grad_and_loss, (params,), (v,), has_aux=True)
        return hv, loss

    def _hvp_double_backward(self, v: dict[str, Tensor], inputs, targets) -> tuple[dict, Tensor]:
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        with torch.enable_grad():
            loss = self._loss(leaves, inputs, targets)
            grads = _gradient_graph(loss, list(leaves.values()))
            hv = torch.autograd.grad(
                grads, list(leaves.values()), grad_outputs=[v[n] for n in leaves],
                allow_unused=True,
            )
        out = {
            n: (h if h is not None else torch.zeros_like(p))
            for (n, p), h in zip(leaves.items(), hv, strict=True)
        }
        return out, loss.detach()

    def _build_retained(self, budget: int | None = None) -> bool:
        """Build and keep the gradient graph of every batch. With ``budget`` (bytes), the
        tensors the first batch's graph saves are measured first and the whole is
        estimated as that times the samples of all batches over the first's; over budget,
        nothing is kept and ``False`` is returned."""
        self._retained = []
        batches = self._iter_batches()
        total_samples = None
        if budget is not None:
            total_samples = sum(self._batch_size_fn(b[0], b[1]) for b in self._batches)
        for i, (inputs, targets, n) in enumerate(batches):
            saved = _SavedBytes() if budget is not None and i == 0 else contextlib.nullcontext()
            with torch.enable_grad(), self._modes(), saved:
                leaves, loss = self._leaf_loss(inputs, targets)
                grads = _gradient_graph(loss, leaves)
            self._retained.append((leaves, list(grads), n, loss.detach()))
            if budget is not None and i == 0:
                per_sample = (saved.bytes + sum(g.numel() * g.element_size() for g in grads)) \
                    / max(n, 1)
                self.memory_estimate = int(per_sample * max(total_samples or n, n))
                if self.memory_estimate > budget:
                    self._retained = None
                    return False
        return True

    @contextlib.contextmanager
    def _modes(self):
        """Eval mode (unless ``train_mode``) and the math attention kernel for a product;
        the model's flags are restored afterwards."""
        with preserved_state(self.model, not self.train_mode, buffers=False), \
                _math_attention():
            yield

    def _matvec_with(self, mode: str, v: Tensor, first: bool = False,
                     out: Tensor | None = None) -> Tensor:
        with self._modes():
            if mode == "retained-graph":
                return self._matvec_retained(v, first, out)
            if self.collective is None:
                total, n_total, n_batches = self._local_product(mode, v, first, out)
            else:
                total, n_total, n_batches = self._reduced(self._local_product, mode, v, first)
        self._record_samples(n_total, n_batches)
        self.hvp_count += 1
        return total.div_(n_total)

    def _local_product(self, mode: str, v: Tensor, first: bool, out: Tensor | None = None
                       ) -> tuple[Tensor, int, int]:
        """This process's weighted sum of batch products (in ``out`` when given), its
        count and its batches."""
        vd = self.unflatten(v)
        total = out if out is not None else torch.empty(self.dim, device=self.device,
                                                        dtype=self.dtype)
        n_total = 0
        n_batches = 0
        hvp = self._hvp_fwd_rev if mode == "forward-over-reverse" else self._hvp_double_backward
        for i, (inputs, targets, n) in enumerate(self._iter_batches()):
            hv, loss = hvp(vd, inputs, targets)
            if first and not bool(torch.isfinite(loss)):
                raise ValueError(f"the loss is {loss.item()} on batch {i}: not finite")
            self._accumulate(total, [hv[name] for name in self.param_names], self._weight(n),
                             n_batches == 0)
            n_total += n
            n_batches += 1
        if n_batches == 0:
            total.zero_()
        return total, n_total, n_batches

    def _accumulate(self, total: Tensor, parts: Sequence[Tensor | None], weight: float,
                    first: bool) -> None:
        """``total (+)= weight * parts``, parameter by parameter into views of ``total``
        (no flat copy of the parts is made; ``None``: a zero part)."""
        for view, part in zip(self.unflatten(total).values(), parts, strict=True):
            if part is None:
                if first:
                    view.zero_()
            elif first:
                if weight == 1.0:
                    view.copy_(part)
                else:
                    torch.mul(part, weight, out=view)
            else:
                view.add_(part, alpha=weight)

    def _reduced(self, local: Callable[..., tuple[Tensor, int, int]], *args: Any
                 ) -> tuple[Tensor, int, int]:
        """``local(*args)`` summed over all processes (see ``collective``); an error on any
        process raises on every one."""
        error = None
        try:
            total, n_total, n_batches = local(*args)
        except Exception as exc:  # reported to the others, then raised here
            error = exc
            total = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
            n_total = n_batches = 0
        total, (n_total, n_batches) = self.collective.sum_and_count(total, n_total, n_batches,
                                                                     error=error)
        return total, int(n_total), int(n_batches)

    def _matvec_retained(self, v: Tensor, first: bool, out: Tensor | None = None) -> Tensor:
        if self.collective is None:
            if self._retained is None:
                self._build_retained()
            # the samples are known in advance: each batch's product is scaled by its share
            # as it is written, so a single mean-loss batch costs one backward and one copy
            n_total = sum(entry[2] for entry in self._retained)
            if n_total <= 0:
                raise ValueError("the data holds no samples (batches of size 0)")
            total, _, n_batches = self._local_retained(v, first, out, 1.0 / n_total)
            self._record_samples(n_total, n_batches)
            self.hvp_count += 1
            return total
        total, n_total, n_batches = self._reduced(self._local_retained, v, first)
        self._record_samples(n_total, n_batches)
        self.hvp_count += 1
        return total.div_(n_total)

    def _local_retained(self, v: Tensor, first: bool, out: Tensor | None = None,
                        scale: float = 1.0) -> tuple[Tensor, int, int]:
        """This process's sum of the kept graphs' products, each batch weighted by
        ``scale * weight`` (in ``out`` when given), its samples and its batches."""
        if self._retained is None:
            self._build_retained()
        vs = list(self.unflatten(v).values())
        total = out if out is not None else torch.empty(self.dim, device=self.device,
                                                        dtype=self.dtype)
        n_total = 0
        for i, entry in enumerate(self._retained):
            n, loss = entry[2], entry[3]
            if first and not bool(torch.isfinite(loss)):
                raise ValueError(f"the loss is {loss.item()} on batch {i}: not finite")
            self._accumulate(total, self._retained_product(entry, vs),
                             scale * self._weight(n), i == 0)
            n_total += n
        if not self._retained:
            total.zero_()
        return total, n_total, len(self._retained)

    @staticmethod
    def _retained_product(entry, vs: list[Tensor]) -> list[Tensor | None]:
        """The kept graph's product, one tensor per parameter (``None``: zero)."""
        leaves, grads = entry[0], entry[1]
        return list(torch.autograd.grad(grads, leaves, grad_outputs=vs, retain_graph=True,
                                        allow_unused=True))

    def _record_samples(self, n_total: int, n_batches: int) -> None:
        if self.n_samples is not None and n_total != self.n_samples:
            raise NondeterministicOperatorError(
                f"the data yielded {n_total} samples in {n_batches} batches this time, "
                f"{self.n_samples} before: it must yield the same samples every pass"
            )
        if n_total <= 0:
            raise ValueError("the data holds no samples (batches of size 0)")
        self.n_samples, self.n_batches = n_total, n_batches

    def _first_matvec(self, v: Tensor) -> Tensor:
        """First product: choose the mode, check determinism and finiteness."""
        if self.collective is not None:
            self._agree_on_data()
        if self.mode is None:
            self.mode = self._choose_mode(v)
        try:
            out = self._matvec_with(self.mode, v, first=True)
        except (RuntimeError, NotImplementedError) as exc:
            if self.mode == self.forward_mode and _lacks_forward_ad(exc):
                raise ValueError(
                    f"{self.forward_mode} products need forward-mode AD, which an op of this "
                    f"model lacks ({first_line(exc)}); use mode='{self.reverse_mode}'"
                ) from exc
            raise
        if self.check_determinism:
            self._check_repeat(v, out)
        self._checked = True
        return out

    def _check_repeat(self, v: Tensor, out: Tensor) -> None:
        """The determinism check: a second product of ``v`` must equal ``out``."""
        second = self._matvec_with(self.mode, v)  # type: ignore[arg-type]
        diff = float(torch.linalg.vector_norm(out - second))
        scale = float(torch.linalg.vector_norm(out)) or 1.0
        differs = diff > self.determinism_rtol * scale
        if self.collective is not None:
            differs = self.collective.any(differs)
            diff = max(diff, self.determinism_rtol * scale) if differs else diff
        if differs:
            raise NondeterministicOperatorError(
                f"two {self.product_name}s of the same vector differ by {diff / scale:.2e}"
                f" (relative; tolerance {self.determinism_rtol:.0e}): the data pipeline "
                "shuffles or augments, or dropout is active; pass fixed batches without "
                "augmentation and keep the model in eval mode"
            )

    def _choose_mode(self, v: Tensor) -> str:
        """``retained-graph`` when the data is in memory, the model in eval mode and the
        graphs fit ``memory_budget`` (estimated from the first batch's graph: one product
        is then one backward pass, the cheapest); otherwise the faster of ``double-backward`` and
        ``forward-over-reverse``, timed on the first batch (a warm-up, then the median of
        three; forward-over-reverse is skipped when an op lacks a forward-mode formula).
        The products computed while timing count towards ``hvp_count``. Across processes
        the graphs are kept only if they fit on every one, and rank 0's timings decide."""
        if self.collective is not None:
            return self._choose_mode_together(v)
        # in train mode a kept graph would freeze one dropout mask: recompute instead
        if self.in_memory and not self.train_mode and not self._retain_refused \
                and self._build_retained(budget=self.memory_budget):
            return "retained-graph"
        return self._timed_choice(v)

    def _timed_choice(self, v: Tensor) -> str:
        """The faster of ``double-backward`` and ``forward-over-reverse`` on the first
        batch (see :meth:`_choose_mode`)."""
        vd = self.unflatten(v)
        batch = next(iter(self._iter_batches()))
        candidates = ["double-backward", "forward-over-reverse"]
        for mode in candidates:
            hvp = self._hvp_fwd_rev if mode == "forward-over-reverse" else self._hvp_double_backward
            times = []
            for _ in range(4):
                start = time.perf_counter()
                try:
                    with self._modes():
                        hvp(vd, batch[0], batch[1])
                except (RuntimeError, NotImplementedError) as exc:
                    if mode == "forward-over-reverse" and _lacks_forward_ad(exc):
                        times = [float("inf")]
                        break
                    raise
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - start)
                self.hvp_count += 1
            # the first call of a mode pays one-off costs: it is not timed
            self.mode_timings[mode] = float(np.median(times[1:] if len(times) > 1 else times))
        return min(candidates, key=lambda m: self.mode_timings[m])

    def _agree_on_data(self) -> None:
        """Across processes: the data counts as in memory only if it is on every one (so
        that the mode choice and the determinism check are the same everywhere)."""
        local = self.in_memory
        self.in_memory = not self.collective.any(not local, self.device)
        if local and not self.in_memory:
            self.check_determinism = self._check_requested

    def _choose_mode_together(self, v: Tensor) -> str:
        """:meth:`_choose_mode` taken identically on every process."""
        c = self.collective
        if self.in_memory and not self.train_mode:
            error, fits = None, False
            try:
                fits = self._build_retained(budget=self.memory_budget)
            except Exception as exc:  # reported to the others, then raised here
                error = exc
            (misfits,) = c.counts(float(not fits), error=error, device=self.device)
            if misfits == 0:
                return "retained-graph"
            self._retained = None  # too large on some process: recompute everywhere
        error, choice = None, None
        try:  # timing products are of this process's first batch only: no reduction
            choice = self._timed_choice(v)
        except Exception as exc:  # reported to the others, then raised here
            error = exc
        c.counts(error=error, device=self.device)
        choice, self.mode_timings = c.broadcast((choice, dict(self.mode_timings)))
        return choice

    def gradient(self) -> Tensor:
        """The gradient of the mean loss over the data, as a flat vector in the operator's
        dtype (the same weighting as the products; over all processes with
        ``collective``). Lanczos started from it converges to the top eigenvalue in fewer
        products: the gradient of a network's loss lies mostly in the top eigenspace of its
        Hessian (Gur-Ari et al. 2018).

        Free when the gradient graphs are kept: in ``auto`` mode with data in memory, the
        graphs are built here if they fit ``memory_budget`` (the choice ``auto`` would make
        at the first product, made now) and their gradients combined. Otherwise one forward
        and one backward pass per batch, not counted as a product."""
        if self._retained is None and self.retains_graphs and self.collective is None \
                and self.in_memory and not self.train_mode:
            if self.mode is None:
                if self._build_retained(budget=self.memory_budget):
                    self.mode = "retained-graph"
                else:  # over budget: the first product need not measure the graph again
                    self._retain_refused = True
            elif self.mode == "retained-graph":
                self._build_retained()
        if self.collective is None:
            total, n_total, _ = self._local_gradient()
        else:
            total, n_total, _ = self._reduced(self._local_gradient)
        if n_total <= 0:
            raise ValueError("the data holds no samples (batches of size 0)")
        return total / n_total

    def _local_gradient(self) -> tuple[Tensor, int, int]:
        total = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        n_total = n_batches = 0
        if self._retained is not None:
            for _leaves, grads, n, _ in self._retained:
                total.add_(self.flatten([g.detach() for g in grads]), alpha=self._weight(n))
                n_total += n
                n_batches += 1
            return total, n_total, n_batches
        with self._modes():
            for inputs, targets, n in self._iter_batches():
                leaves, loss = self._leaf_loss(inputs, targets)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g
                         for g, p in zip(grads, leaves, strict=True)]
                total.add_(self.flatten(grads), alpha=self._weight(n))
                n_total += n
                n_batches += 1
        return total, n_total, n_batches

    def describe(self) -> dict[str, Any]:
        """Settings and counters, JSON-serialisable (for results and the store)."""
        return {
            "dim": self.dim,
            "params": self.param_names if len(self.param_names) <= 64 else len(self.param_names),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "mode": self.mode or self.requested_mode,
            "mode_timings": dict(self.mode_timings),
            "memory_estimate": self.memory_estimate,
            "memory_budget": self.memory_budget,
            # the loss's terms over all batches (the count it averages over: the samples,
            # or the tokens of a per-token loss); ``samples`` is the same count under the
            # key stores written before ``loss_terms`` hold
            "loss_terms": self.n_samples,
            "samples": self.n_samples,
            "batches": self.n_batches,
            "train_mode": self.train_mode,
            "compile": self.compile,
            "batch_vectors": self.batch_vectors,
            "vector_batch": self.vector_batch,
            "vector_batch_reason": self.vector_batch_reason,
            "hvps": self.hvp_count,
            **({} if self.collective is None else {"processes": self.collective.size}),
        }


def _math_attention():
    """Scaled dot-product attention through the math kernel: the fused CPU/GPU kernels
    have neither forward-mode nor double-backward formulas."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _lacks_forward_ad(exc: BaseException) -> bool:
    """Whether an error says forward-over-reverse cannot run this model: an op without a
    forward-mode formula, or one whose formula fails (``nn.MSELoss``'s backward under
    forward AD raises "ZeroTensors are immutable" in torch 2.14)."""
    text = str(exc).lower()
    return any(
        key in text
        for key in ("forward ad", "forward-mode", "forward mode", "jvp", "forward_ad", "fw_grad",
                    "zerotensors are immutable")
    )


@contextlib.contextmanager
def preserved_state(model: nn.Module, eval_mode: bool = True, buffers: bool = True):
    """Run a block with the model in eval mode (or in train mode with
    ``eval_mode=False``), then restore every submodule's training flag and, with
    ``buffers``, every buffer's value (BatchNorm running statistics and
    ``num_batches_tracked`` included)."""
    flags = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if buffers else []
    model.train(not eval_mode)
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Count the bytes of the tensors autograd saves for backward inside the block (each
    storage once): the memory a kept graph holds."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[tuple[int, int]] = set()

        def pack(t: Tensor) -> Tensor:
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):  # wrapped or storage-less tensors
                key = (id(t), t.numel() * t.element_size())
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += key[1]
            return t

        super().__init__(pack, lambda t: t)


def default_memory_budget(device: torch.device) -> int:
    """Half of the free memory of a CUDA device; a quarter of the available memory
    otherwise (``MemAvailable`` of ``/proc/meminfo``, else 4 GiB)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.5 * free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(0.25 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return 4 << 30


def _gradient_graph(loss: Tensor, leaves: Sequence[Tensor]) -> list[Tensor]:
    """The gradient of ``loss`` with its graph, for a second derivative. A parameter the
    loss does not use (a head the outputs leave out, a pooler) gets a zero gradient that is
    still a function of it (``leaf * 0``), so its rows of the Hessian are zero instead of an
    error of autograd's."""
    grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    return [g if g is not None else leaf * 0 for g, leaf in zip(grads, leaves, strict=True)]
