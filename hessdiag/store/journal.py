"""The store's journal: an append-only log of records beside the main HDF5 file.

``<store>.journal`` starts with a 64-byte header naming the *generation* of the main file
it extends (the main file's ``journal_generation`` attribute; ``""`` for stores written
before the journal existed). Then come frames, each one record::

    head   "HDJ<" | meta length (u32) | payload length (u64) | crc32 of meta + payload (u32)
    meta   JSON: {"op": "analysis" | "create_run" | "append_run" | "truncate_run", "id": ...}
    payload  an HDF5 file image laid out like a store (``/analyses/<id>`` or ``/runs/<id>``)
    tail   total frame length (u64) | ">HDJ"

A frame is appended with ``pwrite`` and fsynced before the write returns. A frame that is
not whole (a writer killed while appending: head or tail missing, lengths that run past
the end) ends the journal for readers, and the next writer truncates it away; a frame whose
checksum fails is skipped. Frames are applied in order on top of the main file by
:func:`apply` (the same code for a reader's view and for compaction).
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import h5py
import numpy as np

from hessdiag._files import replacing

FILE_MAGIC = b"HESSDIAG-JOURNAL"
FILE_VERSION = 1
FILE_HEADER = struct.Struct("<16sI32s12x")  # magic, version, generation (hex, padded)
HEAD = struct.Struct("<4sIQI")  # magic, meta length, payload length, crc32
TAIL = struct.Struct("<Q4s")  # total frame length, magic
HEAD_MAGIC, TAIL_MAGIC = b"HDJ<", b">HDJ"

FRAME_OVERHEAD = 64 * 1024
"""What a frame counts for in the compaction rule besides its bytes: reading a frame (an
HDF5 image to open, a record to merge) costs about as much as reading this many bytes of
the main file, so counting it bounds the number of frames readers merge."""


def journal_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".journal")


def new_generation() -> str:
    return secrets.token_hex(16)


def main_generation(f: h5py.File) -> str:
    value = f.attrs.get("journal_generation", "")
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True)
class Frame:
    offset: int
    length: int
    meta: dict[str, Any]
    meta_bytes: bytes
    payload_len: int
    crc: int

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def payload_offset(self) -> int:
        return self.offset + HEAD.size + len(self.meta_bytes)


def read_generation(fh: BinaryIO) -> str | None:
    """The generation a journal extends, or ``None`` if its header is not one."""
    fh.seek(0)
    raw = fh.read(FILE_HEADER.size)
    if len(raw) < FILE_HEADER.size:
        return None
    magic, version, gen = FILE_HEADER.unpack(raw)
    if magic != FILE_MAGIC or version != FILE_VERSION:
        return None
    return gen.rstrip(b"\0").decode("ascii", "replace")


def scan(fh: BinaryIO, start: int = FILE_HEADER.size, size: int | None = None) -> Iterator[Frame]:
    """The whole frames from ``start`` on (stops at the first frame that is not whole)."""
    if size is None:
        size = os.fstat(fh.fileno()).st_size
    offset = start
    while offset + HEAD.size + TAIL.size <= size:
        fh.seek(offset)
        head = fh.read(HEAD.size)
        if len(head) < HEAD.size:
            return
        magic, meta_len, payload_len, crc = HEAD.unpack(head)
        length = HEAD.size + meta_len + payload_len + TAIL.size
        if magic != HEAD_MAGIC or offset + length > size:
            return
        meta_bytes = fh.read(meta_len)
        fh.seek(offset + length - TAIL.size)
        tail = fh.read(TAIL.size)
        if len(meta_bytes) < meta_len or len(tail) < TAIL.size:
            return
        total, end_magic = TAIL.unpack(tail)
        if end_magic != TAIL_MAGIC or total != length:
            return
        try:
            meta = json.loads(meta_bytes)
        except ValueError:
            meta = {"op": "unreadable"}
        yield Frame(offset, length, meta, meta_bytes, payload_len, crc)
        offset += length


def read_payload(fh: BinaryIO, frame: Frame) -> bytes | None:
    """A frame's payload, or ``None`` if its checksum fails (a frame to skip)."""
    fh.seek(frame.payload_offset)
    payload = fh.read(frame.payload_len)
    if len(payload) < frame.payload_len:
        return None
    if zlib.crc32(payload, zlib.crc32(frame.meta_bytes)) != frame.crc:
        return None
    return payload


