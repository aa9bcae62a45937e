"""Settings of every workflow, with their defaults in one place.

Each workflow takes one frozen settings object, checked when it is made
(:class:`hessdiag.InputError` naming the field): :class:`DataSettings` (which samples),
:class:`SpectrumSettings` (``hessdiag spectrum``), :class:`AlignSettings`
(``hessdiag align``) and :class:`TrainConfig` (``hessdiag train``). The command line maps
its options onto these fields and takes its defaults from them. This module imports
nothing heavy, so the command line can read the defaults without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hessdiag._errors import InputError

METHODS = ("lanczos", "power")
TRACE_METHODS = ("hutch++", "hutchinson")
HVP_MODES = ("auto", "forward-over-reverse", "double-backward", "retained-graph")
BATCH_VECTORS = ("auto", "loop", "batched")
STARTS = ("auto", "random", "gradient")
DTYPES = ("float32", "float64")
SPLITS = ("train", "test")
RULES = ("sam", "asam", "eigensam", "eigensam-exact")
OPTIMIZERS = ("sgd", "sam", "eigensam")
BASES = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant")
SHARPNESS_MEASURES = ("critical", "worst-case", "adaptive", "adaptive-asam")
# the ascent of worst-case and adaptive sharpness (hessdiag.sharpness): methods, relative
# tolerance on the value's change, step budget
ASCENT_METHODS = ("krylov", "gradient")
ASCENT_TOL = 1e-3
ASCENT_MAX_STEPS = 20
PRECONDITIONERS = ("none", "adam")
CURVATURES = ("hessian", "ggn", "fisher")
FISHER_KINDS = ("mc", "empirical")
# products of each eigenvalue solve of `hessdiag baseline` (and of a check without a
# baseline): bounds their wall time (hessdiag.check)
CHECK_MAX_HVPS = 200


@dataclass(frozen=True)
class DataSettings:
    """Which samples a task is measured on. ``spec=None``: the checkpoint's data;
    ``samples=None``: all of the split; ``batch_size``: samples per batch of products
    (the Hessian is of the mean over all samples either way)."""

    spec: str | None = None
    root: str | None = None
    download: bool = False
    split: str = "train"
    samples: int | None = None
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise InputError(f"split must be train or test; got {self.split!r}", param="split")
        if self.samples is not None and self.samples <= 0:
            raise InputError(f"samples must be a positive number of samples; got "
                             f"{self.samples}", param="samples")
        if self.batch_size <= 0:
            raise InputError(f"batch_size must be positive; got {self.batch_size}",
                             param="batch_size")


@dataclass(frozen=True)
class SpectrumSettings:
    """What to compute (the options of ``hessdiag spectrum``, with the same defaults).

    ``top_k`` algebraically largest eigenvalues by ``method``; with ``lambda_min`` also the
    most negative one; with ``trace`` the trace by ``trace_method`` from ``trace_hvps``
    products; with ``density`` the spectral density by SLQ (``slq_probes`` x ``slq_steps``
    products). ``tol`` is the relative residual at which an eigenpair counts as converged
    (``None``: 1e-3 in float32, 1e-6 in float64). ``max_hvps``: the budget of products
    of each eigenvalue solve (the top eigenvalues, ``lambda_min``), which ``hessdiag
    baseline`` and ``hessdiag check`` hold every solve to (:mod:`hessdiag.check`);
    ``None``: the solver's own (:func:`hessdiag.curvature.lanczos`). ``params`` restricts
    the Hessian to the parameters a pattern selects (glob, regular expression or module
    prefix); ``per_layer`` adds, for each parameterised module, the top eigenvalue and trace of its
    diagonal block (and computes the whole trace). ``memory_budget`` (GiB) bounds the
    gradient graphs ``hvp_mode="auto"`` may keep (default: see
    :func:`hessdiag.curvature.operator.default_memory_budget`). ``basis_device``: where
    Lanczos keeps its basis and the products of it (default ``None``: the operator's
    device; ``"cpu"`` for a large model on a GPU). ``compile``: products through
    ``torch.compile`` (:class:`hessdiag.curvature.HessianOperator`). ``batch_vectors``: how
    the operator multiplies several vectors at once (``auto``: in one pass per batch on
    CUDA, checked against the loop, one at a time elsewhere; ``loop``; ``batched``: on any
    device; :class:`hessdiag.curvature.HessianOperator`). ``start``: the top eigenvalues'
    starting vector, ``random`` (Gaussian from ``seed``; also what ``auto`` takes) or
    ``gradient`` (the loss gradient plus a Gaussian vector of the same norm; see
    :func:`hessdiag.spectrum.top_start` for when it helps and why it is not the default).
    ``preconditioner="adam"``
    analyses ``P^-1/2 H P^-1/2`` with Adam's ``P = diag(sqrt(v_hat) + eps)`` from the
    checkpoint's optimizer state (the preconditioned sharpness of Cohen et al. 2022).
    ``curvature`` is the matrix analysed: the ``hessian``, the generalised Gauss-Newton
    matrix ``ggn`` or the Fisher ``fisher`` (:mod:`hessdiag.curvature.gauss_newton`), of
    kind ``fisher_kind`` (``mc``: targets sampled from the model, ``fisher_samples`` per
    term, seeded from ``seed``; ``empirical``: the data's targets). With ``ggn`` and
    ``fisher``, ``hvp_mode`` ``forward-over-reverse`` computes ``J v`` in forward mode and
    ``double-backward`` in reverse mode; ``retained-graph`` is the Hessian's only.
    Every stochastic part is seeded from ``seed``.
    """

    top_k: int = 5
    lambda_min: bool = False
    trace: bool = False
    density: bool = False
    method: str = "lanczos"
    tol: float | None = None
    max_hvps: int | None = None
    trace_method: str = "hutch++"
    trace_hvps: int = 99
    slq_probes: int = 5
    slq_steps: int = 60
    params: str | None = None
    per_layer: bool = False
    dtype: str = "float32"
    device: str = "auto"
    hvp_mode: str = "auto"
    memory_budget: float | None = None
    basis_device: str | None = None
    compile: bool = False
    batch_vectors: str = "auto"
    start: str = "auto"
    preconditioner: str = "none"
    curvature: str = "hessian"
    fisher_kind: str = "mc"
    fisher_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.curvature in CURVATURES, "curvature", f"one of {', '.join(CURVATURES)}",
             self.curvature),
            (self.fisher_kind in FISHER_KINDS, "fisher_kind",
             f"one of {', '.join(FISHER_KINDS)}", self.fisher_kind),
            (self.fisher_samples >= 1, "fisher_samples", "at least 1", self.fisher_samples),
            (self.curvature == "hessian" or self.hvp_mode != "retained-graph", "hvp_mode",
             f"auto, forward-over-reverse or double-backward with curvature {self.curvature} "
             "(retained-graph keeps the Hessian's gradient graphs)", self.hvp_mode),
            (not self.compile or self.curvature == "hessian", "compile",
             f"off with curvature {self.curvature} (it compiles the Hessian's "
             "forward-over-reverse product)", self.compile),
            (not self.compile or self.hvp_mode in ("auto", "forward-over-reverse"), "compile",
             f"off with hvp_mode {self.hvp_mode} (torch.compile cannot differentiate twice in "
             "reverse; use hvp_mode forward-over-reverse or auto)", self.compile),
            (self.memory_budget is None or self.memory_budget > 0, "memory_budget",
             "positive (GiB)", self.memory_budget),
            (self.preconditioner in PRECONDITIONERS, "preconditioner",
             f"one of {', '.join(PRECONDITIONERS)}", self.preconditioner),
            (self.preconditioner == "none" or not self.per_layer, "per_layer",
             "off with a preconditioner (per-layer blocks are of the plain Hessian)",
             self.per_layer),
            (self.method in METHODS, "method", f"one of {', '.join(METHODS)}", self.method),
            (self.trace_method in TRACE_METHODS, "trace_method",
             f"one of {', '.join(TRACE_METHODS)}", self.trace_method),
            (self.hvp_mode in HVP_MODES, "hvp_mode", f"one of {', '.join(HVP_MODES)}",
             self.hvp_mode),
            (self.batch_vectors in BATCH_VECTORS, "batch_vectors",
             f"one of {', '.join(BATCH_VECTORS)}", self.batch_vectors),
            (self.start in STARTS, "start", f"one of {', '.join(STARTS)}", self.start),
            (self.dtype in DTYPES, "dtype", "float32 or float64", self.dtype),
            (self.top_k >= 1, "top_k", "at least 1", self.top_k),
            (self.trace_hvps >= 3, "trace_hvps", "at least 3", self.trace_hvps),
            (self.slq_probes >= 1, "slq_probes", "at least 1", self.slq_probes),
            (self.slq_steps >= 2, "slq_steps", "at least 2", self.slq_steps),
            (self.tol is None or self.tol > 0, "tol", "positive", self.tol),
            (self.max_hvps is None or self.max_hvps >= 2, "max_hvps", "at least 2",
             self.max_hvps),
        ]
        for ok, name, what, value in checks:
            if not ok:
                raise InputError(f"{name} must be {what}; got {value!r}", param=name)


@dataclass(frozen=True)
class AlignSettings:
    """Options of ``hessdiag align`` (with its defaults). ``alpha=None``: the Eigen-SAM run's
    own alpha when the checkpoint records it, else 0.2. ``samples``: training samples in the
    fixed measurement set of the Hessian; ``batches`` minibatches of ``batch_size`` drawn
    from the whole training split."""

    rule: str = "sam"
    alpha: float | None = None
    batches: int = 20
    batch_size: int = 128
    top_k: int = 1
    samples: int = 512
    tol: float = 1e-3
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise InputError(f"rule must be one of {', '.join(RULES)}; got {self.rule!r}",
                             param="rule")
        for name, low in (("batches", 2), ("batch_size", 1), ("top_k", 1), ("samples", 1)):
            if getattr(self, name) < low:
                raise InputError(f"{name} must be at least {low}"
                                 + (" (for a confidence interval)" if name == "batches" else "")
                                 + f"; got {getattr(self, name)}", param=name)
        if self.alpha is not None and self.alpha < 0:
            raise InputError(f"alpha must be non-negative; got {self.alpha}", param="alpha")
        if not self.tol > 0:
            raise InputError(f"tol must be positive; got {self.tol}", param="tol")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (stored with it, and enough to resume it)."""

    model: str
    data: str
    loss: str | None = None
    output: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None
    download: bool = False
    samples: int | None = None
    optimizer: str = "sgd"
    base: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    epochs: int = 10
    batch_size: int = 128
    rho: float = 0.05
    alpha: float = 0.2
    eig_every: int = 100
    eig_iters: int = 5
    adaptive: bool = False
    renormalize: bool = False
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    augment: bool = False
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int | None = None
    sharpness_every: int | None = None
    sharpness_samples: int = 512
    run_name: str | None = None
    checkpoint_dir: str = "checkpoints"
    init_from: str | None = None
    # across processes (torchrun): all-reduce SAM's first gradient too, so that every
    # process perturbs by the whole minibatch's gradient (single-process SAM exactly)
    sync_perturbation: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (self.base in BASES, "base", f"one of {', '.join(BASES)}"),
            (self.schedule in SCHEDULES, "schedule", f"one of {', '.join(SCHEDULES)}"),
            (self.lr > 0, "lr", "positive"),
            (self.epochs >= 1, "epochs", "at least 1"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.rho >= 0, "rho", "non-negative"),
            (self.alpha >= 0, "alpha", "non-negative"),
            (self.eig_every >= 1, "eig_every", "at least 1"),
            (self.eig_iters >= 1, "eig_iters", "at least 1"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)"),
            (self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every",
             "at least 1"),
            (self.sharpness_every is None or self.sharpness_every >= 1, "sharpness_every",
             "at least 1"),
            (self.sharpness_samples >= 1, "sharpness_samples", "at least 1"),
            (self.samples is None or self.samples >= 1, "samples", "positive"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise InputError(f"{name} must be {what}; got {getattr(self, name)!r}",
                                 param=name)
        if self.adaptive and self.optimizer == "eigensam":
            raise InputError("adaptive (ASAM) goes with optimizer sam: Eigen-SAM is defined for "
                             "SAM's Euclidean perturbation", param="adaptive")




LANDSCAPE_DIRECTIONS = ("random", "eigen")
LANDSCAPE_BIASES = ("zero", "weights")


@dataclass(frozen=True)
class LandscapeSettings:
    """Options of ``hessdiag landscape`` (with its defaults).

    ``dims`` 1 (a curve) or 2 (a surface) along ``directions``: ``random`` Gaussian
    directions, filter-normalised (Li et al. 2018) when ``filter_norm``, else scaled to unit
    length; or ``eigen``, the top ``dims`` Hessian eigenvectors (unit length, never filter
    normalised, computed to ``tol``). ``bias``: the direction of one-dimensional parameters
    (biases, normalisation scales) under filter normalisation, ``zero`` or their
    ``weights``. The grid is ``resolution`` points over ``x_range`` (and over ``y_range``,
    default ``x_range``; ``y_resolution``, default ``resolution``), coordinates in units of
    the directions. ``seed`` seeds the random directions and the Lanczos start."""

    dims: int = 1
    directions: str = "random"
    x_range: tuple[float, float] = (-1.0, 1.0)
    y_range: tuple[float, float] | None = None
    resolution: int = 25
    y_resolution: int | None = None
    filter_norm: bool = True
    bias: str = "zero"
    tol: float | None = None
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.dims in (1, 2), "dims", "1 or 2", self.dims),
            (self.directions in LANDSCAPE_DIRECTIONS, "directions",
             f"one of {', '.join(LANDSCAPE_DIRECTIONS)}", self.directions),
            (self.bias in LANDSCAPE_BIASES, "bias", f"one of {', '.join(LANDSCAPE_BIASES)}",
             self.bias),
            (self.resolution >= 2, "resolution", "at least 2", self.resolution),
            (self.y_resolution is None or self.y_resolution >= 2, "y_resolution",
             "at least 2", self.y_resolution),
            (self.dtype in DTYPES, "dtype", "float32 or float64", self.dtype),
            (self.tol is None or self.tol > 0, "tol", "positive", self.tol),
        ]
        for ok, name, what, value in checks:
            if not ok:
                raise InputError(f"{name} must be {what}; got {value!r}", param=name)
        for name in ("x_range", "y_range"):
            value = getattr(self, name)
            if value is None:
                continue
            if len(value) != 2 or not float(value[0]) < float(value[1]):
                raise InputError(f"{name} must be two numbers MIN,MAX with MIN < MAX; got "
                                 f"{','.join(str(v) for v in value)}", param=name)

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid's shape: ``(nx,)`` or ``(ny, nx)`` (rows: the second coordinate)."""
        if self.dims == 1:
            return (self.resolution,)
        return (self.y_resolution or self.resolution, self.resolution)
