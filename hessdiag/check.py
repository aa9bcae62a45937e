"""The check workflow: fail a build when a model got sharper than its baseline.

A **baseline** (:func:`make_baseline`, ``hessdiag baseline``) records sharpness metrics of a
checkpoint with everything that produced them: the task (model, data, loss, samples), the
spectrum settings (seed, solver, tolerance, HVP mode, dtype) and the versions. It is a
JSON file, or a spectrum analysis already in a store (``STORE:ANALYSIS_ID``).

:func:`check` measures a checkpoint again with the baseline's own settings and compares
each metric with a limit. For a metric where larger is sharper:

    limit = baseline * (1 + rtol) + noise

and the check fails when ``now > limit``. ``noise`` folds in what the two measurements
cannot resolve: for eigenvalues (deterministic given the tolerance) the sum of the two
residual norms ``||H u - theta u||``, which bound each Ritz value's distance to an
eigenvalue; for the trace (stochastic) ``z * sqrt(se_base^2 + se_now^2)`` with
``z = 1.645``, the one-sided 95% quantile, so a change counts only when it exceeds
``rtol`` beyond the estimators' noise at 95% confidence. ``lambda_min`` compares the
magnitude of the most negative eigenvalue, ``lambda_ratio`` the ratio
``lambda_max / |lambda_min|`` with the residuals propagated. ``alignment`` (the mean
``|cos|`` of the perturbations of the baseline's rule with the top eigenvector, over
minibatches; stochastic) is worse when *lower*: the check fails when it drops below
``baseline * (1 - rtol) - noise``, i.e. when the perturbation stopped following the
sharpest direction. Its noise is the trace's rule with the standard error
``std(|cos|) / sqrt(n)`` over the ``n`` distinct minibatches (the natural-scale error
from which ``align`` builds its logit-scale interval); a measurement from fewer than two
distinct minibatches has no noise estimate and is refused. ``critical_sharpness``
(``2 / lr_c``, see :mod:`hessdiag.sharpness`) counts half the width of its final
line-search bracket as its noise; ``adaptive_sharpness`` (rho 0.05, ascent to relative
tolerance 1e-3, see :mod:`hessdiag.sharpness`) is deterministic given the data and has
none; an ascent that did not converge within its steps, or a critical sharpness that is
undefined (zero gradient), is never compared: :class:`NotConverged`, as for eigenvalues.
Both are sharper when larger. Absolute limits (``max_lambda``, ``max_trace``,
``max_ratio``) apply with or without a baseline.

A baseline whose settings cannot be reproduced (another model, data, loss, split or
number of samples) is bad input, never a silent comparison.

Every eigenvalue solve has a budget of products, ``max_hvps`` (recorded in the baseline;
:data:`~hessdiag.settings.CHECK_MAX_HVPS` for a new one), which bounds the wall time
with the trace's fixed ``trace_hvps``. An eigenvalue that has not converged to ``tol``
within it is never compared and never recorded: :class:`NotConverged`, one line naming
the metric, its value and residual (when the solver returned one before the budget
stopped it) and what to change.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from hessdiag._errors import InputError
from hessdiag.align import checkpoint_alignment
from hessdiag.curvature.lanczos import default_tol
from hessdiag.curvature.stats import bounded_mean_interval
from hessdiag.distributed import collective, is_main
from hessdiag.records import provenance, read_spectrum
from hessdiag.results import SpectrumResult
from hessdiag.runtime import resolve_device, resolve_dtype, versions
from hessdiag.settings import CHECK_MAX_HVPS, AlignSettings, DataSettings, SpectrumSettings
from hessdiag.sharpness import measure_sharpness
from hessdiag.spectrum import compute_spectrum
from hessdiag.store import Store, now
from hessdiag.task import Task, load_task

FORMAT = "hessdiag-baseline"
SCHEMA_VERSION = 1
METRICS = ("lambda_max", "lambda_min", "lambda_ratio", "trace", "top_k", "alignment",
           "critical_sharpness", "adaptive_sharpness")
# sharpness measures beside the spectrum (hessdiag.sharpness), with their defaults
SHARPNESS_METRICS = {"critical_sharpness": "critical", "adaptive_sharpness": "adaptive"}
DEFAULT_METRICS = ("lambda_max", "trace")
Z_ONE_SIDED_95 = 1.6448536269514722
# a sharpness metric that fell by more than this passes with a warning (unless max_drop)
WARN_DROP = 0.5


class NotConverged(InputError):
    """An eigenvalue that did not converge to ``tol`` within ``max_hvps`` products: the
    measurement cannot be compared (nor recorded as a baseline)."""


@dataclass(frozen=True)
class Baseline:
    """Metrics of a checkpoint and everything needed to measure them again."""

    metrics: dict[str, Any]
    task: dict[str, Any]
    data: DataSettings
    settings: SpectrumSettings
    checkpoint: dict[str, Any]
    created: str
    versions: dict[str, Any]
    source: str = ""
    align: AlignSettings | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "created": self.created,
                "versions": self.versions, "checkpoint": self.checkpoint, "task": self.task,
                "data": asdict(self.data), "settings": asdict(self.settings),
                "align": None if self.align is None else asdict(self.align),
                "metrics": self.metrics}


@dataclass(frozen=True)
class MetricCheck:
    """One row of a check: the metric, its values, the limit and the verdict."""

    metric: str
    baseline: float | None
    now: float
    limit: float | None
    noise: float
    passed: bool
    reason: str
    warning: str = ""

    @property
    def verdict(self) -> str:
        """``pass``, ``sharper``, ``dropped`` (beyond ``max_drop``) or ``lower`` (alignment)."""
        if self.passed:
            return "pass"
        if self.reason.startswith("dropped"):
            return "dropped"
        return "lower" if self.reason.startswith("below") else "sharper"

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.now / self.baseline - 1


@dataclass(frozen=True)
class CheckResult:
    """The rows of a check and the measurement behind them."""

    rows: tuple[MetricCheck, ...]
    result: SpectrumResult
    baseline_source: str | None
    rtol: float
    settings: dict[str, Any] = field(default_factory=dict)

    max_drop: float | None = None

    @property
    def passed(self) -> bool:
        return all(row.passed for row in self.rows)

    @property
    def verdict(self) -> str:
        """``pass``, or what failed: ``sharper`` and/or ``dropped``/``lower``."""
        failed = dict.fromkeys(row.verdict for row in self.rows if not row.passed)
        return " and ".join(failed) if failed else "pass"

    @property
    def warnings(self) -> list[str]:
        return [row.warning for row in self.rows if row.warning]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "verdict": self.verdict,
                "baseline": self.baseline_source, "rtol": self.rtol, "max_drop": self.max_drop,
                "metrics": [{**asdict(row), "change": row.change, "verdict": row.verdict}
                            for row in self.rows],
                "warnings": self.warnings, "settings": self.settings}

    def table(self) -> str:
        """The rows as plain text (for JUnit messages, assertions and logs)."""
        head = ("metric", "baseline", "now", "change", "limit", "noise", "verdict")
        lines = [head]
        for r in self.rows:
            lines.append((r.metric, _fmt(r.baseline), _fmt(r.now),
                          "-" if r.change is None else f"{r.change:+.1%}", _fmt(r.limit),
                          _fmt(r.noise), ("pass" if r.passed else r.verdict.upper()) +
                          (f" ({r.reason})" if r.reason else "")))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True))
                         .rstrip() for line in lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.6g}"


# --------------------------------------------------------------------------- metrics


def _settings_for(metrics: tuple[str, ...], settings: SpectrumSettings) -> SpectrumSettings:
    """What the metrics need computed."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InputError(f"metric must be among {', '.join(METRICS)}; got {unknown[0]!r}",
                         param="metric")
    if not metrics:
        raise InputError("metric: give at least one metric", param="metric")
    needs_min = any(m in ("lambda_min", "lambda_ratio") for m in metrics)
    return replace(settings, top_k=settings.top_k if "top_k" in metrics else 1,
                   lambda_min=settings.lambda_min or needs_min,
                   trace=settings.trace or "trace" in metrics, density=False,
                   per_layer=False)