def create(path: Path, generation: str) -> None:
    """A new, empty journal extending ``generation`` (atomically, replacing any other)."""
    with replacing(path) as tmp:
        tmp.write_bytes(FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, generation.encode("ascii")))


def append(fd: int, offset: int, meta: dict[str, Any], payload: bytes | memoryview) -> Frame:
    """Write one frame at ``offset`` (its tail last) and fsync it."""
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    crc = zlib.crc32(payload, zlib.crc32(meta_bytes))
    head = HEAD.pack(HEAD_MAGIC, len(meta_bytes), len(payload), crc)
    length = HEAD.size + len(meta_bytes) + len(payload) + TAIL.size
    position = offset
    for part in (head + meta_bytes, payload, TAIL.pack(length, TAIL_MAGIC)):
        view = memoryview(part)
        while view:
            written = os.pwrite(fd, view, position)
            position += written
            view = view[written:]
    os.fsync(fd)
    return Frame(offset, length, meta, meta_bytes, len(payload), crc)


# --------------------------------------------------------------------------- images


def new_image() -> h5py.File:
    """An in-memory HDF5 file to lay a record out in (see :func:`image_bytes`)."""
    f = h5py.File(f"hessdiag-record-{secrets.token_hex(8)}.h5", "w", driver="core",
                  backing_store=False, libver="latest")
    f.create_group("runs")
    f.create_group("analyses")
    return f


def image_bytes(f: h5py.File) -> bytes:
    f.flush()
    data = f.id.get_file_image()
    f.close()
    return data


def open_image(data: bytes) -> h5py.File:
    return h5py.File(h5py.h5f.open_file_image(data), "r")


def copy_group(src: h5py.Group, parent: h5py.Group, name: str) -> h5py.Group:
    """Copy a group (attributes, datasets and subgroups) with the target file's own object
    format (not ``H5Ocopy``, which would carry the image's newer format into the store)."""
    dst = parent.create_group(name)
    for key, value in src.attrs.items():
        dst.attrs[key] = value
    for key, obj in src.items():
        if isinstance(obj, h5py.Group):
            copy_group(obj, dst, key)
        else:
            extendable = obj.maxshape != obj.shape
            dst.create_dataset(key, data=obj[()], dtype=obj.dtype,
                               maxshape=obj.maxshape if extendable else None,
                               chunks=True if extendable else None)
            for akey, avalue in obj.attrs.items():
                dst[key].attrs[akey] = avalue
    return dst


@dataclass
class Column:
    """One column of a run's table as the journal changes it: the first ``keep`` rows of
    the main file's column (``base`` rows; ``None``: created by the journal), then the
    appended ``chunks`` (already of the column's type: the writer converted them)."""

    base: int | None
    keep: int
    chunks: list[np.ndarray]
    dtype: np.dtype

    def length(self) -> int:
        return self.keep + sum(len(c) for c in self.chunks)

    def truncate(self, keep: int) -> None:
        if self.length() <= keep:
            return
        if keep <= self.keep:
            self.keep, self.chunks = keep, []
            return
        rest, chunks = keep - self.keep, []
        for chunk in self.chunks:
            if rest <= 0:
                break
            chunks.append(chunk[:rest])
            rest -= len(chunks[-1])
        self.chunks = chunks

    def appended(self) -> np.ndarray | None:
        if not self.chunks:
            return None
        return self.chunks[0] if len(self.chunks) == 1 else np.concatenate(self.chunks)


