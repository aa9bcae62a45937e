"""The store's journal: an append-only log of records beside the main HDF5 file.

``<store>.journal`` starts with a 64-byte header naming the *generation* of the main file
it extends (the main file's ``journal_generation`` attribute; ``""`` for stores written
before the journal existed), with a CRC-32 of the header. Then come frames, each one
record::

    head   "HDJ<" | meta length (u32) | payload length (u64) | crc32 of meta + payload (u32)
           | crc32 of the head's first 20 bytes (u32)
    meta   JSON: {"op": "analysis" | "create_run" | "append_run" | "truncate_run", "id": ...}
    payload  an HDF5 file image laid out like a store (``/analyses/<id>`` or ``/runs/<id>``)
    tail   total frame length (u64) | ">HDJ"

(Journals of version 1, written before the head's own checksum existed, have a 20-byte head
and a header without CRC; they read and grow in their own format.)

A frame is appended with ``pwrite`` and fsynced before the write returns. Only an
incomplete *last* frame is a crash (a writer killed while appending): fewer bytes than a
head at the end, or a whole, valid head whose frame runs past the end of the file. Readers
stop before it and the next writer truncates it away. Anything else that is wrong (a
header that is not one, a frame head that fails its checksum with bytes after it, a wrong
tail, a payload that fails its checksum) is *damage*: :class:`~hessdiag.store.integrity.Damage`
is raised, and nothing may then truncate or rewrite the journal (``hessdiag verify
--salvage`` copies its intact frames to a new store: :func:`walk` finds frames after
damage). Frames are applied in order on top of the main file (the same code for a
reader's view and for compaction).
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
from hessdiag.store import integrity
from hessdiag.store.integrity import Damage

FILE_MAGIC = b"HESSDIAG-JOURNAL"
FILE_VERSION = 2
# magic, version, generation (hex, padded), crc32 of the 52 bytes before it (version 1: 0)
FILE_HEADER = struct.Struct("<16sI32sI8x")
HEAD_V1 = struct.Struct("<4sIQI")  # magic, meta length, payload length, crc32
HEAD = struct.Struct("<4sIQII")  # ... and crc32 of the head's first 20 bytes
HEADS = {1: HEAD_V1, 2: HEAD}
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
    version: int = FILE_VERSION

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def payload_offset(self) -> int:
        return self.offset + HEADS[self.version].size + len(self.meta_bytes)


@dataclass(frozen=True)
class Header:
    version: int
    generation: str


def _header_crc(raw: bytes) -> int:
    return zlib.crc32(raw[:52])


def read_header(fh: BinaryIO) -> Header:
    """The journal's header (raises :class:`Damage` if it is not a whole, valid one: the
    header is written whole, by rename, so no crash leaves it short)."""
    fh.seek(0)
    raw = fh.read(FILE_HEADER.size)
    if len(raw) < FILE_HEADER.size:
        raise Damage(f"its header is incomplete ({len(raw)} of {FILE_HEADER.size} bytes)", 0)
    magic, version, gen, crc = FILE_HEADER.unpack(raw)
    if magic != FILE_MAGIC:
        raise Damage("its header does not start with the journal's magic bytes", 0)
    if version == 2:
        if crc != _header_crc(raw):
            raise Damage("its header fails its checksum", 0)
        if raw[56:] != bytes(8):
            raise Damage("its header has damaged padding", 0)
    elif version == 1:
        if raw[52:] != bytes(12):
            raise Damage("its header has damaged padding", 0)
    else:
        raise Damage(f"its header names an unknown version {version}", 0)
    text = gen.rstrip(b"\0")
    if any(c not in b"0123456789abcdef" for c in text):
        raise Damage("its header's generation is not hexadecimal", 0)
    return Header(version, text.decode("ascii"))


def read_generation(fh: BinaryIO) -> str:
    """The generation a journal extends (raises :class:`Damage` for a bad header)."""
    return read_header(fh).generation


@dataclass(frozen=True)
class Torn:
    """An incomplete last frame (a writer killed while appending): from ``offset`` to the
    end of the file."""

    offset: int


@dataclass(frozen=True)
class Bad:
    """Damage at ``offset``: ``what``; ``resumed`` is where the next intact frame starts
    (``None``: none after it)."""

    offset: int
    what: str
    resumed: int | None


def _frame_at(fh: BinaryIO, offset: int, size: int, version: int,
              check_payload: bool) -> Frame | Torn | Bad:
    head_struct = HEADS[version]
    if size - offset < head_struct.size:
        return Torn(offset)
    fh.seek(offset)
    head = fh.read(head_struct.size)
    if version == 2:
        magic, meta_len, payload_len, crc, head_crc = head_struct.unpack(head)
        if magic != HEAD_MAGIC or zlib.crc32(head[:20]) != head_crc:
            return Bad(offset, "a frame head fails its checksum", None)
    else:
        magic, meta_len, payload_len, crc = head_struct.unpack(head)
        if magic != HEAD_MAGIC:
            return Bad(offset, "a frame head lacks its magic bytes", None)
    length = head_struct.size + meta_len + payload_len + TAIL.size
    if offset + length > size:
        return Torn(offset)
    meta_bytes = fh.read(meta_len)
    fh.seek(offset + length - TAIL.size)
    tail = fh.read(TAIL.size)
    total, end_magic = TAIL.unpack(tail)
    if end_magic != TAIL_MAGIC or total != length:
        return Bad(offset, "a frame's tail is wrong", None)
    frame = Frame(offset, length, {}, meta_bytes, payload_len, crc, version)
    if check_payload and read_payload(fh, frame) is None:
        return Bad(offset, "a frame fails its checksum", None)
    try:
        meta = json.loads(meta_bytes)
        if not isinstance(meta, dict):
            raise ValueError
    except ValueError:
        return Bad(offset, "a frame's record name cannot be read", None)
    return Frame(offset, length, meta, meta_bytes, payload_len, crc, version)


def _resync(fh: BinaryIO, start: int, size: int, version: int) -> int | None:
    """The offset of the next intact frame after ``start`` (salvage after damage)."""
    fh.seek(start)
    data = fh.read(size - start)
    position = 0
    while True:
        position = data.find(HEAD_MAGIC, position)
        if position < 0:
            return None
        found = _frame_at(fh, start + position, size, version, check_payload=True)
        if isinstance(found, Frame):
            return start + position
        position += 1


def walk(fh: BinaryIO, version: int, start: int = FILE_HEADER.size, size: int | None = None,
         *, check_payload: bool = True,
         resync: bool = False) -> Iterator[Frame | Torn | Bad]:
    """The journal from ``start`` on: whole frames, then possibly a :class:`Torn` tail. On
    damage, a :class:`Bad`; with ``resync``, the walk goes on at the next intact frame."""
    if size is None:
        size = os.fstat(fh.fileno()).st_size
    offset = start
    while offset < size:
        found = _frame_at(fh, offset, size, version, check_payload)
        if isinstance(found, Frame):
            yield found
            offset = found.end
            continue
        if isinstance(found, Torn):
            yield found
            return
        if not resync:
            yield found
            return
        nxt = _resync(fh, offset + 1, size, version)
        yield Bad(found.offset, found.what, nxt)
        if nxt is None:
            return
        offset = nxt


def scan(fh: BinaryIO, start: int = FILE_HEADER.size, size: int | None = None, *,
         version: int | None = None, check_payload: bool = False) -> Iterator[Frame]:
    """The whole frames from ``start`` on; stops before a torn last frame; raises
    :class:`Damage` at damage (a payload's checksum is checked with ``check_payload``, else
    when it is read: :func:`payload`)."""
    if version is None:
        version = read_header(fh).version
    for item in walk(fh, version, start, size, check_payload=check_payload):
        if isinstance(item, Frame):
            yield item
        elif isinstance(item, Bad):
            raise Damage(item.what, item.offset)
        else:
            return


def read_payload(fh: BinaryIO, frame: Frame) -> bytes | None:
    """A frame's payload, or ``None`` if its checksum fails."""
    fh.seek(frame.payload_offset)
    payload = fh.read(frame.payload_len)
    if len(payload) < frame.payload_len:
        return None
    if zlib.crc32(payload, zlib.crc32(frame.meta_bytes)) != frame.crc:
        return None
    return payload


