"""Check a whole store against its checksums (``hessdiag verify``), and salvage the intact
records of a damaged one into a new store (``hessdiag verify --salvage``).

:func:`verify` reads every record of the main file (attributes and every dataset, against
their checksums: :mod:`hessdiag.store.integrity`) and every frame of the journal (header,
heads, tails, payload checksums; past damage it looks for the next intact frame), and
returns a :class:`Report` of what is intact and what is damaged, where. It never writes.

:func:`salvage` writes a new store holding every intact record: the main file's runs and
analyses whose attributes and datasets pass their checksums, then the journal's intact
frames applied in order (those that extend a record left out are skipped and counted). The
damaged store is only read.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py

from hessdiag._errors import first_line
from hessdiag._files import replacing
from hessdiag.store import (
    Store,
    StoreDamage,
    StoreError,
    _apply,
    _from_attr,
    _init_store,
    integrity,
)
from hessdiag.store import journal as _journal
from hessdiag.store.integrity import Damage


@dataclass
class Problem:
    """Damage: ``where`` (``journal byte N``, ``analysis ID``, ``run ID``, ``file``) and
    ``what``."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Report:
    """What :func:`verify` found. ``intact`` is true when nothing is damaged (a torn last
    frame, the trace of a crash, is not damage)."""

    path: str
    runs: int = 0
    analyses: int = 0
    main_runs: int = 0
    main_analyses: int = 0
    datasets: dict[str, int] = field(default_factory=lambda: {"fletcher32": 0, "crc32": 0,
                                                              "none": 0})
    unsealed_records: int = 0  # written before checksums: attributes not checked
    journal: str = "none"  # none | current | stale | damaged-header
    journal_version: int | None = None
    journal_frames: int = 0
    torn_bytes: int = 0
    damaged: list[Problem] = field(default_factory=list)
    damaged_records: list[str] = field(default_factory=list)  # "runs/ID", "analyses/ID"
    damaged_frames: int = 0

    @property
    def intact(self) -> bool:
        return not self.damaged

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["intact"] = self.intact
        out["damaged"] = [asdict(p) for p in self.damaged]
        return out


@dataclass
class Salvage:
    """What :func:`salvage` wrote to ``out``."""

    out: str
    runs: int
    analyses: int
    journal_frames: int
    left_out: list[str]  # records of the main file left out (damaged)
    skipped_frames: int  # intact journal frames that extend a record left out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Journal:
    """The journal's intact frames (meta, payload) that apply to the main file."""

    items: list[tuple[dict[str, Any], bytes]] = field(default_factory=list)


def _check_store_file(path: Path) -> None:
    if not path.exists():
        raise StoreError(f"store {path} does not exist: give the path of a store",
                         param="store")
    try:
        Store(path).validate()
    except StoreDamage:
        pass  # root attributes: reported by verify as damage


def _main(report: Report, f: h5py.File) -> tuple[set[str], set[str]]:
    """Check every record of the main file; returns the ids of intact runs and analyses."""
    if integrity.check_attrs(f) is False:
        report.damaged.append(Problem("file", "its root attributes (format, schema version, "
                                              "journal generation) fail their checksum"))
    intact: dict[str, set[str]] = {"runs": set(), "analyses": set()}
    for group in ("runs", "analyses"):
        what = "run" if group == "runs" else "analysis"
        try:
            keys = list(f[group].keys())
        except (OSError, KeyError, RuntimeError) as exc:
            report.damaged.append(Problem(f"/{group}", f"cannot be listed ({first_line(exc)})"))
            continue
        for key in keys:
            try:
                obj = f[group][key]
                if integrity.check_attrs(obj) is None:
                    report.unsealed_records += 1
                protections, damages = integrity.verify_group(obj)
            except (OSError, KeyError, RuntimeError) as exc:
                protections, damages = {}, [("record", f"cannot be read ({first_line(exc)})")]
            for kind in protections.values():
                report.datasets[kind] += 1
            for where, problem in damages:
                report.damaged.append(Problem(f"{what} {key}", f"{where} {problem}"))
            if damages:
                report.damaged_records.append(f"{group}/{key}")
            else:
                intact[group].add(key)
    report.main_runs = len(f["runs"]) if "runs" in f else 0
    report.main_analyses = len(f["analyses"]) if "analyses" in f else 0
    return intact["runs"], intact["analyses"]


def _generation_field(path: Path) -> str:
    with open(path, "rb") as fh:
        raw = fh.read(_journal.FILE_HEADER.size)
    if len(raw) < _journal.FILE_HEADER.size:
        return ""
    return _journal.FILE_HEADER.unpack(raw)[2].rstrip(b"\0").decode("ascii", "replace")


def _same_generation(damaged: str, main: str) -> bool:
    """A damaged header's generation still names the main file's if it differs from it in
    a few characters (two random 128-bit tokens never come that close)."""
    if len(damaged) != len(main):
        return False
    return sum(a != b for a, b in zip(damaged, main, strict=True)) <= 4


