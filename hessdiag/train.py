"""The train workflow: SGD, SAM and Eigen-SAM training and fine-tuning into the store.

Any task trains: a model for the data (built from the data's facts), with the data's
default loss or ``loss`` (:mod:`hessdiag.task`); accuracy is logged where the loss is a
classification loss (``nan`` otherwise). One run is a :class:`TrainConfig`. The loop is
deterministic given the seed: the data order of epoch ``e`` is ``randperm`` from a
generator seeded with ``(seed, e)``, augmentation draws from its own generator, and every
random state is saved in each checkpoint, so a run resumed from its last checkpoint
(``resume``) continues exactly as if never interrupted.

What a run writes:

- checkpoints in hessdiag's format, ``<checkpoint_dir>/<run>/step-NNNNNN.pt``, every
  ``checkpoint_every`` steps and at the end (model, optimizer state, step, epoch, random
  states, config);
- in the store's ``/runs/<run>``: the config, per-step metrics (loss, accuracy, lr; test
  loss and accuracy at epoch ends), every ``sharpness_every`` steps (from step 0, and at
  the last step) ``lambda_max`` of the training loss on a fixed measurement set (the first
  ``sharpness_samples`` training samples; Lanczos in eval mode, with its residual) and
  the alignment ``|<e, v>| / ||e||`` of the step's perturbation ``e`` (SGD: the gradient)
  with the top eigenvector ``v``. Both are measured at the same weights: those of the
  step, after its gradient and before its update (the last step's row, at the final
  weights, has no perturbation and ``nan`` alignment). Each sharpness row also holds the
  step's ``lr``, the ``threshold`` of the run's SGD variant at that lr (``2/lr``,
  ``2(1+beta)/lr`` or, with Nesterov, ``2(1+beta)/((1+2beta)lr)``; NaN for Adam, see
  :mod:`hessdiag.stability`) and ``stability = lambda_max / threshold``. And the
  checkpoints written (step, path, sha256), whose optimizer state names its parameters.

Records are flushed at every checkpoint and every epoch end; a run killed at any moment
keeps all of them (see :mod:`hessdiag.store`).

Resuming (``resume=RUN``): a run whose final checkpoint is recorded is left untouched (the
result says so: ``nothing_to_do``); a run with checkpoints continues from its last
recorded one; a run without one starts again from step 0 with its recorded config.
Everything that can be checked is checked before the run is recorded or any of its rows
dropped: the store, the run name, the task, and that the checkpoint folder can take one
checkpoint (a directory, writable, with the space). A checkpoint or record that cannot be
written during the run (a full disk) is an :class:`InputError` naming it; checkpoints are
written to a temporary file and renamed, and recorded only once in place, so the run's
record ends at its last good checkpoint and the run stays resumable.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessdiag._errors import InputError
from hessdiag.align import alignment_row, top_eigenpair
from hessdiag.checkpoints import save_checkpoint
from hessdiag.curvature.preconditioned import name_optimizer_state
from hessdiag.data import batch_of, fixed_batches, load_dataset, to_device
from hessdiag.distributed import collective
from hessdiag.losses import Loss, cross_entropy
from hessdiag.optim import SAM, EigenSAM
from hessdiag.optim.build import build_optimizer
from hessdiag.optim.sam import disable_running_stats, enable_running_stats
from hessdiag.runtime import resolve_device, versions
from hessdiag.settings import DataSettings, TrainConfig
from hessdiag.stability import stability_columns
from hessdiag.store import Store, StoreError, new_id, now
from hessdiag.task import Task, call_model, load_task, new_task

__all__ = ["TrainConfig", "TrainResult", "evaluate", "train"]


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    status: str  # "finished" or "diverged"
    steps: int
    epochs: int
    final_checkpoint: str | None
    train_loss: float
    train_accuracy: float
    test_loss: float | None
    test_accuracy: float | None
    lambda_max: float | None
    alignment: float | None
    seconds: float
    message: str = ""
    nothing_to_do: bool = False  # resumed a run that had already finished: nothing trained


Progress = Callable[[dict[str, Any]], None] | None


# --------------------------------------------------------------------------- pieces


def _schedule(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor at a global step."""
    if cfg.schedule == "constant":
        return lambda step: 1.0
    if cfg.schedule == "step":  # /10 at 50% and 75% of training
        return lambda step: 0.1 ** (int(step >= 0.5 * total_steps) + int(step >= 0.75 *
                                                                          total_steps))
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _augment(x: Tensor, gen: torch.Generator, flip: bool) -> Tensor:
    """Random crop with zero padding (1/8 of the side) and, for natural images, a random
    horizontal flip; from ``gen`` so that a resumed run draws the same."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out[mask] = out[mask].flip(-1)
    return out


def _epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def evaluate(model: nn.Module, batches: Any, loss: Loss,
             device: torch.device) -> tuple[float, float]:
    """The loss's mean over all terms of ``batches`` (each batch weighted by its count) and
    the accuracy where it applies (``nan`` otherwise), in eval mode."""
    model.eval()
    total, loss_sum, correct, counted = 0, 0.0, 0, 0
    with torch.no_grad():
        for x, y in batches:
            x, y = to_device(x, device), to_device(y, device)
            out = call_model(model, x)
            n = loss.count(y)
            loss_sum += float(loss(out, y)) * n
            total += n
            acc = loss.accuracy_counts(out, y)
            if acc is not None:
                correct, counted = correct + acc[0], counted + acc[1]
    accuracy = correct / counted if counted else math.nan
    return loss_sum / max(total, 1), accuracy


class _Sharpness:
    """lambda_max of the training loss on a fixed measurement set, warm-started from the
    previous top eigenvector."""

    def __init__(self, model: nn.Module, loss: Loss, batches, device: torch.device,
                 seed: int, collective: Any = None) -> None:
        self.model, self.loss, self.batches = model, loss, batches
        self.device, self.seed, self.collective = device, seed, collective
        self.vector: Tensor | None = None

    def measure(self) -> dict[str, float]:
        row, self.vector = top_eigenpair(self.model, self.loss, self.batches, v0=self.vector,
                                         seed=self.seed, device=self.device,
                                         **({} if self.collective is None
                                            else {"collective": self.collective}))
        return row


def _sync_gradients(params: list[nn.Parameter], count: float, group: Any) -> None:
    """Replace each process's gradients (of its part's mean loss over ``count`` terms) by
    those of the whole minibatch's mean loss: ``sum_r count_r g_r / sum_r count_r``, one
    all-reduce of one flat vector. Parameters without a gradient keep none."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])
    if count:
        flat.mul_(count)
    else:  # no terms in this part (all padding): it adds nothing
        flat.zero_()
    flat, (total,) = group.sum_and_count(flat, count)
    flat.div_(total)
    for p, chunk in zip(params, torch.split(flat, [p.numel() for p in params]), strict=True):
        if p.grad is not None:
            p.grad.copy_(chunk.view_as(p))


