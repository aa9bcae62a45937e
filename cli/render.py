"""Rendering of results for people (rich tables on stdout) and programs (JSON)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


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
    table.caption = (f"{op.get('dim')} parameters, {op.get('samples')} samples, "
                     f"{op.get('dtype')} on {op.get('device')}, HVP mode {op.get('mode')}; "
                     f"{result.hvps} HVPs in {result.seconds:.1f} s; seed {result.seed}; "
                     f"tol {top.tol:g} (relative residual)")
    table.caption_justify = "left"
    return table
