"""The store's write cost against its size: the journal (this design) against rewriting
the file on every write (the previous design, ``Store(path, compact_ratio=0)``: copy,
write, fsync, rename).

For each store size (1 MB, 100 MB, 1 GB by default; the bulk is large analyses) it times

- a metrics row appended to a run (``append_run``, one row of seven columns),
- an analysis written (``write_analysis``, about 60 kB: eigenvalues and an SLQ density),

with the old and the new design, on copies of the same store. The new design's time per
write is measured over many writes (compactions that fall inside are included) and also
given *amortised*: the time of one compaction at that size divided by the writes between
two compactions (``compact_ratio × size / (frame + FRAME_OVERHEAD)``, at most
``MAX_FRAMES``), added to the time of
an append. It also times a reader (``Store.run`` of the run written to) with the journal
in place and after compaction.

    python benchmarks/bench_store.py                 # 1 MB, 100 MB, 1 GB
    python benchmarks/bench_store.py --sizes 1 100   # MB
    python benchmarks/bench_store.py --dir /some/disk

Needs about 3 × the largest size of free disk space in ``--dir`` (default: a temporary
directory).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hessdiag.store import COMPACT_RATIO, MAX_FRAMES, Store  # noqa: E402
from hessdiag.store.journal import FRAME_OVERHEAD  # noqa: E402

ANALYSIS_MB = 10


def build(path: Path, megabytes: float) -> None:
    """A store of about ``megabytes``: analyses of up to 10 MB each, and a run."""
    store = Store(path, compact_ratio=0)
    rng = np.random.default_rng(0)
    remaining = int(megabytes * 1e6)
    with store.transaction() as f:
        i = 0
        while remaining > 0:
            n = min(remaining, ANALYSIS_MB * 1_000_000) // 8
            group = f["analyses"].create_group(f"big-{i:04d}")
            group.attrs.update({"kind": "spectrum", "created": "2024-01-01T00:00:00+00:00",
                                "sequence": i, "settings": '{"bench": true}'})
            group.create_dataset("slq/nodes", data=rng.random(max(n, 1)))
            remaining -= n * 8
            i += 1
    store.create_run("train", {"status": "running", "config": {"bench": True}})


def metrics_row(i: int) -> dict:
    return {"metrics": {"step": [i], "epoch": [i // 100], "loss": [1.0 / (i + 1)],
                        "acc": [0.5], "lr": [0.01], "test_loss": [np.nan],
                        "test_acc": [np.nan]}}


def analysis_arrays(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"eigenvalues": rng.random(10), "residuals": rng.random(10) * 1e-4,
            "converged": np.ones(10, dtype=bool), "slq/nodes": rng.random((10, 100)),
            "slq/weights": rng.random((10, 100)), "slq/grid": np.linspace(0, 1, 1000),
            "slq/density": rng.random(1000), "slq/sigma": 0.01, "slq/dim": 12345}


def timed(fn, count: int) -> list[float]:
    out = []
    for i in range(count):
        start = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - start)
    return out


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms"


def bench(directory: Path, megabytes: float, new_writes: int, old_writes: int) -> dict:
    base = directory / f"base-{megabytes:g}MB.h5"
    build(base, megabytes)
    size = base.stat().st_size
    result = {"size": size}
    for design in ("old", "new"):
        path = directory / f"{design}-{megabytes:g}MB.h5"
        shutil.copyfile(base, path)
        ratio = 0 if design == "old" else COMPACT_RATIO
        store = Store(path, compact_ratio=ratio)
        n = old_writes if design == "old" else new_writes
        store.append_run("train", metrics_row(0))  # columns created
        rows = timed(lambda i, store=store: store.append_run("train", metrics_row(i + 1)), n)
        analyses = timed(lambda i, store=store: store.write_analysis(
            "spectrum", {"seed": i, "settings": {"top_k": 10}}, analysis_arrays(i)), n)
        result[design] = {"row": statistics.median(rows), "row_mean": statistics.mean(rows),
                          "analysis": statistics.median(analyses),
                          "analysis_mean": statistics.mean(analyses)}
        if design == "new":
            frame_row = Store(path).journal_path.stat().st_size
            pending = store.pending()
            read = timed(lambda i, store=store: store.run("train"), 3)
            start = time.perf_counter()
            store.compact()
            compaction = time.perf_counter() - start
            read_after = timed(lambda i, store=store: store.run("train"), 3)
            # bytes of a row frame / an analysis frame: from two fresh appends
            before = store.journal_path.stat().st_size if store.journal_path.exists() else 0
            store.append_run("train", metrics_row(10**6))
            mid = store.journal_path.stat().st_size if store.journal_path.exists() else 0
            store.write_analysis("spectrum", {"seed": -1}, analysis_arrays(10**6))
            after = store.journal_path.stat().st_size if store.journal_path.exists() else 0
            row_frame = mid - before if mid > before else 2_200
            analysis_frame = after - mid if after > mid else 60_000
            for key, frame in (("row", row_frame), ("analysis", analysis_frame)):
                per = min(COMPACT_RATIO * path.stat().st_size / (frame + FRAME_OVERHEAD),
                          MAX_FRAMES)
                result["new"][f"{key}_amortised"] = (result["new"][key]
                                                     + compaction / max(per, 1.0))
                result["new"][f"{key}_frame"] = frame
            result["new"].update({"compaction": compaction, "pending": pending,
                                  "journal_bytes": frame_row, "read": min(read),
                                  "read_after": min(read_after)})
        path.unlink()
        for extra in (path.with_name(path.name + ".journal"), path.with_name(path.name + ".lock")):
            extra.unlink(missing_ok=True)
    base.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 100, 1000],
                        help="store sizes in MB")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the stores")
    parser.add_argument("--writes", type=int, default=200, help="writes timed, new design")
    parser.add_argument("--old-writes", type=int, default=None,
                        help="writes timed, old design (default: fewer at large sizes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-store-") as tmp:
        rows = []
        for mb in args.sizes:
            old_writes = args.old_writes or (30 if mb <= 10 else 10 if mb <= 200 else 3)
            r = bench(Path(tmp), mb, args.writes, old_writes)
            rows.append((mb, r))
            old, new = r["old"], r["new"]
            print(f"\nstore {r['size'] / 1e6:8.1f} MB  (new: {args.writes} writes each, old: "
                  f"{old_writes})")
            for what in ("row", "analysis"):
                label = "metrics row append" if what == "row" else "analysis write    "
                print(f"  {label}  old {ms(old[what])}   new {ms(new[what])} (mean "
                      f"{ms(new[what + '_mean'])}, amortised {ms(new[what + '_amortised'])})"
                      f"   old/new {old[what] / new[what + '_amortised']:8.1f}x   frame "
                      f"{new[what + '_frame'] / 1e3:.1f} kB")
            print(f"  compaction {ms(new['compaction'])} ({new['pending']} journal records, "
                  f"{new['journal_bytes'] / 1e6:.1f} MB);  Store.run with the journal "
                  f"{ms(new['read'])}, after compaction {ms(new['read_after'])}")
            sys.stdout.flush()
        print("\nsummary (median per write; new amortised includes compactions)")
        print(f"{'size':>10} {'row old':>12} {'row new':>12} {'ratio':>8} "
              f"{'analysis old':>13} {'analysis new':>13} {'ratio':>8}")
        for _, r in rows:
            old, new = r["old"], r["new"]
            print(f"{r['size'] / 1e6:8.1f}MB {old['row'] * 1e3:10.2f}ms "
                  f"{new['row_amortised'] * 1e3:10.2f}ms "
                  f"{old['row'] / new['row_amortised']:7.1f}x "
                  f"{old['analysis'] * 1e3:11.2f}ms {new['analysis_amortised'] * 1e3:11.2f}ms "
                  f"{old['analysis'] / new['analysis_amortised']:7.1f}x")


if __name__ == "__main__":
    main()