def _part(x: Any, y: Any, part: range) -> tuple[Any, Any]:
    """Samples ``part`` of an image batch (tensors, first dimension)."""
    return x[part.start:part.stop], y[part.start:part.stop]


# --------------------------------------------------------------------------- up front


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _last_checkpoint(record: Any) -> tuple[int, str, bool] | None:
    """``(step, path, final)`` of the last checkpoint a run's record holds, or ``None``."""
    paths = record.arrays.get("checkpoints/path")
    if paths is None or len(paths) == 0:
        return None
    steps = record.arrays["checkpoints/step"]
    finals = record.arrays.get("checkpoints/final")
    total = record.attrs.get("total_steps")
    final = (bool(finals[-1]) if finals is not None and len(finals) == len(paths)
             else total is not None and int(steps[-1]) == int(total))
    return int(steps[-1]), _text(paths[-1]), final


def _finished_result(record: Any, run_id: str, message: str, seconds: float) -> TrainResult:
    """What the run reported when it finished, read back from its record."""
    x = record.arrays
    step, path, _ = _last_checkpoint(record)
    per_epoch = max(int(record.attrs.get("steps_per_epoch") or 1), 1)

    def last(name: str, finite: bool = False) -> float | None:
        values = x.get(name)
        if values is None or len(values) == 0:
            return None
        values = np.asarray(values, dtype=float)
        if finite:
            values = values[np.isfinite(values)]
        return float(values[-1]) if len(values) else None

    def or_nan(value: float | None) -> float:
        return math.nan if value is None else value

    return TrainResult(
        run_id=run_id, status="finished", steps=step, epochs=step // per_epoch,
        final_checkpoint=path, train_loss=or_nan(last("metrics/loss")),
        train_accuracy=or_nan(last("metrics/acc")),
        test_loss=last("metrics/test_loss", finite=True),
        test_accuracy=last("metrics/test_acc", finite=True),
        lambda_max=last("sharpness/lambda_max"),
        alignment=last("sharpness/alignment", finite=True), seconds=seconds,
        message=message, nothing_to_do=True)


