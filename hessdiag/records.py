"""Store records: how each result kind is written to the store and read back.

One owner for the store's format. Each analysis kind has one writer and one reader,
used by the workflows, ``show``, ``export`` and everything that reads a store:

``spectrum``   :func:`write_spectrum` / :func:`read_spectrum` (a :class:`SpectrumResult`)
``alignment``  :func:`write_alignment` / :func:`read_alignment` (an :class:`AlignmentResult`)

A reader returns the result that was written (its ``to_dict()`` is equal), so any number
can be redisplayed, exported or compared from the store alone. :func:`provenance` is the
one description of where a result comes from (checkpoint, task, versions), shared by
every kind. :func:`summary` is the one flat row of an analysis (every scalar it holds),
and :func:`flat_tables` every table of a store, for ``show`` and ``export``. The layout
is documented in docs/store.md.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from hessdiag.curvature import EigenResult, SLQResult, TraceResult
from hessdiag.results import (
    AlignmentResult,
    LandscapeResult,
    LayerSharpness,
    SharpnessResult,
    SpectrumResult,
)
from hessdiag.runtime import versions
from hessdiag.stability import peak_stability
from hessdiag.store import Record, Store

# the columns of a run's tables, in order (``hessdiag train`` and ``AlignmentProbe``)
RUN_TABLES: dict[str, tuple[str, ...]] = {
    "metrics": ("step", "epoch", "loss", "acc", "lr", "test_loss", "test_acc"),
    "sharpness": ("step", "lambda_max", "lambda_max_residual", "lambda_max_converged", "hvps",
                  "alignment", "alignment_signed", "lr", "threshold", "stability"),
    "checkpoints": ("step", "path", "sha256", "final"),
    "alignment": ("step", "alignment", "alignment_signed", "lambda_max",
                  "lambda_max_residual", "lambda_max_converged", "hvps"),
}


# --------------------------------------------------------------------------- provenance


def provenance(task: Any) -> dict[str, Any]:
    """Where a result comes from: the checkpoint (absolute path, sha256, format, run, step,
    epoch), the task (model spec and kwargs, data, loss) and the versions. ``task`` is a
    :class:`hessdiag.task.Task`."""
    ck = task.checkpoint
    record = task.record()
    return {
        "checkpoint_path": None if ck is None else str(Path(ck.path).resolve()),
        "checkpoint_sha256": None if ck is None else ck.sha256,
        "checkpoint_format": None if ck is None else ck.format,
        "run_id": None if ck is None else ck.run_id,
        "step": -1 if ck is None or ck.step is None else int(ck.step),
        "epoch": -1 if ck is None or ck.epoch is None else int(ck.epoch),
        "model": record["model"],
        "model_kwargs": record["model_kwargs"],
        "data": record["data"],
        "loss": record["loss"],
        "samples": int(record["data"]["samples"]),
        "versions": versions(),
    }


# --------------------------------------------------------------------------- helpers


def _meta(result: Any, arrays: tuple[str, ...]) -> dict[str, Any] | None:
    """A solver result's fields other than its arrays (JSON-ready), or ``None``."""
    if result is None:
        return None
    out = {}
    for f in dataclasses.fields(result):
        if f.name in arrays or f.name == "eigenvectors":
            continue
        value = getattr(result, f.name)
        out[f.name] = value.item() if isinstance(value, np.generic) else value
    return out


def _rebuild(cls: type, meta: dict[str, Any] | None, **arrays: Any) -> Any:
    if meta is None:
        return None
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in meta.items() if k in known}, **arrays)


_EIGEN_ARRAYS = ("eigenvalues", "residuals", "converged")
_TRACE_ARRAYS = ("samples",)
_SLQ_ARRAYS = ("nodes", "weights")


def _scalar(arrays: dict[str, np.ndarray], key: str) -> Any:
    if key not in arrays:
        return None
    value = np.asarray(arrays[key]).item()
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- spectrum


