"""The diagnostics store: one HDF5 file of runs and analyses (schema in docs/store.md).

Writes are atomic by replacement. Each record is written into a copy of the store, the
copy is flushed and fsynced, then renamed over the store (``os.replace``). A process
killed at any moment therefore leaves either the old file or the new one: the store
always opens and holds every earlier record, and a record is there whole or not at all.
Readers need no lock: they open whatever complete file the path names. Writers take an
exclusive ``fcntl`` lock on a sidecar ``<store>.lock`` so that concurrent writers (a
training run and an analysis) wait for each other instead of losing records.

The cost of a write grows with the store's size (a copy); records are small (no
eigenvectors, no weights) and writers batch what they append, so stores stay in the
megabytes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hessdiag._errors import InputError, first_line
from hessdiag._files import replacing

SCHEMA_VERSION = 1
FORMAT = "hessdiag-store"


class StoreError(InputError):
    """The store cannot be read or written (not HDF5, corrupted, newer schema, read-only)."""


@dataclass(frozen=True)
class Record:
    """One analysis (or run) as read from the store: metadata and arrays."""

    id: str
    group: str
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def kind(self) -> str:
        return str(self.attrs.get("kind", ""))


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_id(prefix: str) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    return f"{prefix}-{stamp}-{secrets.token_hex(3)}"


def _to_attr(value: Any) -> Any:
    """Attributes: strings and numbers as they are; everything else as JSON text."""
    if value is None:
        return "null"
    if isinstance(value, str | int | float | bool | np.integer | np.floating | np.bool_):
        return value
    return json.dumps(value, default=str)


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and (value == "null" or value[:1] in "[{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


class Store:
    """A hessdiag store at ``path`` (created on the first write)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`StoreError` unless the file is absent or a readable store of a
        schema this version understands."""
        if not self.path.exists():
            return
        if self.path.is_dir():
            raise StoreError(f"store {self.path} is a directory; give a file path such as "
                             f"{self.path / 'hessdiag.h5'}", param="store")
        if not h5py.is_hdf5(self.path):
            raise StoreError(f"store {self.path} is not an HDF5 file: give another store "
                             "path (hessdiag never overwrites a file it did not write)",
                             param="store")
        try:
            with h5py.File(self.path, "r") as f:
                fmt = _from_attr(f.attrs.get("format", ""))
                version = _from_attr(f.attrs.get("schema_version", -1))
        except OSError as exc:
            raise StoreError(f"store {self.path} is corrupted or truncated "
                             f"({first_line(exc, 160)}); move it aside and use a new store "
                             "path", param="store") from exc
        if fmt != FORMAT:
            raise StoreError(f"{self.path} is an HDF5 file but not a hessdiag store: give "
                             "another store path", param="store")
        if int(version) > SCHEMA_VERSION:
            raise StoreError(f"store {self.path} has schema version {version}, newer than "
                             f"this hessdiag reads ({SCHEMA_VERSION}): upgrade hessdiag",
                             param="store")

    def check_writable(self) -> None:
        """Validate, and make sure a record could be written (the directory accepts files)."""
        self.validate()
        directory = self.path.parent if str(self.path.parent) else Path(".")
        if not directory.is_dir():
            raise StoreError(f"cannot write store {self.path}: directory {directory} does "
                             "not exist", param="store")
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".hessdiag-probe-"):
                pass
        except OSError as exc:
            raise StoreError(f"cannot write store {self.path}: directory {directory} is not "
                             f"writable ({first_line(exc, 160)}); give a store path in a writable "
                             "directory", param="store") from exc

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[h5py.File]:
        """An open copy of the store to add to; it replaces the store when the block ends
        without an exception, and is discarded otherwise."""
        self.check_writable()
        with self._locked():
            self.validate()  # another writer may have replaced it meanwhile
            with replacing(self.path) as tmp_path:
                if self.path.exists():
                    shutil.copyfile(self.path, tmp_path)
                    mode = "r+"
                else:
                    mode = "w"
                with h5py.File(tmp_path, mode) as f:
                    if mode == "w":
                        f.attrs["format"] = FORMAT
                        f.attrs["schema_version"] = SCHEMA_VERSION
                        f.attrs["created"] = now()
                        f.create_group("runs")
                        f.create_group("analyses")
                    yield f
                    f.flush()

    def write_analysis(self, kind: str, attrs: Mapping[str, Any],
                       arrays: Mapping[str, Any], analysis_id: str | None = None) -> str:
        """Write one analysis whole; returns its id.

        ``arrays`` maps dataset paths (``"eigenvalues"``, ``"slq/nodes"``) to arrays or
        scalars; ``attrs`` become the group's attributes (non-scalars as JSON text).
        """
        analysis_id = analysis_id or new_id(kind)
        with self.transaction() as f:
            group = f["analyses"].create_group(analysis_id)
            group.attrs["kind"] = kind
            group.attrs["created"] = now()
            group.attrs["sequence"] = len(f["analyses"]) - 1  # write order
            for key, value in attrs.items():
                group.attrs[key] = _to_attr(value)
            for key, value in arrays.items():
                if value is None:
                    continue
                value = np.asarray(value)
                if value.dtype.kind in "UO":
                    value = value.astype(h5py.string_dtype())
                group.create_dataset(key, data=value)
        return analysis_id

    def create_run(self, run_id: str, attrs: Mapping[str, Any]) -> None:
        """Start a run's group (its config and provenance as attributes)."""
        with self.transaction() as f:
            if run_id in f["runs"]:
                raise StoreError(f"store {self.path} already has a run {run_id!r}: choose "
                                 "another run_name, or resume it", param="run_name")
            group = f["runs"].create_group(run_id)
            group.attrs["created"] = now()
            for key, value in attrs.items():
                group.attrs[key] = _to_attr(value)

    def append_run(self, run_id: str, tables: Mapping[str, Mapping[str, Any]],
                   attrs: Mapping[str, Any] | None = None) -> None:
        """Append rows to a run's tables in one record, e.g.
        ``{"metrics": {"step": [...], "loss": [...]}}``; columns are extendable 1-D
        datasets (created on first use; every column of a table gets the same number of
        rows). ``attrs`` update the run's attributes in the same record."""
        with self.transaction() as f:
            if run_id not in f["runs"]:
                raise StoreError(f"store {self.path} has no run {run_id!r}", param="store")
            group = f["runs"][run_id]
            for table, columns in tables.items():
                lengths = {len(np.atleast_1d(v)) for v in columns.values()}
                if len(lengths) != 1:
                    raise ValueError(f"columns of {table!r} have different lengths {lengths}")
                sub = group.require_group(table)
                for name, values in columns.items():
                    values = np.atleast_1d(np.asarray(values))
                    if values.dtype.kind == "U":
                        values = values.astype(h5py.string_dtype())
                    if name not in sub:
                        sub.create_dataset(name, data=values, maxshape=(None,),
                                           chunks=True)
                        continue
                    column = sub[name]
                    start = column.shape[0]
                    column.resize((start + len(values),))
                    column[start:] = values
            for key, value in (attrs or {}).items():
                group.attrs[key] = _to_attr(value)

    def truncate_run(self, run_id: str, table: str, keep: int) -> None:
        """Keep the first ``keep`` rows of a run's table (a resumed run drops the rows
        logged after the checkpoint it resumes from)."""
        with self.transaction() as f:
            if run_id not in f["runs"] or table not in f["runs"][run_id]:
                return
            for column in f["runs"][run_id][table].values():
                if column.shape[0] > keep:
                    column.resize((keep,))

    # ------------------------------------------------------------------ reading
    @contextlib.contextmanager
    def _reader(self) -> Iterator[h5py.File | None]:
        self.validate()
        if not self.path.exists():
            yield None
            return
        with h5py.File(self.path, "r") as f:
            yield f

    def analysis_ids(self) -> list[str]:
        return [r.id for r in self.analyses()]

    def analyses(self) -> list[Record]:
        """Every analysis, in the order they were written."""
        with self._reader() as f:
            if f is None:
                return []
            groups = sorted(f["analyses"].values(),
                            key=lambda g: (int(g.attrs.get("sequence", -1)),
                                           str(g.attrs["created"])))
            return [_record(g, "analyses") for g in groups]

    def analysis(self, analysis_id: str) -> Record:
        return self._one("analyses", analysis_id, "analysis")

    def run(self, run_id: str) -> Record:
        return self._one("runs", run_id, "run")

    def _one(self, group: str, key: str, what: str) -> Record:
        with self._reader() as f:
            if f is None or key not in f[group]:
                known = [] if f is None else list(f[group].keys())
                hint = f"; known: {', '.join(known[:5])}" if known else f" (no {group})"
                raise StoreError(f"no {what} {key!r} in store {self.path}{hint}", param="store")
            return _record(f[group][key], group)

    def runs(self) -> list[Record]:
        with self._reader() as f:
            if f is None:
                return []
            return [_record(g, "runs") for g in f["runs"].values()]

    def info(self) -> dict[str, Any]:
        with self._reader() as f:
            if f is None:
                return {"path": str(self.path), "exists": False}
            return {"path": str(self.path), "exists": True,
                    "schema_version": _from_attr(f.attrs["schema_version"]),
                    "created": _from_attr(f.attrs.get("created", "")),
                    "runs": len(f["runs"]), "analyses": len(f["analyses"])}


def _record(group: h5py.Group, kind: str) -> Record:
    arrays: dict[str, np.ndarray] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            arrays[name] = obj[()]

    group.visititems(visit)
    attrs = {k: _from_attr(v) for k, v in group.attrs.items()}
    return Record(id=group.name.rsplit("/", 1)[-1], group=kind, attrs=attrs, arrays=arrays)