def _resume_finished(store: Store, record: Any, run_id: str, main: bool,
                     start: float) -> TrainResult | None:
    """A resumed run whose final checkpoint is recorded has nothing left to train: leave
    its records untouched (or, killed after its last checkpoint and before it recorded
    its end, record that it finished) and say so. ``None``: the run is not finished."""
    last = _last_checkpoint(record)
    if last is None or not last[2]:
        return None
    step, path, _ = last
    if record.attrs.get("status") == "finished":
        message = (f"run {run_id} is finished (step {step}, final checkpoint {path}); "
                   "nothing to do")
    else:
        if main:
            store.check_writable()
            store.append_run(run_id, {}, attrs={"status": "finished", "finished": now(),
                                                "final_checkpoint": path})
        message = (f"run {run_id} had finished (step {step}, final checkpoint {path}) "
                   "when it was stopped; recorded it as finished")
    return _finished_result(record, run_id, message, time.perf_counter() - start)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: dicts, lists, tuples of tensors."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _checkpoint_bytes(cfg: TrainConfig, model: nn.Module, params: list[nn.Parameter],
                      optimizer_state: Any = None) -> int:
    """An upper estimate of one checkpoint's size: the model's state, the optimizer's
    state (as loaded; before any step, the buffers it will hold per parameter: momentum,
    Adam's two moments, SAM's perturbation, Eigen-SAM's eigenvector), the sharpness
    eigenvector, and 256 KiB for the rest (random states, configuration)."""
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    if optimizer_state is not None:
        opt = _tensor_bytes(optimizer_state)
    else:
        slots = 2 if cfg.base in ("adam", "adamw") else 1
        slots += {"sam": 1, "eigensam": 2}.get(cfg.optimizer, 0)
        opt = slots * param_bytes
    vector = param_bytes if cfg.sharpness_every else 0
    return _tensor_bytes(model.state_dict()) + opt + vector + 2 ** 18


def _check_checkpoint_dir(run_dir: Path, need: int, resumed: str | None) -> None:
    """Fail now, before the run is recorded (or a resumed run ``resumed`` drops any row),
    if checkpoints cannot be written to ``run_dir``: its nearest existing folder is a file,
    is not writable, or has less free space than one checkpoint (``need`` bytes). Creates
    nothing."""
    then = "" if resumed is None else f" and continue it with resume {resumed}"
    elsewhere = "give another checkpoint_dir"
    existing = run_dir
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        todo = (elsewhere if resumed is None else
                f"the run's checkpoints are recorded there: move {existing} aside{then}")
        raise InputError(f"cannot write checkpoints to {run_dir}: {existing} is not a "
                         f"directory; {todo}", param=["checkpoint_dir", "resume"])
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".hessdiag-probe-"))
    except OSError as exc:
        raise InputError(f"cannot write checkpoints to {run_dir}: {existing} is not "
                         f"writable ({exc.strerror or exc}); "
                         f"{elsewhere if resumed is None else 'make it writable' + then}",
                         param=["checkpoint_dir", "resume"]) from exc
    free = shutil.disk_usage(existing).free
    if free < need:
        raise InputError(f"not enough free space for a checkpoint in {existing}: about "
                         f"{_size(need)} needed, {_size(free)} free; free space"
                         f"{', or ' + elsewhere if resumed is None else then}",
                         param=["checkpoint_dir", "resume"])


def _check_name_free(store: Store, run_id: str) -> None:
    try:
        store.run(run_id)
    except StoreError:
        return
    raise InputError(f"store {store.path} already has a run {run_id!r}: give another "
                     f"run_name, or continue it with resume {run_id}",
                     param=["run_name", "resume"])


# --------------------------------------------------------------------------- the run


