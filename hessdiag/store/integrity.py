"""Checksums of the main file's contents, so that a damaged byte is an error, never a value.

- Every dataset HDF5 can filter (fixed-size types, chunked) is written with HDF5's
  Fletcher-32 filter: reading a chunk whose bytes changed fails inside HDF5.
- Datasets the filter cannot cover (scalars, which cannot be chunked, and variable-length
  strings, whose text lives outside the chunks) carry a CRC-32 of their value in the
  dataset attribute :data:`DATASET_KEY`.
- Attributes cannot be filtered: every record group (and the root) carries a CRC-32 of its
  other attributes in :data:`ATTRS_KEY` (provenance, settings and the ``solvers`` JSON,
  which holds numbers).

A group without :data:`ATTRS_KEY` and a dataset with neither filter nor CRC were written
before checksums existed: they read as they are (``hessdiag verify`` counts them as
unchecked). A group that has :data:`ATTRS_KEY` was written with checksums, so every one of
its datasets must carry one.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

ATTRS_KEY = "checksum_attrs"
"""Group attribute: CRC-32 of the group's other attributes."""
DATASET_KEY = "checksum_crc32"
"""Dataset attribute: CRC-32 of a dataset's value where Fletcher-32 cannot apply."""


class Damage(Exception):
    """Bytes that fail their checksum (or cannot be parsed where a checksum says they
    should): ``what`` says which, ``offset`` where in the journal (``None`` in the main
    file)."""

    def __init__(self, what: str, offset: int | None = None) -> None:
        super().__init__(what)
        self.what, self.offset = what, offset


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, np.ndarray):
        return [str(value.dtype), _plain(value.tolist())]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def attrs_checksum(attrs: Mapping[str, Any]) -> int:
    """CRC-32 of a group's attributes other than :data:`ATTRS_KEY` (names, types and
    values; floats by their exact ``repr``)."""
    items = []
    for key in sorted(k for k in attrs.keys() if k != ATTRS_KEY):
        value = _plain(attrs[key])
        items.append([key, type(value).__name__, value])
    text = json.dumps(items, allow_nan=True, ensure_ascii=True, separators=(",", ":"))
    return zlib.crc32(text.encode())


def seal(obj: h5py.Group) -> None:
    """Write the checksum of a group's attributes (after its last attribute change)."""
    obj.attrs[ATTRS_KEY] = np.uint32(attrs_checksum(obj.attrs))


def sealed(obj: h5py.Group | h5py.Dataset) -> bool:
    return ATTRS_KEY in obj.attrs


def check_attrs(obj: h5py.Group) -> bool | None:
    """Whether a group's attributes match their checksum (``None``: it has none)."""
    try:
        if ATTRS_KEY not in obj.attrs:
            return None
        return int(obj.attrs[ATTRS_KEY]) == attrs_checksum(obj.attrs)
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        return False


def value_checksum(value: Any) -> int:
    """CRC-32 of a dataset's value as h5py reads it (strings as UTF-8, length-prefixed)."""
    arr = np.asarray(value)
    crc = zlib.crc32(f"{arr.dtype.kind}{arr.shape}".encode())
    if arr.dtype.kind in "OSU":
        for item in arr.reshape(-1).tolist():
            data = item if isinstance(item, bytes) else str(item).encode("utf-8",
                                                                         "surrogateescape")
            crc = zlib.crc32(len(data).to_bytes(8, "little") + data, crc)
        return crc
    return zlib.crc32(np.ascontiguousarray(arr).tobytes(), crc)


def filterable(shape: tuple[int, ...] | None, dtype: np.dtype) -> bool:
    """Whether HDF5's Fletcher-32 filter can cover a dataset (chunked, fixed-size type)."""
    return bool(shape) and h5py.check_vlen_dtype(dtype) is None and dtype.kind != "O"


def create_dataset(group: h5py.Group, name: str, data: Any = None, *,
                   shape: tuple[int, ...] | None = None, dtype: Any = None,
                   maxshape: tuple[int | None, ...] | None = None,
                   chunks: Any = None) -> h5py.Dataset:
    """A dataset with its checksum: Fletcher-32 where HDF5 can filter it, else a CRC-32
    attribute (call :func:`reseal_dataset` after changing such a dataset)."""
    if data is not None:
        arr = np.asarray(data)
        if dtype is None:
            dtype = arr.dtype
        if shape is None:
            shape = arr.shape
    dt = np.dtype(dtype) if dtype is not None else np.dtype(float)
    if filterable(shape, dt):
        dataset = group.create_dataset(name, data=data, shape=shape, dtype=dtype,
                                       maxshape=maxshape, chunks=chunks or True,
                                       fletcher32=True)
        return dataset
    dataset = group.create_dataset(name, data=data, shape=shape, dtype=dtype,
                                   maxshape=maxshape, chunks=chunks)
    dataset.attrs[DATASET_KEY] = np.uint32(value_checksum(dataset[()]))
    return dataset


def reseal_dataset(dataset: h5py.Dataset) -> None:
    """Renew the CRC-32 of a dataset that carries one (after it was extended)."""
    if DATASET_KEY in dataset.attrs:
        dataset.attrs[DATASET_KEY] = np.uint32(value_checksum(dataset[()]))


def protection(dataset: h5py.Dataset) -> str:
    """``fletcher32``, ``crc32`` or ``none`` (written before checksums)."""
    if dataset.fletcher32:
        return "fletcher32"
    if DATASET_KEY in dataset.attrs:
        return "crc32"
    return "none"


def read(dataset: h5py.Dataset) -> Any:
    """A dataset's value, checked against its checksum (raises :class:`Damage`)."""
    try:
        value = dataset[()]
    except OSError as exc:
        text = str(exc)
        if dataset.fletcher32 or "filter" in text or "checksum" in text:
            raise Damage("fails its Fletcher-32 checksum") from exc
        raise Damage(f"cannot be read ({text.splitlines()[0] if text else 'OSError'})") from exc
    if DATASET_KEY in dataset.attrs:
        try:
            expected = int(dataset.attrs[DATASET_KEY])
        except (OSError, ValueError, TypeError) as exc:
            raise Damage("has an unreadable checksum") from exc
        if value_checksum(value) != expected:
            raise Damage("fails its CRC-32 checksum")
    return value


def verify_group(group: h5py.Group) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Check a record group: attributes and every dataset. Returns (protection of each
    dataset by path, damages as (where, what)); never raises for damaged bytes."""
    protections: dict[str, str] = {}
    damages: list[tuple[str, str]] = []
    attrs = check_attrs(group)
    if attrs is False:
        damages.append(("its attributes", "fail their checksum"))
    datasets: list[tuple[str, h5py.Dataset]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            datasets.append((name, obj))

    try:
        group.visititems(visit)
    except (OSError, RuntimeError, KeyError) as exc:
        damages.append(("layout", f"cannot be listed ({str(exc).splitlines()[0]})"))
    for name, dataset in datasets:
        try:
            kind = protection(dataset)
            read(dataset)
        except Damage as exc:
            damages.append((f"dataset {name}", exc.what))
            continue
        except (OSError, RuntimeError, KeyError) as exc:
            damages.append((f"dataset {name}", f"cannot be read ({str(exc).splitlines()[0]})"))
            continue
        if kind == "none" and attrs is not None:
            damages.append((f"dataset {name}", "has lost its checksum"))
        protections[name] = kind
    return protections, damages