class RunDelta:
    """What a journal's frames do to one run, gathered in memory: the attributes it was
    created with (if the journal created it), attribute updates and per-column changes.
    Readers add it to the main file's run (:meth:`columns`); compaction writes it with one
    resize and one write per column (:meth:`write`), whatever the number of frames."""

    def __init__(self, run_id: str, main: h5py.Group | None) -> None:
        self.run_id, self.main = run_id, main
        self.exists = main is not None
        self.created: dict[str, Any] | None = None
        self.attrs: dict[str, Any] = {}
        self.columns: dict[tuple[str, str], Column] = {}

    def _main_column(self, table: str, name: str) -> h5py.Dataset | None:
        if self.main is None or table not in self.main:
            return None
        obj = self.main[table].get(name)
        return obj if isinstance(obj, h5py.Dataset) else None

    def _column(self, table: str, name: str) -> Column | None:
        key = (table, name)
        if key not in self.columns:
            dataset = self._main_column(table, name)
            if dataset is None:
                return None
            rows = dataset.shape[0] if dataset.shape else 0
            self.columns[key] = Column(rows, rows, [], dataset.dtype)
        return self.columns[key]

    def feed(self, meta: dict[str, Any], image: h5py.File | None) -> None:
        op = meta.get("op")
        if op == "create_run" and image is not None:
            if not self.exists:
                self.exists = True
                self.created = dict(image["runs"][self.run_id].attrs.items())
        elif op == "append_run" and image is not None:
            if not self.exists:
                return
            src = image["runs"][self.run_id]
            for table, columns in src.items():
                for name, dataset in columns.items():
                    values = dataset[()]
                    column = self._column(table, name)
                    if column is None:
                        self.columns[(table, name)] = Column(None, 0, [values], dataset.dtype)
                    else:
                        column.chunks.append(values)
            self.attrs.update(src.attrs.items())
        elif op == "truncate_run":
            if not self.exists:
                return
            table, keep = str(meta.get("table")), int(meta.get("keep", 0))
            names = {n for t, n in self.columns if t == table}
            if self.main is not None and table in self.main:
                names.update(k for k, v in self.main[table].items()
                             if isinstance(v, h5py.Dataset))
            for name in names:
                column = self._column(table, name)
                if column is not None:
                    column.truncate(keep)

    def write(self, runs: h5py.Group) -> None:
        """Apply to the file the delta was gathered against (compaction)."""
        if not self.exists:
            return
        if self.run_id in runs:
            group = runs[self.run_id]
        else:
            group = runs.create_group(self.run_id)
            for key, value in (self.created or {}).items():
                group.attrs[key] = value
        for key, value in self.attrs.items():
            group.attrs[key] = value
        for (table, name), column in self.columns.items():
            data = column.appended()
            sub = group.require_group(table)
            if column.base is None:
                if data is None:
                    sub.create_dataset(name, shape=(0,), dtype=column.dtype, maxshape=(None,),
                                       chunks=(1024,))
                else:
                    sub.create_dataset(name, data=data, dtype=column.dtype, maxshape=(None,),
                                       chunks=True)
                continue
            dataset = sub[name]
            if dataset.shape[0] != column.length():
                dataset.resize((column.length(),))
            if data is not None:
                dataset[column.keep:] = data

    def arrays(self, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The run's arrays: ``base`` (the main file's, ``{}`` for a run the journal
        created) with the delta applied, in the order h5py lists them."""
        out = dict(base)
        for (table, name), column in self.columns.items():
            key = f"{table}/{name}"
            parts = [out[key][:column.keep]] if column.base is not None and key in out else []
            parts += column.chunks
            if not parts:
                out[key] = np.zeros(0, dtype=column.dtype)
            else:
                out[key] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        # HDF5 lists a group's members by name, depth first: the order of the path parts
        return {k: out[k] for k in sorted(out, key=lambda k: tuple(k.split("/")))}


def touches(meta: dict[str, Any]) -> tuple[str, str] | None:
    """``("runs" | "analyses", id)`` of what a frame changes."""
    op = meta.get("op")
    if op == "analysis":
        return "analyses", str(meta.get("id"))
    if op in ("create_run", "append_run", "truncate_run"):
        return "runs", str(meta.get("id"))
    return None


# --------------------------------------------------------------------------- writer's index


@dataclass
class Index:
    """What a writer needs to know about a journal without reading its payloads."""

    ino: int
    generation: str
    end: int = FILE_HEADER.size  # offset of the first byte after the last whole frame
    frames: int = 0
    bytes: int = 0
    analyses: set[str] = field(default_factory=set)
    runs: set[str] = field(default_factory=set)
    columns: dict[tuple[str, str, str], int] = field(default_factory=dict)  # -> frame offset
    dtypes: dict[tuple[str, str, str], np.dtype] = field(default_factory=dict)

    def add(self, frame: Frame) -> None:
        meta = frame.meta
        op, key = meta.get("op"), str(meta.get("id"))
        if op == "analysis":
            self.analyses.add(key)
        elif op == "create_run":
            self.runs.add(key)
        elif op == "append_run":
            for column in meta.get("new_columns", []):
                table, name = column.split("/", 1)
                self.columns.setdefault((key, table, name), frame.offset)
        self.frames += 1
        self.bytes += frame.length
        self.end = frame.end

    def cost(self, overhead: int = FRAME_OVERHEAD) -> int:
        return self.bytes + overhead * self.frames