def write_spectrum(store: Store, result: SpectrumResult, origin: dict[str, Any]) -> str:
    """Write a spectrum analysis (``origin`` from :func:`provenance`); returns its id."""
    top, bottom, trace, dens = result.top, result.bottom, result.trace, result.density
    attrs = {
        **origin,
        "seed": result.seed,
        "settings": result.settings,
        "operator": result.operator,
        "method": top.method,
        "tol": top.tol,
        "hvps": result.hvps,
        "seconds": result.seconds,
        "peak_memory": result.peak_memory,
        "peak_memory_growth": result.peak_memory_growth,
        "peak_memory_kind": result.peak_memory_kind,
        "trace_method": None if trace is None else trace.method,
        "solvers": {
            "top": _meta(top, _EIGEN_ARRAYS),
            "bottom": _meta(bottom, _EIGEN_ARRAYS),
            "trace": _meta(trace, _TRACE_ARRAYS),
            "density": _meta(dens, _SLQ_ARRAYS),
            "layers": [{"name": layer.name, "params": list(layer.params), "dim": layer.dim,
                        "top": _meta(layer.top, _EIGEN_ARRAYS),
                        "trace": _meta(layer.trace, _TRACE_ARRAYS)} for layer in result.layers],
        },
    }
    arrays: dict[str, Any] = {
        "eigenvalues": top.eigenvalues,
        "residuals": top.residuals,
        "converged": np.asarray(top.converged, dtype=bool),
    }
    if bottom is not None:
        arrays["lambda_min"] = bottom.eigenvalues[0]
        arrays["lambda_min_residual"] = bottom.residuals[0]
        arrays["lambda_min_converged"] = bool(bottom.converged[0])
    if trace is not None:
        arrays["trace"] = trace.estimate
        arrays["trace_stderr"] = trace.stderr
        arrays["trace_ci95"] = np.array(trace.ci95, dtype=float)
        arrays["trace_samples"] = trace.samples
    if dens is not None:
        grid, curve, sigma = dens.density()
        arrays.update({"slq/nodes": dens.nodes, "slq/weights": dens.weights,
                       "slq/sigma": sigma, "slq/grid": grid, "slq/density": curve,
                       "slq/dim": dens.dim})
    if result.layers:
        rows = [layer.to_dict() for layer in result.layers]
        arrays["layers/name"] = np.array([r["layer"] for r in rows], dtype=str)
        for column in ("dim", "lambda_max", "lambda_max_residual", "trace", "trace_stderr"):
            arrays[f"layers/{column}"] = np.array(
                [np.nan if r[column] is None else r[column] for r in rows], dtype=float)
        arrays["layers/lambda_max_converged"] = np.array(
            [r["lambda_max_converged"] for r in rows], dtype=bool)
    return store.write_analysis("spectrum", attrs, arrays)


