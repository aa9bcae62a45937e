"""Generalised Gauss-Newton and Fisher matrices, as symmetric positive semi-definite operators.

For outputs ``f_i`` (one row per term: a sample, or a token of a per-token loss) and a
batch loss ``L = l(f, y)``, the Hessian splits into ``J^T H_f J`` plus a term with the
second derivatives of the network (Schraudolph 2002; Martens 2020, "New insights and
perspectives on the natural gradient method"). Dropping the second:

``GGNOperator``
    ``G = sum_b (n_b / N) J_b^T H_f,b J_b``, with ``J_b`` the Jacobian of batch ``b``'s
    outputs with respect to the selected parameters and ``H_f,b`` the Hessian of the
    batch's loss with respect to those outputs. Positive semi-definite for a convex loss.
``FisherOperator``
    ``F = sum_b (n_b / N) (1 / m_b) sum_{i in b} J_i^T r_i r_i^T J_i`` over the ``m_b``
    terms of each batch: ``kind="empirical"`` with ``r_i`` the gradient of term ``i``'s
    loss at its data target (Kunstner et al. 2019, "Limitations of the empirical Fisher
    approximation for natural gradient descent", on why this is not the Fisher), or
    ``kind="mc"``, the Fisher of the model's predictive distribution, with targets sampled
    from it (see :class:`FisherOperator`).

Batches are weighted as :class:`~hessdiag.curvature.HessianOperator` weights them
(``batch_size_fn``: a :class:`hessdiag.losses.Loss` counts its terms), so all three
matrices are of the same mean. A product is one forward pass carrying the tangent ``J v``
(forward-mode AD; ``mode="jvp"``) or, for models with an op lacking a forward-mode formula,
a forward and two backward passes (``J v`` as the derivative of ``J^T u`` with respect to
``u``; ``mode="double-vjp"``), then the output-space product in closed form and one
backward pass ``J^T (.)``. No ``vmap`` anywhere: per-term gradients are never formed.

Closed forms of ``H_f`` (hessdiag's losses, see :mod:`hessdiag.losses`; ``m`` real terms,
``E`` entries of the outputs):

=================  ==========================================================================
cross-entropy      ``(diag(p) - p p^T) / m`` per term, ``p = softmax(f)``; padding
                   (target ``-100``) contributes nothing.
nll                ``diag(p) / m`` with ``p = softmax(f)``: the loss is linear in the
                   log-probabilities, so its own Hessian is zero; ``diag(p)`` is the Fisher
                   of the categorical distribution in log-probability outputs, and for a model
                   ending in ``log_softmax`` gives exactly cross-entropy's GGN at the logits.
bce                ``diag(s (1 - s)) / E``, ``s = sigmoid(f)``.
mse                ``2 I / E``.
other losses       by automatic differentiation (a Hessian-vector product of the loss with
                   respect to its outputs).
=================  ==========================================================================

The class axis of ``cross-entropy`` and ``nll`` outputs with three or more dimensions:
dimension 1 for torch's ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` (PyTorch's convention,
``(B, C, d1, ...)``), also when ``likelihood=`` is passed explicitly; the last dimension for
hessdiag's own losses (per token, ``(B, L, C)``); for any other callable with an explicit
``likelihood=``, the axis the targets' shape fits, and when both fit (``(B, C, C)`` with
targets ``(B, C)``) the one on which the loss's value is that likelihood, else a
``ValueError``: never a silent guess.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from hessdiag.curvature.operator import (
    HessianOperator,
    ParamSelector,
    _lacks_forward_ad,
)
from hessdiag.outputs import select_output

GGN_MODES = ("auto", "jvp", "double-vjp")
LIKELIHOODS = ("cross-entropy", "nll", "bce", "mse")
FISHER_KINDS = ("empirical", "mc")
IGNORE_INDEX = -100

__all__ = ["FISHER_KINDS", "GGN_MODES", "LIKELIHOODS", "FisherOperator", "GGNOperator",
           "likelihood_of"]


def likelihood_of(loss_fn: Any) -> str | None:
    """Which of :data:`LIKELIHOODS` ``loss_fn`` is exactly, or ``None``: a
    :class:`hessdiag.losses.Loss` says so itself (``likelihood``); of torch's losses,
    ``nn.CrossEntropyLoss``, ``nn.NLLLoss``, ``nn.BCEWithLogitsLoss`` and ``nn.MSELoss``
    count with mean reduction and no weights, ignore index or label smoothing of their own."""
    kind = getattr(loss_fn, "likelihood", None)
    if kind in LIKELIHOODS:
        return kind
    if not isinstance(loss_fn, nn.Module) or getattr(loss_fn, "reduction", None) != "mean":
        return None
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        plain = loss_fn.weight is None and loss_fn.label_smoothing == 0
        return "cross-entropy" if plain and loss_fn.ignore_index == IGNORE_INDEX else None
    if isinstance(loss_fn, nn.NLLLoss):
        plain = loss_fn.weight is None and loss_fn.ignore_index == IGNORE_INDEX
        return "nll" if plain else None
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return "bce" if loss_fn.weight is None and loss_fn.pos_weight is None else None
    if isinstance(loss_fn, nn.MSELoss):
        return "mse"
    return None


class _OutputCurvature(HessianOperator):
    """``sum_b (n_b / N) J_b^T M_b J_b``, for a positive semi-definite ``M_b`` acting on
    the outputs of batch ``b`` (:meth:`_output_product`). Parameter selection, snapshot,
    dtype and device, batching and weighting, eval mode and the vector helpers are
    :class:`HessianOperator`'s."""

    curvature = ""
    product_name = "curvature-vector product"
    _has_batched_path = False  # matmat loops (see HessianOperator's batch_vectors)
    forward_mode, reverse_mode = "jvp", "double-vjp"
    retains_graphs = False

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any, *,
                 params: ParamSelector = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, mode: str = "auto",
                 likelihood: str | None = None, train_mode: bool = False,
                 check_determinism: bool = True, determinism_rtol: float | None = None,
                 batch_size_fn: Callable[[Any, Tensor], int] | None = None) -> None:
        if mode not in GGN_MODES:
            raise ValueError(f"mode must be one of {', '.join(GGN_MODES)}; got {mode!r}")
        if likelihood is not None and likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)} or None; "
                             f"got {likelihood!r}")
        super().__init__(model, loss_fn, data, params=params, dtype=dtype, device=device,
                         mode="double-backward", train_mode=train_mode,
                         check_determinism=check_determinism,
                         determinism_rtol=determinism_rtol, batch_size_fn=batch_size_fn)
        self.requested_mode = mode
        self.mode = None if mode == "auto" else mode
        self.likelihood = likelihood or likelihood_of(loss_fn)
        # where a class-index loss keeps its classes (see _class_axis); None: decided on the
        # first batch whose outputs have three or more dimensions
        self._class_dim: int | None = _class_axis(loss_fn)

    # ------------------------------------------------------------------ products
    def _jvp(self, mode: str, v: dict[str, Tensor], inputs: Any
             ) -> tuple[list[Tensor], Tensor, Tensor]:
        """``(leaves, f, J v)``: the outputs ``f`` keep their graph to the leaves (for the
        ``J^T`` product that follows)."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
        with torch.enable_grad():
            if mode == "jvp":
                with warnings.catch_warnings(), fwAD.dual_level():
                    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated",
                                            category=FutureWarning)
                    duals = {n: fwAD.make_dual(p, v[n]) for n, p in leaves.items()}
                    outputs = _tensor_outputs(self._outputs(duals, inputs), self.loss_fn)
                    outputs, jv = fwAD.unpack_dual(outputs)
                jv = torch.zeros_like(outputs) if jv is None else jv
            else:
                outputs = _tensor_outputs(self._outputs(leaves, inputs), self.loss_fn)
                u = torch.zeros_like(outputs, requires_grad=True)
                jtu = torch.autograd.grad(outputs, list(leaves.values()), grad_outputs=u,
                                          create_graph=True, allow_unused=True)
                pairs = [(g, v[n]) for n, g in zip(leaves, jtu, strict=True) if g is not None]
                jv = torch.zeros_like(outputs)
                if pairs:
                    (got,) = torch.autograd.grad([g for g, _ in pairs], u,
                                                 grad_outputs=[t for _, t in pairs],
                                                 retain_graph=True, allow_unused=True)
                    jv = jv if got is None else got
        return list(leaves.values()), outputs, jv.detach()

    def _matvec_with(self, mode: str, v: Tensor, first: bool = False,
                     out: Tensor | None = None) -> Tensor:
        with self._modes():
            vd = self.unflatten(v)
            total = out.zero_() if out is not None else torch.zeros(
                self.dim, device=self.device, dtype=self.dtype)
            n_total = n_batches = 0
            for i, (inputs, targets, n) in enumerate(self._iter_batches()):
                leaves, outputs, jv = self._jvp(mode, vd, inputs)
                f = outputs.detach()
                if first:
                    self._check_loss(i, f, targets)
                w = self._output_product(i, f, jv, targets)
                jtw = torch.autograd.grad(outputs, leaves, grad_outputs=w, allow_unused=True)
                parts = [g if g is not None else torch.zeros_like(p)
                         for g, p in zip(jtw, leaves, strict=True)]
                total.add_(self.flatten(parts), alpha=self._weight(n))
                n_total += n
                n_batches += 1
        self._record_samples(n_total, n_batches)
        self.hvp_count += 1
        return total.div_(n_total)

    def _output_product(self, batch: int, f: Tensor, jv: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_loss(self, batch: int, f: Tensor, targets: Tensor) -> None:
        with torch.no_grad():
            loss = self.loss_fn(f, targets)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar; got {shape} (use "
                             "reduction='mean')")
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"the loss is {loss.item()} on batch {batch}: not finite")

    def _choose_mode(self, v: Tensor) -> str:
        """The faster of ``jvp`` and ``double-vjp`` on the first batch (a warm-up, then the
        median of two; ``jvp`` is skipped when an op lacks a forward-mode formula). The
        products computed while timing count towards ``hvp_count``."""
        vd = self.unflatten(v)
        inputs, targets, _ = next(iter(self._iter_batches()))
        for mode in ("double-vjp", "jvp"):
            times = []
            for _ in range(3):
                start = time.perf_counter()
                try:
                    with self._modes():
                        leaves, outputs, jv = self._jvp(mode, vd, inputs)
                        w = self._output_product(0, outputs.detach(), jv, targets)
                        torch.autograd.grad(outputs, leaves, grad_outputs=w, allow_unused=True)
                except (RuntimeError, NotImplementedError) as exc:
                    if mode == "jvp" and _lacks_forward_ad(exc):
                        times = [math.inf]
                        break
                    raise
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                times.append(time.perf_counter() - start)
                self.hvp_count += 1
            self.mode_timings[mode] = float(np.median(times[1:] if len(times) > 1 else times))
        return min(("double-vjp", "jvp"), key=lambda m: self.mode_timings[m])

    def describe(self) -> dict[str, Any]:
        """Settings and counters, JSON-serialisable (for results and the store)."""
        out = {k: v for k, v in super().describe().items()
               if k not in ("memory_estimate", "memory_budget")}
        return {"curvature": self.curvature, **out, "likelihood": self.likelihood}

    # ------------------------------------------------------------------ output space
    def _resolve_class_dim(self, f: Tensor, targets: Any) -> None:
        """Decide the class axis of outputs ``f`` with three or more dimensions for a loss
        that does not say it (:func:`_class_axis`): the axis the targets' shape fits, and
        when it fits both (``(B, C, C)`` with targets ``(B, C)``), the axis on which the
        loss's own value is the likelihood's; a :class:`ValueError` when that cannot tell
        them apart either. Never a guess."""
        if self._class_dim is not None or f.dim() < 3 or not isinstance(targets, Tensor):
            return
        shapes = {1: (f.shape[0], *f.shape[2:]), -1: tuple(f.shape[:-1])}
        fits = [d for d, shape in shapes.items() if tuple(shape) == tuple(targets.shape)]
        if len(fits) == 2:
            with torch.no_grad():
                value = self.loss_fn(f, targets)
                fits = [d for d in fits if _likelihood_value(self.likelihood, f, targets, d)
                        .isclose(value.to(f.dtype), rtol=1e-5, atol=1e-7)]
            if len(fits) != 1:
                raise ValueError(
                    f"cannot tell the class axis of outputs {tuple(f.shape)} with targets "
                    f"{tuple(targets.shape)} for likelihood {self.likelihood}: classes on "
                    "dimension 1 (torch's convention) and on the last dimension (hessdiag's) "
                    "both fit, and the loss's value "
                    + ("matches both" if fits else "matches neither")
                    + "; pass nn.CrossEntropyLoss/nn.NLLLoss (classes on dimension 1) or "
                    "hessdiag's loss (hessdiag.losses.resolve_loss: classes last)")
        if not fits:
            raise ValueError(
                f"loss {self.likelihood} needs targets of the outputs' shape without the "
                f"class axis; outputs {tuple(f.shape)} and targets {tuple(targets.shape)} "
                "fit neither classes on dimension 1 nor classes last")
        self._class_dim = fits[0]

    def _terms(self, x: Tensor) -> Tensor:
        """Outputs of a class-index loss as ``(terms, classes)``."""
        if self._class_dim == 1 and x.dim() > 2:
            x = x.movedim(1, -1)
        return x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)

    def _from_terms(self, rows: Tensor, like: Tensor) -> Tensor:
        if self._class_dim == 1 and like.dim() > 2:
            return rows.reshape(like.movedim(1, -1).shape).movedim(-1, 1)
        return rows.reshape(like.shape)

    def _class_targets(self, f: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(mask, targets)`` per term of a class-index loss (mask: not padding)."""
        self._resolve_class_dim(f, targets)
        rows = self._terms(f)
        if not isinstance(targets, Tensor) or targets.is_floating_point() \
                or targets.numel() != rows.shape[0]:
            what = (f"targets of shape {tuple(targets.shape)}, {targets.dtype}"
                    if isinstance(targets, Tensor) else type(targets).__name__)
            raise ValueError(f"loss {self.likelihood} needs one integer class target per row "
                             f"of outputs {tuple(f.shape)}; got {what}")
        t = targets.reshape(-1).to(f.device)  # (B, d1, ...): the rows' order either way
        return t != IGNORE_INDEX, t