def metric_values(result: SpectrumResult, metrics: tuple[str, ...],
                  alignment: Any = None, sharpness: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Each metric's value with what its noise is made of (``alignment``: an
    :class:`hessdiag.results.AlignmentResult` when the metrics include it; ``sharpness``:
    a :class:`hessdiag.sharpness.SharpnessResult` per sharpness metric)."""
    out: dict[str, Any] = {}
    top, bottom = result.top, result.bottom
    for metric in metrics:
        if metric == "lambda_max":
            out[metric] = {"value": result.lambda_max, "residual": float(top.residuals[0]),
                           "kind": "eigenvalue"}
        elif metric == "top_k":
            out[metric] = {"value": [float(v) for v in top.eigenvalues],
                           "residual": [float(r) for r in top.residuals], "kind": "eigenvalue"}
        elif metric == "lambda_min":
            out[metric] = {"value": float(bottom.eigenvalues[0]),
                           "residual": float(bottom.residuals[0]), "kind": "eigenvalue"}
        elif metric == "lambda_ratio":
            ratio = result.lambda_ratio
            rel = (float(top.residuals[0]) / max(abs(result.lambda_max), 1e-300)
                   + float(bottom.residuals[0]) / max(abs(result.lambda_min), 1e-300))
            out[metric] = {"value": ratio, "residual": abs(ratio) * rel, "kind": "ratio"}
        elif metric == "trace":
            out[metric] = {"value": result.trace.estimate, "stderr": result.trace.stderr,
                           "n": result.trace.n_probes, "kind": "stochastic"}
        elif metric in SHARPNESS_METRICS:
            measured = (sharpness or {})[metric]
            low, high = measured.interval
            # critical: half the width of the final bracket; adaptive: deterministic
            # given the data (a lower bound from a fixed number of ascent steps)
            half = 0.5 * (high - low) if math.isfinite(high) else 0.0
            out[metric] = {"value": measured.value, "residual": half, "kind": "bracket",
                           "rho": measured.rho, "steps": measured.steps,
                           "converged": measured.converged}
        elif metric == "alignment":
            # the standard error of the mean |cos| over the distinct minibatches: the
            # natural-scale error the alignment's logit-scale interval is built from
            _, stderr, _, _ = bounded_mean_interval(np.abs(alignment.cosines))
            if not math.isfinite(stderr):
                raise InputError(
                    f"the alignment metric needs at least two distinct minibatches for its "
                    f"noise term; the measurement has {len(alignment.cosines)}"
                    + (f" ({alignment.note})" if alignment.note else "")
                    + ": use a smaller align batch size or more data", param="metrics")
            out[metric] = {"value": alignment.alignment, "stderr": stderr,
                           "n": len(alignment.cosines),
                           "rule": alignment.rule, "kind": "stochastic"}
    return out


def _noise(base: dict[str, Any], now: dict[str, Any], i: int | None = None) -> float:
    def pick(entry: dict[str, Any], key: str) -> float:
        value = entry[key]
        return float(value[i]) if i is not None else float(value)

    if base["kind"] == "stochastic":
        return Z_ONE_SIDED_95 * math.hypot(pick(base, "stderr"), pick(now, "stderr"))
    return pick(base, "residual") + pick(now, "residual")


def compare(metrics: dict[str, Any], measured: dict[str, Any], rtol: float,
            max_drop: float | None = None) -> list[MetricCheck]:
    """Rows comparing ``measured`` with baseline ``metrics`` (see the module docstring).

    A sharpness metric that fell below ``baseline * (1 - max_drop) - noise`` fails the
    row (``dropped``) when ``max_drop`` is given; without it, a fall beyond
    :data:`WARN_DROP` passes with a warning. A model whose logits saturated, or weights
    that were zeroed, looks flat: a large drop is rarely the improvement it seems."""
    _check_max_drop(max_drop)
    rows = []
    for name, base in metrics.items():
        if name == "adaptive_sharpness" and "converged" not in base:
            raise InputError("the baseline's adaptive_sharpness was recorded with a fixed "
                             "5-step ascent, an unconverged lower bound that a converged "
                             "measurement would exceed: record the baseline again",
                             param="baseline")
        now = measured[name]
        values = base["value"] if isinstance(base["value"], list) else [base["value"]]
        nows = now["value"] if isinstance(now["value"], list) else [now["value"]]
        if len(values) != len(nows):
            raise InputError(f"the baseline holds {len(values)} values of {name}, this "
                             f"measurement {len(nows)}", param="baseline")
        for i, (b, n) in enumerate(zip(values, nows, strict=True)):
            index = i if isinstance(base["value"], list) else None
            label = name if index is None else f"lambda_{i + 1}"
            noise = _noise(base, now, index)
            if name == "lambda_min":  # sharper: more negative curvature
                limit = -(abs(b) * (1 + rtol) + noise)
                ok = n >= limit
            elif name == "alignment":  # worse: lower
                limit = b * (1 - rtol) - noise
                ok = n >= limit
            else:
                limit = b * (1 + rtol) + noise if b >= 0 else b * (1 - rtol) + noise
                ok = n <= limit
            reason = "" if ok else ("below" if name == "alignment" else "beyond") + \
                f" rtol {rtol:g} and noise"
            warning = ""
            if ok and name != "alignment":
                ok, reason, warning = _drop(label, b, n, noise, max_drop)
            rows.append(MetricCheck(label, b, n, limit, noise, ok, reason, warning))
    return rows


def _check_max_drop(max_drop: float | None) -> None:
    if max_drop is not None and not 0 < max_drop < 1:
        raise InputError(f"max_drop must be a fraction in (0, 1); got {max_drop}",
                         param="max_drop")


def _drop(label: str, b: float, n: float, noise: float, max_drop: float | None
          ) -> tuple[bool, str, str]:
    """``(passed, reason, warning)`` of a sharpness metric that may have fallen: its
    magnitude against ``|b| * (1 - drop) - noise``."""
    drop = WARN_DROP if max_drop is None else max_drop
    if not abs(n) < abs(b) * (1 - drop) - noise:
        return True, "", ""
    fell = 1 - abs(n) / abs(b)
    if max_drop is not None:
        return False, f"dropped {fell:.1%}, beyond max_drop {max_drop:g} and noise", ""
    return True, "", (f"{label} fell {fell:.1%} below its baseline ({_fmt(b)} -> {_fmt(n)}): "
                      "a model whose outputs saturated or whose weights were damaged looks "
                      "flat too; set max_drop to fail on such a drop")


def _absolute(measured: dict[str, Any], limits: dict[str, float | None]) -> list[MetricCheck]:
    rows = []
    for metric, limit in limits.items():
        if limit is None:
            continue
        if not limit > 0:
            raise InputError(f"max_{_LIMIT_NAMES[metric]} must be positive; got {limit}",
                             param=f"max_{_LIMIT_NAMES[metric]}")
        now = float(measured[metric]["value"])
        ok = now <= limit
        rows.append(MetricCheck(f"{metric} (absolute)", None, now, limit, 0.0, ok,
                                "" if ok else f"above max_{_LIMIT_NAMES[metric]}"))
    return rows


_LIMIT_NAMES = {"lambda_max": "lambda", "trace": "trace", "lambda_ratio": "ratio"}


# --------------------------------------------------------------------------- budgets


class _Spent(Exception):
    """An eigenvalue solve reached its budget before it converged."""

    def __init__(self, name: str, hvps: int) -> None:
        super().__init__(name)
        self.name, self.hvps = name, hvps


class _Budget:
    """The progress callback of a measurement, holding each eigenvalue solve to
    ``settings.max_hvps`` products.

    :func:`~hessdiag.spectrum.compute_spectrum` runs the top eigenvalues, then
    ``lambda_min``, then the trace; each solver reports ``(done, total)`` from its own
    count, so a count that starts again (or a new total) is the next solver. A solve that
    asks for a product beyond the budget is stopped (:class:`_Spent`): the solver's own
    budget may be larger than the one asked for."""

    def __init__(self, settings: SpectrumSettings, progress: Any) -> None:
        self.limit = settings.max_hvps
        self.solves = ["lambda_max" if settings.top_k == 1 else f"the top {settings.top_k} "
                       "eigenvalues"] + (["lambda_min"] if settings.lambda_min else [])
        self.progress = progress
        self.phase, self.done, self.total = -1, math.inf, None

    def __call__(self, done: int, total: int) -> None:
        if done <= self.done or total != self.total:
            self.phase += 1
        self.done, self.total = done, total
        if self.limit is not None and self.phase < len(self.solves) and done > self.limit:
            raise _Spent(self.solves[self.phase], self.limit)
        if self.progress is not None:
            self.progress(done, total)


def _unconverged_message(name: str, value: float | None, residual: float | None,
                         settings: SpectrumSettings, hvps: int, *, baseline: bool,
                         tol: float | None = None) -> str:
    """One line: what did not converge, its value and residual, and what to change."""
    if tol is None:
        tol = settings.tol if settings.tol is not None else default_tol(
            resolve_dtype(settings.dtype))
    limit = f"{tol:g}"
    found = ""
    if value is not None and residual is not None:
        relative = residual / abs(value) if value else math.inf
        found = f": {value:.6g} with residual {residual:.3g} ({relative:.2g} of it)"
        if relative <= tol:  # converged, but possibly displaced
            found += (", not yet confirmed by the check for eigenvalues the solve may "
                      "have missed")
    budget = settings.max_hvps
    raise_it = (f"raise max_hvps above {hvps}" if budget is None or budget <= hvps
                else f"raise max_hvps (now {budget})")
    head = (f"{name} did not converge to tol {limit} within {hvps} Hessian-vector "
            f"products{found}")
    if baseline:
        return f"{head}; {raise_it} or set tol looser than {limit} (no baseline was written)"
    return (f"{head}; {raise_it}, or record the baseline with tol looser than {limit} "
            "(nothing was compared)")


def _require_converged(result: SpectrumResult, settings: SpectrumSettings,
                       baseline: bool) -> None:
    """:class:`NotConverged` for the first eigenvalue of ``result`` that did not
    converge: an unconverged Ritz value is no measurement to compare."""
    top_name = "lambda_max" if len(result.top.eigenvalues) == 1 else "lambda_{}"
    for eig, name in ((result.top, top_name), (result.bottom, "lambda_min")):
        if eig is None:
            continue
        for i, ok in enumerate(eig.converged):
            if not ok:
                raise NotConverged(_unconverged_message(
                    name.format(i + 1), float(eig.eigenvalues[i]), float(eig.residuals[i]),
                    settings, int(eig.hvps), baseline=baseline, tol=eig.tol),
                    param=("max_hvps", "tol"))


# --------------------------------------------------------------------------- baselines


def _measure(task: Task, checkpoint: str, metrics: tuple[str, ...], settings: SpectrumSettings,
             data: DataSettings, align: AlignSettings | None, model_spec: str | None,
             loss: str | None, unsafe: bool, progress: Any, baseline: bool = False
             ) -> tuple[SpectrumResult, dict[str, Any]]:
    group = collective()  # across processes: each measures its shard (sharpness: all data)
    budget = _Budget(settings, progress)
    try:
        result = compute_spectrum(task.model, task.loss,
                                  task.batches(data.batch_size, sharded=group is not None),
                                  settings, progress=budget, collective=group)
    except _Spent as spent:
        raise NotConverged(_unconverged_message(spent.name, None, None, settings, spent.hvps,
                                                baseline=baseline),
                           param=("max_hvps", "tol")) from None
    _require_converged(result, settings, baseline)
    alignment = None
    if "alignment" in metrics:
        alignment, _ = checkpoint_alignment(checkpoint, settings=align or AlignSettings(),
                                            data=data, model_spec=model_spec, loss=loss,
                                            output=task.loss.output, unsafe=unsafe,
                                            progress=progress)
    sharpness = {}
    for metric, measure in SHARPNESS_METRICS.items():
        if metric in metrics:
            measured = measure_sharpness(
                task.model, task.loss, task.batches(data.batch_size), measure,
                device=resolve_device(settings.device), dtype=resolve_dtype(settings.dtype))
            if not measured.converged:  # an unconverged ascent is no measurement to compare
                nothing = "no baseline was written" if baseline else "nothing was compared"
                raise NotConverged(f"{metric} = {measured.value:.6g}: {measured.reason} "
                                   f"({nothing})", param="metric")
            sharpness[metric] = measured
    return result, metric_values(result, metrics, alignment, sharpness)


def make_baseline(checkpoint: str, *, metrics: tuple[str, ...] = DEFAULT_METRICS,
                  settings: SpectrumSettings | None = None, data: DataSettings | None = None,
                  align: AlignSettings | None = None, model_spec: str | None = None,
                  loss: str | None = None, output: str | None = None, unsafe: bool = False,
                  allow_nonfinite: bool = False, progress: Any = None) -> Baseline:
    """Measure ``metrics`` of a checkpoint and record how (see the module docstring);
    ``align`` sets how the ``alignment`` metric is measured (default
    :class:`~hessdiag.settings.AlignSettings`). Default ``settings``: those of
    :class:`~hessdiag.settings.SpectrumSettings` with ``max_hvps`` :data:`CHECK_MAX_HVPS`.
    Raises :class:`NotConverged` when an eigenvalue does not converge within the budget."""
    metrics = tuple(metrics)
    settings = _settings_for(metrics, settings or SpectrumSettings(max_hvps=CHECK_MAX_HVPS))
    data = data or DataSettings()
    align = (align or AlignSettings()) if "alignment" in metrics else None
    task = load_task(checkpoint, data=data, model_spec=model_spec, loss=loss, output=output,
                     unsafe=unsafe, allow_nonfinite=allow_nonfinite)
    result, values = _measure(task, checkpoint, metrics, settings, data, align, model_spec,
                              loss, unsafe, progress, baseline=True)
    origin = provenance(task)
    # what the loss averaged over, beside the samples: tokens, for a per-token loss
    # (recorded, not compared; baselines written before it lack it)
    terms = {"loss_terms": result.loss_terms} if result.loss_terms is not None else {}
    return Baseline(
        metrics=values, task={**_task_key(task), **terms}, data=data, settings=settings,
        created=now(), versions=versions(), source=f"file:{checkpoint}", align=align,
        checkpoint={"path": origin["checkpoint_path"], "sha256": origin["checkpoint_sha256"],
                    "step": None if origin["step"] == -1 else origin["step"]})


def _task_key(task: Task) -> dict[str, Any]:
    """What must be equal for two measurements to compare."""
    key = {"model": task.model_spec, "data": task.data.name, "split": task.data.split,
           "loss": task.loss.spec, "samples": task.data.samples}
    if task.loss.output is not None:
        key["output"] = task.loss.output
    return key


def write_baseline(baseline: Baseline, path: str | Path) -> Path:
    from hessdiag._files import replacing

    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise InputError(f"cannot write the baseline {path}: directory {path.parent} does not "
                         "exist", param="output")
    payload = baseline.to_json()
    payload["checkpoint"] = _portable(payload.get("checkpoint") or {}, path)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def _portable(checkpoint: dict[str, Any], baseline_path: Path) -> dict[str, Any]:
    """The checkpoint record with its path relative to the baseline's folder (POSIX
    separators), so that a committed baseline reads the same in every clone; the sha256
    says which bytes were measured."""
    out = dict(checkpoint)
    where = out.get("path")
    if where:
        folder = baseline_path.resolve().parent
        try:
            out["path"] = Path(os.path.relpath(Path(where).resolve(), folder)).as_posix()
        except ValueError:  # another drive (Windows): keep it as it was
            pass
    return out


def read_baseline(source: str, metrics: tuple[str, ...] | None = None) -> Baseline:
    """A baseline from a JSON file, or ``STORE:ANALYSIS_ID`` (a spectrum analysis)."""
    path = Path(source)
    if not path.exists() and ":" in source:
        store_path, _, analysis_id = source.rpartition(":")
        if Path(store_path).exists():
            return _from_store(store_path, analysis_id, metrics or DEFAULT_METRICS)
    if not path.is_file():
        raise InputError(f"baseline {source} does not exist (give a file written by `hessdiag "
                         "baseline`, or STORE:ANALYSIS_ID)", param="baseline")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"baseline {source} is not valid JSON ({exc}); write it again with "
                         "`hessdiag baseline`", param="baseline") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"baseline {source} is not a hessdiag baseline (no format "
                         f"{FORMAT!r})", param="baseline")
    version = payload.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise InputError(f"baseline {source} has schema version {version}, newer than this "
                         f"hessdiag reads ({SCHEMA_VERSION}): upgrade hessdiag",
                         param="baseline")
    try:
        baseline = Baseline(
            metrics=payload["metrics"], task=payload["task"],
            data=DataSettings(**payload["data"]), settings=SpectrumSettings(**payload["settings"]),
            align=AlignSettings(**payload["align"]) if payload.get("align") else None,
            checkpoint=_located(payload.get("checkpoint") or {}, path),
            created=payload.get("created", ""),
            versions=payload.get("versions") or {}, source=f"file:{source}")
    except (KeyError, TypeError) as exc:
        raise InputError(f"baseline {source} is corrupted (missing or unknown field: {exc}); "
                         "write it again with `hessdiag baseline`", param="baseline") from exc
    return _select(baseline, metrics)


def _located(checkpoint: dict[str, Any], baseline_path: Path) -> dict[str, Any]:
    """The checkpoint record with a relative path resolved against the baseline's folder."""
    if not isinstance(checkpoint, dict):
        raise TypeError("checkpoint is not a mapping")
    out = dict(checkpoint)
    where = out.get("path")
    if isinstance(where, str) and where and not Path(where).is_absolute():
        out["path"] = str((baseline_path.parent / where).resolve())
    return out


