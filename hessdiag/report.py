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
ANALYSIS_HEADINGS = ("analysis", "kind", "model", "data (samples)", "step", "dtype",
                     "λ_max ± residual", "conv.", "λ_min", "trace ± s.e.",
                     "alignment [95% CI]", "HVPs", "s")
"""The columns of the report's analyses table (:func:`analysis_cells`): a value and its
error share a cell (``lambda_max ± residual``, ``trace ± s.e.``, ``alignment [95%
interval]``) so that the table fits a 1280-pixel window; every field is in ``hessdiag
export``."""

STYLE = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; font-size: 1.2em; }
.meta { color: #666; }
.scroll { max-width: 100%; overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; margin: 0.6em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 6px; text-align: right;
         white-space: nowrap; vertical-align: top; }
td.wrap { white-space: normal; overflow-wrap: anywhere; min-width: 7em; }
.wrap { text-align: left; }
th { background: #f4f6f8; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 12px; }
"""

CAPTIONS = {
    "training": "Loss and accuracy of each run (train solid, test dashed).",
    "sharpness": "lambda_max along training (error bars: residual norms).",
    "alignment": "|cos| between the perturbation and the top Hessian eigenvector along "
                 "training: logged values (dots); error bars: each checkpoint's mean over "
                 "the minibatches of an align analysis with its 95% interval, or else a "
                 "band over windows of at least 10 logged values (intervals on the logit "
                 "scale, inside [0, 1]).",
    "density": "Spectral density by stochastic Lanczos quadrature (log scale); dashed: the "
               "top eigenvalues by Lanczos.",
    "eigenvalues": "Top eigenvalues and lambda_min across a run's checkpoints (error bars: "
                   "residual norms).",
    "eigenvalues:bars": "Top eigenvalues and lambda_min of the one analysed checkpoint as "
                        "bars with their values (a curve across checkpoints needs spectrum "
                        "analyses of two or more; error bars: residual norms).",
    "layers": "lambda_max of each layer's Hessian block (error bars: residual norms).",
    "landscape": "Loss around the checkpoint along the stored directions.",
}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: list[list[str]], headings: tuple[str, ...], wrap: tuple[int, ...] = ()
           ) -> str:
    """An HTML table of already formatted cells in a box that scrolls sideways if it must
    (the page itself never does); the columns ``wrap`` break their long words."""
    if not rows:
        return "<p class=meta>none</p>"
    head = "".join((f"<th class=wrap>{html.escape(c)}</th>" if j in wrap
                    else f"<th>{html.escape(c)}</th>") for j, c in enumerate(headings))
    body = "".join("<tr>" + "".join((f"<td class=wrap>{c}</td>" if j in wrap
                                     else f"<td>{c}</td>") for j, c in enumerate(row))
                   + "</tr>" for row in rows)
    return (f"<div class=scroll><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></div>")


def _plus_minus(value: Any, error: Any) -> str:
    if _cell(value) == "-" or _cell(error) == "-":
        return _cell(value)
    return f"{_cell(value)} ± {float(error):.2g}"


def _interval(value: Any, low: Any, high: Any) -> str:
    if _cell(value) == "-" or _cell(low) == "-" or _cell(high) == "-":
        return _cell(value)
    return f"{_cell(value)} [{float(low):.3g}, {float(high):.3g}]"


def run_cells(row: dict[str, Any]) -> list[str]:
    """The report's cells of a run row (:data:`RUN_COLUMNS`)."""
    return [_cell(row.get(c)) for c in RUN_COLUMNS]


def analysis_cells(row: dict[str, Any]) -> list[str]:
    """The report's cells of an analysis row (:data:`ANALYSIS_HEADINGS`)."""
    data = _cell(row.get("data"))
    if row.get("samples") is not None:
        data += f" ({_cell(row['samples'])})"
    converged = {True: "yes", False: "no"}.get(row.get("all_converged"), "-")
    return [_cell(row.get("analysis_id")), _cell(row.get("kind")), _cell(row.get("model")),
            data, _cell(row.get("step")), _cell(row.get("dtype")),
            _plus_minus(row.get("lambda_max"), row.get("lambda_max_residual")), converged,
            _cell(row.get("lambda_min")),
            _plus_minus(row.get("trace"), row.get("trace_stderr")),
            _interval(row.get("alignment"), row.get("alignment_ci95_low"),
                      row.get("alignment_ci95_high")),
            _cell(row.get("hvps")), _cell(row.get("seconds"))]


def _png(fig: Any) -> str:
    from hessdiag.plot import DPI, _pyplot

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    _pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


LANDSCAPES = 4
"""Landscapes drawn in a report (the latest ones)."""


def caption(store: Any, what: str, fig: Any) -> str:
    """The caption of the figure ``what`` drawn from ``store`` as ``fig``: what it draws,
    run by run where that differs (a stability threshold for SGD runs, none for Adam)."""
    if what == "sharpness":
        from hessdiag.plot import sharpness_runs, threshold_note

        notes = "; ".join(f"{run.id}: {threshold_note(run)}"
                          for run in sharpness_runs(store.runs()))
        return f"{CAPTIONS[what]} Stability threshold per run: {notes}."
    if what == "eigenvalues" and fig.axes and fig.axes[0].get_gid() == "eigenvalues:bars":
        return CAPTIONS["eigenvalues:bars"]
    return CAPTIONS[what]


def figures(store: Any) -> list[tuple[str, str, str]]:
    """``(what, base64 PNG, caption)`` of every figure the store has the data for, in
    reading order (runs first, then analyses)."""
    from hessdiag.plot import figure

    out = []
    for what in ("training", "sharpness", "alignment", "eigenvalues", "density", "layers"):
        try:
            fig = figure(store, what)
        except InputError:  # the store holds nothing this figure draws
            continue
        text = caption(store, what, fig)
        out.append((what, _png(fig), text))
    landscapes = [r.id for r in store.analyses() if r.kind == "landscape"]
    for analysis_id in landscapes[-LANDSCAPES:]:  # the latest ones, each its own figure
        fig = figure(store, "landscape", analyses=[analysis_id])
        out.append(("landscape", _png(fig), CAPTIONS["landscape"]))
    return out


def render_report(store: Any) -> str:
    """The report's HTML text."""
    from hessdiag import __version__
    from hessdiag.records import run_row, summary

    if hasattr(store, "snapshot"):
        store = store.snapshot()  # read once: the tables and every figure come from it
    runs = [run_row(r) for r in store.runs()]
    analyses = [summary(r) for r in store.analyses()]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>hessdiag report: {html.escape(Path(store.path).name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>hessdiag report</h1><p class=meta>store {html.escape(str(store.path))} · "
        f"{len(runs)} runs · {len(analyses)} analyses · hessdiag {__version__}</p>",
        "<h2>Runs</h2>", _table([run_cells(r) for r in runs], RUN_COLUMNS, wrap=(0, 2, 3)),
        "<h2>Analyses</h2>", _table([analysis_cells(r) for r in analyses], ANALYSIS_HEADINGS,
                                    wrap=(0, 2, 3)),
        "<h2>Figures</h2>",
    ]
    drawn = figures(store)
    if not drawn:
        parts.append("<p class=meta>nothing to draw yet</p>")
    seen: dict[str, int] = {}
    for what, data, text in drawn:
        seen[what] = seen.get(what, 0) + 1
        anchor = what if seen[what] == 1 else f"{what}-{seen[what]}"
        parts.append(f"<figure id={anchor}><img alt='{what} figure' "
                     f"src='data:image/png;base64,{data}'><figcaption><b>{what}</b>: "
                     f"{html.escape(text)}</figcaption></figure>")
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
