"""Optimizers that seek flat minima: SAM, ASAM and Eigen-SAM.

- :class:`SAM`: Sharpness-Aware Minimization (Foret et al., ICLR 2021), with the adaptive
  variant ASAM (Kwon et al., ICML 2021) as ``adaptive=True``.
- :class:`EigenSAM`: SAM whose perturbation also follows the top Hessian eigenvector
  (Luo et al., NeurIPS 2024), estimated by warm-started power iteration with
  :mod:`hessdiag.curvature`.
- :func:`make_base_optimizer`: ``"sgd"``, ``"adam"``, ``"adamw"`` to the base class.
- :func:`disable_running_stats` / :func:`enable_running_stats`: keep BatchNorm running
  statistics to the first (unperturbed) forward pass.
"""

from hessdiag.optim.eigensam import EigenSAM
from hessdiag.optim.perturbation import perturbation
from hessdiag.optim.sam import (
    SAM,
    disable_running_stats,
    enable_running_stats,
    make_base_optimizer,
)

__all__ = [
    "SAM",
    "EigenSAM",
    "disable_running_stats",
    "enable_running_stats",
    "make_base_optimizer",
    "perturbation",
]
