"""Damage is not a crash: a damaged byte anywhere in the journal or in a record of the main
file is one error line and exit 2 (show, export, compact, writes), the journal's bytes are
never truncated or rewritten, `verify` names the damage (exit 1) and `verify --salvage`
keeps every intact record. Only an incomplete last journal frame is a crash (a torn tail),
and the other records read as they are."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import run_cli

from hessdiag.store import Store, StoreDamage, integrity
from hessdiag.store import journal as jr

HINT = "`hessdiag verify {p} --salvage NEW.h5` copies every intact record to a new store"
ALL_ANALYSES = ["m-analysis", "j-a1", "j-a2"]


def spectrum(values: list[float]) -> dict[str, np.ndarray]:
    return {"eigenvalues": np.array(values), "residuals": np.zeros(len(values)),
            "converged": np.ones(len(values), dtype=bool)}


def build(tmp_path: Path) -> Path:
    """A tiny store: one analysis and one run in the main file (every kind of dataset), then
    three journal frames: analysis j-a1, rows appended to the run, analysis j-a2."""
    path = tmp_path / "s.h5"
    main = Store(path, compact_ratio=0)
    main.write_analysis("spectrum", {"settings": {"tol": 1e-3, "hvps": 7}},
                        {"eigenvalues": np.array([0.45196, 0.125]),
                         "residuals": np.array([1e-5, 2e-5]),
                         "converged": np.array([True, False]), "trace": 2.5,
                         "trace_stderr": 0.25,
                         "extra/grid": np.arange(6.0).reshape(2, 3),
                         "layers/name": np.array(["alpha-layer", "beta-layer"])},
                        analysis_id="m-analysis")
    main.create_run("m-run", {"status": "running"})
    main.append_run("m-run", {"metrics": {"step": [0, 1], "loss": [1.0, 0.5]},
                              "checkpoints": {"step": [1], "path": ["ckpt-0001.pt"]}})
    journaled = Store(path, compact_ratio=1e9)
    journaled.write_analysis("spectrum", {"n": 1}, spectrum([1.0, 0.5]), analysis_id="j-a1")
    journaled.append_run("m-run", {"metrics": {"step": [2], "loss": [0.25]}})
    journaled.write_analysis("spectrum", {"n": 2}, spectrum([2.0]), analysis_id="j-a2")
    assert journaled.pending() == 3
    return path


def frames(path: Path) -> list[jr.Frame]:
    with open(jr.journal_path(path), "rb") as fh:
        return list(jr.scan(fh))


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def assert_intact_records(path: Path, analyses: list[str], steps: list[int] | None) -> None:
    """The records of the fixture, with their values."""
    store = Store(path)
    assert sorted(store.analysis_ids()) == sorted(analyses)
    values = {"m-analysis": [0.45196, 0.125], "j-a1": [1.0, 0.5], "j-a2": [2.0]}
    for aid in analyses:
        np.testing.assert_array_equal(store.analysis(aid).arrays["eigenvalues"], values[aid])
    if "m-analysis" in analyses:
        record = store.analysis("m-analysis")
        assert float(record.arrays["trace"]) == 2.5
        assert record.attrs["settings"] == {"tol": 1e-3, "hvps": 7}
        assert [n.decode() for n in record.arrays["layers/name"]] == ["alpha-layer",
                                                                     "beta-layer"]
    if steps is None:
        assert [r.id for r in store.runs()] == []
    else:
        run = store.run("m-run")
        assert run.arrays["metrics/step"].tolist() == steps
        np.testing.assert_array_equal(run.arrays["metrics/loss"], [1.0, 0.5, 0.25][:len(steps)])
        assert run.attrs["status"] == "running"


def assert_refused(path: Path, message: str, tmp_path: Path) -> None:
    """show, export, compact and a write: the exact error line, exit 2, no byte changed."""
    journal = jr.journal_path(path)
    before = (path.read_bytes(), journal.read_bytes())
    for args in (["show", path], ["show", path, "--json"], ["export", path, "--format", "json"],
                 ["compact", path]):
        code, out, err = run_cli(args)
        assert code == 2, (args, out, err)
        assert err.strip() == f"error: {message}", args
        assert (path.read_bytes(), journal.read_bytes()) == before
    with pytest.raises(StoreDamage) as caught:
        Store(path).write_analysis("test", {}, {"x": np.arange(3.0)})
    assert str(caught.value) == message
    with pytest.raises(StoreDamage):
        Store(path).append_run("m-run", {"metrics": {"step": [9], "loss": [9.0]}})
    assert (path.read_bytes(), journal.read_bytes()) == before
    assert not list(tmp_path.glob(".*.tmp"))


def salvaged(path: Path, tmp_path: Path, damaged_where: str) -> Path:
    out = tmp_path / "salvaged.h5"
    before = (path.read_bytes(), jr.journal_path(path).read_bytes())
    code, stdout, err = run_cli(["verify", path, "--salvage", out])
    assert code == 1, (stdout, err)
    assert f"damaged: {damaged_where}" in stdout
    assert f"salvaged to {out}" in stdout
    assert (path.read_bytes(), jr.journal_path(path).read_bytes()) == before
    code, stdout, _ = run_cli(["verify", out])
    assert code == 0 and f"{out}: intact" in stdout
    return out


def journal_message(path: Path, offset: int, what: str) -> str:
    return (f"store {path}: journal {jr.journal_path(path)} is damaged at byte {offset} "
            f"({what}): not a crash, so hessdiag leaves the journal as it is and writes "
            f"nothing to this store; {HINT.format(p=path)}")


def test_the_fixture_is_intact_and_verify_says_so(tmp_path):
    path = build(tmp_path)
    assert_intact_records(path, ALL_ANALYSES, [0, 1, 2])
    code, out, _ = run_cli(["verify", path, "--json"])
    assert code == 0
    report = json.loads(out)
    assert report["intact"] and report["damaged"] == []
    assert report["runs"] == 1 and report["analyses"] == 3 and report["journal_frames"] == 3
    # every dataset of the main file carries a checksum
    assert report["datasets"] == {"fletcher32": 7, "crc32": 4, "none": 0}
    with h5py.File(path, "r") as f:
        assert f["analyses/m-analysis/eigenvalues"].fletcher32
        assert integrity.DATASET_KEY in f["analyses/m-analysis/trace"].attrs
        assert integrity.DATASET_KEY in f["analyses/m-analysis/layers/name"].attrs


# (region, offset from the frame's start or None for the header, what the error says)
HEAD = jr.HEAD.size
HEADER_CASES = [
    ("header magic", 3, "its header does not start with the journal's magic bytes"),
    ("header version", 16, "its header names an unknown version 3"),
    ("header generation", 20, "its header fails its checksum"),
    ("header checksum", 53, "its header fails its checksum"),
    ("header padding", 60, "its header has damaged padding"),
]
FRAME_CASES = [  # in the first frame (j-a1)
    ("head magic", 1, "a frame head fails its checksum"),
    ("head meta length", 4, "a frame head fails its checksum"),
    ("head payload length", 9, "a frame head fails its checksum"),
    ("head payload checksum", 16, "a frame head fails its checksum"),
    ("head checksum", 21, "a frame head fails its checksum"),
    ("meta", HEAD + 3, "a frame fails its checksum"),
    ("payload", HEAD + 200, "a frame fails its checksum"),
    ("tail length", -12, "a frame's tail is wrong"),
    ("tail magic", -2, "a frame's tail is wrong"),
]


@pytest.mark.parametrize("region,offset,what", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_a_damaged_journal_header_is_refused_and_salvaged_whole(tmp_path, region, offset,
                                                                  what):
    path = build(tmp_path)
    flip(jr.journal_path(path), offset)
    assert_refused(path, journal_message(path, 0, what), tmp_path)
    out = salvaged(path, tmp_path, f"journal {jr.journal_path(path)} byte 0: {what}")
    assert_intact_records(out, ALL_ANALYSES, [0, 1, 2])  # the frames themselves are intact


@pytest.mark.parametrize("region,offset,what", FRAME_CASES, ids=[c[0] for c in FRAME_CASES])
def test_a_damaged_frame_is_refused_and_every_other_record_salvaged(tmp_path, region, offset,
                                                                    what):
    path = build(tmp_path)
    first = frames(path)[0]
    flip(jr.journal_path(path), first.offset + offset % first.length)
    assert_refused(path, journal_message(path, first.offset, what), tmp_path)
    out = salvaged(path, tmp_path, f"journal {jr.journal_path(path)} byte {first.offset}: "
                                   f"{what} (the next intact frame starts at byte {first.end})")
    assert_intact_records(out, ["m-analysis", "j-a2"], [0, 1, 2])


@pytest.mark.parametrize("offset", [0, 12, HEAD + 1, -12, -1])
def test_damage_in_the_last_whole_frame_is_not_taken_for_a_torn_tail(tmp_path, offset):
    path = build(tmp_path)
    last = frames(path)[-1]
    flip(jr.journal_path(path), last.offset + offset % last.length, 0x80)
    what = ("a frame head fails its checksum" if offset % last.length < HEAD else
            "a frame's tail is wrong" if offset < 0 else "a frame fails its checksum")
    assert_refused(path, journal_message(path, last.offset, what), tmp_path)
    out = salvaged(path, tmp_path, f"journal {jr.journal_path(path)} byte {last.offset}: "
                                   f"{what} (no intact frame after it)")
    assert_intact_records(out, ["m-analysis", "j-a1"], [0, 1, 2])


@pytest.mark.parametrize("keep", [1, 10, HEAD - 1, HEAD, HEAD + 5, 300, -1])
def test_a_torn_last_frame_is_a_crash_the_other_records_read(tmp_path, keep):
    path = build(tmp_path)
    journal = jr.journal_path(path)
    last = frames(path)[-1]
    cut = last.offset + keep % last.length
    journal.write_bytes(journal.read_bytes()[:cut])
    code, out, err = run_cli(["show", path, "--json"])
    assert code == 0, err
    assert sorted(a["analysis_id"] for a in json.loads(out)["analyses"]) == ["j-a1",
                                                                            "m-analysis"]
    assert_intact_records(path, ["m-analysis", "j-a1"], [0, 1, 2])
    code, out, _ = run_cli(["verify", path])
    assert code == 0 and f"a torn last frame of {cut - last.offset} bytes" in out
    # the next write cuts the torn frame off and appends after the whole ones
    Store(path, compact_ratio=1e9).write_analysis("spectrum", {"n": 2}, spectrum([2.0]),
                                                  analysis_id="j-a2")
    assert [f.offset for f in frames(path)][-1] == last.offset
    assert_intact_records(path, ALL_ANALYSES, [0, 1, 2])


def _dataset_offset(path: Path, name: str) -> int:
    with h5py.File(path, "r") as f:
        dataset = f[name]
        if dataset.chunks:
            return dataset.id.get_chunk_info(0).byte_offset
        return dataset.id.get_offset()


def _text_offset(path: Path, text: bytes) -> int:
    data = path.read_bytes()
    assert data.count(text) == 1, text
    return data.index(text)


def main_message(path: Path, what: str) -> str:
    return f"store {path}: {what} (damaged bytes in {path}); {HINT.format(p=path)}"


MAIN_CASES = [  # (kind, where the damaged byte is, the record it is in, what the error says)
    ("eigenvalues", ("dataset", "analyses/m-analysis/eigenvalues", 6), "analyses/m-analysis",
     "analysis m-analysis: dataset eigenvalues fails its Fletcher-32 checksum"),
    ("converged flags", ("dataset", "analyses/m-analysis/converged", 1), "analyses/m-analysis",
     "analysis m-analysis: dataset converged fails its Fletcher-32 checksum"),
    ("scalar", ("dataset", "analyses/m-analysis/trace", 7), "analyses/m-analysis",
     "analysis m-analysis: dataset trace fails its CRC-32 checksum"),
    ("2-D array", ("dataset", "analyses/m-analysis/extra/grid", 20), "analyses/m-analysis",
     "analysis m-analysis: dataset extra/grid fails its Fletcher-32 checksum"),
    ("strings", ("text", b"alpha-layer", 2), "analyses/m-analysis",
     "analysis m-analysis: dataset layers/name fails its CRC-32 checksum"),
    ("analysis attributes", ("text", b'"hvps": 7', 8), "analyses/m-analysis",
     "analysis m-analysis: its attributes fail their checksum"),
    ("run column", ("dataset", "runs/m-run/metrics/loss", 7), "runs/m-run",
     "run m-run: dataset metrics/loss fails its Fletcher-32 checksum"),
    ("run strings", ("text", b"ckpt-0001.pt", 5), "runs/m-run",
     "run m-run: dataset checkpoints/path fails its CRC-32 checksum"),
    ("run attributes", ("text", b"running", 1), "runs/m-run",
     "run m-run: its attributes fail their checksum"),
]


@pytest.mark.parametrize("kind,where,record,what", MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_a_flipped_bit_in_the_main_file_is_an_error_never_a_value(tmp_path, kind, where,
                                                                   record, what):
    path = build(tmp_path)
    how, name, delta = where
    offset = (_dataset_offset(path, name) if how == "dataset"
              else _text_offset(path, name)) + delta
    flip(path, offset, 0x01)
    message = main_message(path, what)
    journal = jr.journal_path(path)
    before = (path.read_bytes(), journal.read_bytes())
    reads = [["show", path], ["export", path, "--format", "json"], ["compact", path]]
    if record.startswith("analyses"):
        reads.append(["show", path, record.split("/")[1]])
    for args in reads:
        code, out, err = run_cli(args)
        assert code == 2, (args, out, err)
        assert err.strip() == f"error: {message}", args
        assert (path.read_bytes(), journal.read_bytes()) == before
    out = salvaged(path, tmp_path, what)
    if record.startswith("analyses"):
        assert_intact_records(out, ["j-a1", "j-a2"], [0, 1, 2])
    else:  # the run is left out, with the journal's rows appended to it
        assert_intact_records(out, ALL_ANALYSES, None)


def test_damaged_root_attributes_are_refused(tmp_path):
    path = build(tmp_path)
    with h5py.File(path, "r") as f:
        generation = jr.main_generation(f).encode()
    flip(path, _text_offset(path, generation) + 3)
    message = main_message(path, "the file's root attributes (format, schema version, "
                                 "journal generation) fail their checksum")
    assert_refused(path, message, tmp_path)
    out = salvaged(path, tmp_path, "file: its root attributes")
    assert_intact_records(out, ALL_ANALYSES, [0, 1, 2])


def test_stores_written_without_checksums_read_and_verify_says_so(tmp_path):
    """A store as versions before checksums wrote it: no filter, no CRC attributes."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "hessdiag-store", "schema_version": 1,
                        "created": "2024-01-01T00:00:00+00:00"})
        group = f.create_group("analyses").create_group("old")
        group.attrs.update({"kind": "test", "created": "2024-01-01T00:00:00+00:00",
                            "sequence": 0})
        group["eigenvalues"] = np.array([3.0, 1.0])
        group["trace"] = 4.0
        f.create_group("runs")
    assert Store(path).analysis("old").arrays["eigenvalues"].tolist() == [3.0, 1.0]
    code, out, _ = run_cli(["verify", path])
    assert code == 0, out
    assert "2 without checksums (written before checksums)" in out
    # it grows: new records carry checksums, the old ones stay readable
    Store(path, compact_ratio=1e9).write_analysis("test", {}, {"eigenvalues": [1.0]},
                                                  analysis_id="new")
    Store(path).compact()
    code, out, _ = run_cli(["verify", path, "--json"])
    assert code == 0 and json.loads(out)["datasets"] == {"fletcher32": 1, "crc32": 0,
                                                         "none": 2}