def read_spectrum(record: Record) -> SpectrumResult:
    """The :class:`SpectrumResult` a spectrum record holds."""
    a, x = record.attrs, record.arrays
    solvers = a.get("solvers") or _legacy_solvers(a, x)
    top = _rebuild(EigenResult, solvers["top"], eigenvalues=np.asarray(x["eigenvalues"]),
                   residuals=np.asarray(x["residuals"]),
                   converged=np.asarray(x["converged"], dtype=bool))
    bottom = None
    if "lambda_min" in x:
        bottom = _rebuild(EigenResult, solvers["bottom"],
                          eigenvalues=np.atleast_1d(np.asarray(x["lambda_min"], dtype=float)),
                          residuals=np.atleast_1d(np.asarray(x["lambda_min_residual"],
                                                             dtype=float)),
                          converged=np.atleast_1d(np.asarray(x["lambda_min_converged"],
                                                             dtype=bool)))
    trace = None
    if "trace" in x:
        trace = _rebuild(TraceResult, solvers["trace"],
                         samples=np.asarray(x.get("trace_samples", np.zeros(0))))
    density = None
    if "slq/nodes" in x:
        density = _rebuild(SLQResult, solvers["density"], nodes=np.asarray(x["slq/nodes"]),
                           weights=np.asarray(x["slq/weights"]))
    layers = []
    for i, entry in enumerate(solvers.get("layers") or []):
        layers.append(LayerSharpness(
            name=entry["name"], params=tuple(entry["params"]), dim=int(entry["dim"]),
            top=_rebuild(EigenResult, entry["top"],
                         eigenvalues=np.asarray([x["layers/lambda_max"][i]]),
                         residuals=np.asarray([x["layers/lambda_max_residual"][i]]),
                         converged=np.asarray([x["layers/lambda_max_converged"][i]], dtype=bool)),
            trace=_rebuild(TraceResult, entry["trace"], samples=np.zeros(0))))
    return SpectrumResult(top=top, bottom=bottom, trace=trace, density=density,
                          operator=a.get("operator") or {}, hvps=int(a.get("hvps") or 0),
                          seconds=float(a.get("seconds") or 0.0), seed=a.get("seed"),
                          settings=a.get("settings") or {}, layers=tuple(layers),
                          peak_memory=_optional_int(a.get("peak_memory")),
                          peak_memory_growth=_optional_int(a.get("peak_memory_growth")),
                          peak_memory_kind=a.get("peak_memory_kind"))


def _optional_int(value: Any) -> int | None:
    """An integer attribute, ``None`` when absent (a record written before it existed)."""
    return None if value is None else int(value)


def _legacy_solvers(a: dict[str, Any], x: dict[str, np.ndarray]) -> dict[str, Any]:
    """Solver metadata of a record written before it was stored (what the record says)."""
    settings = a.get("settings") or {}
    eigen = {"which": "largest", "method": a.get("method"), "tol": a.get("tol"), "hvps": 0,
             "iterations": 0, "seconds": 0.0, "seed": a.get("seed"), "settings": {}}
    trace = None
    if "trace" in x:
        samples = np.asarray(x.get("trace_samples", np.zeros(0)))
        trace = {"estimate": float(np.asarray(x["trace"])),
                 "stderr": float(np.asarray(x["trace_stderr"])),
                 "method": a.get("trace_method"), "n_probes": len(samples),
                 "hvps": settings.get("trace_hvps", 0), "seconds": 0.0, "seed": a.get("seed"),
                 "settings": {}}
    density = None
    if "slq/nodes" in x:
        nodes = np.asarray(x["slq/nodes"])
        density = {"dim": int(np.asarray(x["slq/dim"])), "n_probes": nodes.shape[0],
                   "steps": nodes.shape[1], "hvps": 0, "seconds": 0.0, "seed": a.get("seed"),
                   "settings": {}}
    return {"top": eigen, "bottom": {**eigen, "which": "smallest"}, "trace": trace,
            "density": density, "layers": []}


# --------------------------------------------------------------------------- alignment

_ALIGNMENT_ARRAYS = ("cosines", "eigenvalues", "residuals", "converged", "ci95", "ci95_signed",
                     "topk_share_ci95")


def write_alignment(store: Store, result: AlignmentResult, origin: dict[str, Any]) -> str:
    """Write an alignment analysis (``origin`` from :func:`provenance`); returns its id."""
    attrs = {**origin, "seed": result.seed, "settings": result.settings,
             "perturbation": result.rule, "method": "lanczos",
             "tol": result.settings.get("tol"), "hvps": result.hvps,
             "seconds": result.seconds,
             "solvers": {"alignment": _meta(result, _ALIGNMENT_ARRAYS)}}
    arrays = {
        "eigenvalues": result.eigenvalues, "residuals": result.residuals,
        "converged": np.asarray(result.converged, dtype=bool),
        "alignment/cosine": result.cosines, "alignment/mean_abs": result.alignment,
        "alignment/ci95": np.array(result.ci95, dtype=float),
        "alignment/mean_signed": result.alignment_signed,
        "alignment/ci95_signed": np.array(result.ci95_signed, dtype=float),
    }
    if result.topk_share is not None:
        arrays["alignment/topk_share"] = result.topk_share
        arrays["alignment/topk_share_ci95"] = np.array(result.topk_share_ci95, dtype=float)
    return store.write_analysis("alignment", attrs, arrays)


