"""The curvature engine: Hessian-vector products and the solvers that use them.

Solvers take any symmetric operator with ``matvec`` (a :class:`HessianOperator`, a
:class:`GGNOperator` or :class:`FisherOperator`, a dense matrix, a SciPy
``LinearOperator``) and return frozen results with their errors.
"""

from hessdiag.curvature.gauss_newton import FisherOperator, GGNOperator
from hessdiag.curvature.hutchinson import hutchinson
from hessdiag.curvature.hutchpp import hutchpp
from hessdiag.curvature.lanczos import default_tol, lanczos
from hessdiag.curvature.linear import MatrixOperator, as_operator
from hessdiag.curvature.operator import (
    HessianOperator,
    NondeterministicOperatorError,
    preserved_state,
)
from hessdiag.curvature.power import power_iteration, power_steps
from hessdiag.curvature.results import EigenResult, SLQResult, TraceResult
from hessdiag.curvature.slq import density, slq

__all__ = [
    "EigenResult",
    "FisherOperator",
    "GGNOperator",
    "HessianOperator",
    "MatrixOperator",
    "NondeterministicOperatorError",
    "SLQResult",
    "TraceResult",
    "as_operator",
    "default_tol",
    "density",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "power_steps",
    "preserved_state",
    "slq",
]
