"""Rendering of results for people (rich tables on stdout) and programs (JSON)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["escape"]


def _console(**kwargs: Any) -> Console:
    # off a terminal (pipes, CI logs) rich would squeeze tables into 80 columns
    console = Console(highlight=False, **kwargs)
    if not console.is_terminal:
        console = Console(highlight=False, width=160, **kwargs)
    return console


stdout = _console()
stderr = _console(stderr=True)


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}"


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=_default) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def spectrum_table(result, title: str) -> Table:
    """Top eigenvalues with residuals and flags, then lambda_min, ratio, trace and cost."""
    top = result.top
    table = Table(title=title, title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("error", justify="right")
    table.add_column("converged", justify="center")
    for i, (lam, res, ok) in enumerate(zip(top.eigenvalues, top.residuals, top.converged,
                                           strict=True)):
        table.add_row(f"lambda_{i + 1} (top)", fmt(float(lam), 6), f"res {fmt(float(res), 2)}",
                      "yes" if ok else "[red]no[/red]")
    if result.bottom is not None:
        b = result.bottom
        table.add_row("lambda_min (bottom)", fmt(float(b.eigenvalues[0]), 6),
                      f"res {fmt(float(b.residuals[0]), 2)}",
                      "yes" if b.converged[0] else "[red]no[/red]")
        table.add_row("lambda_max / |lambda_min|", fmt(result.lambda_ratio, 4), "", "")
    if result.trace is not None:
        t = result.trace
        table.add_row(f"trace ({t.method}, {t.hvps} HVPs)", fmt(t.estimate, 6),
                      f"± {fmt(t.stderr, 2)} (1 s.e.)", "")
    if result.density is not None:
        est, se = result.density.trace()
        table.add_row(f"trace (SLQ, {result.density.n_probes} probes)", fmt(est, 6),
                      f"± {fmt(se, 2)} (1 s.e.)", "")
    op = result.operator
    curvature = op.get("curvature", "hessian")
    if op.get("fisher"):
        curvature += f" ({op['fisher']}" + (f", seed {op.get('seed')})" if op["fisher"] == "mc"
                                            else ")")
    table.caption = (f"{curvature}: {op.get('dim')} parameters, {counts_text(result)}, "
                     f"{op.get('dtype')} on {op.get('device')}, HVP mode {op.get('mode')}; "
                     f"{result.hvps} HVPs in {result.seconds:.1f} s"
                     f"{peak_memory_text(result)}; seed {result.seed}; "
                     f"tol {top.tol:g} (relative residual)")
    table.caption_justify = "left"
    return table


def counts_text(result) -> str:
    """``"64 samples, 1371 loss terms"``: the data set items and the terms the loss averaged
    over (tokens, for a per-token language-model loss), each named as such."""
    samples = result.samples
    terms = result.loss_terms
    if samples is None:
        return f"{terms} loss terms"
    return f"{samples} samples, {terms} loss terms"


def peak_memory_text(result) -> str:
    """``", peak memory 1.2 GiB (process RSS)"``; empty when not measured."""
    peak = getattr(result, "peak_memory", None)
    if peak is None:
        return ""
    what = {"cuda-max-allocated": "CUDA allocated", "block-peak-rss": "peak RSS",
            "process-peak-rss": "process peak RSS"}
    kind = what.get(result.peak_memory_kind or "", result.peak_memory_kind or "")
    return f", peak memory {fmt_bytes(peak)}" + (f" ({kind})" if kind else "")


def fmt_bytes(n: int) -> str:
    """Bytes in binary units: ``512 B``, ``3.4 MiB``, ``1.2 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


json_default = _default


def write_csv(fh, rows: list[dict[str, Any]]) -> None:
    import csv

    if not rows:
        return
    writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def rows_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for key in rows[0] if rows else []:
        table.add_column(key)
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    return table