class GGNOperator(_OutputCurvature):
    """The generalised Gauss-Newton matrix ``G = sum_b (n_b / N) J_b^T H_f,b J_b`` of a
    model's mean loss over a fixed set of batches (see the module docstring).

    Takes :class:`HessianOperator`'s arguments (``model``, ``loss_fn``, ``data``,
    ``params``, ``dtype``, ``device``, ``train_mode``, ``check_determinism``,
    ``determinism_rtol``, ``batch_size_fn``) with ``mode`` one of ``"auto"`` (the faster of
    the two, timed on the first batch), ``"jvp"`` (forward-mode ``J v``) or
    ``"double-vjp"`` (reverse mode only). ``likelihood`` (one of :data:`LIKELIHOODS`)
    vouches that ``loss_fn`` is that loss, for the closed form; by default it is read from
    the loss (:func:`likelihood_of`), and a loss that is none of them has ``H_f`` by
    automatic differentiation. ``describe()`` reports ``loss_hessian``: ``closed form`` or
    ``autograd``.

    >>> import torch
    >>> from torch import nn
    >>> from hessdiag.curvature import GGNOperator, lanczos
    >>> torch.manual_seed(0)
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> op = GGNOperator(model, nn.CrossEntropyLoss(), (x, y), dtype=torch.float64)
    >>> bool(lanczos(op, k=1, which="smallest", seed=0).eigenvalues[0] > -1e-10)
    True
    """

    curvature = "ggn"
    product_name = "Gauss-Newton-vector product"

    def _output_product(self, batch: int, f: Tensor, jv: Tensor, targets: Tensor) -> Tensor:
        kind = self.likelihood
        if kind in ("cross-entropy", "nll"):
            mask, _ = self._class_targets(f, targets)
            p, u = torch.softmax(self._terms(f), dim=-1), self._terms(jv)
            pu = p * u
            hu = pu - p * pu.sum(-1, keepdim=True) if kind == "cross-entropy" else pu
            hu = hu * (mask.to(hu.dtype).unsqueeze(-1) / max(int(mask.sum()), 1))
            return self._from_terms(hu, f)
        if kind == "mse":
            return jv * (2.0 / max(f.numel(), 1))
        if kind == "bce":
            s = torch.sigmoid(f)
            return s * (1 - s) * jv / max(f.numel(), 1)
        leaf = f.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.loss_fn(leaf, targets)
            (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
            (hu,) = torch.autograd.grad(g, leaf, grad_outputs=jv, allow_unused=True)
        return torch.zeros_like(f) if hu is None else hu.detach()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(),
                "loss_hessian": "closed form" if self.likelihood else "autograd"}


