"""What SharpnessMonitor costs a training loop (run by hand, not in CI).

    python benchmarks/bench_monitor.py [--steps 1000] [--every 100] [--batch-size 64]
        [--measure-samples 256] [--models mlp,cnn6] [--threads N]

On the bundled digits (1,437 training images, 8x8, no download), SGD with momentum 0.9
(lr 0.05) trains each model for `--steps` steps twice from the same start and data
order, once plain and once with a monitor measuring every `--every` steps (step 0
included) on the first `--measure-samples` training images; the two runs alternate in
chunks of `--every` steps so that a varying load on a shared machine weighs on both
alike. Printed per model: the plain step time, the monitor's measurements (count, mean
time of the warm ones, i.e. all but the first, which also chooses the product mode,
and their mean Hessian-vector products), and the overhead: (monitored - plain) / plain
wall time, measured, and the amortised estimate warm-measurement / (every x step).
"""

import argparse
import copy
import time

import torch
from torch import nn

from hessdiag.data.digits import load_digits
from hessdiag.models import build_model
from hessdiag.monitor import SharpnessMonitor

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--every", type=int, default=100)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--measure-samples", type=int, default=256)
parser.add_argument("--models", default="mlp,cnn6")
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

x, y = load_digits("train").tensors
measure = (x[:args.measure_samples], y[:args.measure_samples])
loss_fn = nn.CrossEntropyLoss()
KWARGS = {"mlp": {"hidden": 128}, "cnn6": {"width": 16, "hidden": 64}}


def run(model_name: str) -> None:
    torch.manual_seed(0)
    start = build_model(model_name, num_classes=10, in_shape=[1, 8, 8],
                        **KWARGS.get(model_name, {}))
    n_params = sum(p.numel() for p in start.parameters())
    models = {"plain": copy.deepcopy(start), "monitored": copy.deepcopy(start)}
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
            for k, m in models.items()}
    monitor = SharpnessMonitor(models["monitored"], loss_fn, measure,
                               optimizer=opts["monitored"], every=args.every)
    seconds = {"plain": 0.0, "monitored": 0.0}
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))

    def steps(kind: str, first: int, last: int) -> None:
        model, opt = models[kind], opts[kind]
        begin = time.perf_counter()
        for step in range(first, last):
            if kind == "monitored":
                monitor.step(step)
            i = (step * args.batch_size) % (len(y) - args.batch_size)
            idx = order[i:i + args.batch_size]
            model.train()
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        if kind == "monitored" and last == args.steps:
            monitor.step(last)
        seconds[kind] += time.perf_counter() - begin

    for first in range(0, args.steps, args.every):
        last = min(first + args.every, args.steps)
        for kind in ("plain", "monitored"):
            steps(kind, first, last)
    rows = monitor.history
    warm = rows[1:] or rows
    warm_s = sum(r["seconds"] for r in warm) / len(warm)
    hvps = sum(r["hvps"] for r in warm) / len(warm)
    step_s = seconds["plain"] / args.steps
    measured = (seconds["monitored"] - seconds["plain"]) / seconds["plain"]
    print(f"{model_name} ({n_params:,} parameters, batch {args.batch_size}, measurement set "
          f"{args.measure_samples}): plain step {1e3 * step_s:.2f} ms; "
          f"{len(rows)} measurements, first {1e3 * rows[0]['seconds']:.0f} ms, warm mean "
          f"{1e3 * warm_s:.0f} ms ({hvps:.1f} HVPs, all converged: "
          f"{all(r['lambda_max_converged'] == 1 for r in rows)}); overhead at every="
          f"{args.every}: measured {100 * measured:.1f}%, amortised warm "
          f"{100 * warm_s / (args.every * step_s):.1f}%", flush=True)


for name in args.models.split(","):
    run(name.strip())