def analyses_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in [("analysis", "left"), ("checkpoint", "left"), ("step", "right"),
                          ("data", "left"), ("dtype", "left"), ("λ_max", "right"),
                          ("conv.", "center"),
                          ("λ_min", "right"), ("trace ± s.e.", "right"), ("HVPs", "right"),
                          ("s", "right")]:
        table.add_column(name, justify=justify)
    for r in rows:
        trace = "-" if r["trace"] is None else f"{fmt(r['trace'])} ± {fmt(r['trace_stderr'], 2)}"
        ckpt = (r["checkpoint_path"] or "").rsplit("/", 1)[-1]
        table.add_row(r["analysis_id"], ckpt, "-" if r["step"] is None else str(r["step"]),
                      f"{r['data']} ({r['samples']})", r.get("dtype") or "-",
                      fmt(r["lambda_max"], 5),
                      {True: "yes", False: "[red]no[/red]", None: "-"}[r["all_converged"]],
                      fmt(r["lambda_min"], 4), trace, str(r["hvps"]),
                      fmt(r["seconds"], 3))
    return table


def analysis_detail(row: dict[str, Any], eig: list[dict[str, Any]]) -> Table:
    table = Table(title=f"analysis {row['analysis_id']}", title_justify="left",
                  show_header=False)
    table.add_column("field")
    table.add_column("value")
    for key, value in row.items():
        if key != "analysis_id" and value is not None:
            table.add_row(key, escape(str(value)))
    for e in eig:
        table.add_row(f"eigenvalue {e['index']}",
                      f"{e['eigenvalue']:.6g}  (residual {e['residual']:.2g}, "
                      f"{'converged' if e['converged'] else 'not converged'})")
    return table


BLOCKS = " ▁▂▃▄▅▆▇█"


def density_sketch(record, width: int = 64) -> str:
    """A one-line-per-analysis terminal sketch of log10 density (SLQ), with its range."""
    grid = np.asarray(record.arrays["slq/grid"], dtype=float)
    dens = np.asarray(record.arrays["slq/density"], dtype=float)
    edges = np.linspace(0, len(grid), width + 1).astype(int)
    cols = np.array([dens[a:b].max() if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:],
                                                                       strict=True)])
    top = cols.max()
    floor = top * 1e-6
    levels = np.clip((np.log10(np.maximum(cols, floor)) - np.log10(floor))
                     / (np.log10(top) - np.log10(floor)), 0, 1)
    bars = "".join(BLOCKS[int(round(v * (len(BLOCKS) - 1)))] for v in levels)
    sigma = float(np.asarray(record.arrays.get("slq/sigma", np.nan)))
    return (f"{record.id} density (log scale, sigma {sigma:.2g}):\n"
            f"  {bars}\n  {grid[0]:<.4g}{' ' * (width - 16)}{grid[-1]:>.4g}")


def train_summary(result, store) -> Table:
    table = Table(title=f"run {result.run_id}: {result.status}", title_justify="left",
                  show_header=False)
    table.add_column("field")
    table.add_column("value")
    rows = [("steps", str(result.steps)), ("epochs", str(result.epochs)),
            ("train loss (last batch)", fmt(result.train_loss)),
            ("train accuracy (last batch)", fmt(result.train_accuracy)),
            ("test loss", fmt(result.test_loss)), ("test accuracy", fmt(result.test_accuracy)),
            ("lambda_max (last measured)", fmt(result.lambda_max)),
            ("alignment |cos(e, v)| (last)", fmt(result.alignment)),
            ("final checkpoint", result.final_checkpoint or "-"),
            ("store", str(store)), ("seconds", f"{result.seconds:.1f}")]
    for key, value in rows:
        table.add_row(key, value)
    return table


