"""Flat tables of a store's contents, for CSV/JSON export and for `hessdiag show`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hessdiag.store import Record, Store


def _scalar(arrays: dict[str, np.ndarray], key: str) -> Any:
    if key not in arrays:
        return None
    value = np.asarray(arrays[key]).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def analysis_row(record: Record) -> dict[str, Any]:
    """One line per analysis: its provenance and headline numbers."""
    a, x = record.attrs, record.arrays
    eig = np.asarray(x.get("eigenvalues", np.zeros(0)), dtype=float)
    conv = np.asarray(x.get("converged", np.zeros(0, dtype=bool)), dtype=bool)
    lam_min = _scalar(x, "lambda_min")
    lam_max = float(eig[0]) if len(eig) else None
    data = a.get("data") or {}
    return {
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
        "samples": a.get("samples"),
        "seed": a.get("seed"),
        "method": a.get("method"),
        "tol": a.get("tol"),
        "hvps": a.get("hvps"),
        "seconds": a.get("seconds"),
        "lambda_max": lam_max,
        "lambda_max_residual": float(x["residuals"][0]) if len(eig) else None,
        "n_eigenvalues": int(len(eig)),
        "all_converged": bool(conv.all()) if len(conv) else None,
        "lambda_min": lam_min,
        "lambda_min_residual": _scalar(x, "lambda_min_residual"),
        "lambda_ratio": (lam_max / abs(lam_min) if lam_max is not None and lam_min
                         else None),
        "trace": _scalar(x, "trace"),
        "trace_stderr": _scalar(x, "trace_stderr"),
        "trace_method": a.get("trace_method"),
        "slq_sigma": _scalar(x, "slq/sigma"),
        "hessdiag_version": (a.get("versions") or {}).get("hessdiag"),
    }


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


def _last(arrays: dict[str, np.ndarray], key: str) -> Any:
    values = arrays.get(key)
    if values is None or len(values) == 0:
        return None
    finite = [v for v in np.asarray(values, dtype=float) if math.isfinite(v)]
    return float(finite[-1]) if finite else None


def run_row(record: Record) -> dict[str, Any]:
    """One line per training run: its settings and where it ended."""
    a, x = record.attrs, record.arrays
    cfg = a.get("config") or {}
    steps = x.get("metrics/step")
    return {
        "run_id": record.id,
        "status": a.get("status"),
        "model": cfg.get("model"),
        "data": cfg.get("data"),
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
        "lambda_max": _last(x, "sharpness/lambda_max"),
        "alignment": _last(x, "sharpness/alignment"),
        "final_checkpoint": a.get("final_checkpoint"),
        "started": a.get("started"),
    }


def run_table_rows(record: Record, table: str) -> list[dict[str, Any]]:
    """The rows of one of a run's tables (``metrics``, ``sharpness``, ``checkpoints``)."""
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
    """``analyses``, ``eigenvalues``, ``slq_nodes``, ``runs``, ``run_metrics``,
    ``run_sharpness`` and ``run_checkpoints`` tables (lists of flat rows)."""
    records = store.analyses()
    runs = store.runs()
    return {
        "analyses": [analysis_row(r) for r in records],
        "eigenvalues": [row for r in records for row in eigenvalue_rows(r)],
        "slq_nodes": [row for r in records for row in slq_rows(r)],
        "runs": [run_row(r) for r in runs],
        "run_metrics": [row for r in runs for row in run_table_rows(r, "metrics")],
        "run_sharpness": [row for r in runs for row in run_table_rows(r, "sharpness")],
        "run_checkpoints": [row for r in runs for row in run_table_rows(r, "checkpoints")],
    }