class FisherOperator(_OutputCurvature):
    """A Fisher matrix ``F = sum_b (n_b / N) (1 / m_b) sum_{i in b} J_i^T r_i r_i^T J_i``
    over the ``m_b`` terms of each batch (samples, or real tokens of a per-token loss), as
    ``J^T (r_i <r_i, (J v)_i>)``: one ``J v`` and one ``J^T`` product per batch, no
    per-sample gradients.

    ``kind="empirical"``: ``r_i`` is the gradient of term ``i``'s loss with respect to its
    outputs at its data target (``m_b`` times the gradient of the batch's mean loss).

    ``kind="mc"`` (the Fisher, or "true" Fisher): targets ``y_i`` are drawn from the
    model's predictive distribution ``mc_samples`` times, and ``F`` averages
    ``c r r^T`` with ``r = grad_f (-log p(y_i | f_i))`` over them, where the loss of a term
    is ``c (-log p) + const``:

    * ``cross-entropy``: ``p(y | f) = softmax(f)_y`` (categorical), ``c = 1``;
    * ``nll``: categorical ``softmax(f)`` (``exp(f)`` for log-probabilities), ``c = 1``;
    * ``bce``: independent Bernoulli ``sigmoid(f_e)`` per output entry, ``c = 1 / E`` for
      ``E`` entries per sample (the loss is their mean);
    * ``mse``: the Gaussian ``N(f, I)`` of unit variance; hessdiag's mse of a sample is
      ``(2 / E) (-log N(y; f, I)) + const`` over its ``E`` entries, so ``c = 2 / E``.

    So ``F`` is in the loss's units and its expectation over the samples is exactly the
    GGN (Martens 2020, section 9.2). The targets come from a generator seeded by ``seed``
    and the batch's index, drawn on the CPU: the operator is one fixed symmetric matrix for
    its whole life, the same on every device. Padding tokens (target ``-100``) stay padding.

    A loss that is none of :data:`LIKELIHOODS` (:func:`likelihood_of`; or pass
    ``likelihood``) is refused: the empirical Fisher needs to know what a term is, the
    Fisher also the distribution. Other arguments as :class:`GGNOperator`.
    """

    curvature = "fisher"
    product_name = "Fisher-vector product"

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor], data: Any, *,
                 kind: str = "mc", seed: int = 0, mc_samples: int = 1, **kwargs: Any) -> None:
        if kind not in FISHER_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FISHER_KINDS)}; got {kind!r}")
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be at least 1; got {mc_samples}")
        super().__init__(model, loss_fn, data, **kwargs)
        if self.likelihood is None:
            raise ValueError(
                f"the Fisher needs a loss that is a likelihood ({', '.join(LIKELIHOODS)}); "
                f"{_name(loss_fn)} is none of them: use GGNOperator, which takes any loss")
        self.kind, self.seed, self.mc_samples = kind, int(seed), int(mc_samples)

    def _output_product(self, batch: int, f: Tensor, jv: Tensor, targets: Tensor) -> Tensor:
        r, terms = self._residuals(batch, f, targets)     # (S, *f.shape), m_b
        if self.likelihood in ("cross-entropy", "nll"):
            rows = torch.stack([self._terms(x) for x in r])
            dots = (rows * self._terms(jv)).sum(-1, keepdim=True)
            w = torch.stack([self._from_terms(x, f) for x in rows * dots])
        else:   # a term is a sample: all of its entries
            dims = tuple(range(2, r.dim()))
            dots = (r * jv).sum(dim=dims, keepdim=True) if dims else r * jv
            w = r * dots
        return w.sum(0) / (r.shape[0] * max(terms, 1))

    def _residuals(self, batch: int, f: Tensor, targets: Tensor) -> tuple[Tensor, int]:
        kind = self.likelihood
        classes = kind in ("cross-entropy", "nll")
        if classes:
            mask, _ = self._class_targets(f, targets)
            terms = int(mask.sum())
        else:
            terms = int(f.shape[0]) if f.dim() else 1
        if self.kind == "empirical":
            leaf = f.detach().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(self.loss_fn(leaf, targets), leaf, allow_unused=True)
            g = torch.zeros_like(f) if g is None else g
            return (g * terms).unsqueeze(0), terms
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [self.seed, batch]).generate_state(1)[0]))
        S = self.mc_samples
        if classes:
            p = torch.softmax(self._terms(f), dim=-1)
            drawn = torch.multinomial(p.detach().to("cpu", torch.float64), S,
                                      replacement=True, generator=gen).T.to(f.device)
            onehot = nn.functional.one_hot(drawn, p.shape[-1]).to(f.dtype)   # (S, T, C)
            r = (p - onehot if kind == "cross-entropy" else -onehot) \
                * mask.to(p.dtype).unsqueeze(-1)
            return torch.stack([self._from_terms(x, f) for x in r]), terms
        entries = max(f[0].numel(), 1) if f.dim() else 1
        if kind == "bce":
            s = torch.sigmoid(f)
            u = torch.rand((S, *f.shape), generator=gen, dtype=torch.float64)
            y = (u.to(f.device) < s.double()).to(f.dtype)
            return (s - y) * math.sqrt(1.0 / entries), terms
        noise = torch.randn((S, *f.shape), generator=gen, dtype=torch.float64)
        return noise.to(f.device, f.dtype) * math.sqrt(2.0 / entries), terms   # mse

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "fisher": self.kind}
        if self.kind == "mc":
            out.update(seed=self.seed, mc_samples=self.mc_samples)
        return out


