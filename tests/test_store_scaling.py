"""The store's journal: a write costs in proportion to its record, not to the store, and
keeps the guarantees of the copy-and-rename design: SIGKILL at random moments (during
appends and compactions) loses no finished record, a reader beside a writer never sees a
partial record (nor records that disappear), concurrent writers lose and duplicate
nothing; torn, damaged and stale journals; stores written before the journal existed."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hessdiag.store import Store, StoreDamage, integrity
from hessdiag.store import journal as jr

BALLAST = 1_000_000  # bytes of the main file, so that records go to the journal


def _with_ballast(path: Path, nbytes: int = BALLAST) -> Store:
    """A store whose main file is about ``nbytes`` (one run holding a big array) and
    holds a run ``train`` to append to."""
    store = Store(path)
    with store.transaction() as f:
        group = f["runs"].create_group("ballast")
        group.attrs["created"] = "2024-01-01T00:00:00+00:00"
        group.create_dataset("blob/values", data=np.random.default_rng(0).random(nbytes // 8))
    store.create_run("train", {"status": "running"})
    return store


def _generation(path: Path) -> str:
    with h5py.File(path, "r") as f:
        return jr.main_generation(f)


def _io_written() -> int | None:
    """Bytes this process has passed to write-like system calls so far (Linux)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    return int(next(line for line in text.splitlines() if line.startswith("wchar")).split()[1])


# a writer of analyses (every third index) and run rows; prints each index once done
WRITER = textwrap.dedent("""
    import sys, numpy as np
    from hessdiag.store import Store, StoreDamage, integrity
    store, start, count = Store(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for i in range(start, start + count):
        if i % 3 == 0:
            store.write_analysis("test", {"index": i, "meta": {"i": i}},
                                 {"values": np.arange(i + 1000, dtype=float),
                                  "slq/nodes": np.full((3, 50), float(i))},
                                 analysis_id=f"record-{i:05d}")
        else:
            store.append_run("train", {"metrics": {"step": [i], "loss": [i * 0.5],
                                                   "tag": [f"r{i}"]}}, attrs={"last": i})
        print(i, flush=True)
""")


def _present(path: Path) -> tuple[list[int], list[int]]:
    """Every record is whole: returns the indices of the analyses and of the run rows."""
    store = Store(path)
    store.validate()
    analyses, records = [], store.analyses()
    for record in records:
        i = record.attrs["index"]
        assert record.id == f"record-{i:05d}" and record.attrs["meta"] == {"i": i}
        np.testing.assert_array_equal(record.arrays["values"], np.arange(i + 1000, dtype=float))
        np.testing.assert_array_equal(record.arrays["slq/nodes"], np.full((3, 50), float(i)))
        analyses.append(i)
    assert [r.attrs["sequence"] for r in records] == list(range(len(analyses)))
    run = store.run("train")
    steps = run.arrays.get("metrics/step", np.zeros(0, dtype=int))
    assert len(run.arrays.get("metrics/loss", [])) == len(steps)
    assert len(run.arrays.get("metrics/tag", [])) == len(steps)
    if len(steps):
        np.testing.assert_array_equal(run.arrays["metrics/loss"], steps * 0.5)
        assert [t.decode() for t in run.arrays["metrics/tag"]] == [f"r{s}" for s in steps]
        assert run.attrs["last"] == steps[-1]
    assert list(steps) == sorted(set(steps))
    return sorted(analyses), [int(s) for s in steps]