def payload(fh: BinaryIO, frame: Frame) -> bytes:
    """A frame's payload (raises :class:`Damage` if its checksum fails)."""
    data = read_payload(fh, frame)
    if data is None:
        raise Damage("a frame fails its checksum", frame.offset)
    return data


def create(path: Path, generation: str) -> None:
    """A new, empty journal extending ``generation`` (atomically, replacing any other)."""
    raw = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, generation.encode("ascii"), 0)
    raw = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, generation.encode("ascii"),
                           _header_crc(raw))
    with replacing(path) as tmp:
        tmp.write_bytes(raw)


def append(fd: int, offset: int, meta: dict[str, Any], payload: bytes | memoryview,
           version: int = FILE_VERSION) -> Frame:
    """Write one frame at ``offset`` (its tail last) and fsync it."""
    meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
    crc = zlib.crc32(payload, zlib.crc32(meta_bytes))
    if version == 2:
        first = HEAD_V1.pack(HEAD_MAGIC, len(meta_bytes), len(payload), crc)
        head = first + struct.pack("<I", zlib.crc32(first))
    else:
        head = HEAD_V1.pack(HEAD_MAGIC, len(meta_bytes), len(payload), crc)
    length = len(head) + len(meta_bytes) + len(payload) + TAIL.size
    position = offset
    for part in (head + meta_bytes, payload, TAIL.pack(length, TAIL_MAGIC)):
        view = memoryview(part)
        while view:
            written = os.pwrite(fd, view, position)
            position += written
            view = view[written:]
    os.fsync(fd)
    return Frame(offset, length, meta, meta_bytes, len(payload), crc, version)


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
            try:
                value = integrity.read(obj)
            except Damage as exc:
                raise Damage(f"dataset {obj.name} {exc.what}") from exc
            dataset = integrity.create_dataset(dst, key, data=value, dtype=obj.dtype,
                                               maxshape=obj.maxshape if extendable else None,
                                               chunks=True if extendable else None)
            for akey, avalue in obj.attrs.items():
                if akey != integrity.DATASET_KEY:
                    dataset.attrs[akey] = avalue
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
            # a sealed run is resealed below: first make sure its attributes were intact
            if integrity.check_attrs(group) is False:
                raise Damage(f"run {self.run_id}: its attributes fail their checksum")
            sealed = integrity.sealed(group)
        else:
            group = runs.create_group(self.run_id)
            for key, value in (self.created or {}).items():
                group.attrs[key] = value
            sealed = True
        for key, value in self.attrs.items():
            group.attrs[key] = value
        if sealed:
            integrity.seal(group)
        for (table, name), column in self.columns.items():
            data = column.appended()
            sub = group.require_group(table)
            if column.base is None:
                if data is None:
                    integrity.create_dataset(sub, name, shape=(0,), dtype=column.dtype,
                                             maxshape=(None,), chunks=(1024,))
                else:
                    integrity.create_dataset(sub, name, data=data, dtype=column.dtype,
                                             maxshape=(None,), chunks=True)
                continue
            dataset = sub[name]
            if integrity.DATASET_KEY in dataset.attrs:  # renewed below: check it first
                try:
                    integrity.read(dataset)
                except Damage as exc:
                    raise Damage(f"run {self.run_id}: dataset {table}/{name} "
                                 f"{exc.what}") from exc
            try:
                if dataset.shape[0] != column.length():
                    dataset.resize((column.length(),))
                if data is not None:
                    dataset[column.keep:] = data
            except OSError as exc:  # a partly rewritten chunk failed its checksum
                raise Damage(f"run {self.run_id}: dataset {table}/{name} fails its "
                             "Fletcher-32 checksum") from exc
            integrity.reseal_dataset(dataset)

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
    version: int = FILE_VERSION  # of the journal's format (its header)
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

