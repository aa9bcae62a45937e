"""Loss landscapes: the mean loss (and accuracy) on a 1-D or 2-D grid around a checkpoint.

Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets": with weights ``theta``
and directions ``d1``, ``d2`` of the parameters' shape,

* 1-D: ``f(a) = L(theta + a d1)`` for ``a`` on a grid;
* 2-D: ``f(a, b) = L(theta + a d1 + b d2)`` on a grid (stored with rows ``b``, columns
  ``a``, as ``matplotlib.contourf(xs, ys, f)`` takes it).

Directions:

``random`` with filter normalisation (the paper's): a Gaussian direction whose every
    *filter* (each slice ``d[i]`` along the first axis of a weight with two or more axes:
    a convolution's output channel, a linear layer's output row) is rescaled to the norm
    of the same filter of ``theta``, so that a step of 1 moves each filter by its own size
    whatever the layer's scale. One-dimensional parameters (biases, normalisation scales)
    get a zero direction, or their own weights (``bias="weights"``).
``random`` without filter normalisation: a Gaussian direction over all parameters scaled to
    unit length, so coordinates are Euclidean distances in parameter space.
``eigen``: the top Hessian eigenvectors (Lanczos, unit length, no filter normalisation),
    so ``f(a) = L(theta) + a g.v + a^2 lambda / 2 + O(a^3)`` and the second difference of
    the 1-D curve at 0 is the top eigenvalue ``lambda``.

``L`` is the same mean loss as the eigenvalues' (:class:`hessdiag.objective.MeanLoss`:
batches weighted by the loss's count of terms, eval mode), for any task ``spectrum``
accepts. Each grid point costs one forward pass over the samples; under ``torchrun`` the
points are split across the processes.

**Resuming.** :func:`compute_landscape` with ``partial`` (a directory) saves the
directions once and the grid after every point into it, the grid pre-filled with NaN:
a process killed at any moment loses no finished point, and a later call with the same
directory and ``resume=True`` computes only the missing points. The workflow
(:func:`landscape_of_checkpoint`) keeps that directory beside the store, keyed by the
checkpoint's hash and the settings, and deletes it once the whole grid is written to the
store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessdiag.curvature import HessianOperator, lanczos
from hessdiag.objective import MeanLoss
from hessdiag.results import LandscapeResult
from hessdiag.runtime import resolve_device, resolve_dtype
from hessdiag.settings import DataSettings, LandscapeSettings

__all__ = ["LandscapeResult", "LandscapeSettings", "compute_landscape", "grid_axes",
           "landscape_of_checkpoint", "random_direction"]

Progress = Callable[[int, int], None] | None


def grid_axes(settings: LandscapeSettings) -> tuple[np.ndarray, np.ndarray | None]:
    """The grid's coordinates: ``xs`` and (2-D) ``ys``."""
    xs = np.linspace(float(settings.x_range[0]), float(settings.x_range[1]),
                     settings.resolution)
    if settings.dims == 1:
        return xs, None
    y_range = settings.y_range or settings.x_range
    ys = np.linspace(float(y_range[0]), float(y_range[1]),
                     settings.y_resolution or settings.resolution)
    return xs, ys


def random_direction(theta: list[Tensor], generator: torch.Generator, *,
                     filter_norm: bool = True, bias: str = "zero") -> list[Tensor]:
    """A Gaussian direction shaped like ``theta`` (drawn on the CPU from ``generator``, so
    the same seed gives the same direction on every device), filter-normalised or scaled
    to unit length (see the module docstring)."""
    d = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t)
         for t in theta]
    if not filter_norm:
        norm = math.sqrt(sum(float((x.double() ** 2).sum()) for x in d))
        return [x / norm for x in d]
    out = []
    for x, t in zip(d, theta, strict=True):
        if t.dim() <= 1:
            out.append(t.clone() if bias == "weights" else torch.zeros_like(t))
            continue
        rows, w = x.reshape(x.shape[0], -1), t.reshape(t.shape[0], -1)
        scale = w.norm(dim=1) / (rows.norm(dim=1) + 1e-10)
        out.append((rows * scale[:, None]).reshape(t.shape))
    return out


def _flat(d: list[Tensor]) -> Tensor:
    return torch.cat([x.reshape(-1).double() for x in d])


