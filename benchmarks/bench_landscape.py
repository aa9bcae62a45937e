"""Cost of a loss landscape: time per grid point against one forward pass over the same
samples, on ``cnn6`` and the bundled ``digits`` (a random-init model: the cost does not
depend on the weights).

    python benchmarks/bench_landscape.py                 # 25 x 25, all training samples
    python benchmarks/bench_landscape.py --resolution 11 --samples 512

Prints the time per grid point and its ratio to a forward pass (median over interleaved
5x5 grids, so that a change of the machine's load affects both sides of a ratio), with the
partial grid kept on disk after every point (as the command does, for resuming) and
without, then the whole grid as the command computes it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hessdiag.data import load_dataset  # noqa: E402
from hessdiag.landscape import compute_landscape  # noqa: E402
from hessdiag.objective import MeanLoss  # noqa: E402
from hessdiag.settings import LandscapeSettings  # noqa: E402
from hessdiag.task import new_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn6")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = new_task(args.model, load_dataset("digits", samples=args.samples))
    batches = task.batches(args.batch_size)
    objective = MeanLoss(task.model, task.loss, batches, torch.device("cpu"), torch.float32)
    objective.loss(objective.theta)  # warm-up

    def forward() -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            objective.loss(objective.theta)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    print(f"{args.model} on digits: {objective.total} samples, "
          f"{sum(t.numel() for t in objective.theta):,} parameters, "
          f"torch threads {torch.get_num_threads()}")
    # ratios from interleaved measurements, so that a change of the machine's load affects
    # both sides of each ratio alike
    small = LandscapeSettings(dims=2, resolution=5, device="cpu")
    for label, keep in (("kept on disk after every point", True), ("in memory", False)):
        ratios, per_point = [], []
        for _ in range(args.repeats):
            f = forward()
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                compute_landscape(task.model, task.loss, batches, small,
                                  partial=Path(tmp) / "grid" if keep else None)
                per = (time.perf_counter() - t0 - f) / 25  # minus the centre's pass
            ratios.append(per / f)
            per_point.append(per)
        print(f"partial grid {label}: {statistics.median(per_point) * 1e3:.1f} ms per point, "
              f"{statistics.median(ratios):.2f} forward passes per point (median of "
              f"{args.repeats} interleaved 5x5 grids; range {min(ratios):.2f}-"
              f"{max(ratios):.2f})")
    n = args.resolution ** 2
    settings = LandscapeSettings(dims=2, resolution=args.resolution, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        f = forward()
        t0 = time.perf_counter()
        result = compute_landscape(task.model, task.loss, batches, settings,
                                   partial=Path(tmp) / "grid")
        seconds = time.perf_counter() - t0
    print(f"{args.resolution}x{args.resolution} grid as the command computes it: {seconds:.1f} s "
          f"({result.forward_passes} forward passes; one forward pass {f * 1e3:.1f} ms just "
          f"before: {seconds / n / f:.2f} forward passes per point)")


if __name__ == "__main__":
    main()
