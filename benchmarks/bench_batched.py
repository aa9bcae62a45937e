"""Hessian-vector products one vector at a time vs several per pass, through the operator.

For each mode (retained-graph, double-backward, forward-over-reverse) and k = 1, 2, 4, 8,
times ``HessianOperator.matmat`` of k vectors with ``batch_vectors="loop"`` (one
``matvec`` per column) and ``batch_vectors="batched"`` (one ``is_grads_batched`` backward,
or ``torch.func.vmap`` of the forward-over-reverse product, after the exactness guard has
passed), and prints products per second and the speed-up, for the shipped digits MLP
(1,437 samples in one batch) and cnn6 on one batch of 128 random 3x32x32 images. k = 1 is
a ``matvec`` either way (what the two columns differ by there is noise). Run by hand
(about five minutes on 2 idle cores)::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_batched.py
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # hessdiag from the checkout when it is not installed

from hessdiag.curvature import HessianOperator  # noqa: E402
from hessdiag.models import build_model  # noqa: E402
from hessdiag.task import load_task  # noqa: E402

DEMO = ROOT / "checkpoints" / "digits-mlp.pt"
MODES = ("retained-graph", "double-backward", "forward-over-reverse")


def products_per_second(ops: dict[str, HessianOperator], k: int, repeats: int
                        ) -> dict[str, float]:
    """k products / the median seconds of one ``op.matmat`` of k vectors, for each operator;
    the operators take turns in every repeat, so that a change of machine load hits all."""
    gen = torch.Generator().manual_seed(k)
    V = torch.randn(next(iter(ops.values())).dim, k, generator=gen)
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(repeats):
        for name, op in ops.items():
            start = time.perf_counter()
            op.matmat(V)
            times[name].append(time.perf_counter() - start)
    return {name: k / statistics.median(t) for name, t in times.items()}


def operator(model: nn.Module, batch, mode: str, batch_vectors: str) -> HessianOperator:
    op = HessianOperator(model, nn.CrossEntropyLoss(), batch, mode=mode,
                         batch_vectors=batch_vectors, check_determinism=False)
    warm = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(0))
    op.matmat(warm)  # first product (graph built), the guard, one-off costs
    op.matmat(warm[:, :2])  # the batched path after the guard
    return op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn6"],
                        choices=["mlp", "cnn6"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    cases = []
    if "mlp" in args.models:
        task = load_task(str(DEMO))
        cases.append(("digits MLP, 1,437 samples", task.model, task.batches(1437)[0]))
    if "cnn6" in args.models:
        cases.append(("cnn6, 128 x 3x32x32", build_model("cnn6"),
                      (torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)))))
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print("| model | mode | k | loop products/s | batched products/s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, model, batch in cases:
        for mode in MODES:
            ops = {b: operator(model, batch, mode, b) for b in ("loop", "batched")}
            if ops["batched"].vector_batch != "batched":
                print(f"# {name} {mode}: batched fell back: "
                      f"{ops['batched'].vector_batch_reason}")
            for k in args.ks:
                rates = products_per_second(ops, k, args.repeats)
                loop, batched = rates["loop"], rates["batched"]
                print(f"| {name} | {mode} | {k} | {loop:.3g} | {batched:.3g} | "
                      f"{batched / loop:.2f} |", flush=True)


if __name__ == "__main__":
    main()
