"""Step time of SGD, SAM and Eigen-SAM, measured in one run (run by hand).

    python benchmarks/bench_train.py [--steps 200] [--batch-size 128] [--eig-every 100]
        [--eig-iters 5] [--model cnn6] [--threads N]

On the same model (cnn6 on 3x32x32 inputs with 10 classes by default; any name of
`hessdiag models` that takes 3x32x32 images, e.g. resnet18) and the same random batches,
times `--steps` optimizer steps of each (after 5 warm-up steps), the three taking their
steps in turn so that a varying load on a shared machine weighs on all alike.

Eigen-SAM's cost over SAM is `eig_iters` Hessian-vector products every `eig_every`
steps, so its expected ratio is about 1 + eig_iters * (HVP / gradient) / (2 * eig_every).
A short run may hold no refresh, or only the first (which also chooses the product
mode), so the refreshes are timed apart: the first one, and one more after the timed
steps (warm-started, as every later refresh is). Eigen-SAM's step time is the mean of
its steps, refreshes excluded, plus the warm refresh's time divided by `eig_every`: the
amortised cost of a long run. The ratios printed are of these amortised times.
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

WARMUP = 5
gen = torch.Generator().manual_seed(0)
batches = [(torch.randn(args.batch_size, 3, 32, 32, generator=gen),
            torch.randint(0, 10, (args.batch_size,), generator=gen)) for _ in range(8)]
loss_fn = nn.CrossEntropyLoss()
hyper = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


KINDS = ("sgd", "sam", "eigensam")


def make(kind: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10, in_shape=(3, 32, 32))
    if kind == "sgd":
        return model, torch.optim.SGD(model.parameters(), **hyper)
    if kind == "sam":
        return model, SAM(model.parameters(), "sgd", rho=0.05, **hyper)
    return model, EigenSAM(model.parameters(), "sgd", rho=0.05, alpha=0.2,
                           eig_every=args.eig_every, eig_iters=args.eig_iters,
                           hvp_mode="auto", **hyper)


def step(kind: str, model: nn.Module, opt: torch.optim.Optimizer, x, y) -> float | None:
    """One optimizer step; for Eigen-SAM the seconds of its refresh, if it refreshed."""
    refresh = None
    model.train()
    if kind == "eigensam":
        start = time.perf_counter()
        if opt.maybe_update_eigenvector(model, loss_fn, x, y):
            refresh = time.perf_counter() - start
        model.train()
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    if kind == "sgd":
        opt.step()
        return refresh
    opt.first_step(zero_grad=True)
    disable_running_stats(model)
    loss_fn(model(x), y).backward()
    enable_running_stats(model)
    opt.second_step(zero_grad=True)
    return refresh


def run() -> dict:
    """The three optimizers step by step in turn (the order rotating), so that a load
    that comes and goes on a shared machine weighs on all three alike."""
    runs = {kind: make(kind) for kind in KINDS}
    steps = {kind: [] for kind in KINDS}  # seconds of each timed step (refresh excluded)
    refreshes = []  # (seconds, products)
    for i in range(args.steps + WARMUP):
        x, y = batches[i % len(batches)]
        for kind in KINDS[i % 3:] + KINDS[: i % 3]:
            model, opt = runs[kind]
            before = getattr(opt, "eig_hvps", 0)
            start = time.perf_counter()
            refresh = step(kind, model, opt, x, y)
            seconds = time.perf_counter() - start
            if refresh is not None:
                refreshes.append((refresh, opt.eig_hvps - before))
                seconds -= refresh
            if i >= WARMUP:
                steps[kind].append(seconds)
    out = {kind: {"step": sum(t) / len(t)} for kind, t in steps.items()}
    model, opt = runs["eigensam"]
    x, y = batches[0]
    hvps = opt.eig_hvps
    start = time.perf_counter()
    opt.update_eigenvector(model, loss_fn, x, y)  # a warm refresh, as every later one
    warm = time.perf_counter() - start
    e = out["eigensam"]
    e.update(plain=e["step"], first=refreshes[0][0], first_hvps=refreshes[0][1], warm=warm,
             warm_hvps=opt.eig_hvps - hvps, mode=opt.hvp_mode,
             step=e["step"] + warm / args.eig_every)
    return out


times = run()
params = sum(p.numel() for p in build_model(args.model, num_classes=10,
                                            in_shape=(3, 32, 32)).parameters())
print(f"{args.model} ({params:,} parameters), batch {args.batch_size} of 3x32x32, "
      f"{args.steps} steps each after {WARMUP} warm-up steps, eig_every={args.eig_every}, "
      f"eig_iters={args.eig_iters}, threads {torch.get_num_threads()}")
for kind, t in times.items():
    print(f"  {kind:9s} {1000 * t['step']:8.1f} ms/step")
e = times["eigensam"]
print(f"  Eigen-SAM: {1000 * e['plain']:.1f} ms a step without a refresh; a refresh "
      f"{1000 * e['warm']:.0f} ms warm ({e['warm_hvps']} products, mode {e['mode']}), "
      f"{1000 * e['first']:.0f} ms the first ({e['first_hvps']} products, mode choice "
      f"included); the warm one amortised over {args.eig_every} steps")
print(f"  SAM / SGD       {times['sam']['step'] / times['sgd']['step']:.3f}")
print(f"  Eigen-SAM / SAM {e['step'] / times['sam']['step']:.3f}  (target <= 1.10); without "
      f"refreshes {e['plain'] / times['sam']['step']:.3f}")