def read_alignment(record: Record) -> AlignmentResult:
    """The :class:`AlignmentResult` an alignment record holds."""
    a, x = record.attrs, record.arrays
    meta = dict((a.get("solvers") or {}).get("alignment") or {})
    if not meta:  # written before the metadata was stored
        settings = a.get("settings") or {}
        meta = {"alignment": _scalar(x, "alignment/mean_abs"),
                "alignment_signed": _scalar(x, "alignment/mean_signed"),
                "batches": len(x["alignment/cosine"]), "top_k": settings.get("top_k", 1),
                "topk_share": _scalar(x, "alignment/topk_share"),
                "rule": a.get("perturbation"), "alpha": settings.get("alpha", 0.0),
                "hvps": a.get("hvps") or 0, "seconds": a.get("seconds") or 0.0,
                "seed": a.get("seed"), "settings": settings}
    share_ci = x.get("alignment/topk_share_ci95")
    return _rebuild(
        AlignmentResult, meta, cosines=np.asarray(x["alignment/cosine"], dtype=float),
        eigenvalues=np.asarray(x["eigenvalues"]), residuals=np.asarray(x["residuals"]),
        converged=np.asarray(x["converged"], dtype=bool),
        ci95=tuple(float(v) for v in x["alignment/ci95"]),
        ci95_signed=tuple(float(v) for v in x["alignment/ci95_signed"]),
        topk_share_ci95=None if share_ci is None else tuple(float(v) for v in share_ci))


# --------------------------------------------------------------------------- sharpness


def write_sharpness(store: Store, result: SharpnessResult, origin: dict[str, Any]) -> str:
    """Write a sharpness measurement (critical, worst-case, adaptive); returns its id."""
    d = result.to_dict()
    attrs = {**origin, "measure": result.measure, "method": result.measure,
             "seconds": result.seconds, "settings": result.settings,
             "solvers": {"sharpness": {k: v for k, v in d.items()
                                       if k not in ("history", "interval")}}}
    arrays = {"sharpness/value": result.value,
              "sharpness/interval": np.array(result.interval, dtype=float),
              "sharpness/history": np.array(result.history, dtype=float)}
    return store.write_analysis("sharpness", attrs, arrays)


def read_sharpness(record: Record) -> SharpnessResult:
    """The :class:`SharpnessResult` a sharpness record holds."""
    meta = dict((record.attrs.get("solvers") or {}).get("sharpness") or {})
    x = record.arrays
    meta["interval"] = [float(v) for v in x["sharpness/interval"]]
    meta["history"] = [float(v) for v in np.asarray(x["sharpness/history"]).ravel()]
    return SharpnessResult.from_dict(meta)


# --------------------------------------------------------------------------- landscapes


def write_landscape(store: Store, result: LandscapeResult, origin: dict[str, Any]) -> str:
    """Write a loss landscape (its grid, directions and settings); returns its id."""
    d = result.to_dict()
    meta = {k: v for k, v in d.items() if k not in ("x", "y", "loss", "accuracy")}
    attrs = {**origin, "method": f"landscape-{result.directions.get('kind')}",
             "seconds": result.seconds, "seed": result.seed, "settings": result.settings,
             "solvers": {"landscape": meta}}
    arrays = {"landscape/x": np.asarray(result.xs, dtype=float),
              "landscape/y": None if result.ys is None else np.asarray(result.ys, dtype=float),
              "landscape/loss": np.asarray(result.loss, dtype=float),
              "landscape/accuracy": np.asarray(result.accuracy, dtype=float)}
    return store.write_analysis("landscape", attrs, arrays)


