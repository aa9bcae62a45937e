"""hessdiag on one CUDA GPU: products per second, peak memory and top-5 time, in one table.

Run through ``benchmarks/gpu_check.sh`` (which calls this module with ``${PYTHON:-python}``):

    bash benchmarks/gpu_check.sh                        # one CUDA GPU, under 8 minutes
    bash benchmarks/gpu_check.sh --device cpu --tiny    # small sizes on a CPU, about a minute

Two models, random initialisation, one batch of random 3x32x32 images with uniform random
labels, eval mode, ``nn.CrossEntropyLoss()``: ResNet-18 (torchvision, CIFAR stem; batch 64)
and a small ViT (torchvision ``VisionTransformer``: 32x32 images in 4x4 patches, 6 layers,
4 heads, width 192, MLP 768). For each model it measures

- Hessian-vector products per second of each mode (``forward-over-reverse``,
  ``double-backward``, ``retained-graph``): ``HessianOperator(model, loss, (x, y),
  mode=...)`` and ``op.matvec(v)``, the median of ``--repeats`` products after a first one;
- looped against batched blocks: ``op.matmat(V)`` with ``--columns`` columns on
  ``HessianOperator(..., batch_vectors="loop")`` and ``batch_vectors="batched"`` (the
  batched operator's first block passes its exactness guard first, untimed);
- forward-over-reverse through ``torch.compile`` (``compile=True``; the first product,
  which compiles, is reported apart);
- top-5: ``lanczos(HessianOperator(model, loss, (x, y)), k=5, tol=1e-3)`` against
  PyHessian's ``hessian(model, loss, data=(x, y), cuda=...).eigenvalues(top_n=5,
  tol=1e-3)`` when pyhessian is importable (PyHessian ranks by magnitude; its products run
  with attention on the math kernel, as hessdiag's do, since the fused kernels have no
  double-backward formula);

each inside ``hessdiag.runtime.PeakMemory``: ``torch.cuda.max_memory_allocated`` on a CUDA
device (reset at the start of the measurement, so it counts the model and the batch too),
the process's peak resident set size elsewhere. Optional steps (PyHessian, compile) are not
started after ``--budget`` seconds, so that a slow GPU still finishes in time.

``--tiny``: batch 4 of 8x8 images for the ResNet-18 (it takes any size), a 2-layer ViT of width
32 on 16x16 images, 1 product per timing, 2 columns per block, top-5 capped at 6 products
and PyHessian at 1 iteration per eigenvalue (so its values are not converged), and no
compile unless ``--compile on`` (compiling a product takes minutes on a CPU).
Exit code 1 when any of hessdiag's measurements failed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_spectrum beside this file
try:
    import hessdiag  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_spectrum import (  # noqa: E402
    MB,
    cifar_resnet18,
    count_pyhessian_hvps,
    math_attention,
    small_vit,
)

from hessdiag.curvature import HessianOperator, lanczos  # noqa: E402
from hessdiag.runtime import PeakMemory  # noqa: E402

warnings.filterwarnings("ignore")

MODES = ("forward-over-reverse", "double-backward", "retained-graph")
MODELS = ("resnet18", "vit")
NUM_CLASSES = 10


# --------------------------------------------------------------------------- setup
def build(name: str, tiny: bool) -> tuple[nn.Module, int]:
    """The model and its input's side length."""
    if name == "resnet18":
        return cifar_resnet18(NUM_CLASSES), 8 if tiny else 32
    if tiny:
        return small_vit(NUM_CLASSES, image_size=16, patch_size=4, num_layers=2, num_heads=2,
                         hidden_dim=32, mlp_dim=64), 16
    return small_vit(NUM_CLASSES), 32


