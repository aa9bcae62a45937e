"""Losses by name: what a task's model is trained and measured with.

``resolve_loss(spec)`` returns a :class:`Loss`: ``loss(outputs, targets)`` is a scalar,
the **mean** over the terms of the batch, and ``loss.count(targets)`` is how many terms
that mean is over. Curvature over several batches weights each batch by its count, so
the Hessian is always that of the mean over all terms of all batches: samples for a
per-sample loss, real (non-padding) tokens for a per-token loss.

=================  ==========================================================================
name               definition
=================  ==========================================================================
``cross-entropy``  softmax cross-entropy; outputs ``(N, C)`` with integer targets ``(N,)``,
                   or per token: outputs ``(B, L, C)`` with targets ``(B, L)``; targets equal
                   to ``-100`` (padding) are left out of the mean and of the count.
``nll``            the same on log-probabilities (``nn.NLLLoss``).
``bce``            binary cross-entropy on logits (``BCEWithLogitsLoss``); float targets in
                   [0, 1] of the outputs' shape; mean over all entries, count = samples.
``mse``            mean squared error over all entries; targets of the outputs' shape (a
                   target ``(N,)`` is compared with outputs ``(N, 1)``); count = samples.
=================  ==========================================================================

``package.module:factory`` or ``path/to/file.py:factory`` names a function called with no
arguments that returns ``loss_fn(outputs, targets) -> scalar`` (the mean over the batch).
If the returned object has a ``count(targets) -> int`` method, batches are weighted by it
(e.g. the number of real tokens); otherwise by the batch's number of samples, the first
dimension of the targets.

Accuracy is reported only where it means something: ``cross-entropy`` and ``nll``
(argmax of the last dimension, padding left out) and ``bce`` (logit > 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from hessdiag._errors import InputError
from hessdiag.outputs import select_output, validate_key
from hessdiag.specs import call_factory, is_factory_spec, load_factory

IGNORE_INDEX = -100
NAMES = ("cross-entropy", "nll", "bce", "mse")


@dataclass(frozen=True)
class Loss:
    """A mean loss with the count of terms it averages over.

    ``spec`` is the name it was resolved from (stored with every result);
    ``classification`` says whether accuracy means something for it; ``likelihood`` names
    the built-in loss it is exactly (``cross-entropy``, ``nll``, ``bce``, ``mse``), which the
    Gauss-Newton and Fisher operators need for their closed forms and sampled targets, and is
    ``None`` for anything else (label smoothing, factories).

    A built-in loss takes one tensor of the model's outputs, chosen by
    :func:`hessdiag.outputs.select_output` (``logits`` of a ``ModelOutput`` or dict, else
    its first tensor; ``output`` names another key or a tuple index). A factory's loss
    (``raw``) receives the outputs as they are unless ``output`` is given.
    """

    spec: str
    fn: Callable[[Any, Any], Tensor]
    count_fn: Callable[[Any], int]
    classification: bool
    accuracy_fn: Callable[[Any, Any], tuple[int, int]] | None = None
    likelihood: str | None = None
    output: str | None = None
    raw: bool = False

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        return self.fn(self.outputs(outputs), targets)

    def outputs(self, outputs: Any) -> Any:
        """The part of the model's ``outputs`` this loss takes (see the class docstring)."""
        if isinstance(outputs, Tensor) or (self.raw and self.output is None):
            return outputs
        return select_output(outputs, self.output)

    def selecting(self, output: str | None) -> Loss:
        """This loss taking the model's output ``output`` (a key or a tuple index)."""
        return replace(self, output=validate_key(output))

    @property
    def reduction(self) -> str:
        """``"sum"`` when the loss function is sum-reduced (an ``nn`` loss with
        ``reduction="sum"`` from a factory): operators and forward measures then divide its
        sum by the count instead of weighting its value by it. ``"mean"`` otherwise."""
        return "sum" if getattr(self.fn, "reduction", "mean") == "sum" else "mean"

    def count(self, targets: Any) -> int:
        """Terms the batch's mean is over (the batch's weight in a mean over batches)."""
        return int(self.count_fn(targets))

    def batch_weight(self, inputs: Any, targets: Any) -> int:
        """The count, in the ``(inputs, targets)`` form curvature operators call."""
        return self.count(targets)

    def accuracy_counts(self, outputs: Any, targets: Any) -> tuple[int, int] | None:
        """``(correct, counted)`` for classification losses; ``None`` otherwise."""
        if self.accuracy_fn is None:
            return None
        return self.accuracy_fn(self.outputs(outputs).detach(), targets)


# --------------------------------------------------------------------------- built-ins


