"""Sharpness inside any training loop: :class:`SharpnessMonitor`.

Every ``every`` steps the monitor measures, on a fixed measurement set and at the weights
of that moment, the top Hessian eigenvalue ``lambda_max`` of the training loss with its
residual norm and converged flag (Lanczos in eval mode, from the seeded random start, or
with ``warm_start=True`` from the previous eigenvector), and beside it what the optimizer
makes of it:

* ``torch.optim.SGD`` (plain, heavy-ball or Nesterov momentum; SAM and Eigen-SAM around
  one): ``threshold`` (``2/lr``, ``2(1+beta)/lr``, ``2(1+beta)/((1+2 beta) lr)``,
  :mod:`hessdiag.stability`) at the optimizer's current learning rate and ``stability =
  lambda_max / threshold`` (1 at the edge of stability);
* ``torch.optim.Adam``/``AdamW`` (or SAM around one): the preconditioned sharpness
  ``lambda_max(P^-1 H)`` with Adam's bias-corrected preconditioner read from the live
  optimizer (:mod:`hessdiag.curvature.preconditioned`), its residual and converged flag,
  ``threshold = (2 + 2 beta1) / ((1 - beta1) lr)`` and ``stability`` =
  ``preconditioned_lambda_max / threshold``;
* with ``trace=True``, the Hutchinson trace of ``H`` with its standard error
  (``trace_probes`` Rademacher probes, seeded);
* for SAM-type optimizers (:class:`hessdiag.optim.SAM`, :class:`hessdiag.optim.EigenSAM`,
  anything with ``perturbation_vector()``) and with ``alignment=True`` for any other,
  ``alignment = |cos(e, v)|`` and ``alignment_signed`` between the last perturbation
  ``e`` (without one: the gradient in ``.grad``) and the top eigenvector ``v``.

Measuring changes nothing: weights, gradients, the modules' train/eval flags, buffers
(BatchNorm running statistics) and every random state are as before (Hessian-vector
products run on the weights through ``torch.func`` in eval mode; the probes draw from
their own seeded generators). What it costs: about 4 to 8 Hessian-vector products on
the measurement set per measurement (``docs/benchmarks.md``). A random start costs
no more than a warm one at intervals of ~100 steps: the top eigenvector moves between
measurements, so the warm start saves few iterations, and an explicit start vector is
followed by a check for eigenvalues its Krylov space missed (measured on the digits MLP
and CNN at every=100: 5-9 products from a random start, 12-25 warm-started).

Each measurement is a row: it is returned, kept in :attr:`SharpnessMonitor.history`,
written to TensorBoard (``hessdiag/lambda_max``, ``hessdiag/stability_ratio``,
``hessdiag/trace``, ``hessdiag/alignment``, ...: :data:`TENSORBOARD_TAGS`), handed to
``log_fn`` (the Lightning and Hugging Face callbacks' way into their loggers) and, with a
store, appended to a run's ``sharpness`` table, the layout ``hessdiag train`` writes, so
``hessdiag show``, ``plot --what sharpness`` and ``report`` read it. Losses given to
:meth:`SharpnessMonitor.step` go to the run's ``metrics`` table.

:class:`AlignmentProbe` is the monitor reduced to the alignment of a vector you pass,
logged to the run's ``alignment`` table (see ``docs/alignment.md``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from hessdiag.curvature import HessianOperator, hutchinson, lanczos

__all__ = ["DEFAULT_EVERY", "TENSORBOARD_TAGS", "AlignmentProbe", "SharpnessMonitor",
           "alignment_row", "optimizer_settings", "top_eigenpair", "unwrap_optimizer"]

#: The columns of a monitor's ``sharpness`` row and the TensorBoard tag each is logged
#: under (``step`` is the TensorBoard step).
TENSORBOARD_TAGS: dict[str, str] = {
    "lambda_max": "hessdiag/lambda_max",
    "lambda_max_residual": "hessdiag/lambda_max_residual",
    "lambda_max_converged": "hessdiag/lambda_max_converged",
    "stability": "hessdiag/stability_ratio",
    "threshold": "hessdiag/threshold",
    "lr": "hessdiag/lr",
    "preconditioned_lambda_max": "hessdiag/preconditioned_lambda_max",
    "preconditioned_residual": "hessdiag/preconditioned_residual",
    "trace": "hessdiag/trace",
    "trace_stderr": "hessdiag/trace_stderr",
    "alignment": "hessdiag/alignment",
    "alignment_signed": "hessdiag/alignment_signed",
    "hvps": "hessdiag/hvps",
    "seconds": "hessdiag/seconds",
}

#: every column of a monitor's ``sharpness`` row, in order (always all of them: NaN where
#: a measure does not apply, so that every row of the stored table has every column)
COLUMNS = ("step", "lambda_max", "lambda_max_residual", "lambda_max_converged", "hvps",
           "alignment", "alignment_signed", "lr", "threshold", "stability",
           "preconditioned_lambda_max", "preconditioned_residual",
           "preconditioned_converged", "trace", "trace_stderr", "trace_probes", "seconds")

#: the default interval of the monitor and the callbacks: a measurement costs about as
#: much as 12 to 20 training steps when the measurement set is one training batch (the
#: digits MLP and CNN, one CPU thread; ``benchmarks/bench_monitor.py``), so every 500
#: steps adds a few percent to training time
DEFAULT_EVERY = 500

_METRICS = ("step", "epoch", "loss", "acc", "lr", "test_loss", "test_acc")


# --------------------------------------------------------------------------- primitives


def _operator(model: nn.Module, loss_fn: Any, batches: Any, device: Any = None,
              collective: Any = None, mode: str = "auto") -> HessianOperator:
    return HessianOperator(model, loss_fn, batches, device=device, check_determinism=False,
                           batch_size_fn=getattr(loss_fn, "batch_weight", None),
                           collective=collective, mode=mode)


def top_eigenpair(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor],
                  measure_batches: Any, *, v0: Tensor | None = None, tol: float = 1e-3,
                  seed: int = 0, device: torch.device | str | None = None,
                  collective: Any = None) -> tuple[dict[str, float], Tensor]:
    """``lambda_max`` over ``measure_batches`` (Lanczos, warm-started from ``v0``) with its
    residual, and its unit eigenvector (the next warm start). ``collective``: see
    :func:`hessdiag.spectrum.compute_spectrum`."""
    op = _operator(model, loss_fn, measure_batches, device, collective)
    top = lanczos(op, k=1, tol=tol, seed=seed, v0=v0)
    row = {"lambda_max": float(top.eigenvalues[0]),
           "lambda_max_residual": float(top.residuals[0]),
           "lambda_max_converged": float(top.converged[0]), "hvps": float(top.hvps)}
    return row, top.eigenvectors[:, 0].detach()


def alignment_row(e: Tensor | None, v: Tensor) -> dict[str, float]:
    """``alignment`` (``|cos(e, v)|``) and ``alignment_signed``; ``nan`` for no or a zero
    ``e``."""
    cos = math.nan
    if e is not None:
        e = e.to(v)
        norm = float(torch.linalg.vector_norm(e))
        if norm > 0:
            cos = float(e @ v) / norm
    return {"alignment": abs(cos), "alignment_signed": cos}


def _as_flat(value: Any, params: list[nn.Parameter]) -> Tensor:
    """A perturbation or gradient given as a flat tensor, a list of tensors in parameter
    order, a ``{parameter: tensor}`` dict (as ``SAM.last_perturbation``), or ``None``
    meaning the parameters' current ``.grad``."""
    if value is None:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params]).detach()
    if isinstance(value, Tensor):
        return value.detach().reshape(-1)
    if isinstance(value, dict):
        return torch.cat([value.get(p, torch.zeros_like(p)).detach().reshape(-1)
                          for p in params])
    return torch.cat([t.detach().reshape(-1) for t in value])


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside a wrapper that keeps it as ``.optimizer`` (Hugging Face
    Accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``)."""
    while (optimizer is not None and not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW
                                                    | torch.optim.SGD)
           and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer)):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_settings(optimizer: Any) -> dict[str, Any]:
    """What the stability threshold needs from a live optimizer: ``base`` (``sgd``,
    ``adam`` or ``other``), ``optimizer`` (``sgd``, ``sam``, ``eigensam``, ``adam``, ...),
    ``lr`` (the largest of its groups': the conservative ratio when they differ),
    ``momentum``, ``nesterov``, ``beta1``. ``None`` gives ``base`` ``none``."""
    optimizer = unwrap_optimizer(optimizer)
    if optimizer is None:
        return {"base": "none", "optimizer": "none", "lr": math.nan, "momentum": 0.0,
                "nesterov": False, "beta1": math.nan}
    base = getattr(optimizer, "base_optimizer", optimizer)
    groups = list(base.param_groups)
    lr = max((float(g.get("lr", math.nan)) for g in groups), default=math.nan)
    first = groups[0] if groups else {}
    if isinstance(base, torch.optim.Adam | torch.optim.AdamW):
        kind = "adam"
    elif isinstance(base, torch.optim.SGD):
        kind = "sgd"
    else:
        kind = "other"
    name = type(optimizer).__name__.lower()
    return {"base": kind, "optimizer": name if base is not optimizer else kind,
            "lr": lr, "momentum": float(first.get("momentum", 0.0) or 0.0),
            "nesterov": bool(first.get("nesterov", False)),
            "beta1": float(first.get("betas", (math.nan,))[0])}


def _now() -> str:
    from hessdiag.store import now

    return now()


# --------------------------------------------------------------------------- the monitor


class SharpnessMonitor:
    """Measure sharpness every ``every`` steps of your own training loop.

    ``measure_batches``: one ``(inputs, targets)`` batch or a list of them, **fixed** (no
    augmentation, no shuffling): the Hessian is that of the mean loss over all their
    samples (each batch weighted by ``loss_fn.batch_weight`` when the loss has it, else by
    its number of samples). ``loss_fn(outputs, targets)`` returns the mean loss (inputs:
    a tensor, a tuple, or a dict of keyword arguments, see :func:`hessdiag.task.call_model`).

    Call :meth:`step` (or the monitor itself) once per optimizer step with the number of
    steps taken so far; at multiples of ``every`` (step 0 included) it measures and
    returns the row, else returns ``None``. Call it after ``optimizer.step()`` (the row
    is then at the weights after ``step`` updates) or, to pair SAM's perturbation with the
    weights it was computed at, after the first backward and before ``first_step`` as
    :class:`AlignmentProbe` does.

    ``warm_start``: start Lanczos from the previous measurement's eigenvector (checked for
    missed eigenvalues) instead of the seeded random vector; useful at short intervals.
    ``tensorboard``: a ``torch.utils.tensorboard.SummaryWriter`` or a log directory (a
    writer is opened there, and closed by :meth:`close`). ``store`` (a
    :class:`hessdiag.store.Store`) and ``run``: rows go to the run's ``sharpness`` table
    (the run is created at the first measurement, with ``status`` ``running``, and marked
    ``finished`` by :meth:`close`; an existing run of that name is appended to).
    ``log_fn(values, step)``: also hand each row's finite values, keyed by their
    TensorBoard tag, to this callable. ``optimizer`` may be set later
    (``monitor.optimizer = opt``) but before the first measurement.
    """

    table = "sharpness"

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor],
                 measure_batches: Any, *, optimizer: Any = None, every: int = DEFAULT_EVERY,
                 trace: bool = False, trace_probes: int = 20, alignment: bool = False,
                 store: Any = None, run: str | None = None, tensorboard: Any = None,
                 log_fn: Callable[[dict[str, float], int], None] | None = None,
                 seed: int = 0, tol: float = 1e-3, warm_start: bool = False,
                 device: Any = None, config: Mapping[str, Any] | None = None) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer of at least 1; got {every!r}")
        if trace and trace_probes < 2:
            raise ValueError(f"trace_probes must be at least 2 (for a standard error); got "
                             f"{trace_probes}")
        if store is not None and not run:
            raise ValueError(f"{type(self).__name__} with a store needs run= (the run id to "
                             "log to)")
        self.model, self.loss_fn = model, loss_fn
        self.batches = measure_batches
        self.optimizer, self.every, self.trace = optimizer, every, bool(trace)
        self.trace_probes, self.alignment = int(trace_probes), bool(alignment)
        self.store, self.run, self.seed, self.tol, self.device = store, run, seed, tol, device
        self.log_fn, self.config = log_fn, dict(config or {})
        self.warm_start = bool(warm_start)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.vector: Tensor | None = None  # the last top eigenvector (alignment, warm start)
        self.preconditioned_vector: Tensor | None = None
        self.history: list[dict[str, float]] = []
        self._writer, self._own_writer = None, False
        if tensorboard is not None:
            if hasattr(tensorboard, "add_scalar"):
                self._writer = tensorboard
            else:
                from torch.utils.tensorboard import SummaryWriter  # only when asked for

                self._writer, self._own_writer = SummaryWriter(str(tensorboard)), True
        self._started = False
        self._samples: int | None = None
        self._mode = "auto"
        self._closed = False
        self._measured: set[int] = set()
        self._metrics: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ public
    def __call__(self, step: int, **kwargs: Any) -> dict[str, float] | None:
        return self.step(step, **kwargs)

    def due(self, step: int) -> bool:
        """Whether :meth:`step` measures at ``step`` (a multiple of ``every`` not yet
        measured)."""
        return step % self.every == 0 and step not in self._measured

    def step(self, step: int, *, perturbation: Any = None, loss: float | None = None,
             acc: float | None = None) -> dict[str, float] | None:
        """Measure at multiples of ``every`` (once per step number); returns the row or
        ``None``. ``perturbation``: the vector whose alignment is measured (a flat tensor,
        a list in parameter order, or a ``{parameter: tensor}`` dict), by default SAM's
        last perturbation, or, with ``alignment=True``, the gradient in ``.grad``.
        ``loss`` (and ``acc``): the step's training loss, kept for the run's ``metrics``
        table (with a store; written at the next measurement or :meth:`close`)."""
        step = int(step)
        if loss is not None and self.store is not None:
            self._metric_row(step, loss, acc)
        if not self.due(step):
            return None
        row = self.measure(step, perturbation=perturbation)
        self.log(row)
        return row

    def measure(self, step: int, *, perturbation: Any = None) -> dict[str, float]:
        """Measure now, whatever the step (not logged: see :meth:`log`)."""
        start = time.perf_counter()
        self._measured.add(int(step))
        row: dict[str, float] = dict.fromkeys(COLUMNS, math.nan)
        row["step"] = float(step)
        # the product mode "auto" picks at the first measurement is kept (no re-timing)
        op = _operator(self.model, self.loss_fn, self.batches, self.device, mode=self._mode)
        top = lanczos(op, k=1, tol=self.tol, seed=self.seed,
                      v0=self.vector if self.warm_start else None)
        self._samples, self._mode = op.n_samples, op.mode
        self.vector = top.eigenvectors[:, 0].detach()
        row.update(lambda_max=float(top.eigenvalues[0]),
                   lambda_max_residual=float(top.residuals[0]),
                   lambda_max_converged=float(top.converged[0]))
        e = self._perturbation(perturbation)
        if e is not None:
            row.update(alignment_row(e, self.vector))
        settings = optimizer_settings(self.optimizer)
        row["lr"] = settings["lr"]
        if settings["base"] == "sgd" and settings["lr"] > 0:
            from hessdiag.stability import sgd_threshold

            row["threshold"] = float(sgd_threshold(settings["lr"], settings["momentum"],
                                                   settings["nesterov"]))
            row["stability"] = row["lambda_max"] / row["threshold"]
        elif settings["base"] == "adam":
            row.update(self._preconditioned(op))
        if self.trace:
            tr = hutchinson(op, self.trace_probes, seed=self.seed)
            row.update(trace=float(tr.estimate), trace_stderr=float(tr.stderr),
                       trace_probes=float(self.trace_probes))
        row["hvps"] = float(op.hvp_count)
        row["seconds"] = time.perf_counter() - start
        self.history.append(row)
        return row

    def log(self, row: Mapping[str, float]) -> None:
        """Write a row to TensorBoard, ``log_fn`` and the store."""
        step = int(row["step"])
        tagged = {tag: float(row[key]) for key, tag in TENSORBOARD_TAGS.items()
                  if key in row and math.isfinite(row[key])}
        if self._writer is not None:
            for tag, value in tagged.items():
                self._writer.add_scalar(tag, value, step)
            self._writer.flush()
        if self.log_fn is not None:
            self.log_fn(tagged, step)
        if self.store is not None:
            self._start_run()
            self.store.append_run(self.run, {self.table: {k: [row[k]] for k in row},
                                             **self._take_metrics()})

    def close(self, status: str = "finished") -> None:
        """Write what is pending, mark the run ``status`` (``finished``) and close a
        TensorBoard writer the monitor opened. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.store is not None:
            self._start_run()
            self.store.append_run(self.run, self._take_metrics(),
                                  attrs={"status": status, "finished": _now()})
        if self._writer is not None:
            self._writer.flush()
            if self._own_writer:
                self._writer.close()

    def __enter__(self) -> SharpnessMonitor:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("finished" if exc_type is None else "stopped")

    # ------------------------------------------------------------------ parts
    def _perturbation(self, given: Any) -> Tensor | None:
        if given is not None:
            return _as_flat(given, self.params)
        vector = getattr(unwrap_optimizer(self.optimizer), "perturbation_vector", None)
        if callable(vector):
            e = vector()
            if e is not None:
                return e.detach()
        if self.alignment:
            return _as_flat(None, self.params)
        return None

    def _preconditioned(self, op: Any) -> dict[str, float]:
        from hessdiag.curvature.preconditioned import PreconditionedOperator, adam_preconditioner
        from hessdiag.stability import adam_threshold

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        try:
            diagonal, info = adam_preconditioner(unwrap_optimizer(self.optimizer), named,
                                                 [n for n, _ in named])
        except ValueError:  # before Adam's first step: no preconditioner yet
            return {}
        pop = PreconditionedOperator(op, diagonal, info)
        top = lanczos(pop, k=1, tol=self.tol, seed=self.seed,
                      v0=self.preconditioned_vector if self.warm_start else None)
        self.preconditioned_vector = top.eigenvectors[:, 0].detach()
        threshold = float(adam_threshold(info["lr"], info["beta1"]))
        value = float(top.eigenvalues[0])
        return {"preconditioned_lambda_max": value,
                "preconditioned_residual": float(top.residuals[0]),
                "preconditioned_converged": float(top.converged[0]),
                "threshold": threshold, "stability": value / threshold, "lr": info["lr"]}

    def _metric_row(self, step: int, loss: float, acc: float | None) -> None:
        row = dict.fromkeys(_METRICS, math.nan)
        row.update(step=float(step), loss=float(loss),
                   acc=math.nan if acc is None else float(acc),
                   lr=optimizer_settings(self.optimizer)["lr"])
        for key, value in row.items():
            self._metrics.setdefault(key, []).append(value)

    def _take_metrics(self) -> dict[str, dict[str, list[float]]]:
        metrics, self._metrics = self._metrics, {}
        return {"metrics": metrics} if metrics else {}

    def _run_attrs(self) -> dict[str, Any]:
        settings = optimizer_settings(self.optimizer)
        config = {"model": type(self.model).__name__, "optimizer": settings["optimizer"],
                  "base": settings["base"], "lr": settings["lr"],
                  "momentum": settings["momentum"], "nesterov": settings["nesterov"],
                  "seed": self.seed, "sharpness_every": self.every, **self.config}
        return {"kind": "external", "status": "running", "started": _now(),
                "config": config, "optimizer": config["optimizer"], "seed": self.seed,
                "monitor": {"every": self.every, "tol": self.tol, "seed": self.seed,
                            "warm_start": self.warm_start,
                            "trace": self.trace, "trace_probes": self.trace_probes,
                            "measure_samples": self._samples}}

    def _start_run(self) -> None:
        if self._started:
            return
        self._started = True
        if self.run not in {r.id for r in self.store.runs()}:
            self.store.create_run(self.run, self._run_attrs())
        else:
            self.store.append_run(self.run, {}, attrs={"status": "running"})


