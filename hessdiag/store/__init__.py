"""The diagnostics store: one HDF5 file of runs and analyses (schema in docs/store.md),
and beside it a journal of the records not yet merged into that file.

A write costs in proportion to its record, not to the store. Each record is laid out as
a small HDF5 image and appended as one checksummed frame to ``<store>.journal``, which is
fsynced before the write returns (:mod:`hessdiag.store.journal`). When the journal has
grown to a fraction of the main file (``compact_ratio``, each frame counting its bytes
plus :data:`~hessdiag.store.journal.FRAME_OVERHEAD`), the writer *compacts*: it copies the
main file, applies the journal's frames, fsyncs the copy, renames it over the main file
(``os.replace``) and deletes the journal. A compaction copies the store, but it comes
after records worth half the store were appended, so its cost per record is a constant
(the geometric-growth argument). The journal is also compacted once it holds
:data:`MAX_FRAMES` records, because readers merge every frame: that bounds a read, and adds
a thousandth of a store copy to each write. Small stores (up to a few hundred kB) are simply
rewritten on every write, as before.

Crash safety: the main file only ever changes by rename, and a journal frame only counts
when it is whole (its tail written last, its checksum right); a writer killed while
appending leaves a torn tail that readers ignore and the next writer cuts off. The main
file names the journal that extends it (``journal_generation``): a journal left behind by a
compaction killed between the rename and the deletion names an older generation and is
ignored. Readers need no lock: they open the main file, then the journal, and check that
the main file was not replaced in between (else they retry); what they read is the main
file plus the whole frames of its journal. Writers take an exclusive ``fcntl`` lock on a
sidecar ``<store>.lock`` so that concurrent writers (a training run and an analysis) wait
for each other instead of losing records.

The main file alone holds every record when there is no ``<store>.journal``; call
:meth:`Store.compact` (or ``hessdiag compact <store>``) before reading it
with h5py directly. ``Store(path, compact_ratio=0)`` rewrites the file on every write (the
previous design: the main file is always complete, a write costs a copy of the store).
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
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from hessdiag._errors import InputError, first_line
from hessdiag._files import _fsync_dir, replacing
from hessdiag.store import integrity
from hessdiag.store import journal as _journal
from hessdiag.store.integrity import Damage
from hessdiag.store.journal import FRAME_OVERHEAD, Frame, Index

SCHEMA_VERSION = 1
FORMAT = "hessdiag-store"
COMPACT_RATIO = 0.5
"""Compact when the journal (bytes plus :data:`FRAME_OVERHEAD` per frame) reaches this
fraction of the main file."""
MAX_FRAMES = 1000
"""Compact, whatever the sizes, when the journal holds this many records: a reader merges
every frame (about a millisecond each), so this bounds a read of a huge store to about a
second; a compaction then comes at most every 1000 writes, which adds a thousandth of a
copy of the store to a write (measured in docs/store.md)."""


class StoreError(InputError):
    """The store cannot be read or written (not HDF5, corrupted, newer schema, read-only)."""


class StoreDamage(StoreError):
    """Bytes of the store fail their checksum (or the journal's structure): damage, not a
    crash. Nothing is written to the store until it is salvaged."""


def salvage_hint(path: Path) -> str:
    return (f"`hessdiag verify {path} --salvage NEW.h5` copies every intact record to a "
            "new store")


def damage_error(path: Path, exc: Damage) -> StoreDamage:
    """The one-line error of damaged bytes in the store at ``path``."""
    if exc.offset is not None:
        journal = _journal.journal_path(path)
        return StoreDamage(f"store {path}: journal {journal} is damaged at byte {exc.offset} "
                           f"({exc.what}): not a crash, so hessdiag leaves the journal as "
                           f"it is and writes nothing to this store; {salvage_hint(path)}")
    return StoreDamage(f"store {path}: {exc.what} (damaged bytes in {path}); "
                       f"{salvage_hint(path)}")


@contextlib.contextmanager
def _damage_as_error(path: Path) -> Iterator[None]:
    try:
        yield
    except Damage as exc:
        raise damage_error(path, exc) from exc


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


def _init_store(f: h5py.File) -> None:
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["created"] = now()
    f.create_group("runs")
    f.create_group("analyses")


class _State:
    """What a writer checks a record against: the main file (or the copy being rewritten)
    plus the journal's index."""

    def __init__(self, main: h5py.File, index: Index | None = None,
                 journal: BinaryIO | None = None) -> None:
        self.main, self.index, self.journal = main, index, journal

    def has_run(self, run_id: str) -> bool:
        return run_id in self.main["runs"] or (self.index is not None
                                               and run_id in self.index.runs)

    def has_analysis(self, analysis_id: str) -> bool:
        return analysis_id in self.main["analyses"] or (self.index is not None and
                                                        analysis_id in self.index.analyses)

    def n_analyses(self) -> int:
        return len(self.main["analyses"]) + (0 if self.index is None
                                             else len(self.index.analyses))

    def has_table(self, run_id: str, table: str) -> bool:
        runs = self.main["runs"]
        if run_id in runs and table in runs[run_id]:
            return True
        return self.index is not None and any(
            key[0] == run_id and key[1] == table for key in self.index.columns)

    def column_dtype(self, run_id: str, table: str, name: str) -> np.dtype | None:
        runs = self.main["runs"]
        if run_id in runs and table in runs[run_id] and name in runs[run_id][table]:
            return runs[run_id][table][name].dtype
        if self.index is None or self.journal is None:
            return None
        key = (run_id, table, name)
        if key in self.index.dtypes:
            return self.index.dtypes[key]
        if key not in self.index.columns:
            return None
        frame = next(_journal.scan(self.journal, self.index.columns[key],
                                   version=self.index.version), None)
        if frame is None:
            return None
        with _journal.open_image(_journal.payload(self.journal, frame)) as image:
            dtype = image["runs"][run_id][table][name].dtype
        self.index.dtypes[key] = dtype
        return dtype


_Built = tuple[dict[str, Any], bytes] | None
"""A record ready to commit: the frame's meta and its HDF5 image (``None``: nothing to
write)."""


def _apply(f: h5py.File, items: list[tuple[dict[str, Any], bytes]]) -> None:
    """Apply journal records (meta, payload) in order to a store-shaped file: analyses are
    copied in; each run's changes are gathered and written once per column. Records that
    no longer apply (their run gone, their id already there) change nothing."""
    deltas: dict[str, _journal.RunDelta] = {}
    for meta, payload in items:
        hit = _journal.touches(meta)
        if hit is None:
            continue
        image = _journal.open_image(payload) if payload else None
        try:
            group, key = hit
            if group == "analyses":
                if image is not None and key not in f["analyses"]:
                    _journal.copy_group(image["analyses"][key], f["analyses"], key)
            else:
                if key not in deltas:
                    deltas[key] = _journal.RunDelta(key, f["runs"].get(key))
                deltas[key].feed(meta, image)
        finally:
            if image is not None:
                image.close()
    for delta in deltas.values():
        delta.write(f["runs"])


class _View:
    """A reader's consistent snapshot: the main file and the whole frames of its journal."""

    def __init__(self, main: h5py.File, journal: BinaryIO | None) -> None:
        self.main, self.journal = main, journal
        # every frame's checksum, also of frames this read does not use: damage anywhere in
        # the journal is reported, never skipped
        self.frames: list[Frame] = [] if journal is None else list(
            _journal.scan(journal, check_payload=True))

    def image(self, frame: Frame) -> h5py.File | None:
        """The frame's record (raises :class:`Damage` if its checksum fails)."""
        if self.journal is None or frame.payload_len == 0:
            return None
        return _journal.open_image(_journal.payload(self.journal, frame))

    def touching(self, group: str, key: str | None = None) -> list[Frame]:
        out = []
        for frame in self.frames:
            hit = _journal.touches(frame.meta)
            if hit is not None and hit[0] == group and (key is None or hit[1] == key):
                out.append(frame)
        return out

    def run_ids(self) -> list[str]:
        ids = set(self.main["runs"].keys())
        ids.update(str(fr.meta.get("id")) for fr in self.frames
                   if fr.meta.get("op") == "create_run")
        return sorted(ids)

    def analysis_frames(self) -> dict[str, Frame]:
        """The journal's analyses that are not in the main file (first frame of each id)."""
        out: dict[str, Frame] = {}
        for frame in self.touching("analyses"):
            key = str(frame.meta.get("id"))
            if key not in self.main["analyses"] and key not in out:
                out[key] = frame
        return out

    def run(self, run_id: str) -> Record | None:
        frames = self.touching("runs", run_id)
        main = self.main["runs"].get(run_id)
        if not frames:
            return None if main is None else _record(main, "runs")
        delta = _journal.RunDelta(run_id, main)
        for frame in frames:
            image = self.image(frame)
            try:
                delta.feed(frame.meta, image)
            finally:
                if image is not None:
                    image.close()
        if not delta.exists:
            return None
        if main is not None:
            base = _record(main, "runs")
            attrs, arrays = base.attrs, base.arrays
        else:
            attrs = {k: _from_attr(v) for k, v in (delta.created or {}).items()
                     if k != integrity.ATTRS_KEY}
            arrays = {}
        attrs.update({k: _from_attr(v) for k, v in delta.attrs.items()})
        return Record(id=run_id, group="runs", attrs=attrs, arrays=delta.arrays(arrays))

    def analysis(self, analysis_id: str, frame: Frame | None = None) -> Record | None:
        if analysis_id in self.main["analyses"]:
            return _record(self.main["analyses"][analysis_id], "analyses")
        if frame is None:
            frame = self.analysis_frames().get(analysis_id)
        image = None if frame is None else self.image(frame)
        if image is None:
            return None
        with image:
            return _record(image["analyses"][analysis_id], "analyses")


class Store:
    """A hessdiag store at ``path`` (created on the first write).

    ``compact_ratio``: compact the journal into the main file when it reaches this
    fraction of the main file's size; ``0`` rewrites the main file on every write (no
    journal)."""

    def __init__(self, path: str | os.PathLike, *, compact_ratio: float = COMPACT_RATIO,
                 max_frames: int = MAX_FRAMES) -> None:
        self.path = Path(path)
        self.compact_ratio = float(compact_ratio)
        self.max_frames = int(max_frames)
        self._index: Index | None = None  # the journal as this object last saw it
        self._writable = False  # check_writable passed once

    @property
    def journal_path(self) -> Path:
        """The journal beside the store (absent when the main file holds everything)."""
        return _journal.journal_path(self.path)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`StoreError` unless the file is absent or a readable store of a
        schema this version understands (:class:`StoreDamage` if its root attributes fail
        their checksum)."""
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
                root_intact = integrity.check_attrs(f)
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
        if root_intact is False:
            raise damage_error(self.path, Damage("the file's root attributes (format, "
                                                 "schema version, journal generation) fail "
                                                 "their checksum"))

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
        """An open copy of the store (the journal merged in) to add to; it replaces the
        store when the block ends without an exception, and is discarded otherwise. Costs
        a copy of the store: the record writers below append to the journal instead."""
        self.check_writable()
        with self._locked():
            self.validate()  # another writer may have replaced it meanwhile
            with self._rewrite() as f:
                yield f

    @contextlib.contextmanager
    def _rewrite(self) -> Iterator[h5py.File]:
        """(Under the lock.) A copy of the main file with the journal applied, renamed over
        the main file when the block ends; then the journal is deleted."""
        self._remove_orphans()
        exists = self.path.exists()
        with _damage_as_error(self.path), replacing(self.path) as tmp_path:
            if exists:
                shutil.copyfile(self.path, tmp_path)
            with h5py.File(tmp_path, "r+" if exists else "w") as f:
                if exists:
                    self._replay_journal(f)
                else:
                    _init_store(f)
                sealed = not exists or integrity.sealed(f)  # (validate checked the seal)
                f.attrs["journal_generation"] = _journal.new_generation()
                yield f
                if sealed:
                    integrity.seal(f)
                f.flush()
        # the journal now extends an older generation: readers ignore it from here on
        self._index = None
        with contextlib.suppress(FileNotFoundError):
            self.journal_path.unlink()
            _fsync_dir(self.path.parent)

    def _replay_journal(self, f: h5py.File) -> None:
        generation = _journal.main_generation(f)
        try:
            fh = open(self.journal_path, "rb")
        except FileNotFoundError:
            return
        with fh:
            header = _journal.read_header(fh)  # raises Damage: then nothing is replaced
            if header.generation != generation:
                return  # left by a compaction killed after its rename: already applied
            items = []
            for frame in list(_journal.scan(fh, version=header.version)):
                payload = _journal.payload(fh, frame) if frame.payload_len else b""
                items.append((frame.meta, payload))
            _apply(f, items)

    def _remove_orphans(self) -> None:
        """(Under the lock.) Temporary copies left by writers killed mid-rewrite."""
        directory = self.path.parent if str(self.path.parent) else Path(".")
        for orphan in directory.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                orphan.unlink()

    def _open_journal(self, generation: str) -> tuple[int, BinaryIO, Index]:
        """(Under the lock.) The journal extending ``generation`` (created if absent or
        stale), its torn tail cut off, and its index brought up to date."""
        path = self.journal_path
        fd: int | None
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            try:
                with os.fdopen(os.dup(fd), "rb") as fh:
                    stale = _journal.read_generation(fh) != generation
            except BaseException:
                os.close(fd)  # a damaged header: refused, the journal left as it is
                raise
            if stale:
                os.close(fd)
                fd = None
        if fd is None:
            _journal.create(path, generation)
            fd = os.open(path, os.O_RDWR)
        size = os.fstat(fd).st_size
        ino = os.fstat(fd).st_ino
        index = self._index
        if (index is None or index.ino != ino or index.generation != generation
                or index.end > size):
            index = Index(ino=ino, generation=generation)
        fh = os.fdopen(os.dup(fd), "rb")
        try:
            if index.frames == 0:
                index.version = _journal.read_header(fh).version
            # every new frame's checksum: a damaged journal is refused before anything
            # is written (the torn tail of a crash is the only thing cut off)
            for frame in _journal.scan(fh, index.end, size, version=index.version,
                                       check_payload=True):
                index.add(frame)
        except BaseException:
            fh.close()
            os.close(fd)
            raise
        if index.end < size:  # a writer was killed while appending: cut its torn frame off
            os.ftruncate(fd, index.end)
            os.fsync(fd)
        self._index = index
        return fd, fh, index

    def _write(self, build: Callable[[_State], _Built]) -> None:
        """Check and lay out one record against the current store (``build``), then append
        it to the journal, or rewrite the main file when the journal is due for
        compaction (or there is no main file yet)."""
        if not self._writable:
            self.check_writable()  # the probe file: once per Store, the lock checks the rest
            self._writable = True
        with self._locked(), _damage_as_error(self.path):
            self.validate()
            built: _Built = None
            if self.path.exists() and self.compact_ratio > 0:
                with h5py.File(self.path, "r") as main:
                    fd, fh, index = self._open_journal(_journal.main_generation(main))
                    try:
                        built = build(_State(main, index, fh))
                        if built is None:
                            return
                        meta, payload = built
                        cost = index.cost() + len(payload) + FRAME_OVERHEAD
                        if (cost < self.compact_ratio * os.path.getsize(self.path)
                                and index.frames < self.max_frames):
                            frame = _journal.append(fd, index.end, meta, payload,
                                                    index.version)
                            index.add(frame)
                            return
                    finally:
                        fh.close()
                        os.close(fd)
            with self._rewrite() as f:
                if built is None:
                    built = build(_State(f))
                    if built is None:
                        return
                _apply(f, [built])

    def compact(self) -> bool:
        """Merge the journal into the main file (which then holds every record, for h5py
        and other readers that know nothing of the journal). Returns whether there was
        anything to merge."""
        if not self.path.exists() or not self.journal_path.exists():
            return False
        self.check_writable()
        with self._locked(), _damage_as_error(self.path):
            self.validate()
            with h5py.File(self.path, "r") as main:
                generation = _journal.main_generation(main)
                check_main(main)  # a damaged store is refused, not copied on
            try:
                with open(self.journal_path, "rb") as fh:
                    header = _journal.read_header(fh)
                    pending = (header.generation == generation
                               and next(_journal.scan(fh, version=header.version,
                                                      check_payload=True), None) is not None)
            except FileNotFoundError:
                return False
            if not pending:  # empty, or left over from an interrupted compaction
                self.journal_path.unlink()
                self._index = None
                return False
            with self._rewrite():
                pass
            return True

    def pending(self) -> int:
        """Records in the journal, not yet in the main file."""
        with self._view() as view:
            return 0 if view is None else len(view.frames)

    def write_analysis(self, kind: str, attrs: Mapping[str, Any],
                       arrays: Mapping[str, Any], analysis_id: str | None = None) -> str:
        """Write one analysis whole; returns its id.

        ``arrays`` maps dataset paths (``"eigenvalues"``, ``"slq/nodes"``) to arrays or
        scalars; ``attrs`` become the group's attributes (non-scalars as JSON text).
        """
        analysis_id = analysis_id or new_id(kind)

        def build(state: _State) -> _Built:
            if state.has_analysis(analysis_id):
                raise StoreError(f"store {self.path} already has an analysis "
                                 f"{analysis_id!r}", param="analysis_id")
            image = _journal.new_image()
            try:
                group = image["analyses"].create_group(analysis_id)
                group.attrs["kind"] = kind
                group.attrs["created"] = now()
                group.attrs["sequence"] = state.n_analyses()  # write order
                for key, value in attrs.items():
                    group.attrs[key] = _to_attr(value)
                integrity.seal(group)
                for key, value in arrays.items():
                    if value is None:
                        continue
                    value = np.asarray(value)
                    if value.dtype.kind in "UO":
                        value = value.astype(h5py.string_dtype())
                    integrity.create_dataset(group, key, data=value)
            except BaseException:
                image.close()
                raise
            return {"op": "analysis", "id": analysis_id}, _journal.image_bytes(image)

        self._write(build)
        return analysis_id

    def create_run(self, run_id: str, attrs: Mapping[str, Any]) -> None:
        """Start a run's group (its config and provenance as attributes)."""

        def build(state: _State) -> _Built:
            if state.has_run(run_id):
                raise StoreError(f"store {self.path} already has a run {run_id!r}: choose "
                                 "another run_name, or resume it", param="run_name")
            image = _journal.new_image()
            try:
                group = image["runs"].create_group(run_id)
                group.attrs["created"] = now()
                for key, value in attrs.items():
                    group.attrs[key] = _to_attr(value)
                integrity.seal(group)
            except BaseException:
                image.close()
                raise
            return {"op": "create_run", "id": run_id}, _journal.image_bytes(image)

        self._write(build)

    def append_run(self, run_id: str, tables: Mapping[str, Mapping[str, Any]],
                   attrs: Mapping[str, Any] | None = None) -> None:
        """Append rows to a run's tables in one record, e.g.
        ``{"metrics": {"step": [...], "loss": [...]}}``; columns are extendable 1-D
        datasets (created on first use; every column of a table gets the same number of
        rows). ``attrs`` update the run's attributes in the same record."""

        def build(state: _State) -> _Built:
            if not state.has_run(run_id):
                raise StoreError(f"store {self.path} has no run {run_id!r}", param="store")
            image = _journal.new_image()
            new_columns = []
            try:
                group = image["runs"].create_group(run_id)
                for table, columns in tables.items():
                    lengths = {len(np.atleast_1d(v)) for v in columns.values()}
                    if len(lengths) != 1:
                        raise ValueError(f"columns of {table!r} have different lengths "
                                         f"{lengths}")
                    sub = group.require_group(table)
                    for name, values in columns.items():
                        values = np.atleast_1d(np.asarray(values))
                        if values.ndim != 1:
                            raise ValueError(f"column {table}/{name} must be 1-D; got shape "
                                             f"{values.shape}")
                        if values.dtype.kind == "U":
                            values = values.astype(h5py.string_dtype())
                        dtype = state.column_dtype(run_id, table, name)
                        if dtype is None:
                            sub.create_dataset(name, data=values)
                            new_columns.append(f"{table}/{name}")
                        else:  # converted to the column's type now, as an append would
                            sub.create_dataset(name, shape=values.shape, dtype=dtype)
                            if len(values):
                                sub[name][...] = values
                for key, value in (attrs or {}).items():
                    group.attrs[key] = _to_attr(value)
            except BaseException:
                image.close()
                raise
            meta = {"op": "append_run", "id": run_id, "new_columns": new_columns}
            return meta, _journal.image_bytes(image)

        self._write(build)

    def truncate_run(self, run_id: str, table: str, keep: int) -> None:
        """Keep the first ``keep`` rows of a run's table (a resumed run drops the rows
        logged after the checkpoint it resumes from)."""

        def build(state: _State) -> _Built:
            if not state.has_run(run_id) or not state.has_table(run_id, table):
                return None
            return {"op": "truncate_run", "id": run_id, "table": table,
                    "keep": int(keep)}, b""

        self._write(build)

    # ------------------------------------------------------------------ reading
    @contextlib.contextmanager
    def _view(self) -> Iterator[_View | None]:
        """The main file and its journal as of one moment (no lock: if a compaction
        replaces the main file between opening it and opening the journal, try again)."""
        self.validate()
        with _damage_as_error(self.path):
            yield from self._view_attempts()

    def _view_attempts(self) -> Iterator[_View | None]:
        for attempt in range(200):
            try:
                main = h5py.File(self.path, "r")
            except FileNotFoundError:
                yield None
                return
            except OSError as exc:
                if not self.path.exists():
                    yield None
                    return
                raise StoreError(f"store {self.path} is corrupted or truncated "
                                 f"({first_line(exc, 160)}); move it aside and use a new "
                                 "store path", param="store") from exc
            journal: BinaryIO | None = None
            try:
                ino = os.fstat(main.id.get_vfd_handle()).st_ino
                try:
                    journal = open(self.journal_path, "rb")
                except FileNotFoundError:
                    journal = None
                try:
                    current = os.stat(self.path).st_ino
                except FileNotFoundError:
                    current = -1
                if current != ino:  # replaced meanwhile: this journal may not extend it
                    continue
                if journal is not None and (_journal.read_generation(journal)
                                            != _journal.main_generation(main)):
                    journal.close()  # left behind by an interrupted compaction
                    journal = None
                yield _View(main, journal)
                return
            finally:
                if journal is not None:
                    journal.close()
                main.close()
                if attempt:
                    time.sleep(0.001)
        raise StoreError(f"store {self.path} keeps being replaced while it is read; try "
                         "again", param="store")

    def analysis_ids(self) -> list[str]:
        return [r.id for r in self.analyses()]

    def analyses(self) -> list[Record]:
        """Every analysis, in the order they were written."""
        with self._view() as view:
            if view is None:
                return []
            records = [_record(g, "analyses") for g in view.main["analyses"].values()]
            for key, frame in view.analysis_frames().items():
                record = view.analysis(key, frame)
                if record is not None:
                    records.append(record)
            return sorted(records, key=lambda r: (int(r.attrs.get("sequence", -1)),
                                                  str(r.attrs["created"])))

    def analysis(self, analysis_id: str) -> Record:
        with self._view() as view:
            record = None if view is None else view.analysis(analysis_id)
            if record is None:
                self._missing(view, "analyses", analysis_id, "analysis")
            return record

    def run(self, run_id: str) -> Record:
        with self._view() as view:
            record = None if view is None else view.run(run_id)
            if record is None:
                self._missing(view, "runs", run_id, "run")
            return record

    def _missing(self, view: _View | None, group: str, key: str, what: str) -> None:
        if view is None:
            known: list[str] = []
        elif group == "runs":
            known = view.run_ids()
        else:
            known = list(view.main["analyses"].keys()) + list(view.analysis_frames())
        hint = f"; known: {', '.join(known[:5])}" if known else f" (no {group})"
        raise StoreError(f"no {what} {key!r} in store {self.path}{hint}", param="store")

    def runs(self) -> list[Record]:
        with self._view() as view:
            if view is None:
                return []
            records = [view.run(run_id) for run_id in view.run_ids()]
            return [r for r in records if r is not None]

    def snapshot(self) -> Snapshot:
        """Every run and analysis read once (each checked against its checksums), for
        code that reads them many times: the figures and pages drawn from one store."""
        return Snapshot(self.path, tuple(self.runs()), tuple(self.analyses()))

    def info(self) -> dict[str, Any]:
        with self._view() as view:
            if view is None:
                return {"path": str(self.path), "exists": False}
            f = view.main
            return {"path": str(self.path), "exists": True,
                    "schema_version": _from_attr(f.attrs["schema_version"]),
                    "created": _from_attr(f.attrs.get("created", "")),
                    "runs": len(view.run_ids()),
                    "analyses": len(f["analyses"]) + len(view.analysis_frames())}


@dataclass(frozen=True)
class Snapshot:
    """A store's records as read at one moment (:meth:`Store.snapshot`), with the reading
    methods of :class:`Store`; later writes to the store are not in it."""

    path: Path
    _runs: tuple[Record, ...]
    _analyses: tuple[Record, ...]

    def runs(self) -> list[Record]:
        return list(self._runs)

    def analyses(self) -> list[Record]:
        return list(self._analyses)

    def snapshot(self) -> Snapshot:
        """Itself (it is one already): code that takes a store or a snapshot reads it once."""
        return self

    def run(self, run_id: str) -> Record:
        return self._one(self._runs, run_id, "run")

    def analysis(self, analysis_id: str) -> Record:
        return self._one(self._analyses, analysis_id, "analysis")

    def _one(self, records: tuple[Record, ...], key: str, what: str) -> Record:
        for record in records:
            if record.id == key:
                return record
        known = ", ".join(r.id for r in records[:5])
        raise StoreError(f"no {what} {key!r} in store {self.path}"
                         + (f"; known: {known}" if known else f" (no {what}s)"), param="store")


def _record(group: h5py.Group, kind: str) -> Record:
    """A run or analysis read whole, every value checked against its checksum (raises
    :class:`Damage` naming the record and the dataset)."""
    what = "run" if kind == "runs" else "analysis"
    record_id = group.name.rsplit("/", 1)[-1]
    arrays: dict[str, np.ndarray] = {}
    names: list[tuple[str, h5py.Dataset]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            names.append((name, obj))

    try:
        if integrity.check_attrs(group) is False:
            raise Damage(f"{what} {record_id}: its attributes fail their checksum")
        group.visititems(visit)
        for name, dataset in names:
            try:
                arrays[name] = integrity.read(dataset)
            except Damage as exc:
                raise Damage(f"{what} {record_id}: dataset {name} {exc.what}") from exc
        attrs = {k: _from_attr(v) for k, v in group.attrs.items()
                 if k != integrity.ATTRS_KEY}
    except (OSError, RuntimeError, KeyError) as exc:  # HDF5's own structures damaged
        raise Damage(f"{what} {record_id} cannot be read ({first_line(exc, 160)})") from exc
    return Record(id=record_id, group=kind, attrs=attrs, arrays=arrays)


def check_main(f: h5py.File) -> None:
    """Read every record of a main file against its checksums (raises :class:`Damage` at
    the first damaged one)."""
    if integrity.check_attrs(f) is False:
        raise Damage("the file's root attributes fail their checksum")
    for group in ("runs", "analyses"):
        for key in f[group]:
            what = "run" if group == "runs" else "analysis"
            _, damages = integrity.verify_group(f[group][key])
            if damages:
                where, problem = damages[0]
                raise Damage(f"{what} {key}: {where} {problem}")