def runs_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in [("run", "left"), ("status", "left"), ("model/data", "left"),
                          ("optimizer", "left"), ("steps", "right"), ("loss", "right"),
                          ("test acc", "right"), ("λ_max", "right"),
                          ("peak λ_max/threshold", "right"), ("alignment", "right")]:
        table.add_column(name, justify=justify)
    for r in rows:
        opt = r["optimizer"] or "-"
        if opt in ("sam", "eigensam"):
            opt += f" ρ={r['rho']}" + (f" α={r['alpha']}" if opt == "eigensam" else "")
        total = "" if r["total_steps"] is None else f"/{r['total_steps']}"  # known ahead?
        table.add_row(r["run_id"], str(r["status"]), f"{r['model'] or '-'}/{r['data'] or '-'}",
                      opt, f"{r['steps']}{total}", fmt(r["loss"]), fmt(r["test_acc"]),
                      fmt(r["lambda_max"]), fmt(r.get("stability_peak"), 3),
                      fmt(r["alignment"], 3))
    return table


def stability_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per run with a stability ratio: its peak and its last value, each at its
    own step's learning rate."""
    return [f"{r['run_id']}: λ_max/threshold (at each step's own lr) peak "
            f"{fmt(r['stability_peak'], 3)} at step {r['stability_peak_step']}, last "
            f"{fmt(r['stability'], 3)} at step {r['stability_step']}"
            for r in rows if r.get("stability_peak") is not None]


def alignment_line(path, done) -> str:
    r = done.result
    ck = done.task.checkpoint
    step = "" if ck.step is None else f" step {ck.step}"
    def ci(pair, digits: int) -> str:
        lo, hi = pair
        return "no interval" if lo != lo or hi != hi else f"[{lo:.{digits}f}, {hi:.{digits}f}]"

    share = "" if r.topk_share is None else (
        f", top-{r.top_k} share {r.topk_share:.3f} {ci(r.topk_share_ci95, 3)}")
    conv = "" if r.converged[0] else " [red](not converged)[/red]"
    used = f"{r.batches} batches" if r.batches == r.requested or not r.requested else \
        f"{r.batches} of {r.requested} batches"
    interval = f"({used}: no interval)" if ci(r.ci95, 4) == "no interval" else \
        f"{ci(r.ci95, 4)} (95% CI, {used})"
    return (f"{path.name}{step}: {r.rule} alignment |cos| {r.alignment:.4f} "
            f"{interval}, signed "
            f"{r.alignment_signed:+.4f}, λ_max {r.lambda_max:.5g}{conv}{share}; "
            f"analysis {done.analysis_id}")


def layers_table(rows: list[dict[str, Any]], result=None) -> Table:
    """Per-layer sharpness: each parameterised module's diagonal Hessian block, then the
    whole network when ``result`` is given."""
    table = Table(title="per-layer sharpness (diagonal Hessian blocks)", title_justify="left")
    for name, justify in [("layer", "left"), ("parameters", "right"), ("λ_max", "right"),
                          ("residual", "right"), ("conv.", "center"),
                          ("trace ± s.e.", "right")]:
        table.add_column(name, justify=justify)
    for r in rows:
        trace = "-" if r["trace"] is None else f"{fmt(r['trace'])} ± {fmt(r['trace_stderr'], 2)}"
        table.add_row(escape(r["layer"]), str(int(r["dim"])), fmt(r["lambda_max"], 5),
                      fmt(r["lambda_max_residual"], 2),
                      "yes" if r["lambda_max_converged"] else "[red]no[/red]", trace)
    if result is not None:
        trace = ("-" if result.trace is None
                 else f"{fmt(result.trace.estimate)} ± {fmt(result.trace.stderr, 2)}")
        table.add_row("[bold]whole network[/bold]", str(result.operator.get("dim")),
                      fmt(result.lambda_max, 5), fmt(float(result.top.residuals[0]), 2),
                      "yes" if result.top.converged[0] else "[red]no[/red]", trace)
    return table