def read_landscape(record: Record) -> LandscapeResult:
    """The :class:`LandscapeResult` a landscape record holds."""
    meta = dict((record.attrs.get("solvers") or {}).get("landscape") or {})
    x = record.arrays
    return LandscapeResult(
        xs=np.asarray(x["landscape/x"], dtype=float),
        ys=None if "landscape/y" not in x else np.asarray(x["landscape/y"], dtype=float),
        loss=np.asarray(x["landscape/loss"], dtype=float),
        accuracy=np.asarray(x["landscape/accuracy"], dtype=float),
        directions=dict(meta.get("directions") or {}), loss0=float(meta.get("loss0", np.nan)),
        samples=int(meta.get("samples", -1)), forward_passes=int(meta.get("forward_passes", 0)),
        seconds=float(meta.get("seconds", 0.0)), seed=int(meta.get("seed", 0)),
        resumed_points=int(meta.get("resumed_points", 0)),
        settings=dict(meta.get("settings") or {}))


READERS = {"spectrum": read_spectrum, "alignment": read_alignment,
           "sharpness": read_sharpness, "landscape": read_landscape}


def read_result(record: Record) -> SpectrumResult | AlignmentResult | SharpnessResult:
    """The result an analysis record holds, whatever its kind."""
    if record.kind not in READERS:
        raise ValueError(f"analysis {record.id} is of kind {record.kind!r}, which this "
                         f"hessdiag does not read ({', '.join(READERS)})")
    return READERS[record.kind](record)


# --------------------------------------------------------------------------- flat views


SUMMARY_COLUMNS = (
    "analysis_id", "kind", "created", "checkpoint_path", "checkpoint_sha256", "run_id", "step",
    "epoch", "model", "data", "split", "loss", "samples", "seed", "dtype", "method", "tol", "hvps",
    "seconds", "curvature", "lambda_max", "lambda_max_residual", "n_eigenvalues",
    "all_converged",
    "lambda_min", "lambda_min_residual", "lambda_ratio", "trace", "trace_stderr",
    "trace_method", "slq_sigma", "layers", "perturbation", "alignment", "alignment_ci95_low",
    "alignment_ci95_high", "alignment_signed", "alignment_signed_ci95_low",
    "alignment_signed_ci95_high", "alignment_batches", "topk_share", "measure", "sharpness",
    "sharpness_low", "sharpness_high", "rho", "lr_c", "forward_passes", "ascent_steps",
    "landscape_loss0", "landscape_loss_max", "landscape_points", "hessdiag_version",
)
"""The columns of :func:`summary` (the same for every kind, ``None`` where absent)."""


