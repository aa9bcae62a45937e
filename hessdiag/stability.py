"""Stability thresholds: the sharpness above which an optimizer's step diverges on a
quadratic, the reference line of the "edge of stability" (Cohen et al. 2021, 2022).

* gradient descent with learning rate ``lr`` and heavy-ball momentum ``beta``:
  ``lambda_max < 2 (1 + beta) / lr`` (``2 / lr`` without momentum);
* Adam with ``beta1``: the preconditioned sharpness ``lambda_max(P^-1 H) <
  (2 + 2 beta1) / ((1 - beta1) lr)`` (38 / lr at ``beta1 = 0.9``).

:func:`stability_columns` is what ``hessdiag train`` logs beside each ``lambda_max``.
"""

from __future__ import annotations

import math


def sgd_threshold(lr: float, momentum: float = 0.0) -> float:
    """``2 (1 + momentum) / lr``."""
    return 2.0 * (1.0 + momentum) / lr


def adam_threshold(lr: float, beta1: float) -> float:
    """``(2 + 2 beta1) / ((1 - beta1) lr)``, for Adam's preconditioned sharpness."""
    return (2.0 + 2.0 * beta1) / ((1.0 - beta1) * lr)


def stability_columns(lambda_max: float, lr: float, momentum: float, base: str
                      ) -> dict[str, float]:
    """``lr``, the ``threshold`` of raw ``lambda_max`` for an SGD-based run (NaN for Adam,
    whose threshold applies to the preconditioned sharpness) and ``stability =
    lambda_max / threshold`` (1 at the edge of stability; ``lambda_max * lr / 2`` without
    momentum)."""
    if base.startswith("adam") or not lr > 0:
        return {"lr": lr, "threshold": math.nan, "stability": math.nan}
    threshold = sgd_threshold(lr, momentum)
    return {"lr": lr, "threshold": threshold, "stability": lambda_max / threshold}
