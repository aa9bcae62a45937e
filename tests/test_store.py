"""The HDF5 store: round trip, bad files, read-only places, SIGKILL at random moments,
concurrent writers and a reader running beside a writer."""

import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import read_only_path

from hessdiag.store import SCHEMA_VERSION, Store, StoreError

WRITER = textwrap.dedent("""
    import sys, numpy as np
    from hessdiag.store import Store
    store, start, count = Store(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for i in range(start, start + count):
        store.write_analysis("test", {"index": i, "meta": {"i": i}},
                             {"values": np.arange(i + 1000, dtype=float),
                              "slq/nodes": np.full((3, 50), float(i))},
                             analysis_id=f"record-{i:05d}")
        print(i, flush=True)
""")


def _check_records(path: Path) -> list[int]:
    """Every record in the store is whole; returns their indices."""
    store = Store(path)
    store.validate()
    seen = []
    for record in store.analyses():
        i = record.attrs["index"]
        assert record.id == f"record-{i:05d}"
        assert record.attrs["meta"] == {"i": i}
        np.testing.assert_array_equal(record.arrays["values"], np.arange(i + 1000, dtype=float))
        np.testing.assert_array_equal(record.arrays["slq/nodes"], np.full((3, 50), float(i)))
        seen.append(i)
    return sorted(seen)


def test_round_trip_keeps_attributes_and_arrays(tmp_path):
    store = Store(tmp_path / "s.h5")
    aid = store.write_analysis("spectrum", {"seed": 3, "settings": {"tol": 1e-3},
                                            "run_id": None, "path": "a/b.pt"},
                               {"eigenvalues": np.array([3.0, 2.0]), "trace": 5.5,
                                "converged": np.array([True, False])})
    record = store.analysis(aid)
    assert record.kind == "spectrum" and record.attrs["seed"] == 3
    assert record.attrs["settings"] == {"tol": 1e-3} and record.attrs["run_id"] is None
    assert record.attrs["path"] == "a/b.pt"
    np.testing.assert_array_equal(record.arrays["eigenvalues"], [3.0, 2.0])
    assert float(record.arrays["trace"]) == 5.5
    assert record.arrays["converged"].tolist() == [True, False]
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert f.attrs["format"] == "hessdiag-store"
    assert store.analysis_ids() == [aid]
    with pytest.raises(StoreError, match="no analysis 'nope'"):
        store.analysis("nope")


def test_a_snapshot_reads_the_store_once_as_it_was(tmp_path):
    store = Store(tmp_path / "s.h5")
    first = store.write_analysis("spectrum", {"seed": 1}, {"eigenvalues": np.array([2.0])})
    store.create_run("r", {"kind": "train"})
    snap = store.snapshot()
    store.write_analysis("spectrum", {"seed": 2}, {"eigenvalues": np.array([1.0])})
    assert [r.id for r in snap.analyses()] == [first] and len(store.analyses()) == 2
    assert [r.id for r in snap.runs()] == ["r"] == [r.id for r in store.runs()]
    assert snap.analysis(first).attrs == store.analysis(first).attrs
    np.testing.assert_array_equal(snap.analysis(first).arrays["eigenvalues"], [2.0])
    assert snap.run("r").attrs == store.run("r").attrs and snap.path == store.path
    with pytest.raises(StoreError, match="no analysis 'nope' in store .*; known: "):
        snap.analysis("nope")


def test_bad_files_are_refused_and_left_unchanged(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    newer = tmp_path / "newer.h5"
    Store(newer).write_analysis("t", {}, {"x": 1.0})
    with h5py.File(newer, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    truncated = tmp_path / "truncated.h5"
    Store(truncated).write_analysis("t", {}, {"x": np.arange(100000.0)})
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    cases = [(text, "not an HDF5 file"), (foreign, "not a hessdiag store"),
             (newer, "newer than this hessdiag reads"), (truncated, "corrupted or truncated")]
    for path, message in cases:
        before = path.read_bytes()
        with pytest.raises(StoreError, match=message):
            Store(path).write_analysis("t", {}, {"x": 1.0})
        with pytest.raises(StoreError, match=message):
            Store(path).analyses()
        assert path.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_read_only_directory_is_refused_before_anything_is_written(tmp_path):
    target = read_only_path(tmp_path, "s.h5")
    with pytest.raises(StoreError, match="not writable"):
        Store(target).check_writable()
    with pytest.raises(StoreError, match="not writable"):
        Store(target).write_analysis("t", {}, {"x": 1.0})
    assert not target.exists()


def test_sigkill_at_random_moments_leaves_every_completed_record(tmp_path):
    path = tmp_path / "killed.h5"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(0)
    completed: list[int] = []
    next_index = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(next_index), "500"],
                                stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # wait out the start-up: kill while it writes
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        completed += [int(line) for line in (first + out).split()]
        present = _check_records(path) if path.exists() else []
        # every record reported done is there, whole; at most the one in flight is extra
        assert set(completed) <= set(present)
        assert len(set(present) - set(completed)) <= 1
        next_index = (max(present) + 1) if present else 0
        completed = present
    assert len(completed) > 24  # every round wrote and was killed mid-stream


def test_concurrent_writers_lose_nothing_and_a_reader_always_sees_a_whole_store(tmp_path):
    path = tmp_path / "shared.h5"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writers = [subprocess.Popen([sys.executable, str(script), str(path), str(start), "25"],
                                stdout=subprocess.DEVNULL) for start in (0, 1000)]
    reads = 0
    while any(w.poll() is None for w in writers):
        if path.exists():
            _check_records(path)
            reads += 1
    assert all(w.returncode == 0 for w in writers)
    indices = _check_records(path)
    assert indices == list(range(25)) + list(range(1000, 1025))
    assert reads > 0