def check_metrics(metrics: tuple[str, ...] | None) -> None:
    """:class:`InputError` for a name that is not one of :data:`METRICS`."""
    for m in metrics or ():
        if m not in METRICS:
            raise InputError(f"unknown metric {m!r} given as metric; known: "
                             f"{', '.join(METRICS)}", param="metric")


def _select(baseline: Baseline, metrics: tuple[str, ...] | None) -> Baseline:
    check_metrics(metrics)
    if not metrics:
        return baseline
    missing = [m for m in metrics if m not in baseline.metrics]
    if missing:
        raise InputError(f"the baseline has no {missing[0]} (it holds "
                         f"{', '.join(baseline.metrics)}); record it with `hessdiag baseline "
                         f"--metric {missing[0]}`", param="metric")
    return replace(baseline, metrics={m: baseline.metrics[m] for m in metrics})


def _from_store(store_path: str, analysis_id: str, metrics: tuple[str, ...]) -> Baseline:
    record = Store(store_path).analysis(analysis_id)
    if record.kind != "spectrum":
        raise InputError(f"analysis {analysis_id} is of kind {record.kind}; a baseline is a "
                         "spectrum analysis", param="baseline")
    result = read_spectrum(record)
    a = record.attrs
    known = {f for f in SpectrumSettings.__dataclass_fields__}
    settings = SpectrumSettings(**{k: v for k, v in (a.get("settings") or {}).items()
                                   if k in known})
    recorded = a.get("data") or {}
    data = DataSettings(spec=recorded.get("spec"), root=recorded.get("root"),
                        split=recorded.get("split", "train"), samples=recorded.get("samples"),
                        batch_size=recorded.get("batch_size") or DataSettings().batch_size)
    _settings_for(metrics, settings)
    have = {"lambda_max", "top_k"} | ({"lambda_min", "lambda_ratio"} if result.bottom else set()) \
        | ({"trace"} if result.trace else set())
    missing = [m for m in metrics if m not in have]
    if missing:
        raise InputError(f"analysis {analysis_id} has no {missing[0]}: choose other metrics or "
                         "record a baseline with `hessdiag baseline`", param="metric")
    return Baseline(
        metrics=metric_values(result, metrics),
        task={"model": a.get("model"), "data": recorded.get("spec"),
              "split": recorded.get("split", "train"), "loss": a.get("loss") or "cross-entropy",
              "samples": a.get("samples"), "loss_terms": result.loss_terms},
        data=data, settings=settings,
        checkpoint={"path": a.get("checkpoint_path"), "sha256": a.get("checkpoint_sha256")},
        created=str(a.get("created", "")), versions=a.get("versions") or {},
        source=f"store:{store_path}:{analysis_id}")


