"""What SharpnessMonitor costs a training loop (run by hand, not in CI).

    python benchmarks/bench_monitor.py [--steps 2000] [--every 100,500]
        [--batch-size 64] [--measure-samples 64,256] [--models mlp,cnn6] [--threads N]
        [--data digits|cifar-shaped]

``--data cifar-shaped`` (for ``--models resnet18``): 512 random 3x32x32 images with random
labels of 10 classes, generated with a fixed seed (no download; the cost of a step and
of a measurement depends on the shapes, not on the pixels).

On the bundled digits (1,437 training images, 8x8, no download), SGD with momentum 0.9
(lr 0.05) trains each model for `--steps` steps with a monitor measuring every `every`
steps (step 0 included) on the first `--measure-samples` training images. Inside the one
loop, the training steps (forward, backward, optimizer step) and the monitor's calls are
timed apart, so a varying load on a shared machine weighs on both alike; the overhead is
monitor time / training time: the fraction of step time the monitor adds. Reported with
and without the first measurement (which also times the product modes once per run).
"""

import argparse
import time

import torch
from torch import nn

from hessdiag.data.digits import load_digits
from hessdiag.models import build_model
from hessdiag.monitor import SharpnessMonitor

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--every", default="100,500")
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--measure-samples", default="64,256")
parser.add_argument("--models", default="mlp,cnn6")
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--data", default="digits", choices=["digits", "cifar-shaped"])
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

if args.data == "digits":
    x, y = load_digits("train").tensors
else:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g)
loss_fn = nn.CrossEntropyLoss()
KWARGS = {"mlp": {"hidden": 128}, "cnn6": {"width": 16, "hidden": 64}}


def run(model_name: str, every: int, samples: int) -> None:
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_shape=list(x.shape[1:]),
                        **KWARGS.get(model_name, {}))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = SharpnessMonitor(model, loss_fn, (x[:samples], y[:samples]), optimizer=opt,
                               every=every)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train_s = monitor_s = 0.0
    for step in range(args.steps + 1):
        t0 = time.perf_counter()
        monitor.step(step)
        t1 = time.perf_counter()
        monitor_s += t1 - t0
        if step == args.steps:
            break
        i = (step * args.batch_size) % (len(y) - args.batch_size)
        idx = order[i:i + args.batch_size]
        model.train()
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        train_s += time.perf_counter() - t1
    rows = monitor.history
    first = rows[0]["seconds"]
    hvps = sum(r["hvps"] for r in rows[1:]) / max(len(rows) - 1, 1)
    warm = sum(r["seconds"] for r in rows[1:]) / max(len(rows) - 1, 1)
    step_s = train_s / args.steps
    print(f"{model_name:5s} {n_params:,} params, batch {args.batch_size}, measure "
          f"{samples:3d}, every {every:3d}: step {1e3 * step_s:.2f} ms; {len(rows)} "
          f"measurements, first {1e3 * first:.0f} ms, then {1e3 * warm:.0f} ms each "
          f"({hvps:.1f} HVPs, = {warm / step_s:.0f} steps; converged: "
          f"{all(r['lambda_max_converged'] == 1 for r in rows)}); overhead "
          f"{100 * monitor_s / train_s:.1f}% of step time, "
          f"{100 * (monitor_s - first) / train_s:.1f}% without the first", flush=True)


for name in args.models.split(","):
    for samples in (int(s) for s in args.measure_samples.split(",")):
        for every in (int(e) for e in args.every.split(",")):
            run(name.strip(), every, samples)