def alignments_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in [("analysis", "left"), ("checkpoint", "left"), ("step", "right"),
                          ("perturbation", "left"), ("|cos| [95% CI]", "right"),
                          ("signed [95% CI]", "right"), ("B", "right"), ("λ_max", "right"),
                          ("s", "right")]:
        table.add_column(name, justify=justify)
    for r in rows:
        ckpt = (r["checkpoint_path"] or "").rsplit("/", 1)[-1]
        table.add_row(r["analysis_id"], ckpt, "-" if r["step"] is None else str(r["step"]),
                      str(r["perturbation"]),
                      f"{fmt(r['alignment'])} [{fmt(r['alignment_ci95_low'])}, "
                      f"{fmt(r['alignment_ci95_high'])}]",
                      f"{fmt(r['alignment_signed'])} [{fmt(r['alignment_signed_ci95_low'])}, "
                      f"{fmt(r['alignment_signed_ci95_high'])}]",
                      str(r["alignment_batches"]), fmt(r["lambda_max"], 5),
                      fmt(r["seconds"], 3))
    return table


def baseline_table(baseline, path: str) -> Table:
    table = Table(title=f"baseline {path}", title_justify="left")
    for name in ("metric", "value", "error"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for name, entry in baseline.metrics.items():
        values = entry["value"] if isinstance(entry["value"], list) else [entry["value"]]
        errors = entry.get("residual", entry.get("stderr"))
        errors = errors if isinstance(errors, list) else [errors] * len(values)
        kind = "± s.e." if entry["kind"] == "stochastic" else "res"
        for i, (value, error) in enumerate(zip(values, errors, strict=True)):
            label = name if len(values) == 1 else f"lambda_{i + 1}"
            table.add_row(label, fmt(value, 6), f"{kind} {fmt(error, 2)}")
    task = baseline.task
    terms = task.get("loss_terms")  # baselines written before it: not recorded
    table.caption = (f"{task['model']} on {task['data']} ({task['split']}, {task['samples']} "
                     "samples" + ("" if terms is None else f", {terms} loss terms")
                     + f"), loss {task['loss']}; seed {baseline.settings.seed}, "
                     f"{baseline.settings.dtype}, tol {baseline.settings.tol or 'by dtype'}")
    table.caption_justify = "left"
    return table


def check_table(result, checkpoint: str) -> Table:
    verdict = ("[green]pass[/green]" if result.passed
               else f"[bold red]{result.verdict.upper()}[/bold red]")
    table = Table(title=f"hessdiag check {checkpoint}: {verdict}", title_justify="left")
    for name in ("metric", "baseline", "now", "change", "limit", "noise", "verdict"):
        table.add_column(name, justify="left" if name in ("metric", "verdict") else "right")
    for row in result.rows:
        change = "-" if row.change is None else f"{row.change:+.1%}"
        table.add_row(row.metric, fmt(row.baseline, 6), fmt(row.now, 6), change,
                      fmt(row.limit, 6), fmt(row.noise, 2),
                      "pass" if row.passed else f"[bold red]{row.verdict}[/bold red]")
    drop = "" if result.max_drop is None else f"; max drop {result.max_drop:g}"
    table.caption = (f"baseline {result.baseline_source or '(absolute limits only)'}; rtol "
                     f"{result.rtol:g}{drop}; noise: residuals of eigenvalues, 1.645 combined s.e. "
                     f"of stochastic metrics; {result.result.hvps} HVPs in "
                     f"{result.result.seconds:.1f} s")
    table.caption_justify = "left"
    return table


def landscape_table(result, title: str) -> Table:
    """The landscape's centre, range of losses, directions and cost, with a sketch of the
    1-D curve."""
    d = result.directions
    table = Table(title=title, title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    finite = result.loss[np.isfinite(result.loss)]
    table.add_row("loss at the checkpoint", fmt(result.loss0, 6))
    if finite.size:
        table.add_row("loss on the grid: min / max", f"{fmt(float(finite.min()), 6)} / "
                      f"{fmt(float(finite.max()), 6)}")
    acc = result.accuracy[np.isfinite(result.accuracy)]
    if acc.size:
        table.add_row("accuracy on the grid: min / max",
                      f"{fmt(float(acc.min()), 4)} / {fmt(float(acc.max()), 4)}")
    kind = d.get("kind")
    if kind == "eigen":
        for i, (lam, res) in enumerate(zip(d.get("eigenvalues", []), d.get("residuals", []),
                                           strict=False)):
            table.add_row(f"direction {i + 1}: eigenvector of lambda_{i + 1}",
                          f"{fmt(lam, 6)} (res {fmt(res, 2)})")
    else:
        norms = ", ".join(fmt(n, 4) for n in d.get("norms", []))
        table.add_row("random directions' norms" + (" (filter-normalised)"
                                                    if d.get("filter_norm") else ""), norms)
        if d.get("cosine") is not None:
            table.add_row("cosine between the two directions", fmt(d["cosine"], 3))
    if result.ys is None:
        table.add_row("loss along the direction", _sparkline(result.loss))
    shape = ("x".join(str(n) for n in reversed(result.loss.shape)) + " grid"
             if result.ys is not None else f"{result.loss.size} points")
    table.caption = (f"{shape} over x in [{fmt(float(result.xs[0]))}, "
                     f"{fmt(float(result.xs[-1]))}]"
                     + ("" if result.ys is None else f", y in [{fmt(float(result.ys[0]))}, "
                        f"{fmt(float(result.ys[-1]))}]")
                     + f"; {result.samples} loss terms, {result.forward_passes} forward passes"
                     + (f" ({result.resumed_points} points resumed)" if result.resumed_points
                        else "") + f" in {result.seconds:.1f} s; seed {result.seed}")
    table.caption_justify = "left"
    return table


def _sparkline(values: np.ndarray) -> str:
    bars = "▁▂▃▄▅▆▇█"
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    if not finite.size:
        return "-"
    lo, hi = float(finite.min()), float(finite.max())
    span = hi - lo or 1.0
    return "".join(" " if not math.isfinite(x) else bars[int((x - lo) / span * 7)] for x in v)


def verify_lines(report, salvaged=None) -> list[str]:
    """``hessdiag verify``: what is intact, what is damaged (where), what salvage wrote."""
    d = report.datasets
    state = "intact" if report.intact else "DAMAGED"
    lines = [f"{report.path}: {state}",
             f"  records: {report.runs} runs, {report.analyses} analyses"
             + (f" ({report.main_runs} runs and {report.main_analyses} analyses in the file, "
                "the rest in the journal)" if report.journal_frames else ""),
             f"  datasets: {d['fletcher32']} Fletcher-32, {d['crc32']} CRC-32"
             + (f", {d['none']} without checksums (written before checksums)"
                if d["none"] else "")
             + (f"; the attributes of {report.unsealed_records} records without checksum"
                if report.unsealed_records else "")]
    journal = {"none": "none (the file holds every record)",
               "stale": "left by an interrupted compaction (already merged): ignored",
               "damaged-header": f"header damaged; {report.journal_frames} intact frames",
               "current": f"{report.journal_frames} intact frames"}[report.journal]
    if report.torn_bytes:
        journal += (f"; a torn last frame of {report.torn_bytes} bytes (a write interrupted "
                    "by a crash: not a record, the next write drops it)")
    lines.append(f"  journal: {journal}")
    lines += [f"  damaged: {problem}" for problem in report.damaged]
    if salvaged is not None:
        left = (f"; left out (damaged): {', '.join(salvaged.left_out)}"
                if salvaged.left_out else "")
        skipped = (f"; {salvaged.skipped_frames} journal frames extending them skipped"
                   if salvaged.skipped_frames else "")
        lines.append(f"salvaged to {salvaged.out}: {salvaged.runs} runs, {salvaged.analyses} "
                     f"analyses ({salvaged.journal_frames} journal frames applied){left}"
                     f"{skipped}")
    return lines
