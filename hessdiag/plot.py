"""Figures drawn from the store alone (matplotlib, optional: ``pip install hessdiag[plot]``).

Each ``*_figure`` function takes records read from a :class:`~hessdiag.store.Store` and
returns a matplotlib ``Figure`` whose artists hold exactly the stored numbers (tests read
them back through the figure); :func:`save` writes it as PNG, SVG or PDF by the file's
extension. :func:`figure` is the one entry point ``hessdiag plot`` uses. Nothing is shown
on screen (the Agg backend), so figures work headless. A log axis spanning less than a
decade gets plain tick numbers (:func:`plain_log_ticks`).

=============  ==========================================================================
``what``       figure
=============  ==========================================================================
density        spectral densities of spectrum analyses (log scale), overlaid, top
               eigenvalues marked; recomputed from the stored nodes and weights
eigenvalues    top-k eigenvalues and lambda_min across the analyses of a run's
               checkpoints (x: training step), error bars = residual norms; bars
               with their values when the analyses are all of one checkpoint
training       loss and accuracy (train and test) of several runs
sharpness      lambda_max along training for several runs, with each run's stability
               threshold (``2 (1 + momentum) / lr``, Nesterov ``2 (1 + momentum) / ((1 +
               2 momentum) lr)``, at the logged learning rate; none for Adam runs)
alignment      alignment along training per run: logged values, and 95% intervals
               (logit scale, inside [0, 1]) of align analyses of its checkpoints,
               else of windows of at least 10 logged values
layers         per-layer lambda_max of one analysis as bars, error bars = residuals
landscape      a stored loss landscape: 1-D curves or a 2-D contour
=============  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hessdiag._errors import InputError
from hessdiag.curvature import SLQResult
from hessdiag.curvature.stats import bounded_mean_interval
from hessdiag.stability import raw_threshold, run_variant

WHAT = ("density", "eigenvalues", "training", "sharpness", "alignment", "layers", "landscape")
FORMATS = (".png", ".svg", ".pdf")
SIZE = (6.4, 3.8)  # inches
DPI = 120
COLORS = ("#1f5fa8", "#c0392b", "#2e8b57", "#8e44ad", "#d35400", "#16a085", "#7f8c8d")


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise InputError("figures need matplotlib: pip install 'hessdiag[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_path(path: str | Path) -> Path:
    """The figure's path, its format checked from the extension (before any work)."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InputError(f"cannot tell the figure format of {str(path)!r}: end the file name "
                         f"with {', '.join(FORMATS)}", param="output")
    return path


def save(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (PNG, SVG or PDF by extension) and close it."""
    path = check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def _new(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = SIZE):
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=DPI, squeeze=False)
    return fig, axes


def _tight_layout(fig: Any) -> None:
    """``fig.tight_layout()``, the layout then final. Matplotlib's leaves a placeholder
    layout engine on the figure, and ``savefig`` lays out a figure that has an engine once
    more (a whole draw without rendering: about a third of a save) though the placeholder
    changes nothing; without it the saved file is byte for byte the same."""
    import matplotlib as mpl
    from matplotlib.layout_engine import PlaceHolderLayoutEngine

    fig.tight_layout()
    if (isinstance(fig.get_layout_engine(), PlaceHolderLayoutEngine)
            and not mpl.rcParams["figure.autolayout"]
            and not mpl.rcParams["figure.constrained_layout.use"]):
        fig.set_layout_engine(None)  # no engine (with these rcParams)


def plain_log_ticks(ax: Any) -> None:
    """On each log-scaled axis of ``ax`` whose view spans less than a decade, plain numbers
    at evenly spaced ticks (``8``, ``10``, ``12``) instead of matplotlib's labelled minor
    ticks in scientific notation (``7.14x10^0``): such an axis holds no power of ten to
    label. Axes spanning a decade or more keep the powers of ten."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

    for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() != "log":
            continue
        low, high = sorted(limits)
        if not (low > 0 and high / low < 10):
            continue
        axis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.6g}"))
        axis.set_minor_locator(NullLocator())
        axis.set_minor_formatter(NullFormatter())