def _eigen_directions(model: nn.Module, loss_fn: Any, batches: list, k: int, *,
                      names: list[str], tol: float | None, seed: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[list[list[Tensor]], dict[str, Any], int]:
    op = HessianOperator(model, loss_fn, batches, dtype=dtype, device=device,
                         check_determinism=False,
                         batch_size_fn=getattr(loss_fn, "batch_weight", None))
    if tol is None:
        tol = 1e-6 if dtype == torch.float64 else 1e-3
    top = lanczos(op, k=k, which="largest", tol=tol, seed=seed)
    directions = []
    for j in range(k):
        parts = op.unflatten(top.eigenvectors[:, j].to(device=device, dtype=dtype))
        directions.append([parts[n] for n in names])
    info = {"eigenvalues": [float(v) for v in top.eigenvalues],
            "residuals": [float(v) for v in top.residuals],
            "converged": [bool(c) for c in top.converged], "tol": float(tol),
            "hvps": int(op.hvp_count)}
    return directions, info, int(op.hvp_count)


class _Partial:
    """An interrupted grid on disk: ``directions.pt`` (written once) and ``grid.npz``
    (loss, accuracy, done; replaced after every point)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.directions_path = self.dir / "directions.pt"
        self.grid_path = self.dir / "grid.npz"

    def load(self, shape: tuple[int, ...], n_directions: int
             ) -> tuple[list[list[Tensor]], dict[str, Any], dict[str, np.ndarray]] | None:
        if not (self.directions_path.exists() and self.grid_path.exists()):
            return None
        saved = torch.load(self.directions_path, weights_only=True, map_location="cpu")
        with np.load(self.grid_path) as z:
            grid = {k: z[k] for k in ("loss", "accuracy", "done")}
        if grid["loss"].shape != shape or len(saved["directions"]) != n_directions:
            return None
        return saved["directions"], json.loads(saved["info"]), grid

    def start(self, directions: list[list[Tensor]], info: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.directions_path.with_suffix(".tmp")
        torch.save({"directions": [[t.detach().cpu() for t in d] for d in directions],
                    "info": json.dumps(info)}, tmp)
        os.replace(tmp, self.directions_path)

    def save(self, loss: np.ndarray, accuracy: np.ndarray, done: np.ndarray) -> None:
        # a process killed at any moment leaves the previous grid or this one; page-cache
        # writes survive the death of the process, so no fsync per point
        tmp = self.dir / "grid.tmp.npz"
        np.savez(tmp, loss=loss, accuracy=accuracy, done=done)
        os.replace(tmp, self.grid_path)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def compute_landscape(model: nn.Module, loss_fn: Any, batches: Any,
                      settings: LandscapeSettings | None = None, *,
                      partial: str | os.PathLike | None = None, resume: bool = False,
                      progress: Progress = None, collective: Any = None) -> LandscapeResult:
    """The loss landscape of ``loss_fn`` over ``batches`` around the model's weights (see
    the module docstring). ``partial``: a directory where the grid is kept while it is
    computed; with ``resume=True``, points already there are not recomputed.
    ``progress(done, total)`` is called after every grid point.

    ``collective`` (a :class:`hessdiag.distributed.Collective`, every process with all of
    ``batches``): the grid points are split across processes, round by round (each
    process computes one point of a round, then all exchange their values), so every
    process ends with the whole grid; rank 0 alone keeps the partial grid, and its
    directions and resumed points are the ones used everywhere."""
    s = settings or LandscapeSettings()
    start = time.perf_counter()
    dtype, device = resolve_dtype(s.dtype), resolve_device(s.device)
    objective = MeanLoss(model, loss_fn, batches, device, dtype)
    xs, ys = grid_axes(s)
    shape = s.shape
    main = collective is None or collective.rank == 0
    store = _Partial(Path(partial)) if partial is not None and main else None
    saved = store.load(shape, s.dims) if (store is not None and resume) else None
    if collective is not None:
        saved = collective.broadcast(saved)
    hvps = 0
    if saved is not None:
        directions = [[t.to(device=device, dtype=dtype) for t in d] for d in saved[0]]
        info, grid = saved[1], saved[2]
        loss, accuracy, done = grid["loss"], grid["accuracy"], grid["done"].astype(bool)
    else:
        if s.directions == "eigen":
            directions, info, hvps = _eigen_directions(
                model, loss_fn, objective_batches(objective), s.dims, names=objective.names,
                tol=s.tol, seed=s.seed, dtype=dtype, device=device)
        else:
            generator = torch.Generator().manual_seed(s.seed)
            directions = [random_direction(objective.theta, generator,
                                           filter_norm=s.filter_norm, bias=s.bias)
                          for _ in range(s.dims)]
            info = {}
        if collective is not None:  # rank 0's directions, bit for bit, everywhere
            collective.broadcast_tensors([t for d in directions for t in d])
        flats = [_flat(d) for d in directions]
        info = {"kind": s.directions, "filter_norm": bool(s.filter_norm and
                                                          s.directions == "random"),
                "bias": s.bias, "seed": s.seed,
                "norms": [float(f.norm()) for f in flats],
                "cosine": (float(flats[0] @ flats[1] / (flats[0].norm() * flats[1].norm()))
                           if len(flats) == 2 else None), **info}
        loss = np.full(shape, np.nan)
        accuracy = np.full(shape, np.nan)
        done = np.zeros(shape, dtype=bool)
        if store is not None:
            store.start(directions, info)
            store.save(loss, accuracy, done)
    resumed = int(done.sum())
    total = int(np.prod(shape))
    loss0, acc0 = objective.loss_and_accuracy(objective.theta)
    pending = [index for index in np.ndindex(*shape) if not done[index]]
    size, rank = (1, 0) if collective is None else (collective.size, collective.rank)

    def evaluate(index: tuple[int, ...]) -> tuple[float, float]:
        a = float(xs[index[-1]])
        b = None if ys is None else float(ys[index[0]])
        point = [t + a * d1 for t, d1 in zip(objective.theta, directions[0], strict=True)]
        if b is not None:
            point = [p + b * d2 for p, d2 in zip(point, directions[1], strict=True)]
        value, acc = objective.loss_and_accuracy(point)
        return value, np.nan if acc is None else acc

    for first in range(0, len(pending), size):
        mine = pending[first + rank] if first + rank < len(pending) else None
        values = [(mine, *evaluate(mine))] if mine is not None else []
        if collective is not None:
            values = [v for part in collective.gather(values) for v in part]
        for index, value, acc in values:
            loss[index], accuracy[index], done[index] = value, acc, True
        if store is not None:
            store.save(loss, accuracy, done)
        if progress is not None:
            progress(int(done.sum()), total)
    return LandscapeResult(
        xs=xs, ys=ys, loss=loss, accuracy=accuracy, directions=info, loss0=loss0,
        samples=objective.total, forward_passes=_total_passes(objective.forward, collective),
        seconds=time.perf_counter() - start, seed=s.seed, resumed_points=resumed,
        settings={**asdict(s), "hvps": hvps,
                  "accuracy0": acc0, "dtype": str(dtype).replace("torch.", ""),
                  "device": str(device)})


def _total_passes(passes: int, collective: Any) -> int:
    """Forward passes of the whole job (every process's)."""
    if collective is None:
        return passes
    return int(collective.counts(float(passes))[0])


def objective_batches(objective: MeanLoss) -> list[tuple[Any, Any]]:
    """The objective's batches as ``(inputs, targets)`` pairs (already on its device)."""
    return [(x, y) for x, y, _ in objective.batches]


def partial_dir(store_path: str | os.PathLike, key: str) -> Path:
    """Where the workflow keeps an interrupted grid: beside the store, by ``key``."""
    path = Path(store_path)
    return path.with_name(f".{path.name}.landscape") / key


def _key(task: Any, settings: LandscapeSettings, data: DataSettings) -> str:
    sha = task.checkpoint.sha256 if task.checkpoint is not None else None
    text = json.dumps({"checkpoint": sha, "task": task.record(), "data": asdict(data),
                       "settings": asdict(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def landscape_of_checkpoint(checkpoint: str, *, settings: LandscapeSettings | None = None,
                            data: DataSettings | None = None, model_spec: str | None = None,
                            loss: str | None = None, output: str | None = None,
                            unsafe: bool = False,
                            allow_nonfinite: bool = False, store: Any = None,
                            resume: bool = False, progress: Progress = None
                            ) -> tuple[LandscapeResult, Any, str | None]:
    """The landscape of a checkpoint's task (its model, data and loss, as ``spectrum``
    measures them), written to ``store`` when given. With a store the grid is kept beside
    it while it is computed (see the module docstring), so that ``resume=True`` continues
    an interrupted run with the same checkpoint and settings. Returns
    ``(result, task, analysis id)``."""
    from hessdiag.distributed import collective
    from hessdiag.records import provenance, write_landscape
    from hessdiag.task import load_task

    settings = settings or LandscapeSettings()
    data = data or DataSettings()
    task = load_task(checkpoint, data=data, model_spec=model_spec, loss=loss, output=output,
                     unsafe=unsafe, allow_nonfinite=allow_nonfinite)
    resolve_device(settings.device)
    group = collective()
    main = group is None or group.rank == 0
    partial = None if store is None else partial_dir(store.path, _key(task, settings, data))
    if partial is not None and not resume and main:
        with contextlib.suppress(OSError):
            shutil.rmtree(partial)
    result = compute_landscape(task.model, task.loss, task.batches(data.batch_size), settings,
                               partial=partial, resume=resume, progress=progress,
                               collective=group)
    analysis_id = None
    if store is not None and main:  # across processes, rank 0 writes
        origin = provenance(task)
        origin["data"] = {**origin["data"], "batch_size": data.batch_size}
        analysis_id = write_landscape(store, result, origin)
        _Partial(partial).remove()
        with contextlib.suppress(OSError):
            partial.parent.rmdir()  # the last one: no empty folder left beside the store
    return result, task, analysis_id