def has_c_compiler() -> bool:
    names = [os.environ.get("CC", ""), "cc", "gcc", "clang"]
    return any(shutil.which(n) for n in names if n)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tidy(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Check:
    """The measurements of one run, kept as rows of the table."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self.crit = nn.CrossEntropyLoss()
        self.top5_seconds: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", file=sys.stderr, flush=True)

    def add(self, model: str, order: int, what: str, *, hessdiag: bool = True,
            **fields: Any) -> dict:
        row = {"model": model, "order": order, "what": what, "hessdiag": hessdiag,
               "products_per_second": None, "seconds": None, "products": None,
               "peak_memory": None, "peak_memory_growth": None, "memory_kind": None,
               "note": "", **fields}
        self.rows.append(row)
        self.log(f"{model} {what}: " + (f"{row['products_per_second']:.3g} products/s"
                                         if row["products_per_second"] else row["note"]))
        return row

    def measure(self, model: str, order: int, what: str, fn: Callable[[], dict], *,
                hessdiag: bool = True) -> dict:
        """``fn()`` inside ``PeakMemory``; a failure becomes the row's note."""
        tidy(self.device)
        try:
            with PeakMemory(self.device) as memory:
                fields = fn()
        except Exception as exc:  # noqa: BLE001 - one failure must not stop the table
            traceback.print_exc(limit=4, file=sys.stderr)
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return self.add(model, order, what, hessdiag=hessdiag, failed=True,
                            note=f"failed: {type(exc).__name__}: {text}"[:160])
        finally:
            tidy(self.device)
        return self.add(model, order, what, hessdiag=hessdiag, peak_memory=memory.peak,
                        peak_memory_growth=memory.growth, memory_kind=memory.kind, **fields)

    def timed(self, fn: Callable[[], Any], repeats: int) -> list[float]:
        times = []
        for _ in range(repeats):
            sync(self.device)
            start = time.perf_counter()
            fn()
            sync(self.device)
            times.append(time.perf_counter() - start)
        return times

    # ------------------------------------------------------------------ products
    def products(self, name: str, model: nn.Module, batch, base: int) -> None:
        args = self.args
        gen = torch.Generator().manual_seed(args.seed)
        for i, mode in enumerate(MODES):
            order = base + 10 * i

            def matvec(mode=mode):
                op = HessianOperator(model, self.crit, batch, mode=mode, batch_vectors="loop")
                v = torch.randn(op.dim, generator=gen).to(self.device)
                first = self.timed(lambda: op.matvec(v), 1)[0]
                times = self.timed(lambda: op.matvec(v), args.repeats)
                med = statistics.median(times)
                return {"products_per_second": 1 / med, "seconds": med,
                        "products": args.repeats,
                        "note": f"first product {first:.2f} s (builds the graph)"}

            self.measure(name, order, f"{mode} matvec", matvec)
            rates = {}
            for j, vectors in enumerate(("loop", "batched")):
                def matmat(mode=mode, vectors=vectors):
                    op = HessianOperator(model, self.crit, batch, mode=mode,
                                         batch_vectors=vectors)
                    V = torch.randn(op.dim, args.columns, generator=gen).to(self.device)
                    if vectors == "batched":
                        op.matmat(V)  # the first block: graph built, the exactness guard
                    else:
                        op.matvec(V[:, 0])  # the first product builds the graph
                    times = self.timed(lambda: op.matmat(V), args.block_repeats)
                    med = statistics.median(times)
                    looped = vectors == "batched" and op.vector_batch == "loop"
                    return {"products_per_second": args.columns / med, "seconds": med,
                            "products": args.columns * args.block_repeats,
                            "note": f"looped: {op.vector_batch_reason}" if looped else ""}

                row = self.measure(name, order + 1 + j, f"{mode} {vectors} x{args.columns}",
                                   matmat)
                rates[vectors] = row["products_per_second"]
            if rates["loop"] and rates["batched"] and not row["note"]:
                row["speedup_vs_loop"] = rates["batched"] / rates["loop"]
                row["note"] = f"{row['speedup_vs_loop']:.2f}x the loop"

    def compiled(self, name: str, model: nn.Module, batch, base: int) -> None:
        what = "forward-over-reverse compile=True"
        if self.args.compile_reason:
            self.add(name, base, what, note=f"skipped: {self.args.compile_reason}")
            return
        if self.over_budget():
            self.add(name, base, what, note=f"skipped: past the {self.args.budget:.0f} s budget")
            return
        args = self.args

        def go():
            op = HessianOperator(model, self.crit, batch, compile=True)
            v = torch.randn(op.dim, generator=torch.Generator().manual_seed(args.seed))
            v = v.to(self.device)
            first = self.timed(lambda: op.matvec(v), 1)[0]
            times = self.timed(lambda: op.matvec(v), args.repeats)
            med = statistics.median(times)
            return {"products_per_second": 1 / med, "seconds": med, "products": args.repeats,
                    "note": f"first product (compiling) {first:.1f} s"}

        self.measure(name, base, what, go)

    # ------------------------------------------------------------------ top-5
    def top5(self, name: str, model: nn.Module, batch, base: int) -> None:
        args = self.args

        def go():
            start = time.perf_counter()
            op = HessianOperator(model, self.crit, batch)
            r = lanczos(op, k=5, tol=1e-3, seed=args.seed, max_hvps=args.top5_cap,
                        return_eigenvectors=False)
            sync(self.device)
            secs = time.perf_counter() - start
            self.top5_seconds[name] = secs
            values = ", ".join(f"{float(v):.4g}" for v in r.eigenvalues)
            conv = int(r.converged.sum())
            return {"products_per_second": op.hvp_count / secs, "seconds": secs,
                    "products": op.hvp_count, "values": [float(v) for v in r.eigenvalues],
                    "note": f"{op.mode}; {conv}/5 converged; [{values}]"}

        self.measure(name, base, "top-5 hessdiag lanczos tol=1e-3", go)

    def pyhessian_top5(self, name: str, model: nn.Module, batch, base: int) -> None:
        what = "top-5 pyhessian tol=1e-3"
        try:
            from pyhessian import hessian
        except ImportError:
            self.add(name, base, what, hessdiag=False, note="skipped: pyhessian not importable")
            return
        if self.over_budget():
            self.add(name, base, what, hessdiag=False,
                     note=f"skipped: past the {self.args.budget:.0f} s budget")
            return
        args = self.args

        def go():
            model.zero_grad(set_to_none=True)
            torch.manual_seed(args.seed)
            with count_pyhessian_hvps() as box, math_attention():
                start = time.perf_counter()
                h = hessian(model, self.crit, data=batch, cuda=self.device.type == "cuda")
                vals, _ = h.eigenvalues(maxIter=args.pyhessian_iters, tol=1e-3, top_n=5)
                sync(self.device)
                secs = time.perf_counter() - start
            del h
            model.zero_grad(set_to_none=True)
            values = ", ".join(f"{float(v):.4g}" for v in vals)
            ours = self.top5_seconds.get(name)
            ratio = f"{secs / ours:.2f}x hessdiag's time; " if ours else ""
            return {"products_per_second": box["hvps"] / secs, "seconds": secs,
                    "products": box["hvps"], "values": [float(v) for v in vals],
                    "ratio_vs_hessdiag": secs / ours if ours else None,
                    "note": f"{ratio}[{values}]"}

        self.measure(name, base, what, go, hessdiag=False)

    # ------------------------------------------------------------------ output
    def table(self) -> str:
        head = (f"{'model':<9} {'measurement':<36} {'products/s':>10} {'seconds':>8} "
                f"{'products':>8} {'peak MB':>8} {'growth MB':>9}  note")
        lines = [head, "-" * len(head)]
        order = {m: i for i, m in enumerate(MODELS)}
        for row in sorted(self.rows, key=lambda r: (order.get(r["model"], 9), r["order"])):
            def num(key, fmt, row=row):
                value = row.get(key)
                return "-" if value is None else format(value, fmt)

            peak = row["peak_memory"]
            growth = row["peak_memory_growth"]
            lines.append(
                f"{row['model']:<9} {row['what']:<36} {num('products_per_second', '.3g'):>10} "
                f"{num('seconds', '.3f'):>8} {num('products', 'd'):>8} "
                f"{'-' if peak is None else format(peak / MB, '.0f'):>8} "
                f"{'-' if growth is None else format(growth / MB, '.0f'):>9}  {row['note']}")
        return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true",
                   help="small sizes: a check that the script runs, about a minute on a CPU")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--batch-size", type=int, default=None, help="default 64, 4 with --tiny")
    p.add_argument("--repeats", type=int, default=None,
                   help="products per matvec timing (default 10, 1 with --tiny)")
    p.add_argument("--columns", type=int, default=None,
                   help="columns of the matmat blocks (default 8, 2 with --tiny)")
    p.add_argument("--block-repeats", type=int, default=None,
                   help="timed matmat blocks (default 3, 1 with --tiny)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="the compiled forward-over-reverse row: auto = on unless --tiny or "
                        "there is no C compiler")
    p.add_argument("--no-pyhessian", action="store_true", help="skip PyHessian's top-5")
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds after which PyHessian and compile are not started "
                        "(default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.batch_size = args.batch_size or (4 if tiny else 64)
    args.repeats = args.repeats or (1 if tiny else 10)
    args.columns = args.columns or (2 if tiny else 8)
    args.block_repeats = args.block_repeats or (1 if tiny else 3)
    args.top5_cap = 6 if tiny else None
    args.pyhessian_iters = 1 if tiny else 100
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(args.models) - set(MODELS):
        p.error(f"unknown models {sorted(set(args.models) - set(MODELS))}; choose from {MODELS}")
    args.compile_reason = ""
    if args.compile == "off":
        args.compile_reason = "--compile off"
    elif args.compile == "auto" and tiny:
        args.compile_reason = "--tiny (compiling a product takes minutes on a CPU)"
    elif not has_c_compiler():
        args.compile_reason = "no C compiler for torch.compile"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine; run with --device cpu [--tiny]",
              file=sys.stderr)
        return 2
    check = Check(args, device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"hessdiag GPU check on {where}: torch {torch.__version__}, batch {args.batch_size}, "
          f"{args.repeats} products per matvec timing, {args.columns} columns x "
          f"{args.block_repeats} blocks per matmat timing{', tiny sizes' if args.tiny else ''}")
    crit = nn.CrossEntropyLoss()
    setups = {}
    for i, name in enumerate(args.models):
        torch.manual_seed(args.seed)
        model, side = build(name, args.tiny)
        model = model.to(device).eval()
        g = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(args.batch_size, 3, side, side, generator=g).to(device)
        y = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=g).to(device)
        with torch.no_grad():
            loss = float(crit(model(x), y))
        n = sum(p.numel() for p in model.parameters())
        print(f"  {name}: {n:,} parameters, input {args.batch_size}x3x{side}x{side}, "
              f"loss {loss:.4f}")
        setups[name] = (model, (x, y), 100 * i)
    # the interpreter's, torch's and the models' objects are long-lived: keep them out of
    # the collections between measurements (a full collection over them costs ~0.2 s)
    gc.collect()
    gc.freeze()
    # cheap and essential first; optional, slow steps last (they respect --budget)
    for name, (model, batch, base) in setups.items():
        check.products(name, model, batch, base)
    for name, (model, batch, base) in setups.items():
        check.top5(name, model, batch, base + 60)
    for name, (model, batch, base) in setups.items():
        if args.no_pyhessian:
            check.add(name, base + 61, "top-5 pyhessian tol=1e-3", hessdiag=False,
                      note="skipped: --no-pyhessian")
        else:
            check.pyhessian_top5(name, model, batch, base + 61)
    for name, (model, batch, base) in setups.items():
        check.compiled(name, model, batch, base + 50)
    kind = next((r["memory_kind"] for r in check.rows if r["memory_kind"]), "n/a")
    print(f"\nproducts/s: products per second (matvec: 1 / median; blocks: columns / median; "
          f"top-5: all products / time); peak memory {kind}, MB = 10^6 bytes\n")
    print(check.table())
    total = check.elapsed()
    print(f"\ntotal {total:.0f} s")
    if args.out:
        out = {"config": {k: v for k, v in vars(args).items()},
               "environment": {"torch": torch.__version__, "python": platform.python_version(),
                               "device": where},
               "rows": check.rows, "total_seconds": total}
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.out}")
    failed = [r for r in check.rows if r.get("failed") and r["hessdiag"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