def summary(record: Record) -> dict[str, Any]:
    """One flat row per analysis: its provenance and every scalar it holds (for ``show``
    and ``export``). Quantities an analysis does not have are ``None``."""
    a = record.attrs
    data = a.get("data") or {}
    row: dict[str, Any] = {
        "analysis_id": record.id,
        "kind": record.kind,
        "created": a.get("created"),
        "checkpoint_path": a.get("checkpoint_path"),
        "checkpoint_sha256": a.get("checkpoint_sha256"),
        "run_id": a.get("run_id"),
        "step": None if a.get("step", -1) == -1 else a.get("step"),
        "epoch": None if a.get("epoch", -1) == -1 else a.get("epoch"),
        "model": a.get("model"),
        "data": data.get("spec") if isinstance(data, dict) else data,
        "split": data.get("split") if isinstance(data, dict) else None,
        "loss": a.get("loss") or "cross-entropy",
        "samples": a.get("samples"),
        "seed": a.get("seed"),
        "dtype": (a.get("operator") or {}).get("dtype") or (a.get("settings") or {}).get("dtype"),
        "method": a.get("method"),
        "tol": a.get("tol"),
        "hvps": a.get("hvps"),
        "seconds": a.get("seconds"),
    }
    result = read_result(record)
    if isinstance(result, SpectrumResult):
        d = result.to_dict()
        row.update({
            "lambda_max": result.lambda_max,
            "lambda_max_residual": d["residuals"][0],
            "n_eigenvalues": len(d["eigenvalues"]),
            "all_converged": all(d["converged"]),
            "lambda_min": d["lambda_min"],
            "lambda_min_residual": d["lambda_min_residual"],
            "lambda_ratio": d["lambda_ratio"],
            "trace": d["trace"],
            "trace_stderr": d["trace_stderr"],
            "trace_method": d["trace_method"],
            "slq_sigma": _scalar(record.arrays, "slq/sigma"),
            "layers": len(result.layers) or None,
            "curvature": d["curvature"],
        })
    elif isinstance(result, LandscapeResult):
        finite = result.loss[np.isfinite(result.loss)]
        eig = result.directions.get("eigenvalues") or [None]
        row.update({
            "measure": f"landscape-{result.dims}d",
            "lambda_max": eig[0] if result.directions.get("kind") == "eigen" else None,
            "landscape_loss0": result.loss0,
            "landscape_loss_max": float(finite.max()) if finite.size else None,
            "landscape_points": int(result.loss.size),
            "forward_passes": result.forward_passes,
        })
    elif isinstance(result, SharpnessResult):
        row.update({
            "measure": result.measure, "sharpness": result.value,
            "sharpness_low": result.interval[0],
            "sharpness_high": None if math.isinf(result.interval[1]) else result.interval[1],
            "rho": result.rho, "lr_c": result.lr_c, "forward_passes": result.forward_passes,
            "all_converged": result.converged,
            "ascent_steps": result.steps if result.measure != "critical" else None,
        })
    else:
        d = result.to_dict()
        row.update({
            "lambda_max": result.lambda_max,
            "lambda_max_residual": d["lambda_max_residual"],
            "n_eigenvalues": len(d["eigenvalues"]),
            "all_converged": all(d["converged"]),
            "perturbation": result.rule,
            "alignment": result.alignment,
            "alignment_ci95_low": d["ci95"][0],
            "alignment_ci95_high": d["ci95"][1],
            "alignment_signed": result.alignment_signed,
            "alignment_signed_ci95_low": d["ci95_signed"][0],
            "alignment_signed_ci95_high": d["ci95_signed"][1],
            "alignment_batches": result.batches,
            "topk_share": result.topk_share,
        })
    row["hessdiag_version"] = (a.get("versions") or {}).get("hessdiag")
    return {key: row.get(key) for key in SUMMARY_COLUMNS}


def eigenvalue_rows(record: Record) -> list[dict[str, Any]]:
    x = record.arrays
    eig = np.asarray(x.get("eigenvalues", np.zeros(0)), dtype=float)
    res = np.asarray(x.get("residuals", np.full(len(eig), np.nan)), dtype=float)
    conv = np.asarray(x.get("converged", np.zeros(len(eig), dtype=bool)), dtype=bool)
    return [{"analysis_id": record.id, "index": i + 1, "eigenvalue": float(eig[i]),
             "residual": float(res[i]), "converged": bool(conv[i])} for i in range(len(eig))]


def slq_rows(record: Record) -> list[dict[str, Any]]:
    x = record.arrays
    if "slq/nodes" not in x:
        return []
    nodes, weights = np.asarray(x["slq/nodes"]), np.asarray(x["slq/weights"])
    return [{"analysis_id": record.id, "probe": p, "index": j, "node": float(nodes[p, j]),
             "weight": float(weights[p, j])}
            for p in range(nodes.shape[0]) for j in range(nodes.shape[1])
            if np.isfinite(nodes[p, j])]


def layer_rows(record: Record) -> list[dict[str, Any]]:
    """The per-layer table of a spectrum analysis (empty without ``per_layer``)."""
    if record.kind != "spectrum":
        return []
    return [{"analysis_id": record.id, **layer.to_dict()}
            for layer in read_spectrum(record).layers]