def test_sigkill_during_appends_and_compactions_loses_no_finished_record(tmp_path):
    path = tmp_path / "killed.h5"
    _with_ballast(path)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1)
    done: set[int] = set()
    next_index, generations, journal_seen = 0, {_generation(path)}, 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(path), str(next_index), "5000"],
                                stdout=subprocess.PIPE, text=True)
        # kill while it writes, after a random number of records (whatever the machine's
        # speed) and a random moment into the next one
        first = "".join(proc.stdout.readline() for _ in range(rng.randint(5, 25)))
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        done |= {int(line) for line in (first + out).split()}
        journal_seen += Store(path).pending() > 0
        analyses, rows = _present(path)
        present = set(analyses) | set(rows)
        # every record reported done is there, whole; at most the one in flight is extra
        assert done <= present
        assert len(present - done) <= 1
        done = present
        next_index = max(present) + 1
        generations.add(_generation(path))
    assert len(done) > 100  # every round wrote and was killed mid-stream
    assert len(generations) > 5 and journal_seen > 3  # both appends and compactions ran
    # the last kill may have come right after a compaction: then nothing is left to merge
    pending = Store(path).pending()
    assert Store(path).compact() == (pending > 0)
    assert not Store(path).journal_path.exists()
    assert not list(tmp_path.glob(".*.tmp"))  # copies of killed compactions are cleaned up
    assert set().union(*map(set, _present(path))) == done


def test_a_reader_beside_a_writer_sees_only_whole_records_and_never_loses_one(tmp_path):
    path = tmp_path / "read.h5"
    _with_ballast(path)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    n = 75  # about ten compactions while the reader reads
    writer = subprocess.Popen([sys.executable, str(script), str(path), "0", str(n)],
                              stdout=subprocess.DEVNULL)
    seen: set[int] = set()
    reads, generations = 0, set()
    while writer.poll() is None:
        analyses, rows = _present(path)
        now_seen = set(analyses) | set(rows)
        assert seen <= now_seen  # a record once seen stays (through compactions)
        seen = now_seen
        generations.add(_generation(path))
        reads += 1
    assert writer.returncode == 0
    assert set().union(*map(set, _present(path))) == set(range(n))
    assert reads > 10 and len(generations) > 2


THREE = textwrap.dedent("""
    import sys, numpy as np
    from hessdiag.store import Store, StoreDamage, integrity
    store, k, n = Store(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store.create_run(f"w{k}", {"writer": k})
    for i in range(n):
        store.append_run("shared", {"rows": {"writer": [k], "i": [i],
                                             "payload": [np.full(8, i).tobytes().hex()]}})
        store.append_run(f"w{k}", {"rows": {"i": [i], "x": [float(i) / 3]}})
        if i % 10 == 0:
            store.write_analysis("t", {"writer": k, "i": i}, {"v": np.arange(50.0) + i})
""")


def test_three_writers_appending_to_runs_lose_and_duplicate_no_row(tmp_path):
    path = tmp_path / "three.h5"
    store = _with_ballast(path, 300_000)
    store.create_run("shared", {})
    script = tmp_path / "three.py"
    script.write_text(THREE)
    n = 20  # each writer's rows overlap the others' in time (start-up differs by less)
    writers = [subprocess.Popen([sys.executable, str(script), str(path), str(k), str(n)])
               for k in range(3)]
    assert all(w.wait(timeout=600) == 0 for w in writers)
    for reader in (Store(path), None):
        if reader is None:  # and the same after merging the journal into the main file
            Store(path).compact()
            reader = Store(path)
        shared = reader.run("shared").arrays
        pairs = list(zip(shared["rows/writer"].tolist(), shared["rows/i"].tolist(), strict=True))
        assert len(pairs) == len(set(pairs)) == 3 * n
        for k in range(3):
            assert [i for w, i in pairs if w == k] == list(range(n))
            own = reader.run(f"w{k}").arrays
            assert own["rows/i"].tolist() == list(range(n))
            np.testing.assert_array_equal(own["rows/x"], np.arange(n) / 3)
        assert [p.decode() for p in shared["rows/payload"]] == \
            [np.full(8, i).tobytes().hex() for _, i in pairs]
        analyses = reader.analyses()
        assert [a.attrs["sequence"] for a in analyses] == list(range(3 * len(range(0, n, 10))))
        assert sorted((a.attrs["writer"], a.attrs["i"]) for a in analyses) == \
            [(k, i) for k in range(3) for i in range(0, n, 10)]


def _append_rows(store: Store, start: int, count: int) -> None:
    for i in range(start, start + count):
        store.append_run("train", {"metrics": {"step": [i], "loss": [0.1 * i], "acc": [0.5],
                                               "lr": [0.01]}})


