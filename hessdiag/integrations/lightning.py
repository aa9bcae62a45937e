"""Sharpness during ``lightning.pytorch.Trainer.fit``: :class:`SharpnessCallback`.

Every ``every`` optimizer steps (``trainer.global_step``, and at step 0 when training
starts) it measures on a fixed measurement batch what
:class:`hessdiag.monitor.SharpnessMonitor` measures (``lambda_max`` with its residual, the
optimizer's stability ratio, optionally the trace and the alignment), at the weights after
that many steps, and logs it through every logger of the trainer (``trainer.loggers``:
TensorBoard, CSV, Weights & Biases, ...) at that step, under ``hessdiag/...`` tags, and
into a hessdiag store when one is given. Needs ``lightning`` (``pip install
'hessdiag[lightning]'``)::

    from hessdiag.integrations.lightning import SharpnessCallback

    cb = SharpnessCallback((x_fixed, y_fixed), nn.CrossEntropyLoss(), every=500)
    lightning.pytorch.Trainer(callbacks=[cb]).fit(module, loader)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from hessdiag.monitor import DEFAULT_EVERY, SharpnessMonitor

try:
    import lightning.pytorch as pl

    _Callback: Any = pl.Callback
except ImportError:  # the module imports; the callback says what is missing
    pl = None
    _Callback = object

__all__ = ["SharpnessCallback"]


class SharpnessCallback(_Callback):
    """Measure sharpness every ``every`` optimizer steps of ``Trainer.fit``.

    ``measure_batches``: a fixed ``(inputs, targets)`` batch (or a list of them) on which
    ``loss_fn(pl_module(inputs), targets)`` is the mean training loss; it is moved to the
    module's device. ``model``: the module whose Hessian is measured (default: the
    ``LightningModule`` itself, called as ``pl_module(inputs)``). The optimizer is the
    trainer's first (for its stability threshold and SAM's perturbation). ``store`` and
    ``run``: also log into a hessdiag store (the run is marked finished when training
    ends). Other keywords (``trace``, ``alignment``, ``seed``, ``tol``, ...) are
    :class:`hessdiag.monitor.SharpnessMonitor`'s. :attr:`monitor` holds the rows
    (``monitor.history``).
    """

    def __init__(self, measure_batches: Any, loss_fn: Callable[[Any, Any], Tensor], *,
                 every: int = DEFAULT_EVERY, model: Any = None, store: Any = None,
                 run: str | None = None, **monitor_kwargs: Any) -> None:
        if pl is None:
            raise ImportError("SharpnessCallback needs PyTorch Lightning: pip install "
                              "'hessdiag[lightning]'")
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer of at least 1; got {every!r}")
        self.measure_batches, self.loss_fn, self.every = measure_batches, loss_fn, every
        self.model, self.store, self.run = model, store, run
        self.monitor_kwargs = monitor_kwargs
        self.monitor: SharpnessMonitor | None = None
        self._last_step: int | None = None

    def _log(self, trainer: Any) -> Callable[[dict[str, float], int], None]:
        def log(values: dict[str, float], step: int) -> None:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
        return log

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from hessdiag.data import to_device

        if not trainer.is_global_zero:
            return  # one process measures and logs (the weights are the same on all)

        model = self.model if self.model is not None else pl_module
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        batches = to_device(self.measure_batches, pl_module.device)
        self.monitor = SharpnessMonitor(
            model, self.loss_fn, batches, optimizer=optimizer, every=self.every,
            store=self.store, run=self.run, log_fn=self._log(trainer),
            config={"model": type(model).__name__, "framework": "lightning"},
            **self.monitor_kwargs)
        self._last_step = trainer.global_step
        self.monitor.step(trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is None or trainer.global_step == self._last_step:
            return  # accumulating gradients: no optimizer step since the last call
        self._last_step = trainer.global_step
        self.monitor.step(trainer.global_step, loss=_loss_of(outputs))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: Any, pl_module: Any,
                     exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close("stopped")


def _loss_of(outputs: Any) -> float | None:
    """The training step's loss from what ``training_step`` returned."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    if isinstance(outputs, Tensor) and outputs.numel() == 1:
        return float(outputs.detach())
    return None
