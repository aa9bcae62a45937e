"""hessdiag: how sharp is your network?

Hessian spectra, traces and spectral densities of PyTorch models through
Hessian-vector products. See :mod:`hessdiag.curvature`.
"""

from hessdiag._version import __version__
from hessdiag.curvature import (
    EigenResult,
    HessianOperator,
    SLQResult,
    TraceResult,
    density,
    hutchinson,
    hutchpp,
    lanczos,
    power_iteration,
    slq,
)

__all__ = [
    "EigenResult",
    "HessianOperator",
    "SLQResult",
    "TraceResult",
    "__version__",
    "density",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "slq",
]
