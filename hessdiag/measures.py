"""Old import paths, kept so that code written against them still runs.

This module held the spectrum and alignment computations; they now live in the modules
named after what they compute, and nothing in hessdiag imports this one:

* :mod:`hessdiag.spectrum` owns :func:`compute_spectrum`, :func:`curvature_operator`,
  :func:`check_curvature`, :func:`resolve_basis_device`, :func:`top_start` and
  :func:`parameterised_modules`;
* :mod:`hessdiag.align` owns :func:`measure_alignment`, :func:`checkpoint_alignment`,
  :func:`optimizer_eigenvector`, :class:`AlignmentProbe`, :func:`top_eigenpair`,
  :func:`alignment_row` and :func:`training_gradient`.
"""

from __future__ import annotations

# owned by hessdiag.align
from hessdiag.align import (
    AlignmentProbe,
    alignment_row,
    checkpoint_alignment,
    measure_alignment,
    optimizer_eigenvector,
    top_eigenpair,
    training_gradient,
)

# owned by hessdiag.spectrum
from hessdiag.spectrum import (
    check_curvature,
    compute_spectrum,
    curvature_operator,
    parameterised_modules,
    resolve_basis_device,
    top_start,
)

__all__ = ["AlignmentProbe", "alignment_row", "check_curvature", "checkpoint_alignment",
           "compute_spectrum", "curvature_operator", "measure_alignment",
           "optimizer_eigenvector", "parameterised_modules", "resolve_basis_device",
           "top_eigenpair", "top_start", "training_gradient"]
