"""Stability thresholds: the sharpness above which an optimizer's step diverges on a
quadratic, the reference line of the "edge of stability" (Cohen et al. 2021, 2022).

On ``f(x) = 1/2 lambda x^2`` with PyTorch's update rules (checked by running
``torch.optim.SGD`` just below and above each one):

* gradient descent with learning rate ``lr``: ``lambda < 2 / lr``;
* heavy-ball momentum ``beta`` (``torch.optim.SGD(momentum=beta)``, dampening 0):
  ``lambda < 2 (1 + beta) / lr``;
* Nesterov momentum (``nesterov=True``): ``lambda < 2 (1 + beta) / ((1 + 2 beta) lr)``
  (``3.8 / (2.8 lr)`` at ``beta = 0.9``: 2.8 times lower than heavy ball's);
* Adam and AdamW with ``beta1``: the preconditioned sharpness ``lambda_max(P^-1 H) <
  (2 + 2 beta1) / ((1 - beta1) lr)`` (38 / lr at ``beta1 = 0.9``), with ``P`` Adam's
  bias-corrected preconditioner (:func:`hessdiag.curvature.preconditioned.adam_preconditioner`).

Each is ``c / lr`` for a dimensionless constant ``c`` of the variant
(:func:`dimensionless_threshold`): the step is stable iff the eigenvalues of ``lr H``
(``lr P^-1 H`` for Adam) are below ``c``.

:func:`stability_columns` is what ``hessdiag train`` logs beside each ``lambda_max``, at
the learning rate of that step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

VARIANTS = ("gd", "heavy-ball", "nesterov", "adam")


def sgd_variant(momentum: float = 0.0, nesterov: bool = False) -> str:
    """``gd``, ``heavy-ball`` or ``nesterov`` for ``torch.optim.SGD``'s settings."""
    if not momentum:
        return "gd"
    return "nesterov" if nesterov else "heavy-ball"


def dimensionless_threshold(variant: str, beta: float = 0.0) -> float:
    """``c`` such that the step is stable iff the eigenvalues of ``lr H`` (Adam: ``lr
    P^-1 H``) are below ``c``: ``2`` (GD), ``2 (1 + beta)`` (heavy ball), ``2 (1 + beta) /
    (1 + 2 beta)`` (Nesterov), ``(2 + 2 beta1) / (1 - beta1)`` (Adam, ``beta = beta1``)."""
    if variant == "gd":
        return 2.0
    if variant == "heavy-ball":
        return 2.0 * (1.0 + beta)
    if variant == "nesterov":
        return 2.0 * (1.0 + beta) / (1.0 + 2.0 * beta)
    if variant == "adam":
        return (2.0 + 2.0 * beta) / (1.0 - beta)
    raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")


def sgd_threshold(lr: Any, momentum: float = 0.0, nesterov: bool = False) -> Any:
    """``2 / lr`` (GD), ``2 (1 + momentum) / lr`` (heavy ball) or ``2 (1 + momentum) /
    ((1 + 2 momentum) lr)`` (Nesterov) for ``torch.optim.SGD(lr, momentum, nesterov)``
    (``lr`` a number or an array)."""
    return dimensionless_threshold(sgd_variant(momentum, nesterov), momentum) / lr


def adam_threshold(lr: Any, beta1: float) -> Any:
    """``(2 + 2 beta1) / ((1 - beta1) lr)``, for Adam's preconditioned sharpness."""
    return dimensionless_threshold("adam", beta1) / lr


def run_variant(config: Mapping[str, Any]) -> tuple[str, float]:
    """The variant and its momentum (``beta1`` for Adam) of a ``hessdiag train`` run's
    ``config`` (the stored one; older stores lack ``nesterov``: heavy ball)."""
    base = str(config.get("base") or "sgd")
    if base.startswith("adam"):
        return "adam", 0.9  # hessdiag train builds Adam with torch's default betas
    momentum = float(config.get("momentum") or 0.0)
    return sgd_variant(momentum, bool(config.get("nesterov"))), momentum