def _check_recorded_specs(cfg: TrainConfig, source: str, unsafe: bool,
                          named: tuple[str, ...]) -> None:
    """The model, data and loss specs a stored run records, through
    :func:`hessdiag.specs.recorded`: a factory spec only when named again or trusted."""
    from hessdiag.specs import recorded

    for what, spec, option in (("model spec", cfg.model, "model_spec"),
                               ("data spec", cfg.data, "data"), ("loss spec", cfg.loss, "loss")):
        if spec not in named:
            recorded(spec, what=what, source=source, option=option, trusted=unsafe)


def _task(cfg: TrainConfig, resume: bool, unsafe: bool = False) -> Task:
    """The run's task: a new model for its data, or (fine-tuning) the weights of
    ``init_from`` measured on the run's data (a pickled checkpoint only with ``unsafe``)."""
    if cfg.init_from is not None and not resume:
        try:
            return load_task(cfg.init_from, data=DataSettings(
                spec=cfg.data, root=cfg.data_root, download=cfg.download,
                samples=cfg.samples), model_spec=cfg.model, model_kwargs=cfg.model_kwargs,
                loss=cfg.loss, output=cfg.output, unsafe=unsafe)
        except InputError as exc:
            if "whole pickled model" not in str(exc):
                raise
            raise InputError(f"checkpoint {cfg.init_from} holds a whole pickled model, and "
                             "training rebuilds its model by name: save its weights with "
                             "torch.save(model.state_dict(), 'weights.pt') and fine-tune "
                             "from those, with model naming the architecture",
                             param="init_from") from exc
    data = load_dataset(cfg.data, split="train", root=cfg.data_root, download=cfg.download,
                        samples=cfg.samples)
    return new_task(cfg.model, data, loss=cfg.loss, output=cfg.output,
                    model_kwargs=cfg.model_kwargs)


