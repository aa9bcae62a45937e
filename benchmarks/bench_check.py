"""False alarms and detections of `hessdiag check`, measured.

1. The shipped digits checkpoint checked against its own baseline with 20 other seeds:
   every probe and random start differs, the network does not; it must pass >= 19 times.
2. The same network with its first layer's weights scaled so that lambda_max is about 30%
   higher (the scale found by bisection): it must fail every time, over 20 seeds.

Run by hand: ``python benchmarks/bench_check.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hessdiag.check import check, make_baseline
from hessdiag.checkpoints import load_checkpoint, save_checkpoint
from hessdiag.measures import compute_spectrum
from hessdiag.settings import DataSettings, SpectrumSettings
from hessdiag.task import load_task

DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "digits-mlp.pt"


def scaled(scale: float, path: Path) -> Path:
    loaded = load_checkpoint(DEMO)
    with torch.no_grad():
        loaded.model.net[1].weight.mul_(scale)
    save_checkpoint(path, loaded.model, model_spec=loaded.info.model_spec,
                    model_kwargs=loaded.info.model_kwargs, data=loaded.info.data)
    return path


def lambda_max(path: Path) -> float:
    task = load_task(str(path))
    settings = SpectrumSettings(top_k=1, dtype="float64")
    return compute_spectrum(task.model, task.loss, task.batches(256), settings).lambda_max


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--increase", type=float, default=0.30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    baseline = make_baseline(str(DEMO), data=DataSettings())
    base = lambda_max(DEMO)
    lo, hi = 0.5, 1.0  # scaling the first layer down makes the network sharper
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        ratio = lambda_max(scaled(mid, tmp / "probe.pt")) / base
        if abs(ratio - 1 - args.increase) < 0.005:
            break
        lo, hi = (mid, hi) if ratio > 1 + args.increase else (lo, mid)
    sharper = scaled(mid, tmp / "sharper.pt")
    ratio = lambda_max(sharper) / base
    same = [check(str(DEMO), baseline=baseline, seed=s).passed for s in range(1, args.seeds + 1)]
    caught = [not check(str(sharper), baseline=baseline, seed=s).passed
              for s in range(1, args.seeds + 1)]
    print(f"baseline lambda_max {base:.6g}; rtol 0.1; metrics lambda_max and trace")
    print(f"same checkpoint, {args.seeds} other seeds: passed {sum(same)}/{args.seeds}")
    print(f"first layer scaled by {mid:.4f}: lambda_max x{ratio:.3f}; failed "
          f"{sum(caught)}/{args.seeds}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
