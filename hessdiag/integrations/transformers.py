"""Sharpness during a Hugging Face ``transformers.Trainer`` run: :class:`SharpnessCallback`.

Every ``every`` optimizer steps (``state.global_step``, and at step 0 when training
begins) it measures on a fixed measurement batch what
:class:`hessdiag.monitor.SharpnessMonitor` measures, at the weights after that many steps,
and logs it with the Trainer's own ``log``: the values appear in ``state.log_history``
(with their ``step``) and reach every ``report_to`` integration (TensorBoard writes them
as ``train/hessdiag/lambda_max``, ...), and go into a hessdiag store when one is given.

The loss whose Hessian is measured (``loss=``):

``"model"`` (default)  the model's own loss, ``outputs.loss``, computed from the
                       ``labels`` inside the inputs: exactly what the Trainer optimises
                       (GPT-2's shift of the labels by one token included)
a hessdiag loss name   e.g. ``"cross-entropy"``, on the outputs' ``logits`` (the rule of
                       :func:`hessdiag.outputs.select_output`) against the ``labels``
                       taken out of the inputs (no shift: give labels aligned with the
                       logits); batches weighted by their loss terms (labels not -100)
a callable             ``loss(outputs, labels)`` on the outputs as they are, with the
                       labels taken out of the inputs

Needs ``transformers`` (``pip install 'hessdiag[transformers]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from hessdiag.monitor import DEFAULT_EVERY, SharpnessMonitor

try:
    import transformers

    _Callback: Any = transformers.TrainerCallback
except ImportError:  # the module imports; the callback says what is missing
    transformers = None
    _Callback = object

__all__ = ["SharpnessCallback", "measurement_batches", "model_loss"]


def model_loss(outputs: Any, targets: Any = None) -> Tensor:
    """The loss the model computed itself: ``outputs.loss`` (a ``ModelOutput`` or a dict
    with ``loss``), or the first element of a tuple (``return_dict=False``)."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss",
                                                                            None)
    if loss is None and isinstance(outputs, tuple | list) and outputs:
        loss = outputs[0]
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ValueError("the model returned no loss: with loss='model' the measurement "
                         "inputs must hold the labels (e.g. batch['labels'])")
    return loss


def measurement_batches(batches: Any, loss: Any = "model", labels_key: str = "labels"
                        ) -> tuple[list[tuple[Any, Any]], Callable[[Any, Any], Tensor]]:
    """``(batches, loss_fn)`` for :class:`hessdiag.monitor.SharpnessMonitor` from a batch
    of model inputs as the Trainer's collator gives them (a dict with ``labels_key``), or a
    list of them. ``loss="model"``: the inputs keep their labels (the model computes its
    loss) and the labels also serve as targets, whose first dimension weights batches;
    else the labels are taken out of the inputs and are the targets of ``loss``."""
    if isinstance(batches, Mapping):
        batches = [batches]
    pairs = []
    for batch in batches:
        if not isinstance(batch, Mapping) or labels_key not in batch:
            raise ValueError(f"a measurement batch must be a dict of model inputs holding "
                             f"{labels_key!r} (as the Trainer's data collator gives them)")
        if loss == "model":
            pairs.append((dict(batch), batch[labels_key]))
        else:
            inputs = {k: v for k, v in batch.items() if k != labels_key}
            pairs.append((inputs, batch[labels_key]))
    if loss == "model":
        return pairs, model_loss
    if isinstance(loss, str):  # a built-in loss takes the outputs' logits itself
        from hessdiag.losses import resolve_loss

        return pairs, resolve_loss(loss)
    if not callable(loss):
        raise ValueError(f"loss must be 'model', a hessdiag loss name or a callable "
                         f"loss(outputs, labels); got {loss!r}")
    return pairs, loss


def _find_trainer() -> Any:
    """The ``transformers.Trainer`` whose callback handler is calling us (found on the
    call stack), or ``None``."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, transformers.Trainer):
            return candidate
        frame = frame.f_back
    return None


class SharpnessCallback(_Callback):
    """Measure sharpness every ``every`` optimizer steps of ``Trainer.train``.

    ``measure_batch``: a fixed batch of model inputs with their ``labels`` (a dict, as the
    data collator returns it; or a list of such dicts), moved to the model's device.
    ``loss``: ``"model"`` (the model's own ``outputs.loss``), a hessdiag loss name such as
    ``"cross-entropy"`` (on the logits) or a callable ``loss(outputs, labels)``. The
    optimizer is the Trainer's (AdamW by default: the row holds the preconditioned
    sharpness and its stability ratio). ``store`` and ``run``: also log into a hessdiag
    store. Other keywords (``trace``, ``alignment``, ``seed``, ``tol``, ...) are
    :class:`hessdiag.monitor.SharpnessMonitor`'s; :attr:`monitor` holds the rows.

    Values are logged with ``trainer.log``; the Trainer is found when the callback is
    first called (or bound with :meth:`bind`). Without one, the values are appended to
    ``state.log_history`` only.
    """

    def __init__(self, measure_batch: Any, *, loss: Any = "model",
                 every: int = DEFAULT_EVERY,
                 labels_key: str = "labels", store: Any = None, run: str | None = None,
                 **monitor_kwargs: Any) -> None:
        if transformers is None:
            raise ImportError("SharpnessCallback needs Hugging Face transformers: pip "
                              "install 'hessdiag[transformers]'")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer of at least 1; got {every!r}")
        self.batches, self.loss_fn = measurement_batches(measure_batch, loss, labels_key)
        self.loss_spec = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        self.every, self.store, self.run = every, store, run
        self.monitor_kwargs = monitor_kwargs
        self.monitor: SharpnessMonitor | None = None
        self.trainer: Any = None
        self._state: Any = None

    def bind(self, trainer: Any) -> SharpnessCallback:
        """Log through this ``trainer`` (found on the call stack when not bound)."""
        self.trainer = trainer
        return self

    def _log(self, values: dict[str, float], step: int) -> None:
        if self.trainer is not None and self.trainer.state.global_step == step:
            self.trainer.log(dict(values))
        elif self._state is not None:
            self._state.log_history.append({**values, "step": step})

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        from hessdiag.data import to_device

        if self.trainer is None:
            self.trainer = _find_trainer()
        self._state = state
        device = next(model.parameters()).device
        self.monitor = SharpnessMonitor(
            model, self.loss_fn, to_device(self.batches, device), optimizer=optimizer,
            every=self.every, store=self.store, run=self.run, log_fn=self._log,
            config={"model": type(model).__name__, "framework": "transformers",
                    "loss": self.loss_spec}, **self.monitor_kwargs)
        if state.is_world_process_zero:
            self.monitor.step(state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is None or not state.is_world_process_zero:
            return
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            self.monitor.optimizer = optimizer
        self.monitor.step(state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
               **kwargs: Any) -> None:
        # the training loss the Trainer logs goes to the store's metrics table
        if (self.monitor is not None and self.store is not None and logs
                and isinstance(logs.get("loss"), int | float)):
            self.monitor._metric_row(state.global_step, float(logs["loss"]), None)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()
