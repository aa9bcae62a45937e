"""A store's runs as TensorBoard event files.

:func:`export_tensorboard` writes every run of a store to ``OUT/<run id>/`` as scalars
over the run's steps, under the tags a live :class:`hessdiag.monitor.SharpnessMonitor`
uses, so a stored run opens in TensorBoard next to curves logged while training:

=================  =====================================================================
table              tags
=================  =====================================================================
``sharpness``      ``hessdiag/lambda_max``, ``hessdiag/lambda_max_residual``,
                   ``hessdiag/stability_ratio``, ``hessdiag/threshold``, ``hessdiag/lr``,
                   ``hessdiag/trace``, ``hessdiag/trace_stderr``, ``hessdiag/alignment``,
                   ... (:data:`hessdiag.monitor.TENSORBOARD_TAGS`; any other column
                   ``hessdiag/<column>``)
``alignment``      ``hessdiag/probe/<column>`` (an :class:`hessdiag.align.AlignmentProbe`'s)
``metrics``        ``train/loss``, ``train/acc``, ``train/lr``, ``train/epoch``,
                   ``test/loss``, ``test/acc``
other tables       ``<table>/<column>`` (numeric columns only; ``checkpoints`` is skipped)
=================  =====================================================================

Each value is written at its row's ``step``; non-finite values (NaN: a measure that does
not apply at that row) are left out. TensorBoard keeps scalars as 32-bit floats, so a
value read back equals ``numpy.float32`` of the stored one. The ``tensorboard`` package is
needed (``pip install 'hessdiag[tensorboard]'``) and imported only here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hessdiag._errors import InputError
from hessdiag.monitor import TENSORBOARD_TAGS

__all__ = ["ExportedRun", "event_files", "export_tensorboard", "run_scalars", "tag_of"]

_METRIC_TAGS = {"loss": "train/loss", "acc": "train/acc", "lr": "train/lr",
                "epoch": "train/epoch", "test_loss": "test/loss", "test_acc": "test/acc"}
_SKIPPED_TABLES = ("checkpoints",)


@dataclass(frozen=True)
class ExportedRun:
    run_id: str
    directory: Path
    scalars: int  # values written
    tags: tuple[str, ...]


def tag_of(table: str, column: str) -> str:
    """The TensorBoard tag of a run table's column."""
    if table == "sharpness":
        return TENSORBOARD_TAGS.get(column, f"hessdiag/{column}")
    if table == "alignment":
        return f"hessdiag/probe/{column}"
    if table == "metrics":
        return _METRIC_TAGS.get(column, f"train/{column}")
    return f"{table}/{column}"


def run_scalars(record: Any) -> Iterator[tuple[str, int, float]]:
    """``(tag, step, value)`` of every finite numeric value of a run's tables (a
    :class:`hessdiag.store.Record`), table by table, column by column, in row order."""
    tables: dict[str, dict[str, np.ndarray]] = {}
    for key, values in record.arrays.items():
        table, _, column = key.partition("/")
        if column and "/" not in column and table not in _SKIPPED_TABLES:
            tables.setdefault(table, {})[column] = np.asarray(values)
    for table, columns in tables.items():
        steps = columns.get("step")
        if steps is None or steps.dtype.kind not in "iuf":
            continue
        for column, values in columns.items():
            if column == "step" or values.dtype.kind not in "iufb":
                continue
            tag = tag_of(table, column)
            for step, value in zip(steps, values, strict=False):
                value = float(value)
                if math.isfinite(value) and math.isfinite(float(step)):
                    yield tag, int(step), value


def event_files(directory: Path) -> list[Path]:
    """The TensorBoard event files in ``directory`` (not below it)."""
    return sorted(directory.glob("events.out.tfevents.*")) if directory.is_dir() else []


def export_tensorboard(store: Any, out: str | Path, *, force: bool = False) -> list[ExportedRun]:
    """Write every run of ``store`` (a :class:`hessdiag.store.Store`) as TensorBoard event
    files in ``out/<run id>/``. Refuses (:class:`InputError`) when ``out`` is a file or a
    run's directory already holds event files, unless ``force``: then those event files
    are replaced (nothing else in ``out`` is touched). A store without runs is an error
    too: there would be nothing to open."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: tensorboard exports to a directory",
                         param="out")
    runs = store.runs()
    if not runs:
        raise InputError(f"store {store.path} has no runs: nothing to write for TensorBoard "
                         "(its analyses are single results, see hessdiag export --format "
                         "csv)", param="store")
    if not force:
        for record in runs:
            there = event_files(out / record.id)
            if there:
                raise InputError(f"--out {out}: {there[0]} already exists (an earlier "
                                 "export?); pass --force to replace it, or choose another "
                                 "--out", param="out")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch's writer needs the tensorboard package
        raise InputError("writing TensorBoard files needs the tensorboard package: pip "
                         "install 'hessdiag[tensorboard]'", param="format") from exc
    exported = []
    for record in runs:
        directory = out / record.id
        for old in event_files(directory):
            old.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(log_dir=str(directory))
        count, tags = 0, []
        try:
            for tag, step, value in run_scalars(record):
                writer.add_scalar(tag, value, step)
                count += 1
                if not tags or tags[-1] != tag:
                    tags.append(tag)
        finally:
            writer.close()
        exported.append(ExportedRun(record.id, directory, count, tuple(dict.fromkeys(tags))))
    return exported