# --------------------------------------------------------------------------- the check


def check(checkpoint: str, *, baseline: Baseline | None = None,
          metrics: tuple[str, ...] | None = None, rtol: float = 0.1,
          max_lambda: float | None = None, max_trace: float | None = None,
          max_ratio: float | None = None, settings: SpectrumSettings | None = None,
          data: DataSettings | None = None, model_spec: str | None = None,
          loss: str | None = None, output: str | None = None, seed: int | None = None,
          max_hvps: int | None = None,
          max_drop: float | None = None, unsafe: bool = False, allow_nonfinite: bool = False,
          store: Store | None = None, progress: Any = None) -> CheckResult:
    """Measure ``checkpoint`` with the baseline's settings (or ``settings`` without a
    baseline, default :class:`~hessdiag.settings.SpectrumSettings` with ``max_hvps``
    :data:`CHECK_MAX_HVPS`) and compare (see the module docstring). ``seed`` overrides
    the seed, ``max_hvps`` the budget of each eigenvalue solve (a larger budget changes
    no converged value). Raises :class:`NotConverged` when an eigenvalue does not
    converge within the budget: nothing is compared. ``max_drop`` fails a metric that fell
    by more than this fraction (see :func:`compare`).

    The baseline is data, never code: a data *factory* spec it records is imported only
    when ``data.spec`` names the same spec, or with ``unsafe`` (see :mod:`hessdiag.specs`);
    ``data`` naming other data is refused, since nothing would compare."""
    if not rtol >= 0:
        raise InputError(f"rtol must be non-negative; got {rtol}", param="rtol")
    limits = {"lambda_max": max_lambda, "trace": max_trace, "lambda_ratio": max_ratio}
    if baseline is None and all(v is None for v in limits.values()):
        raise InputError("nothing to check against: give a baseline or an absolute limit "
                         "(max_lambda, max_trace or max_ratio)",
                         param=("baseline", "max_lambda", "max_trace", "max_ratio"))
    _check_max_drop(max_drop)
    if baseline is not None:
        baseline = _select(baseline, metrics)
        wanted = tuple(baseline.metrics)
        named = data.spec if data is not None else None
        if named is not None and named != baseline.data.spec:
            raise InputError(f"the baseline was measured on data {baseline.data.spec!r}, not "
                             f"{named!r}: nothing would compare (record a new baseline, or "
                             "do not pass data)", param="data")
        if named is None:
            from hessdiag.specs import recorded

            recorded(baseline.data.spec, what="data spec", source=f"baseline "
                     f"{baseline.source.split(':', 1)[-1]}", option="data", trusted=unsafe)
        settings, data = baseline.settings, baseline.data
        output = output if output is not None else baseline.task.get("output")
    else:
        wanted = ()
        settings = settings or SpectrumSettings(max_hvps=CHECK_MAX_HVPS)
        data = data or DataSettings()
    wanted_all = tuple(dict.fromkeys(wanted + tuple(k for k, v in limits.items()
                                                    if v is not None)))
    if seed is not None:
        settings = replace(settings, seed=seed)
    if max_hvps is not None:
        settings = replace(settings, max_hvps=max_hvps)
    settings = _settings_for(wanted_all, settings)
    task = load_task(checkpoint, data=data, model_spec=model_spec, loss=loss, output=output,
                     unsafe=unsafe, allow_nonfinite=allow_nonfinite)
    if baseline is not None:
        _same_task(baseline, task, checkpoint)
    align = None
    if "alignment" in wanted_all:
        align = baseline.align if baseline is not None and baseline.align else AlignSettings()
        if seed is not None:
            align = replace(align, seed=seed)
    result, measured = _measure(task, checkpoint, wanted_all, settings, data, align,
                                model_spec, loss, unsafe, progress)
    rows = [] if baseline is None else compare(baseline.metrics, measured, rtol, max_drop)
    rows += _absolute(measured, limits)
    if store is not None and is_main():  # across processes, rank 0 writes
        from hessdiag.records import write_spectrum

        origin = provenance(task)
        origin["data"] = {**origin["data"], "batch_size": data.batch_size}
        write_spectrum(store, result, origin)
    return CheckResult(rows=tuple(rows), result=result,
                       baseline_source=None if baseline is None else baseline.source,
                       rtol=rtol, max_drop=max_drop,
                       settings={"spectrum": asdict(settings), "data": asdict(data)})