# --------------------------------------------------------------------------- the probe


class AlignmentProbe(SharpnessMonitor):
    """Record the alignment of your optimizer's perturbation with the top Hessian
    eigenvector inside your own training loop, without changing training.

    Every ``every`` steps, :meth:`probe` computes the top eigenvector of the Hessian over
    ``measure_batches`` (Lanczos, warm-started from the previous one, in eval mode, on a
    copy of the weights) and the cosine with the vector you pass. It touches neither the
    weights, their gradients, the model's modes, BatchNorm statistics nor any random
    state. With ``store`` (a :class:`hessdiag.store.Store`) and ``run``, rows go to the
    run's ``alignment`` table (the run is created if the store does not have it).

    Call it where the weights are the unperturbed ``w``: after the first backward and
    before ``first_step``. Pass nothing to use the gradient in ``.grad``: SAM's
    perturbation is parallel to it, so that is the alignment of SAM's ``e``. Any other
    vector (a flat tensor, a list in parameter order, or a ``{parameter: tensor}`` dict)
    is measured the same way. (:class:`SharpnessMonitor` measures the same and more.)

    >>> probe = AlignmentProbe(model, loss_fn, measure_batches, every=100,
    ...                        store=Store("hessdiag.h5"), run="my-sam-run")  # doctest: +SKIP
    >>> for step, (x, y) in enumerate(loader):                                # doctest: +SKIP
    ...     loss_fn(model(x), y).backward()
    ...     probe.probe(step)                             # alignment of e = rho g / ||g||
    ...     opt.first_step(zero_grad=True)
    ...     loss_fn(model(x), y).backward()
    ...     opt.second_step(zero_grad=True)
    """

    table = "alignment"

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor],
                 measure_batches: Any, *, every: int = 100, store: Any = None,
                 run: str | None = None, tol: float = 1e-3, seed: int = 0) -> None:
        super().__init__(model, loss_fn, measure_batches, every=every, store=store, run=run,
                         tol=tol, seed=seed, alignment=True)
        self.batches = measure_batches  # as given, exactly as before
        if store is not None:
            self._started = True
            if run not in {r.id for r in store.runs()}:
                store.create_run(run, {"kind": "external", "status": "running",
                                       "probe_every": every})

    def probe(self, step: int, perturbation_or_grad: Any = None) -> dict[str, float] | None:
        """Measure at steps that are multiples of ``every``; returns the row (``step``,
        ``alignment``, ``alignment_signed``, ``lambda_max``, residual, HVPs) or ``None``.
        ``perturbation_or_grad``: see :func:`_as_flat` (``None``: the current ``.grad``)."""
        if step % self.every != 0:
            return None
        e = _as_flat(perturbation_or_grad, self.params)
        measured, self.vector = top_eigenpair(self.model, self.loss_fn, self.batches,
                                              v0=self.vector, tol=self.tol, seed=self.seed)
        row = {"step": float(step), **alignment_row(e, self.vector), **measured}
        self.history.append(row)
        if self.store is not None:
            self.store.append_run(self.run, {"alignment": {k: [v_] for k, v_ in row.items()}})
        return row