def _journal_frames(report: Report, path: Path, generation: str) -> _Journal:
    root_damaged = any(p.where == "file" for p in report.damaged)
    found = _Journal()
    jpath = _journal.journal_path(path)
    try:
        fh = open(jpath, "rb")
    except FileNotFoundError:
        return found
    with fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            header = _journal.read_header(fh)
        except Damage as exc:
            report.journal = "damaged-header"
            report.damaged.append(Problem(f"journal {jpath} byte 0", exc.what))
            if not _same_generation(_generation_field(jpath), generation):
                report.damaged.append(Problem(
                    f"journal {jpath}", "its header no longer names the file it extends, so "
                    "its frames are not applied (they may be merged into the file already)"))
                return found
            fh.seek(16)
            version = int.from_bytes(fh.read(4), "little")
            version = version if version in _journal.HEADS else _journal.FILE_VERSION
        else:
            report.journal_version = header.version
            if header.generation != generation and not (
                    root_damaged and _same_generation(header.generation, generation)):
                report.journal = "stale"  # merged by a compaction killed before deleting it
                return found
            report.journal = "current"
            version = header.version
        for item in _journal.walk(fh, version, size=size, check_payload=True, resync=True):
            if isinstance(item, _journal.Torn):
                report.torn_bytes = size - item.offset
            elif isinstance(item, _journal.Bad):
                report.damaged_frames += 1
                after = ("the next intact frame starts at byte "
                         f"{item.resumed}" if item.resumed is not None
                         else "no intact frame after it")
                report.damaged.append(Problem(f"journal {jpath} byte {item.offset}",
                                              f"{item.what} ({after})"))
            else:
                data = _journal.read_payload(fh, item) if item.payload_len else b""
                report.journal_frames += 1
                found.items.append((item.meta, data or b""))
    return found


def _counts(report: Report, f: h5py.File, frames: _Journal) -> None:
    runs, analyses = set(f["runs"].keys()), set(f["analyses"].keys())
    for meta, _ in frames.items:
        if meta.get("op") == "create_run":
            runs.add(str(meta.get("id")))
        elif meta.get("op") == "analysis":
            analyses.add(str(meta.get("id")))
    report.runs, report.analyses = len(runs), len(analyses)


def verify(path: str | os.PathLike) -> Report:
    """Check every record and journal frame of the store at ``path`` (read only)."""
    path = Path(path)
    _check_store_file(path)
    report = Report(path=str(path))
    try:
        with h5py.File(path, "r") as f:
            _main(report, f)
            frames = _journal_frames(report, path, _journal.main_generation(f))
            _counts(report, f, frames)
    except OSError as exc:
        raise StoreError(f"store {path} cannot be opened ({first_line(exc, 160)}): its HDF5 "
                         "structure is damaged; move it aside and use a new store path",
                         param="store") from exc
    return report


def salvage(path: str | os.PathLike, out: str | os.PathLike) -> tuple[Report, Salvage]:
    """Write a new store at ``out`` with every intact record of the store at ``path`` (the
    main file's intact runs and analyses, then the journal's intact frames in order).
    ``path`` is only read."""
    path, out = Path(path), Path(out)
    _check_store_file(path)
    if out.exists() or _journal.journal_path(out).exists():
        raise StoreError(f"salvage target {out} exists: give a new path (salvage never "
                         "overwrites a file)", param="salvage")
    with contextlib.suppress(OSError):
        if out.resolve() == path.resolve():
            raise StoreError("salvage target is the damaged store itself: give a new path",
                             param="salvage")
    if not out.parent.is_dir():
        raise StoreError(f"salvage target directory {out.parent} does not exist",
                         param="salvage")
    report = Report(path=str(path))
    with h5py.File(path, "r") as f:
        runs, analyses = _main(report, f)
        frames = _journal_frames(report, path, _journal.main_generation(f))
        _counts(report, f, frames)
        with replacing(out) as tmp, h5py.File(tmp, "w") as dst:
            _init_store(dst)
            created = _from_attr(f.attrs.get("created", ""))
            if isinstance(created, str) and created:
                dst.attrs["created"] = created
            for group, keep in (("runs", runs), ("analyses", analyses)):
                for key in sorted(keep):
                    _journal.copy_group(f[group][key], dst[group], key)
            applied, skipped = [], 0
            for meta, data in frames.items:
                hit = _journal.touches(meta)
                if hit is not None and f"{hit[0]}/{hit[1]}" in report.damaged_records:
                    skipped += 1
                    continue
                applied.append((meta, data))
            _apply(dst, applied)
            dst.attrs["journal_generation"] = _journal.new_generation()
            integrity.seal(dst)
            result = Salvage(out=str(out), runs=len(dst["runs"]),
                             analyses=len(dst["analyses"]), journal_frames=len(applied),
                             left_out=list(report.damaged_records), skipped_frames=skipped)
    return report, result
