"""Step time of SGD, SAM and Eigen-SAM, measured in one run (run by hand).

    python benchmarks/bench_train.py [--steps 200] [--batch-size 128] [--eig-every 100]
        [--eig-iters 5] [--model cnn6] [--threads N]

On the same model (cnn6 on 3x32x32 inputs by default) and the same random batches, times
`--steps` optimizer steps of each (after 5 warm-up steps) and prints the ratios
Eigen-SAM / SAM and SAM / SGD. Eigen-SAM's cost over SAM is `eig_iters` Hessian-vector
products every `eig_every` steps, so its expected ratio is about
1 + eig_iters * (HVP / gradient) / (2 * eig_every).
"""

import argparse
import time

import torch
from torch import nn

from hessdiag.models import build_model
from hessdiag.optim import SAM, EigenSAM, disable_running_stats, enable_running_stats

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--batch-size", type=int, default=128)
parser.add_argument("--eig-every", type=int, default=100)
parser.add_argument("--eig-iters", type=int, default=5)
parser.add_argument("--model", default="cnn6")
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

gen = torch.Generator().manual_seed(0)
batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=gen),
            torch.randint(0, 10, (args.batch_size,), generator=gen)) for _ in range(8)]
loss_fn = nn.CrossEntropyLoss()
hyper = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def run(kind: str) -> float:
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10, in_shape=(3, 32, 32))
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), **hyper)
    elif kind == "sam":
        opt = SAM(model.parameters(), "sgd", rho=0.05, **hyper)
    else:
        opt = EigenSAM(model.parameters(), "sgd", rho=0.05, alpha=0.2, eig_every=args.eig_every,
                       eig_iters=args.eig_iters, hvp_mode="auto", **hyper)
    start = None
    for step in range(args.steps + 5):
        if step == 5:
            start = time.perf_counter()
        x, y = batches[step % len(batches)]
        model.train()
        if kind == "eigensam":
            opt.maybe_update_eigenvector(model, loss_fn, x, y)
            model.train()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if kind == "sgd":
            opt.step()
            continue
        opt.first_step(zero_grad=True)
        disable_running_stats(model)
        loss_fn(model(x), y).backward()
        enable_running_stats(model)
        opt.second_step(zero_grad=True)
    return (time.perf_counter() - start) / args.steps


times = {kind: run(kind) for kind in ("sgd", "sam", "eigensam")}
print(f"{args.model}, batch {args.batch_size} of 3x32x32, {args.steps} steps each, "
      f"eig_every={args.eig_every}, eig_iters={args.eig_iters}, threads "
      f"{torch.get_num_threads()}")
for kind, t in times.items():
    print(f"  {kind:9s} {1000 * t:8.1f} ms/step")
print(f"  SAM / SGD       {times['sam'] / times['sgd']:.3f}")
print(f"  Eigen-SAM / SAM {times['eigensam'] / times['sam']:.3f}  (target <= 1.10)")