def raw_threshold(config: Mapping[str, Any], lr: Any) -> Any:
    """The threshold of the raw ``lambda_max`` for a run's ``config`` at learning rate(s)
    ``lr``; ``None`` for Adam-based runs, whose threshold applies to the preconditioned
    sharpness ``lambda_max(P^-1 H)``, not to ``lambda_max``."""
    variant, beta = run_variant(config)
    if variant == "adam":
        return None
    return dimensionless_threshold(variant, beta) / np.asarray(lr, dtype=float)


def stability_columns(lambda_max: float, lr: float, momentum: float, base: str,
                      nesterov: bool = False) -> dict[str, float]:
    """``lr``, the ``threshold`` of raw ``lambda_max`` for an SGD-based run at this ``lr``
    (GD, heavy ball or Nesterov; NaN for Adam, whose threshold applies to the
    preconditioned sharpness) and ``stability = lambda_max / threshold`` (1 at the edge
    of stability; ``lambda_max * lr / 2`` without momentum)."""
    if base.startswith("adam") or not lr > 0:
        return {"lr": lr, "threshold": math.nan, "stability": math.nan}
    threshold = sgd_threshold(lr, momentum, nesterov)
    return {"lr": lr, "threshold": threshold, "stability": lambda_max / threshold}


def stability_along(config: Mapping[str, Any], arrays: Mapping[str, Any]
                    ) -> tuple[np.ndarray, np.ndarray] | None:
    """``(steps, lambda_max / threshold)`` of a run's sharpness rows, each at its own
    step's learning rate: recomputed from ``sharpness/lambda_max`` and ``sharpness/lr``
    with the run's variant (so a store written before the Nesterov threshold was right
    reads right), or the stored ``sharpness/stability`` when the lr column is missing.
    For Adam-based runs, the stored ratio of the preconditioned sharpness when the rows
    hold it (a :class:`hessdiag.monitor.SharpnessMonitor`'s), else ``None``; ``None``
    without sharpness rows."""
    steps, lam = arrays.get("sharpness/step"), arrays.get("sharpness/lambda_max")
    if steps is None or lam is None or not len(steps):
        return None
    steps, lam = np.asarray(steps, dtype=float), np.asarray(lam, dtype=float)
    stored = arrays.get("sharpness/stability")
    if (run_variant(config)[0] == "adam" and stored is not None and len(stored) == len(steps)
            and arrays.get("sharpness/preconditioned_lambda_max") is not None):
        # a SharpnessMonitor's Adam rows: stability is the preconditioned sharpness over
        # Adam's threshold, measured with the live optimizer's preconditioner
        return steps, np.asarray(stored, dtype=float)
    lr = arrays.get("sharpness/lr")
    if lr is not None and len(lr) == len(lam):
        lr = np.asarray(lr, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            threshold = raw_threshold(config, lr)
            if threshold is None:
                return None
            ratio = np.where(lr > 0, lam / threshold, np.nan)
        return steps, ratio
    stored = arrays.get("sharpness/stability")
    if stored is None or len(stored) != len(steps):
        return None
    return steps, np.asarray(stored, dtype=float)


def peak_stability(config: Mapping[str, Any], arrays: Mapping[str, Any]
                   ) -> dict[str, float | int | None]:
    """The run's ``stability`` (``lambda_max / threshold`` at each step's own lr): its
    ``peak`` and ``peak_step``, and the ``last`` finite value and its ``last_step``
    (all ``None`` when there is none)."""
    out: dict[str, float | int | None] = {"peak": None, "peak_step": None, "last": None,
                                          "last_step": None}
    along = stability_along(config, arrays)
    if along is None:
        return out
    steps, ratio = along
    finite = np.isfinite(ratio)
    if not finite.any():
        return out
    steps, ratio = steps[finite], ratio[finite]
    i = int(np.argmax(ratio))
    out.update(peak=float(ratio[i]), peak_step=int(steps[i]), last=float(ratio[-1]),
               last_step=int(steps[-1]))
    return out