def _finish(fig: Any, title: str | None) -> Any:
    if title:
        fig.suptitle(title, fontsize=10)
    for ax in fig.axes:
        plain_log_ticks(ax)
    _tight_layout(fig)
    return fig


def _legend_below(ax: Any, **kwargs: Any) -> Any:
    """The legend under the axes (below the x label), outside the data, so no line
    (an eigenvalue marker at the spectrum's edge) runs through it."""
    return ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), borderaxespad=0.0,
                     fontsize=7, frameon=False, **kwargs)


def _label(record: Any) -> str:
    """A short name for an analysis or a run in legends."""
    a = record.attrs
    if record.group == "runs":
        cfg = a.get("config") or {}
        opt = cfg.get("optimizer") or a.get("optimizer") or "?"
        base = cfg.get("base") or "sgd"
        if base != "sgd":  # plain Adam is optimizer sgd around base adam
            opt = base if opt == "sgd" else f"{opt}+{base}"
        return f"{record.id} ({opt})"
    where = Path(str(a.get("checkpoint_path") or "")).name or record.id
    return f"{where} [{record.id[-6:]}]"


# --------------------------------------------------------------------------- analyses


def density_figure(records: Sequence[Any], *, sigma: float | None = None,
                   title: str | None = None) -> Any:
    """Spectral densities of spectrum analyses that hold an SLQ density, overlaid."""
    from hessdiag.records import read_spectrum

    fig, axes = _new(size=(SIZE[0], SIZE[1] + 0.4))
    ax = axes[0, 0]
    floor = math.inf
    for i, record in enumerate(records):
        result = read_spectrum(record)
        if result.density is None:
            raise InputError(f"analysis {record.id} has no density: run spectrum with "
                             "--density", param="analysis")
        color = COLORS[i % len(COLORS)]
        grid, dens, used = result.density.density(sigma=sigma)
        low = max(float(dens.max()) * 1e-8, 1e-300)
        floor = min(floor, low)
        ax.semilogy(grid, np.maximum(dens, low), color=color, lw=1.4,
                    label=f"{_label(record)} (sigma={used:.2g})", gid=f"density:{record.id}")
        for j, lam in enumerate(np.asarray(result.top.eigenvalues)):
            ax.axvline(lam, color=color, lw=0.8, ls="--", gid=f"eigenvalue:{record.id}",
                       label="top eigenvalues (Lanczos)" if i == 0 and j == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_ylim(bottom=floor)
    _legend_below(ax, ncol=2)
    return _finish(fig, title or "Hessian spectral density (SLQ)")


def plot_density(result: SLQResult, path: str | Path, *, sigma: float | None = None,
                 eigenvalues: np.ndarray | None = None, title: str | None = None) -> Path:
    """The SLQ spectral density of one result on a log scale, with the given eigenvalues
    marked, written to ``path`` (``hessdiag spectrum --plot``)."""
    fig, axes = _new(size=(6.4, 4.0))
    ax = axes[0, 0]
    grid, dens, sigma = result.density(sigma=sigma)
    floor = max(float(dens.max()) * 1e-8, 1e-300)
    ax.semilogy(grid, np.maximum(dens, floor), color=COLORS[0], lw=1.4, label="SLQ density")
    if eigenvalues is not None:
        for i, lam in enumerate(np.asarray(eigenvalues)):
            ax.axvline(lam, color=COLORS[1], lw=0.8, ls="--",
                       label="top eigenvalues (Lanczos)" if i == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_ylim(bottom=floor)
    ax.set_title(title or f"Hessian spectral density ({result.n_probes} probes x "
                          f"{result.steps} steps, sigma={sigma:.2g})", fontsize=9)
    _legend_below(ax, ncol=2)
    plain_log_ticks(ax)
    _tight_layout(fig)
    return save(fig, path)


def eigenvalues_figure(records: Sequence[Any], *, title: str | None = None) -> Any:
    """Top-k eigenvalues (and lambda_min where measured) of spectrum analyses against the
    training step of their checkpoints, with residual norms as error bars."""
    from hessdiag.records import read_spectrum

    rows = []
    for record in records:
        step = record.attrs.get("step", -1)
        if step is None or int(step) < 0:
            continue
        rows.append((int(step), read_spectrum(record), record))
    if not rows:
        raise InputError("no spectrum analysis of a training checkpoint (with a step) was "
                         "selected: run spectrum on a run's checkpoints first", param="runs")
    rows.sort(key=lambda r: r[0])
    if len({s for s, *_ in rows}) == 1:
        return _eigenvalue_bars(rows, title=title)
    steps = np.array([s for s, *_ in rows])
    k = min(len(r.top.eigenvalues) for _, r, _ in rows)
    fig, axes = _new()
    ax = axes[0, 0]
    ax.set_gid("eigenvalues:steps")
    for j in range(k):
        values = np.array([r.top.eigenvalues[j] for _, r, _ in rows], dtype=float)
        errors = np.array([r.top.residuals[j] for _, r, _ in rows], dtype=float)
        ax.errorbar(steps, values, yerr=errors, marker="o", ms=3, lw=1.2, capsize=2,
                    color=COLORS[j % len(COLORS)], label=f"lambda_{j + 1}", gid=f"top:{j}")
    bottoms = [(s, r.bottom) for s, r, _ in rows if r.bottom is not None]
    if bottoms:
        ax.errorbar(np.array([s for s, _ in bottoms], dtype=float),
                    np.array([b.eigenvalues[0] for _, b in bottoms], dtype=float),
                    yerr=np.array([b.residuals[0] for _, b in bottoms], dtype=float),
                    marker="s", ms=3,
                    lw=1.2, capsize=2, color="black", ls=":", label="lambda_min", gid="bottom")
    ax.axhline(0.0, color="#999999", lw=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("Hessian eigenvalue")
    ax.legend(fontsize=7, frameon=False, ncol=2)
    return _finish(fig, title or "Eigenvalues across checkpoints (error bars: residuals)")


def _eigenvalue_bars(rows: Sequence[tuple[int, Any, Any]], *, title: str | None) -> Any:
    """The eigenvalues of the analyses of ONE checkpoint as bars with their values written
    on them (a curve across checkpoints needs two): lambda_1..k and lambda_min, one group
    of bars per analysis (several analyses of one checkpoint: other samples or dtypes)."""
    step = rows[0][0]
    fig, axes = _new()
    ax = axes[0, 0]
    ax.set_gid("eigenvalues:bars")
    names: list[str] = []
    for _, result, _ in rows:
        names += [n for n in (f"lambda_{j + 1}" for j in range(len(result.top.eigenvalues)))
                  if n not in names]
    if any(r.bottom is not None for _, r, _ in rows):
        names.append("lambda_min")
    x = np.arange(len(names))
    width = 0.8 / len(rows)
    for i, (_, result, record) in enumerate(rows):
        values = {f"lambda_{j + 1}": (float(v), float(e)) for j, (v, e) in
                  enumerate(zip(result.top.eigenvalues, result.top.residuals, strict=True))}
        if result.bottom is not None:
            values["lambda_min"] = (float(result.bottom.eigenvalues[0]),
                                    float(result.bottom.residuals[0]))
        have = [j for j, n in enumerate(names) if n in values]
        heights = [values[names[j]][0] for j in have]
        bars = ax.bar(x[have] + (i - (len(rows) - 1) / 2) * width, heights, width * 0.9,
                      yerr=[values[names[j]][1] for j in have], capsize=2,
                      color=COLORS[i % len(COLORS)], gid=f"bars:{i}",
                      label=_spectrum_label(record) if len(rows) > 1 else None)
        ax.bar_label(bars, labels=[f"{h:.4g}" for h in heights], fontsize=7, padding=2)
    ax.set_xticks(x, names)
    ax.axhline(0.0, color="#999999", lw=0.6)
    ax.margins(y=0.15)
    ax.set_ylabel("Hessian eigenvalue")
    ax.set_xlabel(f"the one analysed checkpoint (training step {step})")
    if len(rows) > 1:
        ax.legend(fontsize=7, frameon=False)
    return _finish(fig, title or f"Eigenvalues at step {step} (error bars: residuals)")


def _spectrum_label(record: Any) -> str:
    """An analysis in a legend by what tells analyses of one checkpoint apart."""
    a = record.attrs
    dtype = (a.get("operator") or {}).get("dtype") or "?"
    return f"{record.id[-6:]}: {dtype}, {a.get('samples') or '?'} samples"


def layers_figure(record: Any, *, title: str | None = None) -> Any:
    """Per-layer lambda_max of one spectrum analysis as bars (error bars: residuals)."""
    from hessdiag.records import read_spectrum

    result = read_spectrum(record)
    if not result.layers:
        raise InputError(f"analysis {record.id} has no per-layer table: run spectrum with "
                         "--layers", param="analysis")
    names = [layer.name for layer in result.layers]
    values = [layer.lambda_max for layer in result.layers]
    errors = [float(layer.top.residuals[0]) for layer in result.layers]
    fig, axes = _new(size=(6.4, max(2.4, 0.35 * len(names) + 1.2)))
    ax = axes[0, 0]
    y = np.arange(len(names))
    ax.barh(y, values, xerr=errors, color=COLORS[0], capsize=2, gid="layers")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(result.lambda_max, color=COLORS[1], ls="--", lw=0.9,
               label=f"whole model lambda_max = {result.lambda_max:.4g}")
    ax.set_xlabel("lambda_max of the layer's Hessian block")
    ax.legend(fontsize=7, frameon=False)
    return _finish(fig, title or f"Per-layer sharpness ({_label(record)})")


# --------------------------------------------------------------------------- runs


def _column(record: Any, table: str, column: str) -> np.ndarray | None:
    values = record.arrays.get(f"{table}/{column}")
    return None if values is None else np.asarray(values, dtype=float)


def _sharpness_table(record: Any) -> str | None:
    for table in ("sharpness", "alignment"):
        values = _column(record, table, "lambda_max")
        if values is not None and np.isfinite(values).any():
            return table
    return None


def training_figure(runs: Sequence[Any], *, title: str | None = None) -> Any:
    """Loss (left) and accuracy (right, where the loss has one) of several runs: train
    solid, test dashed."""
    fig, axes = _new(1, 2, size=(9.6, 3.6))
    loss_ax, acc_ax = axes[0]
    any_acc = False
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        step = _column(run, "metrics", "step")
        if step is None or not len(step):
            continue
        for column, ax, style in (("loss", loss_ax, "-"), ("test_loss", loss_ax, "--"),
                                  ("acc", acc_ax, "-"), ("test_acc", acc_ax, "--")):
            values = _column(run, "metrics", column)
            if values is None:
                continue
            keep = np.isfinite(values)
            if not keep.any():
                continue
            any_acc |= ax is acc_ax
            name = f"{run.id} {'test' if column.startswith('test') else 'train'}"
            ax.plot(step[keep], values[keep], ls=style, color=color, lw=1.2, label=name,
                    gid=f"{column}:{run.id}")
    if not loss_ax.get_lines():
        raise InputError("none of the selected runs logged metrics yet", param="runs")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    losses = np.concatenate([line.get_ydata() for line in loss_ax.get_lines()])
    if losses.min() > 0 and losses.max() / losses.min() > 10:
        loss_ax.set_yscale("log")
    loss_ax.legend(fontsize=7, frameon=False)
    if any_acc:
        acc_ax.set_xlabel("step")
        acc_ax.set_ylabel("accuracy")
        acc_ax.legend(fontsize=7, frameon=False)
    else:
        acc_ax.set_axis_off()
        acc_ax.text(0.5, 0.5, "no accuracy: the loss is not a classification loss",
                    ha="center", va="center", fontsize=8, transform=acc_ax.transAxes)
    return _finish(fig, title or "Training")


_THRESHOLD_LABEL = {"gd": "2/lr", "heavy-ball": "2(1+momentum)/lr",
                    "nesterov": "2(1+momentum)/((1+2 momentum) lr)"}


def cfg_of(run: Any) -> dict[str, Any]:
    return run.attrs.get("config") or {}


def stability_threshold(run: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, threshold)`` along a run, from its logged learning rate: the largest
    lambda_max at which the run's SGD variant is stable on a quadratic, ``2 / lr`` (no
    momentum), ``2 (1 + momentum) / lr`` (heavy ball) or ``2 (1 + momentum) / ((1 + 2
    momentum) lr)`` (Nesterov). ``None`` for Adam-based runs, whose threshold applies to
    the preconditioned Hessian, not to lambda_max."""
    cfg = run.attrs.get("config") or {}
    if str(cfg.get("base", "sgd")).startswith("adam"):
        return None
    step, lr = _column(run, "metrics", "step"), _column(run, "metrics", "lr")
    if step is None or lr is None or not len(step):
        lr0 = cfg.get("lr")
        if not lr0:
            return None
        step, lr = np.array([0.0]), np.array([float(lr0)])
    keep = np.isfinite(lr) & (lr > 0)
    return step[keep], raw_threshold(cfg, lr[keep])


def threshold_note(run: Any) -> str:
    """What the sharpness figure draws as ``run``'s stability threshold, in words: the
    formula of the dotted line, or why there is none."""
    if stability_threshold(run) is None:
        if run_variant(cfg_of(run))[0] == "adam":
            return ("no threshold line: Adam's threshold bounds the preconditioned "
                    "sharpness lambda_max(P^-1 H), which training does not log")
        return "no threshold line: the run logged no learning rate"
    return f"dotted: {_THRESHOLD_LABEL[run_variant(cfg_of(run))[0]]} at the logged lr"


def sharpness_runs(runs: Sequence[Any]) -> list[Any]:
    """The runs of ``runs`` the sharpness figure draws (those that logged lambda_max)."""
    return [run for run in runs if _sharpness_table(run) is not None]


def sharpness_figure(runs: Sequence[Any], *, title: str | None = None) -> Any:
    """lambda_max along training for several runs on one axes (error bars: residuals),
    each with its stability threshold as a dotted line of the same colour."""
    fig, axes = _new()
    ax = axes[0, 0]
    drawn = thresholds = 0
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        table = _sharpness_table(run)
        if table is None:
            continue
        step = _column(run, table, "step")
        lam = _column(run, table, "lambda_max")
        res = _column(run, table, "lambda_max_residual")
        keep = np.isfinite(lam)
        ax.errorbar(step[keep], lam[keep], yerr=None if res is None else res[keep],
                    color=color, lw=1.3, marker="o", ms=2.5, capsize=1.5,
                    label=f"{_label(run)} lambda_max" + (
                        "" if stability_threshold(run) is not None else " (no threshold)"),
                    gid=f"lambda_max:{run.id}")
        drawn += 1
        threshold = stability_threshold(run)
        if threshold is not None:
            ts, tv = threshold
            ax.plot(ts, tv, color=color, ls=":", lw=1.1, gid=f"threshold:{run.id}",
                    label=f"{run.id}: {_THRESHOLD_LABEL[run_variant(cfg_of(run))[0]]}")
            thresholds += 1
    if not drawn:
        raise InputError("none of the selected runs logged lambda_max: train with "
                         "--sharpness-every N (or an Eigen-SAM run)", param="runs")
    ax.set_xlabel("step")
    ax.set_ylabel("lambda_max")
    ax.set_yscale("log")
    ax.legend(fontsize=7, frameon=False)
    if title is None:
        title = "Sharpness along training"
        if thresholds:
            title += (" (dotted: stability threshold)" if thresholds == drawn
                      else " (dotted: stability threshold, where one applies)")
    return _finish(fig, title)


MIN_BAND_VALUES = 10
"""Fewest logged values a window of the alignment band is drawn from (a Student-t quantile
with fewer degrees of freedom makes a band that says nothing: from 3 values, t = 4.3)."""


def moving_band(values: np.ndarray, window: int, min_values: int = MIN_BAND_VALUES
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean of each centred window of ``window`` values in [0, 1] with its 95% interval
    on the logit scale (:func:`hessdiag.curvature.stats.bounded_mean_interval`, inside
    [0, 1]); windows are cut at the ends, and one of fewer than ``min_values`` values has
    no band (NaN)."""
    values = np.asarray(values, dtype=float)
    half = window // 2
    mean, low, high = (np.full(len(values), np.nan) for _ in range(3))
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        part = part[np.isfinite(part)]
        if len(part):
            m, _, lo, hi = bounded_mean_interval(part, 0.0, 1.0)
            mean[i] = m
            if len(part) >= max(min_values, 2):
                low[i], high[i] = lo, hi
    return mean, low, high


def checkpoint_intervals(records: Sequence[Any]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(step, mean |cos|, low, high, minibatches)`` of alignment analyses of a run's
    checkpoints, in step order, recomputed from their stored per-minibatch cosines: the
    mean of ``|cos|`` with its 95% logit-scale interval (inside [0, 1]; NaN from a single
    minibatch). Analyses without a training step are left out."""
    rows = []
    for record in records:
        step = record.attrs.get("step", -1)
        cos = record.arrays.get("alignment/cosine")
        if step is None or int(step) < 0 or cos is None:
            continue
        cos = np.abs(np.asarray(cos, dtype=float))
        cos = cos[np.isfinite(cos)]
        if len(cos):
            m, _, lo, hi = bounded_mean_interval(cos, 0.0, 1.0)
            rows.append((int(step), m, lo, hi, len(cos)))
    rows.sort(key=lambda r: r[0])
    cols = [np.array([r[j] for r in rows], dtype=float) for j in range(5)]
    return cols[0], cols[1], cols[2], cols[3], cols[4]


def alignment_figure(runs: Sequence[Any], *, analyses: Sequence[Any] = (),
                     window: int | None = None, title: str | None = None) -> Any:
    """|cos| between each run's perturbation and the top eigenvector along training.

    * The logged values (dots): one minibatch's perturbation at each logged step.
    * Where ``analyses`` (``align`` on the run's checkpoints) hold per-minibatch cosines:
      each checkpoint's mean |cos| with its 95% interval over those minibatches (error
      bars), the band that measures something at one set of weights.
    * Otherwise, a moving mean of the logged values with a 95% band over windows of at
      least :data:`MIN_BAND_VALUES` values (``window``: by default a tenth of the values,
      at least 11); a run with fewer logged values has dots only.

    Every interval is on the logit scale, inside [0, 1]."""
    fig, axes = _new()
    ax = axes[0, 0]
    drawn = 0
    for i, run in enumerate(runs):
        color = COLORS[i % len(COLORS)]
        mine = [r for r in analyses if r.attrs.get("run_id") == run.id]
        ck_step, ck_mean, ck_low, ck_high, ck_n = checkpoint_intervals(mine)
        for table in ("sharpness", "alignment"):
            step, cos = _column(run, table, "step"), _column(run, table, "alignment")
            if cos is not None and np.isfinite(cos).any():
                break
        else:
            step = cos = None
        if cos is None and not len(ck_step):
            continue
        if cos is not None:
            keep = np.isfinite(cos)
            step, cos = step[keep], cos[keep]
            ax.plot(step, cos, ".", color=color, ms=3, alpha=0.5, gid=f"alignment:{run.id}",
                    label=f"{_label(run)} logged")
        if len(ck_step):
            below = np.where(np.isfinite(ck_low), ck_mean - ck_low, 0.0)
            above = np.where(np.isfinite(ck_high), ck_high - ck_mean, 0.0)
            ax.errorbar(ck_step, ck_mean, yerr=np.vstack([below, above]), color=color,
                        marker="o", ms=4, lw=1.4, capsize=2.5, gid=f"checkpoints:{run.id}",
                        label=f"{_label(run)} checkpoints (95% CI over "
                              f"{int(ck_n.min())}-{int(ck_n.max())} minibatches)")
        elif cos is not None and len(cos) >= MIN_BAND_VALUES:
            w = window or max(MIN_BAND_VALUES + 1, len(cos) // 10) | 1
            mean, low, high = moving_band(cos, w)
            ax.plot(step, mean, color=color, lw=1.4, gid=f"mean:{run.id}",
                    label=f"{_label(run)} (mean of {w})")
            ax.fill_between(step, low, high, color=color, alpha=0.2, lw=0,
                            gid=f"band:{run.id}")
        drawn += 1
    if not drawn:
        raise InputError("none of the selected runs logged alignment: train SAM or Eigen-SAM "
                         "with --sharpness-every N, use an AlignmentProbe, or run align on "
                         "the run's checkpoints", param="runs")
    ax.set_xlabel("step")
    ax.set_ylabel("|cos(perturbation, top eigenvector)|")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, frameon=False)
    return _finish(fig, title or "Alignment along training (95% intervals, logit scale)")


# --------------------------------------------------------------------------- landscapes


def landscape_figure(record: Any, *, title: str | None = None) -> Any:
    """A stored landscape: the loss (and accuracy) along one direction, or the loss as a
    filled contour over two (rows: the second coordinate, columns: the first)."""
    from hessdiag.records import read_landscape

    land = read_landscape(record)
    xs, loss = np.asarray(land.xs), np.asarray(land.loss, dtype=float)
    kind = land.directions.get("kind", "?")
    if land.directions.get("filter_norm"):
        kind += ", filter-normalised"
    if land.ys is None:
        has_acc = np.isfinite(np.asarray(land.accuracy, dtype=float)).any()
        fig, axes = _new(1, 2 if has_acc else 1, size=(9.6 if has_acc else 6.4, 3.6))
        ax = axes[0, 0]
        ax.plot(xs, loss, color=COLORS[0], lw=1.4, marker=".", ms=3, gid="loss")
        ax.set_xlabel(f"step along the {kind} direction")
        ax.set_ylabel("loss")
        if has_acc:
            axes[0, 1].plot(xs, land.accuracy, color=COLORS[2], lw=1.4, marker=".", ms=3,
                            gid="accuracy")
            axes[0, 1].set_xlabel(f"step along the {kind} direction")
            axes[0, 1].set_ylabel("accuracy")
    else:
        ys = np.asarray(land.ys)
        fig, axes = _new(size=(5.6, 4.6))
        ax = axes[0, 0]
        finite = loss[np.isfinite(loss)]
        levels = None
        if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 50:
            levels = np.geomspace(finite.min(), finite.max(), 25)
        contour = ax.contourf(xs, ys, loss, levels=levels if levels is not None else 25,
                              cmap="viridis")
        contour.set_gid("loss")
        ax.contour(xs, ys, loss, levels=contour.levels, colors="white", linewidths=0.3)
        fig.colorbar(contour, ax=ax, label="loss")
        ax.plot([0], [0], "r*", ms=8, label="checkpoint")
        ax.set_xlabel(f"direction 1 ({kind})")
        ax.set_ylabel(f"direction 2 ({kind})")
        ax.legend(fontsize=7, frameon=True, loc="upper right")
    return _finish(fig, title or f"Loss landscape ({kind} directions)")


# --------------------------------------------------------------------------- entry point


def select_runs(store: Any, runs: Sequence[str] | None) -> list[Any]:
    """The named runs (all runs when ``runs`` is empty), each by id or a unique prefix."""
    available = store.runs()
    if not runs:
        if not available:
            raise InputError(f"{store.path} holds no training runs", param="store")
        return available
    chosen = []
    for name in runs:
        hits = [r for r in available if r.id == name] or [r for r in available
                                                          if r.id.startswith(name)]
        if len(hits) != 1:
            known = ", ".join(r.id for r in available) or "none"
            what = "is not" if not hits else "matches several runs"
            raise InputError(f"run {name!r} {what} in {store.path} (runs: {known})",
                             param="runs")
        chosen.append(hits[0])
    return chosen


def select_analyses(store: Any, ids: Sequence[str] | None, kind: str) -> list[Any]:
    """The named analyses of ``kind`` (all of that kind when ``ids`` is empty)."""
    available = [r for r in store.analyses() if r.kind == kind]
    if not ids:
        if not available:
            raise InputError(f"{store.path} holds no {kind} analysis", param="analysis")
        return available
    chosen = []
    for name in ids:
        hits = [r for r in available if r.id == name] or [r for r in available
                                                          if r.id.startswith(name)]
        if len(hits) != 1:
            what = "is not a" if not hits else "matches several"
            raise InputError(f"analysis {name!r} {what} {kind} analysis in {store.path}",
                             param="analysis")
        chosen.append(hits[0])
    return chosen


def figure(store: Any, what: str, *, runs: Sequence[str] | None = None,
           analyses: Sequence[str] | None = None, sigma: float | None = None,
           title: str | None = None) -> Any:
    """The figure ``what`` (one of :data:`WHAT`) from ``store`` alone."""
    if what not in WHAT:
        raise InputError(f"unknown figure {what!r}; choose one of {', '.join(WHAT)}",
                         param="what")
    if sigma is not None and not sigma > 0:
        raise InputError(f"sigma must be positive; got {sigma}", param="sigma")
    if what == "density":
        records = select_analyses(store, analyses, "spectrum")
        if not analyses:
            records = [r for r in records if "slq/nodes" in r.arrays]
            if not records:
                raise InputError(f"no analysis in {store.path} holds a density: run "
                                 "spectrum with --density", param="analysis")
        return density_figure(records, sigma=sigma, title=title)
    if what == "eigenvalues":
        records = select_analyses(store, analyses, "spectrum")
        if runs:
            ids = {r.id for r in select_runs(store, runs)}
            records = [r for r in records if r.attrs.get("run_id") in ids]
        return eigenvalues_figure(records, title=title)
    if what == "layers":
        records = select_analyses(store, analyses, "spectrum")
        if not analyses:
            records = [r for r in records if "layers/lambda_max" in r.arrays][-1:]
            if not records:
                raise InputError(f"no analysis in {store.path} has a per-layer table: run "
                                 "spectrum with --layers", param="analysis")
        return layers_figure(records[-1], title=title)
    if what == "landscape":
        return landscape_figure(select_analyses(store, analyses, "landscape")[-1],
                                title=title)
    chosen = select_runs(store, runs)
    if what == "alignment":
        ids = {r.id for r in chosen}
        mine = [r for r in store.analyses() if r.kind == "alignment"
                and r.attrs.get("run_id") in ids]
        return alignment_figure(chosen, analyses=mine, title=title)
    draw = {"training": training_figure, "sharpness": sharpness_figure}[what]
    return draw(chosen, title=title)