def cosine_rows(record: Record) -> list[dict[str, Any]]:
    """The per-minibatch cosines of an alignment analysis."""
    if "alignment/cosine" not in record.arrays:
        return []
    return [{"analysis_id": record.id, "batch": i, "cosine": float(c)}
            for i, c in enumerate(np.asarray(record.arrays["alignment/cosine"]))]


def _last(arrays: dict[str, np.ndarray], key: str) -> Any:
    values = arrays.get(key)
    if values is None or len(values) == 0:
        return None
    finite = [v for v in np.asarray(values, dtype=float) if math.isfinite(v)]
    return float(finite[-1]) if finite else None


def run_row(record: Record) -> dict[str, Any]:
    """One line per training run: its settings and where it ended. ``stability`` is
    ``lambda_max / threshold`` of the last sharpness row (at that step's own lr, from
    :func:`hessdiag.stability.peak_stability`, so right for older Nesterov stores too),
    ``stability_step`` its step, ``stability_peak`` the run's largest ratio and
    ``stability_peak_step`` its step (``None`` for Adam-based runs and runs without
    sharpness rows)."""
    a, x = record.attrs, record.arrays
    cfg = a.get("config") or {}
    steps = x.get("metrics/step")
    ratio = peak_stability(cfg, x)
    return {
        "run_id": record.id,
        "status": a.get("status"),
        "model": cfg.get("model"),
        "data": cfg.get("data"),
        "loss_spec": a.get("loss") or cfg.get("loss") or "cross-entropy",
        "optimizer": cfg.get("optimizer"),
        "base": cfg.get("base"),
        "lr": cfg.get("lr"),
        "rho": cfg.get("rho"),
        "alpha": cfg.get("alpha"),
        "epochs": cfg.get("epochs"),
        "seed": cfg.get("seed"),
        "steps": int(steps[-1]) if steps is not None and len(steps) else 0,
        "total_steps": a.get("total_steps"),
        "loss": _last(x, "metrics/loss"),
        "test_loss": _last(x, "metrics/test_loss"),
        "test_acc": _last(x, "metrics/test_acc"),
        "lambda_max": _last(x, "sharpness/lambda_max") or _last(x, "alignment/lambda_max"),
        "stability": ratio["last"],
        "stability_step": ratio["last_step"],
        "stability_peak": ratio["peak"],
        "stability_peak_step": ratio["peak_step"],
        "alignment": _last(x, "sharpness/alignment") or _last(x, "alignment/alignment"),
        "final_checkpoint": a.get("final_checkpoint"),
        "started": a.get("started"),
    }


def run_table_rows(record: Record, table: str) -> list[dict[str, Any]]:
    """The rows of one of a run's tables (:data:`RUN_TABLES`)."""
    prefix = f"{table}/"
    columns = {k[len(prefix):]: v for k, v in record.arrays.items() if k.startswith(prefix)}
    if not columns:
        return []
    n = min(len(v) for v in columns.values())
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"run_id": record.id}
        for name, values in columns.items():
            value = values[i]
            value = value.decode() if isinstance(value, bytes) else value
            row[name] = value.item() if isinstance(value, np.generic) else value
        rows.append(row)
    return rows


def flat_tables(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Every table of a store as lists of flat rows: ``analyses`` (one :func:`summary` row
    each), ``eigenvalues``, ``slq_nodes``, ``layers``, ``alignment_cosines``, ``runs`` and
    one ``run_<table>`` per table of :data:`RUN_TABLES`."""
    records = store.analyses()
    runs = store.runs()
    tables = {
        "analyses": [summary(r) for r in records],
        "eigenvalues": [row for r in records for row in eigenvalue_rows(r)],
        "slq_nodes": [row for r in records for row in slq_rows(r)],
        "layers": [row for r in records for row in layer_rows(r)],
        "alignment_cosines": [row for r in records for row in cosine_rows(r)],
        "runs": [run_row(r) for r in runs],
    }
    for table in RUN_TABLES:
        tables[f"run_{table}"] = [row for r in runs for row in run_table_rows(r, table)]
    return tables