def _checkpoint_failed(exc: OSError, path: Path, step: int, run_id: str,
                       last_good: str | None, store: Store) -> InputError:
    """The one line for a checkpoint that could not be written (a full disk, above all).
    The run's record still ends at its last good checkpoint, so the run is resumable; its
    status says why it stopped (if the store can still be written)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"no space left on the device for checkpoint {path} at step {step}"
        todo = "free space there"
    else:
        what = f"cannot write checkpoint {path} at step {step} ({exc.strerror or exc})"
        todo = "make it writable"
    since = last_good if last_good is not None else "step 0 (it has no checkpoint yet)"
    message = (f"{what}: the run stopped and can continue from {since}; {todo} and "
               f"continue it with resume {run_id}")
    try:
        store.append_run(run_id, {}, attrs={"status": "stopped", "message": message})
    except (OSError, ValueError):  # the store is on the same full disk: it stays "running"
        pass
    return InputError(message, param="resume")


def _store_failed(exc: OSError, store: Store, step: int, run_id: str,
                  last_good: str | None) -> InputError:
    """The one line for records the store could not take during a run (a full disk)."""
    reason = ("no space left on the device" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
              else exc.strerror or str(exc))
    since = last_good if last_good is not None else "step 0 (it has no checkpoint yet)"
    return InputError(f"cannot write store {store.path} at step {step} ({reason}): the run "
                      f"stopped and can continue from {since}; free space there and continue "
                      f"it with resume {run_id}", param="resume")


def train(cfg: TrainConfig | None, *, store: Store, resume: str | None = None,
          progress: Progress = None, unsafe: bool = False,
          named: tuple[str, ...] = ()) -> TrainResult:
    """Run ``cfg``, or with ``resume=RUN_ID`` continue that run from its last checkpoint
    with its stored config (``cfg`` is then ignored); see the module docstring. ``unsafe``
    lets ``cfg.init_from`` be a checkpoint of pickled objects (unpickling runs code), and
    trusts the factory specs the files record. A resumed run's model, data and loss are
    read from the store, which is data: a factory spec among them is imported only when
    it is in ``named`` (the user named it again) or with ``unsafe`` (see
    :mod:`hessdiag.specs`).

    In a job of several processes (``torchrun``, :mod:`hessdiag.distributed`) every
    process takes a contiguous part of each minibatch; gradients are all-reduced (weighted
    by the loss's count, so they are the whole minibatch's), except SAM's first one unless
    ``cfg.sync_perturbation``: each process then perturbs by its own part's gradient.
    Sharpness is measured on the sharded measurement set, Eigen-SAM's power iteration on
    the whole minibatch's Hessian. Only rank 0 writes checkpoints and the store."""
    start_time = time.perf_counter()
    procs = collective()
    main = procs is None or procs.rank == 0
    resume_from: tuple[int, str, bool] | None = None  # the checkpoint a resumed run loads
    if resume is not None:
        record = store.run(resume)
        cfg = TrainConfig(**record.attrs["config"])
        run_id = resume
        done = _resume_finished(store, record, run_id, main, start_time)
        if done is not None:
            return done
        _check_recorded_specs(cfg, f"store {store.path} (run {run_id})", unsafe, named)
        store.check_writable()
        resume_from = _last_checkpoint(record)  # None: killed before its first one
    elif cfg is None:
        raise InputError("train needs a config, or resume=RUN_ID", param="resume")
    else:
        store.check_writable()
        run_id = cfg.run_name or new_id("run")
        if procs is not None:
            run_id = procs.broadcast(run_id)
        _check_name_free(store, run_id)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    # a run resumed without a checkpoint starts again from step 0: its task is built as
    # when it started (fine-tuning: from init_from again)
    task = _task(cfg, resume_from is not None, unsafe)
    train_info, loss_eval = task.data, task.loss
    if cfg.label_smoothing and loss_eval.spec != "cross-entropy":
        raise InputError(f"label_smoothing applies to cross-entropy; this run's loss is "
                         f"{loss_eval.spec}", param="label_smoothing")
    loss_fn = (cross_entropy(cfg.label_smoothing).selecting(loss_eval.output)
               if cfg.label_smoothing else loss_eval)
    first_inputs = task.first_batch()[0]
    is_image = isinstance(first_inputs, Tensor) and first_inputs.dim() == 4
    if cfg.augment and not is_image:
        raise InputError(f"augment crops and flips images; the inputs of {cfg.data} are not "
                         "image batches (N, C, H, W)", param="augment")
    test_info = load_dataset(cfg.data, split="test", root=cfg.data_root, download=cfg.download)
    model = task.model
    kwargs = task.model_kwargs
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)

    ready = train_info.batches
    if procs is not None and ready is not None:
        raise InputError(f"data {cfg.data} is a list of ready batches, which cannot be split "
                         "across processes by sample: train it in one process", param="data")
    if procs is not None:
        procs.broadcast_tensors(list(model.state_dict().values()))  # one start everywhere
    n_train = len(ready) if ready is not None else len(train_info.dataset)
    steps_per_epoch = n_train if ready is not None else math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    lr_factor = _schedule(cfg, total_steps)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 17)
    flip = cfg.augment and cfg.data in ("cifar10", "cifar100")
    test_batches = fixed_batches(test_info, 512)
    measure_set = load_dataset(cfg.data, split="train", root=cfg.data_root,
                               samples=cfg.sharpness_samples)
    sharpness = _Sharpness(model, loss_eval, fixed_batches(
        measure_set, 256, shard=None if procs is None else procs.shard), device, cfg.seed,
        procs)
    run_dir = Path(cfg.checkpoint_dir) / run_id
    if resume is not None and record.attrs.get("checkpoint_dir"):
        run_dir = Path(record.attrs["checkpoint_dir"])  # as recorded (resolved) at the start
    step = 0
    data_record = {"spec": cfg.data, "root": cfg.data_root, "split": "train"}
    task_record = task.record()

    last_good: str | None = None  # the last checkpoint written and recorded
    if resume_from is not None:
        last = resume_from[1]
        if procs is not None:
            last = procs.broadcast(last)
        loaded = load_task(last, data=DataSettings(spec=cfg.data, root=cfg.data_root),
                           model_spec=cfg.model, loss=cfg.loss, output=cfg.output,
                           unsafe=unsafe, check=False)
        model.load_state_dict(loaded.model.state_dict())
        optimizer.load_state_dict(loaded.optimizer_state)
        extra = loaded.extra
        step = int(loaded.checkpoint.step)
        aug_gen.set_state(extra["aug_rng"])
        torch.set_rng_state(extra["torch_rng"])
        if extra.get("sharpness_vector") is not None:
            sharpness.vector = extra["sharpness_vector"].to(device)
        last_good = last
    # every option that can fail is checked before anything is recorded
    if main:
        _check_checkpoint_dir(
            run_dir, _checkpoint_bytes(cfg, model, params, None if resume_from is None
                                       else optimizer.state_dict()),
            None if resume is None else run_id)
    if resume is not None:
        # rows logged after the checkpoint are logged again; sharpness at step s is measured
        # before update s + 1, after the checkpoint of step s
        for table, keep in (("metrics", np.less_equal), ("sharpness", np.less),
                            ("checkpoints", np.less_equal)):
            steps_logged = record.arrays.get(f"{table}/step")
            if steps_logged is not None and main:
                store.truncate_run(run_id, table, int(np.sum(keep(steps_logged, step))))
        if main:
            store.append_run(run_id, {}, attrs={"status": "running", "resumed_at": now()})
    elif main:
        store.create_run(run_id, {
            "config": asdict(cfg), "model": cfg.model, "model_kwargs": kwargs,
            "data": data_record, "loss": loss_eval.spec, "task": task_record,
            "optimizer": cfg.optimizer, "seed": cfg.seed, "versions": versions(),
            "started": now(), "status": "running", "checkpoint_dir": str(run_dir.resolve()),
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            **({} if procs is None else {"processes": procs.size}),
        })

    pending: dict[str, dict[str, list]] = {"metrics": {}, "sharpness": {}}

    def log(table: str, row: dict[str, float]) -> None:
        cols = pending[table]
        for key, value in row.items():
            cols.setdefault(key, []).append(value)

    def flush(extra_tables: dict | None = None, attrs: dict | None = None) -> None:
        tables = {k: v for k, v in pending.items() if v}
        tables.update(extra_tables or {})
        if (tables or attrs) and main:
            try:
                store.append_run(run_id, tables, attrs=attrs)
            except OSError as exc:  # a record is written whole or not at all
                raise _store_failed(exc, store, step, run_id, last_good) from exc
        for k in pending:
            pending[k] = {}

    def checkpoint(final: bool) -> str:
        nonlocal last_good
        path = run_dir / f"step-{step:06d}.pt"
        if not main:
            return str(path)  # rank 0 writes it
        try:
            sha = _save(path, final)
        except OSError as exc:  # written to a temporary and renamed: nothing partial is left
            raise _checkpoint_failed(exc, path.resolve(), step, run_id, last_good, store) from exc
        flush({"checkpoints": {"step": [step], "path": [str(path.resolve())],
                               "sha256": [sha], "final": [final]}})
        last_good = str(path.resolve())
        return str(path)

    def _save(path: Path, final: bool) -> str:
        return save_checkpoint(
            path, model, model_spec=cfg.model, model_kwargs=kwargs,
            optimizer_state=name_optimizer_state(optimizer.state_dict(), optimizer,
                                                 named_params),
            step=step, epoch=step // steps_per_epoch,
            run_id=run_id, data=data_record, loss=loss_eval.spec, output=loss_eval.output,
            extra={"aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
                   "sharpness_vector": (None if sharpness.vector is None
                                        else sharpness.vector.cpu()),
                   "final": final, "config": asdict(cfg)},
        )

    def measuring(at: int) -> bool:
        return bool(cfg.sharpness_every) and (at % cfg.sharpness_every == 0 or at == total_steps)

    last_loss, last_acc, last_eval = math.nan, math.nan, (None, None)
    last_sharp: dict[str, float] = {}
    last_alignment: float | None = None
    final_path = None
    status, message = "finished", ""
    momentum = cfg.momentum if cfg.base == "sgd" else 0.0
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        order = _epoch_order(n_train, cfg.seed, epoch)
        if ready is not None:
            x, y = ready[int(order[position])]
        else:
            lo = position * cfg.batch_size
            indices = order[lo:lo + cfg.batch_size]
            if procs is not None and not cfg.augment:  # this process's part of the minibatch
                part = procs.shard(len(indices))
                indices = indices[part.start:part.stop]
            x, y = batch_of(train_info, indices)
        if cfg.augment:
            x = _augment(x, aug_gen, flip)
            if procs is not None:  # augmented whole, so every process draws the same
                x, y = _part(x, y, procs.shard(len(y)))
        x, y = to_device(x, device), to_device(y, device)
        factor = lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        model.train()
        if isinstance(optimizer, EigenSAM):
            optimizer.maybe_update_eigenvector(model, loss_fn, x, y,
                                               **({} if procs is None
                                                  else {"collective": procs}))
            model.train()
        optimizer.zero_grad(set_to_none=True)
        out = call_model(model, x)
        loss = loss_fn(out, y)
        if procs is None:
            finite = bool(torch.isfinite(loss))
        else:  # the whole minibatch's loss and accuracy, the same on every process
            count = float(loss_fn.count(y))
            acc = loss_eval.accuracy_counts(out, y) or (0, 0)
            loss_sum, total, correct, counted = procs.counts(
                float(loss.detach()) * count if count else 0.0, count, *acc)
            shared_loss = loss_sum / total if total else math.nan
            shared_acc = correct / counted if counted else math.nan
            finite = math.isfinite(shared_loss)
        if not finite:
            status = "diverged"
            value = float(loss.detach()) if procs is None else shared_loss
            message = f"the training loss is {value} at step {step}: stopped"
            break
        loss.backward()
        if procs is not None and (cfg.sync_perturbation or not isinstance(optimizer, SAM)):
            _sync_gradients(params, count, procs)
        # sharpness at the weights of this step, paired with this step's perturbation
        measured = sharpness.measure() if measuring(step) else None
        if isinstance(optimizer, SAM):
            optimizer.first_step(zero_grad=True)
            perturbation = optimizer.perturbation_vector()
            disable_running_stats(model)
            loss_fn(call_model(model, x), y).backward()
            enable_running_stats(model)
            if procs is not None:  # the descent gradient is always the whole minibatch's
                _sync_gradients(params, count, procs)
            optimizer.second_step(zero_grad=False)
        else:
            perturbation = _flat([p.grad for p in params]).detach() if measured else None
            optimizer.step()
        if measured is not None:
            last_sharp = {**measured, **alignment_row(perturbation, sharpness.vector),
                          **stability_columns(measured["lambda_max"], cfg.lr * factor,
                                              momentum, cfg.base, cfg.nesterov)}
            log("sharpness", {"step": step, **last_sharp})
            if math.isfinite(last_sharp["alignment"]):
                last_alignment = last_sharp["alignment"]
        if procs is None:
            last_loss = float(loss.detach())
            acc = loss_eval.accuracy_counts(out, y)
            last_acc = acc[0] / acc[1] if acc is not None and acc[1] else math.nan
        else:
            last_loss, last_acc = shared_loss, shared_acc
        step += 1
        row = {"step": step, "epoch": epoch, "loss": last_loss, "acc": last_acc,
               "lr": cfg.lr * factor, "test_loss": math.nan, "test_acc": math.nan}
        if (step % steps_per_epoch == 0 or step == total_steps) and main:
            last_eval = evaluate(model, test_batches, loss_eval, device)
            row["test_loss"], row["test_acc"] = last_eval
        log("metrics", row)
        if step == total_steps and measuring(step):
            # the final weights: no perturbation follows them
            final = sharpness.measure()
            last_sharp = {**final, **alignment_row(None, sharpness.vector),
                          **stability_columns(final["lambda_max"], cfg.lr * factor,
                                              momentum, cfg.base, cfg.nesterov)}
            log("sharpness", {"step": step, **last_sharp})
        if progress is not None and main:
            progress({"step": step, "total": total_steps, "epoch": epoch, "loss": last_loss,
                      "acc": last_acc, "lambda_max": last_sharp.get("lambda_max")})
        if step == total_steps:
            final_path = checkpoint(final=True)
        elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint(final=False)
        elif step % steps_per_epoch == 0:
            flush()
    seconds = time.perf_counter() - start_time
    flush(attrs={"status": status, "finished": now(), "message": message,
                 "final_checkpoint": final_path})
    return TrainResult(
        run_id=run_id, status=status, steps=step, epochs=step // steps_per_epoch,
        final_checkpoint=final_path, train_loss=last_loss, train_accuracy=last_acc,
        test_loss=last_eval[0], test_accuracy=last_eval[1],
        lambda_max=last_sharp.get("lambda_max"),
        alignment=last_alignment,
        seconds=seconds, message=message,
    )
