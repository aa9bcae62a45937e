"""False alarms and detections of `hessdiag check`, measured.

1. The shipped digits checkpoint checked against its own baseline with 20 other seeds:
   every probe and random start differs, the network does not; it must pass >= 19 times.
2. The same network with its first layer's weights scaled so that lambda_max is about 30%
   higher (the scale found by bisection): it must fail every time, over 20 seeds.

Run by hand: ``python benchmarks/bench_check.py`` (a few minutes on 2 cores).

``--model resnet18``: instead, the wall time and products of ``hessdiag baseline`` and
``hessdiag check`` (lambda_max and trace, the defaults) at the scale of a real network:
the CIFAR ResNet-18 of the model registry (11,173,962 parameters), randomly initialised,
saved as a hessdiag checkpoint, on the first ``--samples`` (32) of 64 CIFAR-shaped
random images of 10 classes (the ``cifar_shaped`` data factory of this file), with
``--max-hvps`` (default: the baseline's default) and ``--tol``. A measurement that does
not converge within the budget prints its one-line error and the time it took::

    python benchmarks/bench_check.py --model resnet18 [--samples 32] [--max-hvps N]
        [--tol T] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hessdiag.check import NotConverged, check, make_baseline
from hessdiag.checkpoints import load_checkpoint, save_checkpoint
from hessdiag.settings import CHECK_MAX_HVPS, DataSettings, SpectrumSettings
from hessdiag.spectrum import compute_spectrum
from hessdiag.task import load_task

DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "digits-mlp.pt"
HERE = Path(__file__).resolve()


def cifar_shaped(split: str = "train") -> torch.utils.data.TensorDataset:
    """64 random 3x32x32 images with labels of 10 classes (a data factory: no download)."""
    gen = torch.Generator().manual_seed(0 if split == "train" else 1)
    x = torch.randn(64, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (64,), generator=gen)
    return torch.utils.data.TensorDataset(x, y)


class Products:
    """A progress callback counting the products of every solver of a measurement (each
    reports its own count), with the time of each."""

    def __init__(self, label: str) -> None:
        self.label, self.total, self.last, self.shown = label, 0, 0, 0
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        self.total += done - self.last if done > self.last else done
        self.last = done
        if self.total >= self.shown + 10:
            self.shown = self.total
            print(f"  {self.label}: {self.total} products, "
                  f"{time.perf_counter() - self.start:.0f} s", flush=True)


def at_scale(model: str, samples: int, max_hvps: int, tol: float | None) -> None:
    """Wall time and products of baseline and check on a randomly initialised ``model``."""
    from hessdiag.models import build_model

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    net = build_model(model, num_classes=10, in_shape=(3, 32, 32))
    path = tmp / f"{model}.pt"
    data = {"spec": f"{HERE}:cifar_shaped", "split": "train"}
    save_checkpoint(path, net, model_spec=model, data=data)
    params = sum(p.numel() for p in net.parameters())
    print(f"{model}: {params:,} parameters; {samples} CIFAR-shaped samples; max_hvps "
          f"{max_hvps}, tol {tol or 'by dtype'}; {torch.get_num_threads()} threads")
    settings = SpectrumSettings(max_hvps=max_hvps, tol=tol)
    counted = Products("baseline")
    start = time.perf_counter()
    try:
        baseline = make_baseline(str(path), settings=settings,
                                 data=DataSettings(samples=samples), progress=counted)
    except NotConverged as exc:
        print(f"baseline: {time.perf_counter() - start:.0f} s, {counted.total} products: "
              f"error: {exc}")
        return
    seconds = time.perf_counter() - start
    values = {k: v["value"] for k, v in baseline.metrics.items()}
    print(f"baseline: {seconds:.0f} s, {counted.total} solver products; {values}")
    counted = Products("check")
    start = time.perf_counter()
    try:
        result = check(str(path), baseline=baseline, progress=counted)
    except NotConverged as exc:
        print(f"check: {time.perf_counter() - start:.0f} s, {counted.total} products: "
              f"error: {exc}")
        return
    spectrum = result.result
    top = spectrum.top
    rest = spectrum.hvps - top.hvps - spectrum.trace.hvps
    print(f"check: {time.perf_counter() - start:.0f} s, {spectrum.hvps} products "
          f"(lambda_max {top.hvps}, trace {spectrum.trace.hvps}"
          + (f", {rest} choosing the mode and checking determinism" if rest else "")
          + f"); {'pass' if result.passed else 'FAIL'}; mode {spectrum.operator.get('mode')}")
    split = {k: top.settings[k] for k in ("product_seconds", "solver_seconds")
             if k in top.settings}
    if split:
        print(f"  lambda_max: {top.seconds:.0f} s, of which products "
              f"{split.get('product_seconds', float('nan')):.0f} s")
    print(result.table())


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
    parser.add_argument("--model", default=None, help="e.g. resnet18: wall time and products "
                        "of baseline and check at this model's scale instead")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--max-hvps", type=int, default=CHECK_MAX_HVPS)
    parser.add_argument("--tol", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        at_scale(args.model, args.samples, args.max_hvps, args.tol)
        return
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
