"""hessdiag: how sharp is your network?

Hessian spectra, traces and spectral densities of PyTorch models through
Hessian-vector products. See :mod:`hessdiag.curvature`.

The names below are imported on first use, so that ``hessdiag.store`` or
``hessdiag --version`` do not pay for importing torch.
"""

from hessdiag._errors import InputError
from hessdiag._version import __version__

_CURVATURE = (
    "EigenResult",
    "HessianOperator",
    "SLQResult",
    "TraceResult",
    "density",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "slq",
)

__all__ = ["InputError", "__version__", *_CURVATURE]


def __getattr__(name: str):
    if name in _CURVATURE:
        from hessdiag import curvature

        return getattr(curvature, name)
    raise AttributeError(f"module 'hessdiag' has no attribute {name!r}")
