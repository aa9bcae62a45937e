"""Hessian-vector products one vector at a time vs several per backward pass.

For a retained gradient graph, ``torch.autograd.grad(..., is_grads_batched=True)`` pushes
k vectors through one (vmapped) backward. Prints seconds per vector for k = 1, 4, 8 and
the speed-up over a loop, for the shipped digits MLP (1,437 samples) and cnn6 on a batch
of 128 CIFAR-shaped images. Run by hand: ``python benchmarks/bench_batched.py``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from hessdiag.models import build_model
from hessdiag.task import load_task

DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "digits-mlp.pt"


def seconds_per_vector(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int,
                       repeats: int) -> tuple[float, float]:
    params = list(model.parameters())
    model.eval()
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    vectors = [torch.randn(k, *p.shape) for p in params]
    for batched in (False, True):  # warm-up of both paths
        if batched:
            torch.autograd.grad(grads, params, grad_outputs=vectors, retain_graph=True,
                                is_grads_batched=True)
        else:
            torch.autograd.grad(grads, params, grad_outputs=[v[0] for v in vectors],
                                retain_graph=True)
    start = time.perf_counter()
    for _ in range(repeats):
        for j in range(k):
            torch.autograd.grad(grads, params, grad_outputs=[v[j] for v in vectors],
                                retain_graph=True)
    loop = (time.perf_counter() - start) / repeats / k
    start = time.perf_counter()
    for _ in range(repeats):
        torch.autograd.grad(grads, params, grad_outputs=vectors, retain_graph=True,
                            is_grads_batched=True)
    return loop, (time.perf_counter() - start) / repeats / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    task = load_task(str(DEMO))
    x, y = task.batches(1437)[0]
    cases = [("digits mlp, 1,437 samples", task.model, x, y),
             ("cnn6, 128 x 3x32x32", build_model("cnn6"), torch.randn(128, 3, 32, 32),
              torch.randint(0, 10, (128,)))]
    print(f"{'model':28s} {'k':>3s} {'loop s/vector':>14s} {'batched s/vector':>17s} "
          f"{'speed-up':>9s}")
    for name, model, inputs, targets in cases:
        for k in (1, 4, 8):
            loop, batched = seconds_per_vector(model, inputs, targets, k, args.repeats)
            print(f"{name:28s} {k:3d} {loop:14.4f} {batched:17.4f} {loop / batched:9.2f}")


if __name__ == "__main__":
    main()
