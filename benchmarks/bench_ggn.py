"""Cost of a Gauss-Newton (and Fisher) product against a Hessian-vector product.

Run by hand (not in CI), from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/bench_ggn.py            # cnn6, 128 random 3x32x32
    python benchmarks/bench_ggn.py --repeats 3 --batch-size 32  # quicker

One model (``cnn6`` from the registry, eval mode, 10 classes), one batch, cross-entropy.
Each operator is built once and warmed up (its first product chooses nothing: every mode
is fixed), then the median of ``--repeats`` products is taken; every product mode of
both operators is timed in the same process, so the ratios are measured under the same
machine load. Absolute seconds on a shared machine are noisy; compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from hessdiag.curvature import FisherOperator, GGNOperator, HessianOperator
from hessdiag.models import build_model


def median_seconds(op, v: torch.Tensor, repeats: int) -> float:
    op.matvec(v)  # warm-up: first-call costs and the checks of the first product
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        op.matvec(v)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model("cnn6", num_classes=10, in_shape=[3, 32, 32]).eval()
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    batch, loss = (x, y), nn.CrossEntropyLoss()
    ops = {f"hessian {m}": HessianOperator(model, loss, batch, mode=m)
           for m in ("forward-over-reverse", "double-backward", "retained-graph")}
    ops.update({f"ggn {m}": GGNOperator(model, loss, batch, mode=m)
                for m in ("jvp", "double-vjp")})
    ops["fisher mc jvp"] = FisherOperator(model, loss, batch, mode="jvp", kind="mc")
    ops["fisher empirical jvp"] = FisherOperator(model, loss, batch, mode="jvp",
                                                 kind="empirical")
    first = next(iter(ops.values()))
    v = torch.randn(first.dim, generator=torch.Generator().manual_seed(1))
    print(f"cnn6, {first.dim} parameters, batch {args.batch_size} x 3x32x32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    seconds = {name: median_seconds(op, v, args.repeats) for name, op in ops.items()}
    fastest_hessian = min(s for name, s in seconds.items() if name.startswith("hessian"))
    print(f"{'product':<32}{'seconds':>10}{'/ fastest Hessian':>20}")
    for name, s in seconds.items():
        print(f"{name:<32}{s:>10.4f}{s / fastest_hessian:>20.2f}")


if __name__ == "__main__":
    main()
