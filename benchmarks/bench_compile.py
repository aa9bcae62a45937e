"""Eager against ``torch.compile``d Hessian-vector products (``HessianOperator(compile=True)``).

Run by hand, from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --model mlp
    OMP_NUM_THREADS=1 python benchmarks/bench_compile.py --model cnn6 --batch-size 32

For one batch (the digits MLP on all 1,437 training images; hessdiag's ``cnn6`` on random
3x32x32 images) it builds an operator per mode (forward-over-reverse, double-backward,
retained-graph, and forward-over-reverse compiled), times each one's first product (for
the compiled one: compiling), then ``--repeats`` products of each, round-robin so that
load changes hit all alike, and prints the median and minimum seconds per product and the
largest difference between the compiled and the eager forward-over-reverse product.
torch.compile caches compiled code on disk (``/tmp/torchinductor_$USER``): a second run
compiles faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

try:
    import hessdiag  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hessdiag.curvature import HessianOperator  # noqa: E402
from hessdiag.data import load_digits  # noqa: E402
from hessdiag.models import build_model  # noqa: E402

warnings.filterwarnings("ignore")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("mlp", "cnn6"), default="mlp")
    p.add_argument("--batch-size", type=int, default=32, help="cnn6: images in the batch")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.model == "mlp":
        model = build_model("mlp", in_shape=(1, 8, 8), num_classes=10)
        x, y = load_digits("train").tensors
    else:
        model = build_model("cnn6", in_shape=(3, 32, 32), num_classes=10)
        x = torch.randn(args.batch_size, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch_size,))
    crit = nn.CrossEntropyLoss()
    ops = {mode: HessianOperator(model, crit, (x, y), mode=mode)
           for mode in ("forward-over-reverse", "double-backward", "retained-graph")}
    ops["compiled forward-over-reverse"] = HessianOperator(model, crit, (x, y), compile=True)
    dim = ops["retained-graph"].dim
    print(f"{args.model}: {dim:,} parameters, batch {tuple(x.shape)}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    v = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    first, out = {}, {}
    for name, op in ops.items():
        start = time.perf_counter()
        out[name] = op.matvec(v)
        first[name] = time.perf_counter() - start
    eager, compiled = out["forward-over-reverse"], out["compiled forward-over-reverse"]
    diff = float((eager - compiled).abs().max() / eager.abs().max())
    times: dict[str, list[float]] = {name: [] for name in ops}
    names = list(ops)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            ops[name].matvec(v)
            times[name].append(time.perf_counter() - start)
    for name in names:
        med, low = statistics.median(times[name]), min(times[name])
        print(f"  {name:<30s} first {first[name]:7.2f} s   median {med:.4f} s   min "
              f"{low:.4f} s   {1 / med:7.2f} products/s")
    base = statistics.median(times["forward-over-reverse"])
    comp = statistics.median(times["compiled forward-over-reverse"])
    print(f"  compiled / eager forward-over-reverse (medians): {comp / base:.2f}; largest "
          f"difference of the products, relative to the largest entry: {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
