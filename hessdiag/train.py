"""The train workflow: SGD, SAM and Eigen-SAM training and fine-tuning into the store.

One run is a :class:`TrainConfig`. The loop is deterministic given the seed: the data order
of epoch ``e`` is ``randperm`` from a generator seeded with ``(seed, e)``, augmentation
draws from its own generator, and every random state is saved in each checkpoint, so a run
resumed from its last checkpoint (``resume``) continues exactly as if never interrupted.

What a run writes:

- checkpoints in hessdiag's format, ``<checkpoint_dir>/<run>/step-NNNNNN.pt``, every
  ``checkpoint_every`` steps and at the end (model, optimizer state, step, epoch, random
  states, config);
- in the store's ``/runs/<run>``: the config, per-step metrics (loss, accuracy, lr; test
  loss and accuracy at epoch ends), every ``sharpness_every`` steps ``lambda_max`` of the
  training loss on a fixed measurement set (Lanczos, with its residual) and the
  alignment ``|<e, v>| / ||e||`` of the step's perturbation ``e`` (SGD: the gradient)
  with the top eigenvector ``v``, and the checkpoints written (step, path, sha256).

Records are flushed at every checkpoint and every epoch end; a run killed at any moment
keeps all of them (see :mod:`hessdiag.store`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessdiag.align import top_alignment
from hessdiag.checkpoints import load_checkpoint, save_checkpoint
from hessdiag.data import load_dataset, stack_samples
from hessdiag.models import build_model
from hessdiag.optim import SAM, EigenSAM, make_base_optimizer
from hessdiag.optim.sam import disable_running_stats, enable_running_stats
from hessdiag.spectrum import measurement_batches, resolve_device, versions
from hessdiag.store import Store, new_id, now

OPTIMIZERS = ("sgd", "sam", "eigensam")
BASES = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (stored with it, and enough to resume it)."""

    model: str
    data: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    download: bool = False
    samples: int | None = None
    optimizer: str = "sgd"
    base: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    epochs: int = 10
    batch_size: int = 128
    rho: float = 0.05
    alpha: float = 0.2
    eig_every: int = 100
    eig_iters: int = 5
    adaptive: bool = False
    renormalize: bool = False
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    augment: bool = False
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int | None = None
    sharpness_every: int | None = None
    sharpness_samples: int = 512
    run_name: str | None = None
    checkpoint_dir: str = "checkpoints"
    init_from: str | None = None

    def validate(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.base in BASES, f"--base must be one of {', '.join(BASES)}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}"),
            (self.lr > 0, "--lr must be positive"),
            (self.epochs >= 1, "--epochs must be at least 1"),
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.rho >= 0, "--rho must be non-negative"),
            (self.alpha >= 0, "--alpha must be non-negative"),
            (self.eig_every >= 1, "--eig-every must be at least 1"),
            (self.eig_iters >= 1, "--eig-iters must be at least 1"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.checkpoint_every is None or self.checkpoint_every >= 1,
             "--checkpoint-every must be at least 1"),
            (self.sharpness_every is None or self.sharpness_every >= 1,
             "--sharpness-every must be at least 1"),
            (self.sharpness_samples >= 1, "--sharpness-samples must be at least 1"),
            (self.samples is None or self.samples >= 1, "--samples must be positive"),
            (not (self.adaptive and self.optimizer == "eigensam"),
             "--adaptive (ASAM) goes with --optimizer sam: Eigen-SAM is defined for SAM's "
             "Euclidean perturbation"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


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


def evaluate(model: nn.Module, batches, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over batches, in eval mode."""
    model.eval()
    total, loss_sum, correct = 0, 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            total += len(y)
    return loss_sum / max(total, 1), correct / max(total, 1)


class _Sharpness:
    """lambda_max of the training loss on a fixed measurement set, warm-started from the
    previous top eigenvector, and the alignment of a perturbation with it."""

    def __init__(self, model: nn.Module, batches, device: torch.device, seed: int) -> None:
        self.model, self.batches, self.device, self.seed = model, batches, device, seed
        self.vector: Tensor | None = None

    def measure(self, perturbation: Tensor | None) -> dict[str, float]:
        row, self.vector = top_alignment(self.model, nn.CrossEntropyLoss(), self.batches,
                                         perturbation, v0=self.vector, seed=self.seed,
                                         device=self.device)
        return row


# --------------------------------------------------------------------------- the run


def train(cfg: TrainConfig | None, *, store: Store, resume: str | None = None,
          progress: Progress = None) -> TrainResult:
    """Run ``cfg``, or with ``resume=RUN_ID`` continue that run from its last checkpoint
    with its stored config (``cfg`` is then ignored); see the module docstring."""
    start_time = time.perf_counter()
    if resume is not None:
        record = store.run(resume)
        cfg = TrainConfig(**record.attrs["config"])
        run_id = resume
    elif cfg is None:
        raise ValueError("train needs a config, or resume=RUN_ID")
    else:
        cfg.validate()
        store.check_writable()
        run_id = cfg.run_name or new_id("run")
    cfg.validate()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)

    train_info = load_dataset(cfg.data, split="train", root=cfg.data_root,
                              download=cfg.download, samples=cfg.samples)
    test_info = load_dataset(cfg.data, split="test", root=cfg.data_root,
                             download=cfg.download)
    kwargs = {"num_classes": train_info.num_classes, "in_shape": list(train_info.in_shape),
              **cfg.model_kwargs}
    if cfg.init_from is not None and resume is None:
        loaded = load_checkpoint(cfg.init_from, model_spec=cfg.model, model_kwargs=kwargs)
        model = loaded.model
    else:
        model = build_model(cfg.model, **kwargs)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    base_kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.base == "sgd":
        base_kwargs.update(momentum=cfg.momentum, nesterov=cfg.nesterov)
    base_cls = make_base_optimizer(cfg.base)
    if cfg.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = base_cls(params, **base_kwargs)
    elif cfg.optimizer == "sam":
        optimizer = SAM(params, base_cls, rho=cfg.rho, adaptive=cfg.adaptive, **base_kwargs)
    else:
        optimizer = EigenSAM(params, base_cls, rho=cfg.rho, alpha=cfg.alpha,
                             eig_every=cfg.eig_every, eig_iters=cfg.eig_iters,
                             renormalize=cfg.renormalize, adaptive=cfg.adaptive,
                             eig_seed=cfg.seed, **base_kwargs,
                             # a fixed mode: "auto" chooses by timing, and the modes differ
                             # in the last bits, which a resumed run must not
                             hvp_mode="double-backward")

    n_train = len(train_info.dataset)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    lr_factor = _schedule(cfg, total_steps)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 17)
    flip = cfg.augment and cfg.data in ("cifar10", "cifar100")
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    test_batches = measurement_batches(test_info.dataset, 512)
    measure_set = load_dataset(cfg.data, split="train", root=cfg.data_root,
                               samples=cfg.sharpness_samples).dataset
    sharpness = _Sharpness(model, measurement_batches(measure_set, 256), device, cfg.seed)
    run_dir = Path(cfg.checkpoint_dir) / run_id
    step = 0
    data_record = {"spec": cfg.data, "root": cfg.data_root, "split": "train"}

    if resume is not None:
        record = store.run(resume)
        ckpts = record.arrays.get("checkpoints/path")
        if ckpts is None or len(ckpts) == 0:
            raise ValueError(f"run {resume} has no checkpoint to resume from; start it again")
        last = ckpts[-1].decode() if isinstance(ckpts[-1], bytes) else str(ckpts[-1])
        loaded = load_checkpoint(last)
        model.load_state_dict(loaded.model.state_dict())
        optimizer.load_state_dict(loaded.optimizer_state)
        extra = loaded.extra
        step = int(loaded.info.step)
        aug_gen.set_state(extra["aug_rng"])
        torch.set_rng_state(extra["torch_rng"])
        if extra.get("sharpness_vector") is not None:
            sharpness.vector = extra["sharpness_vector"].to(device)
        for table in ("metrics", "sharpness", "checkpoints"):
            steps_logged = record.arrays.get(f"{table}/step")
            if steps_logged is not None:
                store.truncate_run(run_id, table, int(np.sum(steps_logged <= step)))
        store.append_run(run_id, {}, attrs={"status": "running", "resumed_at": now()})
    else:
        store.create_run(run_id, {
            "config": asdict(cfg), "model": cfg.model, "model_kwargs": kwargs,
            "data": data_record, "optimizer": cfg.optimizer, "seed": cfg.seed,
            "versions": versions(), "started": now(), "status": "running",
            "checkpoint_dir": str(run_dir.resolve()), "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
        })

    pending: dict[str, dict[str, list]] = {"metrics": {}, "sharpness": {}}

    def log(table: str, row: dict[str, float]) -> None:
        cols = pending[table]
        for key, value in row.items():
            cols.setdefault(key, []).append(value)

    def flush(extra_tables: dict | None = None, attrs: dict | None = None) -> None:
        tables = {k: v for k, v in pending.items() if v}
        tables.update(extra_tables or {})
        if tables or attrs:
            store.append_run(run_id, tables, attrs=attrs)
        for k in pending:
            pending[k] = {}

    def checkpoint(final: bool) -> str:
        path = run_dir / f"step-{step:06d}.pt"
        sha = save_checkpoint(
            path, model, model_spec=cfg.model, model_kwargs=kwargs,
            optimizer_state=optimizer.state_dict(), step=step, epoch=step // steps_per_epoch,
            run_id=run_id, data={"spec": cfg.data, "root": cfg.data_root, "split": "train"},
            extra={"aug_rng": aug_gen.get_state(), "torch_rng": torch.get_rng_state(),
                   "sharpness_vector": (None if sharpness.vector is None
                                        else sharpness.vector.cpu()),
                   "final": final, "config": asdict(cfg)},
        )
        flush({"checkpoints": {"step": [step], "path": [str(path.resolve())],
                               "sha256": [sha], "final": [final]}})
        return str(path)

    last_loss, last_acc, last_eval = math.nan, math.nan, (None, None)
    last_sharp: dict[str, float] = {}
    final_path = None
    status, message = "finished", ""
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        order = _epoch_order(n_train, cfg.seed, epoch)
        lo = position * cfg.batch_size
        x, y = stack_samples(train_info.dataset, order[lo:lo + cfg.batch_size])
        if cfg.augment:
            x = _augment(x, aug_gen, flip)
        x, y = x.to(device), y.to(device)
        factor = lr_factor(step)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        model.train()
        if isinstance(optimizer, EigenSAM):
            optimizer.maybe_update_eigenvector(model, loss_fn, x, y)
            model.train()
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        if not torch.isfinite(loss):
            status = "diverged"
            message = f"the training loss is {float(loss.detach())} at step {step}: stopped"
            break
        loss.backward()
        if isinstance(optimizer, SAM):
            optimizer.first_step(zero_grad=True)
            disable_running_stats(model)
            loss_fn(model(x), y).backward()
            enable_running_stats(model)
            optimizer.second_step(zero_grad=False)
            perturbation = optimizer.perturbation_vector()
        else:
            perturbation = _flat([p.grad for p in params]).detach() \
                if cfg.sharpness_every and (step + 1) % cfg.sharpness_every == 0 else None
            optimizer.step()
        last_loss = float(loss.detach())
        last_acc = float((out.argmax(1) == y).float().mean())
        step += 1
        row = {"step": step, "epoch": epoch, "loss": last_loss, "acc": last_acc,
               "lr": cfg.lr * factor, "test_loss": math.nan, "test_acc": math.nan}
        if step % steps_per_epoch == 0 or step == total_steps:
            last_eval = evaluate(model, test_batches, device)
            row["test_loss"], row["test_acc"] = last_eval
        log("metrics", row)
        if cfg.sharpness_every and step % cfg.sharpness_every == 0:
            last_sharp = sharpness.measure(perturbation)
            log("sharpness", {"step": step, **last_sharp})
        if progress is not None:
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
        lambda_max=last_sharp.get("lambda_max"), alignment=last_sharp.get("alignment"),
        seconds=seconds, message=message,
    )