@pytest.mark.parametrize("written", ["structure", "bytes"])
def test_the_cost_of_a_write_does_not_grow_with_the_store(tmp_path, written):
    small = _with_ballast(tmp_path / "small.h5", 1_000_000)
    big = _with_ballast(tmp_path / "big.h5", 40_000_000)
    if written == "structure":
        # at the big store: each row is one frame appended to the journal, the main file
        # untouched; the frame is the same size as at the small store
        frames = {}
        for store in (small, big):
            _append_rows(store, 0, 3)  # columns created
            ino, mtime = os.stat(store.path).st_ino, os.stat(store.path).st_mtime_ns
            before = store.journal_path.stat().st_size
            _append_rows(store, 3, 1)
            frames[store] = store.journal_path.stat().st_size - before
            assert (os.stat(store.path).st_ino, os.stat(store.path).st_mtime_ns) == (ino, mtime)
        assert frames[small] == frames[big] < 20_000
        return
    # bytes written per row, compactions included, over many rows: the same at 1 MB and
    # at 40 MB (a compaction copies the store, but only after rows worth half of it)
    per_row = {}
    rows = 150
    for store in (small, big):
        _append_rows(store, 0, 3)
        before = _io_written()
        if before is None:
            pytest.skip("no /proc/self/io")
        _append_rows(store, 3, rows)
        per_row[store] = (_io_written() - before) / rows
    print("bytes written per row", {s.path.name: round(v) for s, v in per_row.items()})
    frame = 20_000
    bound = (1 + 1 / 0.5) * (frame + jr.FRAME_OVERHEAD) * 1.5
    assert per_row[small] < bound and per_row[big] < bound, per_row
    assert per_row[big] < 40_000_000 / 100  # far from a copy of the store per row


def test_torn_damaged_and_stale_journals(tmp_path):
    path = tmp_path / "s.h5"
    store = _with_ballast(path, 4_000_000)
    _append_rows(store, 0, 5)
    store.write_analysis("t", {"n": 1}, {"v": np.arange(10.0)}, analysis_id="a1")
    journal = store.journal_path
    assert store.pending() == 7
    # a writer killed in the middle of a frame: readers stop before it, the next writer
    # cuts it off
    whole = journal.read_bytes()
    with open(journal, "ab") as fh:
        fh.write(whole[jr.FILE_HEADER.size:jr.FILE_HEADER.size + 3000])
    assert Store(path).pending() == 7
    assert Store(path).run("train").arrays["metrics/step"].tolist() == list(range(5))
    _append_rows(Store(path), 5, 1)
    assert Store(path).pending() == 8
    with open(journal, "rb") as fh:
        assert list(jr.scan(fh))[-1].end == journal.stat().st_size
    assert Store(path).run("train").arrays["metrics/step"].tolist() == list(range(6))
    # a damaged frame (bad checksum) is damage, not a crash: refused by readers, writers
    # and compaction alike, and the journal is left as it is
    with open(journal, "rb") as fh:
        frames = list(jr.scan(fh))
    kept = journal.read_bytes()
    data = bytearray(kept)
    analysis = next(f for f in frames if f.meta["op"] == "analysis")
    data[analysis.payload_offset + 100] ^= 0xFF
    journal.write_bytes(bytes(data))
    for attempt in (lambda: Store(path).analysis_ids(), lambda: Store(path).analyses(),
                    lambda: _append_rows(Store(path), 6, 1), lambda: Store(path).compact()):
        with pytest.raises(StoreDamage, match=f"damaged at byte {analysis.offset} "):
            attempt()
        assert journal.read_bytes() == bytes(data)
    journal.write_bytes(kept)
    # a compaction killed after its rename leaves the journal it merged: ignored
    assert Store(path).compact()
    journal.write_bytes(kept)
    assert Store(path).pending() == 0
    assert Store(path).run("train").arrays["metrics/step"].tolist() == list(range(6))
    _append_rows(Store(path), 6, 1)  # the stale journal is replaced, not appended to
    assert Store(path).pending() == 1
    assert Store(path).run("train").arrays["metrics/step"].tolist() == list(range(7))