def _class_axis(loss_fn: Any) -> int | None:
    """The class axis of a class-index loss's outputs with three or more dimensions:
    ``1`` for torch's ``nn.CrossEntropyLoss`` and ``nn.NLLLoss`` (PyTorch takes
    ``(B, C, d1, ...)``), whatever ``likelihood`` is passed; ``-1`` for a loss that names its
    likelihood itself (hessdiag's :class:`~hessdiag.losses.Loss`: ``(B, L, C)``); ``None``
    for any other callable: decided from the first batch (see
    ``_OutputCurvature._resolve_class_dim``)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss | nn.NLLLoss):
        return 1
    if getattr(loss_fn, "likelihood", None) in LIKELIHOODS:
        return -1
    return None


def _likelihood_value(kind: str | None, f: Tensor, targets: Tensor, dim: int) -> Tensor:
    """The mean cross-entropy (or NLL) of outputs ``f`` with classes on ``dim``."""
    x = f if dim == 1 else f.movedim(-1, 1)
    fn = nn.functional.cross_entropy if kind == "cross-entropy" else nn.functional.nll_loss
    return fn(x, targets.to(f.device), ignore_index=IGNORE_INDEX)


def _tensor_outputs(outputs: Any, loss_fn: Any) -> Tensor:
    """The tensor of the model's outputs the matrices are of: the loss's own choice for a
    hessdiag :class:`~hessdiag.losses.Loss` with ``output`` set, else the rule of
    :func:`hessdiag.outputs.select_output` (``logits``, else the first tensor)."""
    if isinstance(outputs, Tensor):
        return outputs
    return select_output(outputs, getattr(loss_fn, "output", None))


def _name(loss_fn: Any) -> str:
    spec = getattr(loss_fn, "spec", None)
    return f"loss {spec}" if isinstance(spec, str) else f"loss_fn {type(loss_fn).__name__}"
