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

    cb = SharpnessCallback((x_fixed, y_fixed), nn.CrossEntropyLoss(), every=100)
    lightning.pytorch.Trainer(callbacks=[cb]).fit(module, loader)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from hessdiag.monitor import SharpnessMonitor

__all__ = ["SharpnessCallback"]


class SharpnessCallback(pl.Callback):
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
                 every: int = 100, model: Any = None, store: Any = None,
                 run: str | None = None, **monitor_kwargs: Any) -> None:
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer of at least 1; got {every!r}")
        self.measure_batches, self.loss_fn, self.every = measure_batches, loss_fn, every
        self.model, self.store, self.run = model, store, run
        self.monitor_kwargs = monitor_kwargs
        self.monitor: SharpnessMonitor | None = None

    def _log(self, trainer: pl.Trainer) -> Callable[[dict[str, float], int], None]:
        def log(values: dict[str, float], step: int) -> None:
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(values, step=step)
        return log

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from hessdiag.data import to_device

        model = self.model if self.model is not None else pl_module
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        batches = to_device(self.measure_batches, pl_module.device)
        self.monitor = SharpnessMonitor(
            model, self.loss_fn, batches, optimizer=optimizer, every=self.every,
            store=self.store, run=self.run, log_fn=self._log(trainer),
            config={"model": type(model).__name__, "framework": "lightning"},
            **self.monitor_kwargs)
        self.monitor.step(trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.monitor is None:
            return
        loss = _loss_of(outputs)
        self.monitor.step(trainer.global_step, loss=loss)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
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