def test_a_journal_of_format_1_reads_and_grows(tmp_path):
    path = build(tmp_path)
    Store(path).compact()
    with h5py.File(path, "r") as f:
        generation = jr.main_generation(f)
    journal = jr.journal_path(path)
    journal.write_bytes(jr.FILE_HEADER.pack(jr.FILE_MAGIC, 1, generation.encode(), 0))
    Store(path).validate()
    store = Store(path, compact_ratio=1e9)
    store.write_analysis("test", {}, {"eigenvalues": [5.0]}, analysis_id="v1")
    with open(journal, "rb") as fh:
        assert jr.read_header(fh).version == 1 and [f.version for f in jr.scan(fh)] == [1]
    assert Store(path).analysis("v1").arrays["eigenvalues"].tolist() == [5.0]


def test_verify_and_salvage_refuse_bad_input(tmp_path):
    code, _, err = run_cli(["verify", tmp_path / "missing.h5"])
    assert code == 2 and "does not exist" in err
    path = build(tmp_path)
    (tmp_path / "taken.h5").write_text("x")
    code, _, err = run_cli(["verify", path, "--salvage", tmp_path / "taken.h5"])
    assert code == 2 and "exists: give a new path" in err
    assert (tmp_path / "taken.h5").read_text() == "x"