def _same_task(baseline: Baseline, task: Task, checkpoint: str) -> None:
    now = _task_key(task)
    for key in ("model", "data", "split", "loss", "samples", "output"):
        if baseline.task.get(key) != now.get(key):
            raise InputError(f"the baseline was measured with {key} {baseline.task.get(key)!r}, "
                             f"checkpoint {checkpoint} with {now.get(key)!r}: the settings "
                             "cannot be reproduced, so nothing is compared (record a new "
                             "baseline for this task)", param="baseline")


def junit_xml(result: CheckResult, checkpoint: str) -> str:
    """The check as JUnit XML: one test case per metric, the table in each failure."""
    from xml.etree import ElementTree as ET

    failures = sum(not row.passed for row in result.rows)
    suite = ET.Element("testsuite", name="hessdiag check", tests=str(len(result.rows)),
                       failures=str(failures), errors="0")
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="checkpoint",
                  value=checkpoint)
    for row in result.rows:
        case = ET.SubElement(suite, "testcase", classname="hessdiag.check", name=row.metric,
                             time=f"{result.result.seconds:.3f}")
        if not row.passed:
            failure = ET.SubElement(case, "failure", message=(
                f"{row.metric} {_fmt(row.now)} above its limit {_fmt(row.limit)} "
                f"(baseline {_fmt(row.baseline)}, noise {_fmt(row.noise)})"), type="sharper")
            failure.text = result.table()
    root = ET.Element("testsuites")
    root.append(suite)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
