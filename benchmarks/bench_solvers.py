"""Each solver's own time beside its products, at the size of a real network (run by hand).

    python benchmarks/bench_solvers.py [--model resnet18] [--batch-size 32] [--threads 2]

On torchvision's ``resnet18(num_classes=10)`` (11,173,962 parameters, BatchNorm, random
init, eval mode) and one random CIFAR-shaped batch, runs Lanczos top-1 and top-5, power
iteration (top-1), Hutchinson and Hutch++ (the trace), SLQ (the density) and three
per-layer blocks (a top-1 of the Hessian restricted to one layer's parameters, as
``hessdiag spectrum --per-layer`` does for every layer), each on a fresh
``HessianOperator``. For each it prints the products, the seconds inside them
(``HessianOperator.hvp_seconds``), the seconds outside them (the solver's own work:
inner products, orthogonalisation, small dense problems, allocation) and that overhead as
a fraction of the product time, and the peak memory of the run above what the process
held before it (``hessdiag.runtime.PeakMemory``). The target is an overhead of at most
10% of the product time.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
import torchvision
from torch import nn

from hessdiag.curvature import HessianOperator, hutchinson, hutchpp, lanczos, power_iteration, slq
from hessdiag.runtime import PeakMemory


def build(name: str) -> nn.Module:
    if name == "resnet18":
        return torchvision.models.resnet18(num_classes=10)
    if name == "vit":
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=4, num_layers=6, num_heads=4, hidden_dim=192,
            mlp_dim=768, num_classes=10)
    raise SystemExit(f"unknown model {name!r}: resnet18 or vit")


def parity(model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor,
           repeats: int = 7) -> None:
    """A product through ``HessianOperator.matvec`` (into a buffer, as the solvers call
    it, and returning a fresh vector) against a bare ``torch.autograd.grad`` of the same
    kept gradient graph with the same vector, interleaved, median of ``repeats``."""
    import statistics

    op = HessianOperator(model, loss, (x, y))
    v = torch.randn(op.dim)
    out = torch.empty(op.dim)
    op.matvec(v)  # builds and keeps the graph
    leaves, grads = op._retained[0][0], op._retained[0][1]
    parts = list(op.unflatten(v).values())

    def bare():
        torch.autograd.grad(grads, leaves, grad_outputs=parts, retain_graph=True)

    timings: dict[str, list[float]] = {"bare autograd.grad": [], "matvec(v, out=buffer)": [],
                                       "matvec(v)": []}
    calls = {"bare autograd.grad": bare, "matvec(v, out=buffer)": lambda: op.matvec(v, out=out),
             "matvec(v)": lambda: op.matvec(v)}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - start)
    base = statistics.median(timings["bare autograd.grad"])
    print("product parity (median of", repeats, "interleaved):")
    for name, values in timings.items():
        med = statistics.median(values)
        print(f"  {name:24s} {med:7.3f} s  {med / base:5.2f}x bare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build(args.model).eval()
    x = torch.randn(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    loss = nn.CrossEntropyLoss()
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n:,} parameters, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    layers = [name for name, _ in model.named_parameters()]
    blocks = [layers[0], next(n for n in layers if "layer3" in n), layers[-2]]

    parity(model, loss, x, y)

    tasks = [
        ("lanczos top-1 (tol 1e-3)", None, lambda op: lanczos(op, k=1, tol=1e-3, seed=0)),
        ("lanczos top-5 (tol 1e-3)", None, lambda op: lanczos(op, k=5, tol=1e-3, seed=0)),
        ("power top-1 (tol 1e-3)", None,
         lambda op: power_iteration(op, k=1, tol=1e-3, max_iter=100, seed=0)),
        ("hutchinson (30 products)", None, lambda op: hutchinson(op, 30, seed=0)),
        ("hutch++ (30 products)", None, lambda op: hutchpp(op, 30, seed=0)),
        ("slq (1 probe x 30 steps)", None, lambda op: slq(op, n_probes=1, steps=30, seed=0)),
    ] + [(f"block top-1: {name}", name, lambda op: lanczos(op, k=1, tol=1e-3, seed=0))
         for name in blocks]

    print(f"{'task':42s} {'products':>8s} {'in products':>12s} {'outside':>9s} "
          f"{'overhead':>9s} {'peak growth':>12s}")
    for label, params, run in tasks:
        gc.collect()
        with PeakMemory() as memory:
            start = time.perf_counter()
            op = HessianOperator(model, loss, (x, y), params=params)
            run(op)
            seconds = time.perf_counter() - start
        inside = op.hvp_seconds
        outside = seconds - inside
        growth = (memory.growth or 0) / 1e6
        print(f"{label:42s} {op.hvp_count:8d} {inside:11.2f}s {outside:8.2f}s "
              f"{outside / inside:8.1%} {growth:10.0f} MB")
        del op


if __name__ == "__main__":
    main()