def _class_targets(name: str, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs as ``(terms, C)`` and targets as ``(terms,)`` for a classification loss."""
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        what = (f"float targets of shape {tuple(targets.shape)}"
                if isinstance(targets, Tensor) else type(targets).__name__)
        raise InputError(f"loss {name} needs integer class targets; the data has {what} "
                         "(a regression target? use loss mse)", param="loss")
    if not isinstance(outputs, Tensor) or outputs.dim() < 1:
        raise InputError(f"loss {name} needs outputs of shape (N, classes) or (B, L, classes); "
                         f"the model returned {_describe(outputs)}", param="loss")
    if tuple(outputs.shape[:-1]) != tuple(targets.shape):
        raise InputError(f"the model's outputs {tuple(outputs.shape)} do not fit loss {name} "
                         f"with targets {tuple(targets.shape)}: it needs outputs of the "
                         "targets' shape plus a last dimension of classes", param="loss")
    return outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1)


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    out, tgt = _class_targets("cross-entropy", outputs, targets)
    return nn.functional.cross_entropy(out, tgt, ignore_index=IGNORE_INDEX)


def _nll(outputs: Tensor, targets: Tensor) -> Tensor:
    out, tgt = _class_targets("nll", outputs, targets)
    return nn.functional.nll_loss(out, tgt, ignore_index=IGNORE_INDEX)


def _real_terms(targets: Tensor) -> int:
    return int((targets != IGNORE_INDEX).sum())


def _argmax_accuracy(outputs: Tensor, targets: Tensor) -> tuple[int, int]:
    keep = targets != IGNORE_INDEX
    correct = (outputs.argmax(-1) == targets) & keep
    return int(correct.sum()), int(keep.sum())


def _matched(name: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Targets in the outputs' shape (``(N,)`` against ``(N, 1)`` is allowed), as floats."""
    if not isinstance(targets, Tensor) or not isinstance(outputs, Tensor):
        raise InputError(f"loss {name} needs tensor outputs and targets; got "
                         f"{_describe(outputs)} and {_describe(targets)}", param="loss")
    if tuple(outputs.shape) != tuple(targets.shape):
        if (outputs.dim() >= 1 and targets.dim() >= 1 and outputs.shape[0] == targets.shape[0]
                and outputs.numel() == targets.numel()):
            targets = targets.reshape(outputs.shape)
        else:
            raise InputError(f"the model's outputs {tuple(outputs.shape)} do not fit loss {name} "
                             f"with targets {tuple(targets.shape)}: they need the same shape",
                             param="loss")
    return targets.to(outputs.dtype)


# written out rather than nn.functional.mse_loss / binary_cross_entropy_with_logits: their
# backward formulas fail under forward-over-reverse differentiation in torch 2.14
# ("ZeroTensors are immutable") when the targets carry no tangent


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs - _matched("mse", outputs, targets)).square().mean()


def _bce(outputs: Tensor, targets: Tensor) -> Tensor:
    # log(1 + e^x) - t x, the logits form of -t log(s) - (1 - t) log(1 - s)
    return (nn.functional.softplus(outputs) - _matched("bce", outputs, targets) * outputs).mean()


def _bce_accuracy(outputs: Tensor, targets: Tensor) -> tuple[int, int]:
    t = targets.reshape(outputs.shape)
    return int(((outputs > 0) == (t > 0.5)).sum()), int(t.numel())


def _samples(targets: Any) -> int:
    if isinstance(targets, Tensor):
        return int(targets.shape[0]) if targets.dim() else 1
    return len(targets)


def cross_entropy(label_smoothing: float = 0.0) -> Loss:
    """``cross-entropy``, optionally with label smoothing (training only)."""
    if label_smoothing == 0:
        return Loss("cross-entropy", _cross_entropy, _real_terms, True, _argmax_accuracy,
                    likelihood="cross-entropy")

    def smoothed(outputs: Tensor, targets: Tensor) -> Tensor:
        out, tgt = _class_targets("cross-entropy", outputs, targets)
        return nn.functional.cross_entropy(out, tgt, ignore_index=IGNORE_INDEX,
                                           label_smoothing=label_smoothing)

    return Loss("cross-entropy", smoothed, _real_terms, True, _argmax_accuracy)


_BUILTIN: dict[str, Callable[[], Loss]] = {
    "cross-entropy": cross_entropy,
    "nll": lambda: Loss("nll", _nll, _real_terms, True, _argmax_accuracy, likelihood="nll"),
    "bce": lambda: Loss("bce", _bce, _samples, True, _bce_accuracy, likelihood="bce"),
    "mse": lambda: Loss("mse", _mse, _samples, False, None, likelihood="mse"),
}
_ALIASES = {"ce": "cross-entropy", "crossentropy": "cross-entropy", "cross_entropy":
            "cross-entropy", "l2": "mse"}


def resolve_loss(spec: str | Loss | None, default: str = "cross-entropy",
                 output: str | None = None) -> Loss:
    """The :class:`Loss` named by ``spec`` (see the module docstring); ``None`` gives
    ``default``. A :class:`Loss` is returned as it is. ``output`` (a key or a tuple index)
    chooses the model output it takes (:meth:`Loss.selecting`)."""
    loss = _named_loss(spec, default)
    return loss if output is None else loss.selecting(output)


def _named_loss(spec: str | Loss | None, default: str) -> Loss:
    if isinstance(spec, Loss):
        return spec
    if spec is None:
        spec = default
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"loss must be a name or a factory spec; got {spec!r}", param="loss")
    spec = spec.strip()
    name = _ALIASES.get(spec.lower(), spec.lower())
    if name in _BUILTIN:
        return _BUILTIN[name]()
    if is_factory_spec(spec):
        return _from_factory(spec)
    raise InputError(f"unknown loss {spec!r}; known: {', '.join(NAMES)}; or give "
                     "package.module:factory or path/to/file.py:factory", param="loss")


def _from_factory(spec: str) -> Loss:
    fn = call_factory(load_factory(spec, "loss"), spec, "loss")
    if not callable(fn):
        raise InputError(f"loss spec {spec!r}: the factory returned a {type(fn).__name__}, not "
                         "a callable loss_fn(outputs, targets)", param="loss")
    count = getattr(fn, "count", None)
    return Loss(spec, fn, count if callable(count) else _samples, False, None, raw=True)


def check_loss_output(loss: Loss, value: Any) -> Tensor:
    """``value`` if it is a finite-or-not scalar tensor; :class:`InputError` otherwise."""
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise InputError(f"loss {loss.spec} returned {shape}, not a scalar: it must return "
                         "the mean over the batch", param="loss")
    return value


def _describe(obj: Any) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


__all__ = ["IGNORE_INDEX", "NAMES", "Loss", "check_loss_output", "cross_entropy", "resolve_loss"]

