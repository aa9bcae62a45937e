"""Time per Hessian-vector product against the number of processes.

    python benchmarks/bench_distributed.py                      # one process
    torchrun --nproc-per-node 2 benchmarks/bench_distributed.py # two (Gloo on the CPU)

The operator is the Hessian of the shipped digits MLP's loss over ``--samples`` training
samples, each process holding its shard; products are timed after a warm-up (the mode
choice and first product), the median of ``--repeat`` runs of ``--products`` products.
Rank 0 prints one JSON line: processes, samples, parameters, mode, seconds per product,
and the seconds of one all-reduce of a parameter-sized vector alone (communication).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from hessdiag.curvature import HessianOperator  # noqa: E402
from hessdiag.distributed import collective, init, is_main, shutdown  # noqa: E402
from hessdiag.settings import DataSettings  # noqa: E402
from hessdiag.task import load_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1437)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--products", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--mode", default="double-backward")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = parser.parse_args()
    init("cpu")
    group = collective()
    task = load_task(str(ROOT / "checkpoints" / "digits-mlp.pt"),
                     data=DataSettings(samples=args.samples))
    dtype = getattr(torch, args.dtype)
    op = HessianOperator(task.model, task.loss, task.batches(args.batch_size,
                                                             sharded=group is not None),
                         dtype=dtype, mode=args.mode, batch_size_fn=task.loss.batch_weight,
                         collective=group)
    v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=dtype)
    op.matvec(v)  # warm-up: mode choice, first product
    runs = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        for _ in range(args.products):
            v = op.matvec(v)
            v = v / torch.linalg.vector_norm(v)
        runs.append((time.perf_counter() - start) / args.products)
    comm = None
    if group is not None:
        buf = torch.zeros(op.dim, dtype=dtype)
        start = time.perf_counter()
        for _ in range(50):
            group.sum(buf)
        comm = (time.perf_counter() - start) / 50
    if is_main():
        print(json.dumps({"processes": 1 if group is None else group.size,
                          "samples": op.n_samples, "parameters": op.dim, "mode": op.mode,
                          "dtype": args.dtype, "seconds_per_hvp": statistics.median(runs),
                          "seconds_per_allreduce": comm}))
    shutdown()


if __name__ == "__main__":
    main()