def test_stores_written_before_the_journal_read_and_grow(tmp_path):
    path = tmp_path / "old.h5"
    store = _with_ballast(path)
    _append_rows(store, 0, 2)
    store.write_analysis("t", {"n": 1}, {"v": np.arange(3.0)}, analysis_id="a1")
    store.compact()
    with h5py.File(path, "r+") as f:  # as the copy-and-rename design wrote it
        del f.attrs["journal_generation"]
        del f.attrs[integrity.ATTRS_KEY]  # written before checksums, too
    assert store.run("train").arrays["metrics/step"].tolist() == [0, 1]
    _append_rows(Store(path), 2, 2)
    assert Store(path).pending() == 2 and _generation(path) == ""
    assert Store(path).run("train").arrays["metrics/step"].tolist() == [0, 1, 2, 3]
    assert Store(path).analysis_ids() == ["a1"]


def test_compaction_makes_the_main_file_complete_for_h5py(tmp_path):
    path = tmp_path / "s.h5"
    store = _with_ballast(path)
    _append_rows(store, 0, 4)
    store.write_analysis("t", {"settings": {"a": 1}}, {"v": np.arange(3.0)}, analysis_id="a1")
    with h5py.File(path, "r") as f:
        assert "a1" not in f["analyses"]  # still in the journal
    before = (store.runs(), store.analyses())
    result = subprocess.run([sys.executable, "-m", "hessdiag", "compact", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "6 journal records merged" in result.stdout  # the run, 4 rows, 1 analysis
    assert not store.journal_path.exists()
    with h5py.File(path, "r") as f:
        assert f["runs/train/metrics/step"][()].tolist() == [0, 1, 2, 3]
        assert f["analyses/a1"].attrs["settings"] == '{"a": 1}'
        assert f["runs/train/metrics/step"].maxshape == (None,)
    after = (store.runs(), store.analyses())
    for old, new in zip(before[0] + before[1], after[0] + after[1], strict=True):
        assert old.id == new.id and old.attrs == new.attrs
        assert list(old.arrays) == list(new.arrays)
        for key in old.arrays:
            np.testing.assert_array_equal(old.arrays[key], new.arrays[key])
            assert old.arrays[key].dtype == new.arrays[key].dtype
    assert not Store(path).compact()  # nothing left to merge


def test_a_rejected_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "s.h5"
    store = _with_ballast(path)
    _append_rows(store, 0, 2)
    size = store.journal_path.stat().st_size
    with pytest.raises(OSError):  # text into a float column, as the old design refused
        store.append_run("train", {"metrics": {"step": [2], "loss": ["high"], "acc": [0.5],
                                               "lr": [0.01]}})
    with pytest.raises(ValueError, match="different lengths"):
        store.append_run("train", {"metrics": {"step": [2, 3], "loss": [0.1]}})
    with pytest.raises(ValueError, match="already has an analysis"):
        store.write_analysis("t", {}, {"v": 1.0}, analysis_id="x")
        store.write_analysis("t", {}, {"v": 1.0}, analysis_id="x")
    assert store.journal_path.stat().st_size > size  # only the first "x"
    assert store.run("train").arrays["metrics/step"].tolist() == [0, 1]
    shutil.copy(path, tmp_path / "copy.h5")  # the main file alone still opens
    Store(tmp_path / "copy.h5").validate()


def test_the_journal_reads_as_rewriting_the_file_would(tmp_path):
    """Random sequences of appends, truncations, new runs and analyses read the same from a
    store that rewrites its file on every write, one that only journals, and one that
    compacts now and then (and from the file alone after compaction)."""
    rng = random.Random(3)
    stores = [Store(tmp_path / "rewrite.h5", compact_ratio=0),
              Store(tmp_path / "journal.h5", compact_ratio=1e9),
              Store(tmp_path / "mixed.h5", compact_ratio=1.0)]
    runs = ["r0"]
    for store in stores:
        store.create_run("r0", {"config": {"a": 1}, "flag": True})
    for step in range(60):
        op = rng.choice(["append", "append", "append", "truncate", "run", "analysis", "attrs"])
        run = rng.choice(runs)
        if op == "append":
            table = rng.choice(["metrics", "sharpness"])
            n = rng.randint(1, 3)
            columns = {"step": [step] * n, "loss": [rng.random() for _ in range(n)]}
            if rng.random() < 0.3:
                columns[rng.choice(["path", "tag"])] = [f"s{step}-{i}" for i in range(n)]
            if rng.random() < 0.2:
                columns["ok"] = [bool(step % 2)] * n
            call = (lambda s, r=run, t=table, c=columns: s.append_run(r, {t: c}))  # noqa: E731
        elif op == "truncate":
            keep = rng.randint(0, 6)
            table_choice = rng.choice(["metrics", "sharpness"])
            call = (lambda s, r=run, k=keep, t=table_choice: s.truncate_run(r, t, k))  # noqa: E731
        elif op == "run":
            runs.append(f"r{len(runs)}")
            call = (lambda s, r=runs[-1]: s.create_run(r, {"n": len(runs)}))  # noqa: E731
        elif op == "analysis":
            call = (lambda s, i=step: s.write_analysis(  # noqa: E731
                "t", {"i": i, "d": {"x": [i]}}, {"v": np.arange(i, dtype=float),
                                                 "names": np.array(["a", "b"])},
                analysis_id=f"a{i}"))
        else:
            call = (lambda s, r=run, i=step: s.append_run(r, {}, attrs={"status": f"s{i}"}))  # noqa: E731
        for store in stores:
            call(store)
        if step % 20 == 19:
            stores[2].compact()

    def same(a, b):
        assert a.id == b.id
        drop = ("created",)
        assert {k: v for k, v in a.attrs.items() if k not in drop} == \
            {k: v for k, v in b.attrs.items() if k not in drop}
        assert list(a.arrays) == list(b.arrays), (a.id, list(a.arrays), list(b.arrays))
        for key, x in a.arrays.items():
            y = b.arrays[key]
            assert x.dtype == y.dtype and x.shape == y.shape, (a.id, key)
            assert x.tolist() == y.tolist(), (a.id, key)

    assert stores[1].pending() > 50
    reference = stores[0].runs() + stores[0].analyses()
    for store in stores[1:] * 2:
        got = store.runs() + store.analyses()
        assert len(got) == len(reference)
        for a, b in zip(reference, got, strict=True):
            same(a, b)
        store.compact()


def test_a_sweep_of_three_training_runs_into_one_store_loses_and_duplicates_nothing(tmp_path):
    """Three `hessdiag train` processes (a sweep over optimizers) write metrics, sharpness
    and checkpoint rows into one store at the same time, on a store large enough that
    their records go through the journal and its compactions."""
    path = tmp_path / "sweep.h5"
    _with_ballast(path, 400_000)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--model", "mlp", "--model-kwargs", '{"hidden": 8}', "--data", "digits",
              "--samples", "160", "--batch-size", "16", "--epochs", "1",
              "--sharpness-every", "5", "--sharpness-samples", "32", "--checkpoint-every",
              "5", "--device", "cpu", "--store", str(path), "--quiet",
              "--checkpoint-dir", str(tmp_path / "ckpt")]
    optimizers = ("sgd", "sam", "eigensam")
    procs = [subprocess.Popen([sys.executable, "-m", "hessdiag", "train", *common,
                               "--optimizer", opt, "--run-name", opt, "--seed", str(k)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for k, opt in enumerate(optimizers)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    store = Store(path)
    for opt in optimizers:
        run = store.run(opt)
        x = run.arrays
        assert run.attrs["status"] == "finished"
        assert x["metrics/step"].tolist() == list(range(1, 11))  # every step, once
        assert x["sharpness/step"].tolist() == [0, 5, 10]
        assert x["checkpoints/step"].tolist() == [5, 10]
        assert len(set(x["checkpoints/path"].tolist())) == 2
    assert store.compact() in (True, False)
    again = {opt: Store(path).run(opt).arrays["metrics/step"].tolist() for opt in optimizers}
    assert all(steps == list(range(1, 11)) for steps in again.values())



def test_the_compact_command_refuses_a_missing_store(tmp_path):
    from hessdiag.cli.app import app
    from typer.testing import CliRunner

    missing = CliRunner().invoke(app, ["compact", str(tmp_path / "none.h5")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
