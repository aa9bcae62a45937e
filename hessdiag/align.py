"""Alignment between a SAM-type perturbation and the top Hessian eigenvector.

SAM only flattens the sharpest direction when its perturbation points along the top
eigenvector of the Hessian (Luo et al., NeurIPS 2024, "Explicit Eigenvalue Regularization
Improves Sharpness-Aware Minimization"); Eigen-SAM steers it there. For weights ``w``,
minibatch gradient ``g`` and unit top eigenvector ``v`` of the training-loss Hessian on a
fixed measurement set, the alignment of a perturbation ``e`` is ``|<e, v>| / ||e||``
(reported with its sign too). The perturbation rules (:func:`hessdiag.optim.perturbation`):

``sam``             ``e ∝ g / ||g||`` (Foret et al. 2021)
``asam``            ``e ∝ T^2 g / ||T g||``, ``T = |w|`` (Kwon et al. 2021)
``eigensam``        ``e ∝ g_hat + alpha sign(<g, u>) u_perp`` with ``u`` the eigenvector
                    estimate the Eigen-SAM optimizer holds (saved in the checkpoint's
                    optimizer state): the perturbation the optimizer applies
``eigensam-exact``  the same rule with ``u = v``, the exact top eigenvector of the
                    measurement set: what Eigen-SAM would apply with a perfect estimate
                    (aligned partly by construction, so not a measure of the optimizer)

The cosine does not depend on the radius ``rho``, so none is asked for.

:func:`measure_alignment` averages over ``B`` distinct minibatches (mean of ``|cos|`` and
of the signed cosine, each with a 95% interval inside its range, a Student-t interval on
the logit scale: :func:`hessdiag.curvature.stats.bounded_mean_interval`; a minibatch given
twice counts once, and one minibatch gives no interval) and, with ``top_k > 1``, reports
the share ``||V_k^T e||^2 / ||e||^2`` of the perturbation inside the top-``k``
eigenspace. :func:`align_checkpoint` draws the minibatches with
:func:`hessdiag.data.draw_minibatches` (distinct samples, never one twice; its ``note``
says when a small data set holds fewer than asked).
:class:`AlignmentProbe` measures the same inside a user's own training loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hessdiag.distributed import is_main
from hessdiag.measures import (
    AlignmentProbe,
    checkpoint_alignment,
    measure_alignment,
    optimizer_eigenvector,
)
from hessdiag.records import provenance, write_alignment
from hessdiag.results import AlignmentResult
from hessdiag.settings import RULES, AlignSettings, DataSettings
from hessdiag.task import Task

__all__ = ["RULES", "AlignSettings", "AlignmentProbe", "CheckpointAlignment", "align_checkpoint",
           "measure_alignment", "optimizer_eigenvector"]


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class CheckpointAlignment:
    result: AlignmentResult
    task: Task
    final: bool
    analysis_id: str | None


def align_checkpoint(path: str, *, settings: AlignSettings | None = None,
                     data: DataSettings | None = None, model_spec: str | None = None,
                     loss: str | None = None, unsafe: bool = False,
                     allow_nonfinite: bool = False, store: Any = None,
                     progress: Callable[[int, int], None] | None = None
                     ) -> CheckpointAlignment:
    """Alignment at one checkpoint; written to ``store`` (kind ``alignment``, with the
    checkpoint's run id) when given. ``data.samples`` is ignored: the measurement set is
    ``settings.samples`` samples, the minibatches come from the whole split."""
    result, task = checkpoint_alignment(path, settings=settings or AlignSettings(),
                                        data=data or DataSettings(), model_spec=model_spec,
                                        loss=loss, unsafe=unsafe,
                                        allow_nonfinite=allow_nonfinite, progress=progress)
    analysis_id = None
    if store is not None and is_main():  # across processes, rank 0 writes
        origin = provenance(task)
        origin["data"] = {**origin["data"], "measure_samples": task.data.samples}
        analysis_id = write_alignment(store, result, origin)
    return CheckpointAlignment(result=result, task=task, final=bool(task.extra.get("final")),
                               analysis_id=analysis_id)
