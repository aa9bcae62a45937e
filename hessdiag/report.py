"""A one-page HTML report of a store: its runs, its analyses and every figure that applies,
self-contained (figures embedded as PNG data, no script, no network), readable offline.

The figures are those of :mod:`hessdiag.plot`, drawn from the store alone; the tables are
the rows of :func:`hessdiag.records.run_row` and :func:`hessdiag.records.summary`, the
ones ``hessdiag show`` prints and ``hessdiag export`` writes.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any

from hessdiag._errors import InputError
from hessdiag._files import replacing

RUN_COLUMNS = ("run_id", "status", "model", "data", "optimizer", "lr", "rho", "epochs",
               "seed", "steps", "loss", "test_loss", "test_acc", "lambda_max", "alignment")
ANALYSIS_COLUMNS = ("analysis_id", "kind", "model", "data", "step", "samples", "lambda_max",
                    "lambda_max_residual", "all_converged", "lambda_min", "trace",
                    "trace_stderr", "alignment", "alignment_ci95_low", "alignment_ci95_high",
                    "hvps", "seconds")

STYLE = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; font-size: 1.2em; }
.meta { color: #666; }
table { border-collapse: collapse; font-size: 12px; margin: 0.6em 0; display: block;
        overflow-x: auto; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right;
         white-space: nowrap; }
th { background: #f4f6f8; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 12px; }
"""

CAPTIONS = {
    "training": "Loss and accuracy of each run (train solid, test dashed).",
    "sharpness": "lambda_max along training (error bars: residual norms); dotted: each run's "
                 "stability threshold 2(1+momentum)/lr at its logged learning rate.",
    "alignment": "|cos| between the perturbation and the top Hessian eigenvector along "
                 "training: logged values (dots); error bars: each checkpoint's mean over "
                 "the minibatches of an align analysis with its 95% interval, or else a "
                 "band over windows of at least 10 logged values (intervals on the logit "
                 "scale, inside [0, 1]).",
    "density": "Spectral density by stochastic Lanczos quadrature (log scale); dashed: the "
               "top eigenvalues by Lanczos.",
    "eigenvalues": "Top eigenvalues and lambda_min across a run's checkpoints (error bars: "
                   "residual norms).",
    "layers": "lambda_max of each layer's Hessian block (error bars: residual norms).",
    "landscape": "Loss around the checkpoint along the stored directions.",
}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    if not rows:
        return "<p class=meta>none</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns)
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(fig: Any) -> str:
    from hessdiag.plot import DPI, _pyplot

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


LANDSCAPES = 4
"""Landscapes drawn in a report (the latest ones)."""


def figures(store: Any) -> list[tuple[str, str]]:
    """``(what, base64 PNG)`` of every figure the store has the data for, in reading order
    (runs first, then analyses)."""
    from hessdiag.plot import figure

    out = []
    for what in ("training", "sharpness", "alignment", "eigenvalues", "density", "layers"):
        try:
            fig = figure(store, what)
        except InputError:  # the store holds nothing this figure draws
            continue
        out.append((what, _png(fig)))
    landscapes = [r.id for r in store.analyses() if r.kind == "landscape"]
    for analysis_id in landscapes[-LANDSCAPES:]:  # the latest ones, each its own figure
        out.append(("landscape", _png(figure(store, "landscape", analyses=[analysis_id]))))
    return out


def render_report(store: Any) -> str:
    """The report's HTML text."""
    from hessdiag import __version__
    from hessdiag.records import run_row, summary

    runs = [run_row(r) for r in store.runs()]
    analyses = [summary(r) for r in store.analyses()]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>hessdiag report: {html.escape(Path(store.path).name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>hessdiag report</h1><p class=meta>store {html.escape(str(store.path))} · "
        f"{len(runs)} runs · {len(analyses)} analyses · hessdiag {__version__}</p>",
        "<h2>Runs</h2>", _table(runs, RUN_COLUMNS),
        "<h2>Analyses</h2>", _table(analyses, ANALYSIS_COLUMNS),
        "<h2>Figures</h2>",
    ]
    drawn = figures(store)
    if not drawn:
        parts.append("<p class=meta>nothing to draw yet</p>")
    seen: dict[str, int] = {}
    for what, data in drawn:
        seen[what] = seen.get(what, 0) + 1
        anchor = what if seen[what] == 1 else f"{what}-{seen[what]}"
        parts.append(f"<figure id={anchor}><img alt='{what} figure' "
                     f"src='data:image/png;base64,{data}'><figcaption><b>{what}</b>: "
                     f"{html.escape(CAPTIONS[what])}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(store: Any, path: str | Path) -> Path:
    """Write the report of ``store`` to ``path`` (atomically) and return the path."""
    path = Path(path)
    text = render_report(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
