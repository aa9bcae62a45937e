"""Alignment between a SAM-type perturbation and the top Hessian eigenvector.

SAM only flattens the sharpest direction when its perturbation points along the top
eigenvector of the Hessian (Luo et al., NeurIPS 2024, "Explicit Eigenvalue Regularization
Improves Sharpness-Aware Minimization"); Eigen-SAM steers it there. For weights ``w``,
minibatch gradient ``g`` and unit top eigenvector ``v`` of the training-loss Hessian on a
fixed measurement set, the alignment of a perturbation ``e`` is
``|<e, v>| / ||e||`` (reported with its sign too). Perturbation rules:

``sam``       ``e = rho g / ||g||`` (Foret et al. 2021)
``asam``      ``e = rho T^2 g / ||T g||``, ``T = |w|`` (Kwon et al. 2021)
``eigensam``  ``e = rho (g_hat + alpha sign(<g, v>) v_perp)``,
              ``v_perp = v - <g_hat, v> g_hat`` (with the measured ``v``)

:func:`measure_alignment` averages over ``B`` minibatches (mean of ``|cos|`` and of the
signed cosine, each with a 95% t-interval) and, with ``top_k > 1``, reports the share
``||V_k^T e||^2 / ||e||^2`` of the perturbation inside the top-``k`` eigenspace.
:class:`AlignmentProbe` measures the same inside a user's own training loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hessdiag.curvature import HessianOperator, lanczos
from hessdiag.data import stack_samples

RULES = ("sam", "asam", "eigensam")


def perturbation(rule: str, g: Tensor, w: Tensor, v: Tensor, rho: float,
                 alpha: float) -> Tensor:
    """The perturbation ``e`` of ``rule`` for flat gradient ``g``, weights ``w`` and unit
    top eigenvector ``v`` (see the module docstring)."""
    gnorm = torch.linalg.vector_norm(g)
    if rule == "sam":
        return rho * g / (gnorm + 1e-12)
    if rule == "asam":
        t = w.abs()
        return rho * t * t * g / (torch.linalg.vector_norm(t * g) + 1e-12)
    if rule == "eigensam":
        g_hat = g / (gnorm + 1e-12)
        s = torch.sign(g @ v)
        v_perp = v - (g_hat @ v) * g_hat
        return rho * (g_hat + alpha * s * v_perp)
    raise ValueError(f"perturbation must be one of {', '.join(RULES)}; got {rule!r}")


def mean_ci95(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and the 95% t-interval of the mean."""
    from scipy import stats

    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, -math.inf, math.inf
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class AlignmentResult:
    """Alignment of one model's perturbations with its top eigenvector(s)."""

    alignment: float
    ci95: tuple[float, float]
    alignment_signed: float
    ci95_signed: tuple[float, float]
    cosines: np.ndarray
    batches: int
    top_k: int
    topk_share: float | None
    topk_share_ci95: tuple[float, float] | None
    eigenvalues: np.ndarray
    residuals: np.ndarray
    converged: np.ndarray
    rule: str
    rho: float
    alpha: float
    hvps: int
    seconds: float
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    def to_dict(self) -> dict[str, Any]:
        return {
            "alignment": self.alignment, "alignment_signed": self.alignment_signed,
            "ci95": list(self.ci95), "ci95_signed": list(self.ci95_signed),
            "batches": self.batches, "lambda_max": self.lambda_max,
            "lambda_max_residual": float(self.residuals[0]),
            "lambda_max_converged": bool(self.converged[0]),
            "top_k": self.top_k, "topk_share": self.topk_share,
            "topk_share_ci95": None if self.topk_share_ci95 is None
            else list(self.topk_share_ci95),
            "perturbation": self.rule, "rho": self.rho, "alpha": self.alpha,
            "hvps": self.hvps, "seconds": self.seconds, "seed": self.seed,
        }


def _flat_grad(model: nn.Module, params: list[nn.Parameter], loss_fn, x, y) -> Tensor:
    """The minibatch gradient as training computes it (train mode, batch statistics),
    without changing the model: BatchNorm running statistics are saved and restored."""
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    flags = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        with torch.enable_grad():
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])


def measure_alignment(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    measure_batches: Any,
    minibatches: Iterable[tuple[Tensor, Tensor]],
    *,
    rule: str = "sam",
    rho: float = 0.05,
    alpha: float = 0.2,
    top_k: int = 1,
    tol: float = 1e-3,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AlignmentResult:
    """Top eigenvector(s) of the Hessian over ``measure_batches`` (Lanczos), then the
    cosine between each minibatch's perturbation and the top eigenvector."""
    if rule not in RULES:
        raise ValueError(f"--perturbation must be one of {', '.join(RULES)}; got {rule!r}")
    if rho <= 0:
        raise ValueError(f"--rho must be positive; got {rho}")
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1; got {top_k}")
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    op = HessianOperator(model, loss_fn, measure_batches, device=device)
    top = lanczos(op, k=top_k, tol=tol, seed=seed, progress=progress)
    V = top.eigenvectors
    v = V[:, 0]
    params = [p for p in model.parameters() if p.requires_grad]
    w = torch.cat([p.detach().reshape(-1) for p in params]).to(v)
    cosines, shares = [], []
    for x, y in minibatches:
        g = _flat_grad(model, params, loss_fn, x.to(device), y.to(device)).to(v)
        e = perturbation(rule, g, w, v, rho, alpha)
        norm = float(torch.linalg.vector_norm(e))
        if norm == 0:
            continue  # a zero gradient has no direction
        cosines.append(float(e @ v) / norm)
        if top_k > 1:
            shares.append(float(torch.linalg.vector_norm(V.T @ e) ** 2) / norm**2)
    if not cosines:
        raise ValueError("no minibatch gave a non-zero gradient: nothing to align")
    cos = np.array(cosines)
    a, alo, ahi = mean_ci95(np.abs(cos))
    s, slo, shi = mean_ci95(cos)
    share = share_ci = None
    if shares:
        share, lo, hi = mean_ci95(np.array(shares))
        share_ci = (lo, hi)
    return AlignmentResult(
        alignment=a, ci95=(alo, ahi), alignment_signed=s, ci95_signed=(slo, shi),
        cosines=cos, batches=len(cos), top_k=top_k, topk_share=share,
        topk_share_ci95=share_ci, eigenvalues=top.eigenvalues, residuals=top.residuals,
        converged=top.converged, rule=rule, rho=rho, alpha=alpha, hvps=op.hvp_count,
        seconds=time.perf_counter() - start, seed=seed,
        settings={"tol": tol, "hvp_mode": op.mode, "measure_samples": op.n_samples},
    )


def top_alignment(model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor],
                  measure_batches: Any, e: Tensor | None, *, v0: Tensor | None = None,
                  tol: float = 1e-3, seed: int = 0,
                  device: torch.device | str | None = None) -> tuple[dict[str, float], Tensor]:
    """``lambda_max`` over ``measure_batches`` (Lanczos, warm-started from ``v0``) and the
    cosine of ``e`` with its eigenvector; returns the row and the eigenvector (the next
    warm start). ``e=None`` or a zero ``e`` gives ``nan`` alignments."""
    op = HessianOperator(model, loss_fn, measure_batches, device=device,
                         check_determinism=False)
    top = lanczos(op, k=1, tol=tol, seed=seed, v0=v0)
    v = top.eigenvectors[:, 0].detach()
    cos = math.nan
    if e is not None:
        e = e.to(v)
        norm = float(torch.linalg.vector_norm(e))
        if norm > 0:
            cos = float(e @ v) / norm
    row = {"alignment": abs(cos), "alignment_signed": cos,
           "lambda_max": float(top.eigenvalues[0]),
           "lambda_max_residual": float(top.residuals[0]),
           "lambda_max_converged": float(top.converged[0]), "hvps": float(top.hvps)}
    return row, v


def _as_flat(value: Any, params: list[nn.Parameter]) -> Tensor:
    """A perturbation or gradient given as a flat tensor, a list of tensors in parameter
    order, a ``{parameter: tensor}`` dict (as ``SAM.last_perturbation``), or ``None``
    meaning the parameters' current ``.grad``."""
    if value is None:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params]).detach()
    if isinstance(value, Tensor):
        return value.detach().reshape(-1)
    if isinstance(value, dict):
        return torch.cat([value.get(p, torch.zeros_like(p)).detach().reshape(-1)
                          for p in params])
    return torch.cat([t.detach().reshape(-1) for t in value])


class AlignmentProbe:
    """Record the alignment of your optimizer's perturbation with the top Hessian
    eigenvector inside your own training loop, without changing training.

    Every ``every`` steps, :meth:`probe` computes the top eigenvector of the Hessian over
    ``measure_batches`` (Lanczos, warm-started from the previous one, in eval mode, on a
    copy of the weights) and the cosine with the vector you pass. It touches neither the
    weights, their gradients, the model's modes, BatchNorm statistics nor any random
    state. With ``store`` (a :class:`hessdiag.store.Store`) and ``run``, rows go to the
    run's ``alignment`` table (the run is created if the store does not have it).

    Call it where the weights are the unperturbed ``w``: after the first backward and
    before ``first_step``. Pass nothing to use the gradient in ``.grad``: SAM's
    perturbation is parallel to it, so that is the alignment of SAM's ``e``. Any other
    vector (a flat tensor, a list in parameter order, or a ``{parameter: tensor}`` dict)
    is measured the same way.

    >>> probe = AlignmentProbe(model, loss_fn, measure_batches, every=100,
    ...                        store=Store("hessdiag.h5"), run="my-sam-run")  # doctest: +SKIP
    >>> for step, (x, y) in enumerate(loader):                                # doctest: +SKIP
    ...     loss_fn(model(x), y).backward()
    ...     probe.probe(step)                             # alignment of e = rho g / ||g||
    ...     opt.first_step(zero_grad=True)
    ...     loss_fn(model(x), y).backward()
    ...     opt.second_step(zero_grad=True)
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any, Tensor], Tensor],
                 measure_batches: Any, *, every: int = 100, store: Any = None,
                 run: str | None = None, tol: float = 1e-3, seed: int = 0) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1; got {every}")
        if store is not None and run is None:
            raise ValueError("AlignmentProbe with a store needs run= (the run id to log to)")
        self.model, self.loss_fn, self.batches = model, loss_fn, measure_batches
        self.every, self.store, self.run, self.tol, self.seed = every, store, run, tol, seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.vector: Tensor | None = None
        self.history: list[dict[str, float]] = []
        if store is not None:
            existing = {r.id for r in store.runs()}
            if run not in existing:
                store.create_run(run, {"kind": "external", "status": "running",
                                       "probe_every": every})

    def probe(self, step: int, perturbation_or_grad: Any = None) -> dict[str, float] | None:
        """Measure at steps that are multiples of ``every``; returns the row (``step``,
        ``alignment``, ``alignment_signed``, ``lambda_max``, residual, HVPs) or ``None``.
        ``perturbation_or_grad``: see :func:`_as_flat` (``None``: the current ``.grad``)."""
        if step % self.every != 0:
            return None
        e = _as_flat(perturbation_or_grad, self.params)
        measured, self.vector = top_alignment(self.model, self.loss_fn, self.batches, e,
                                              v0=self.vector, tol=self.tol, seed=self.seed)
        row = {"step": float(step), **measured}
        self.history.append(row)
        if self.store is not None:
            self.store.append_run(self.run, {"alignment": {k: [v_] for k, v_ in row.items()}})
        return row


# --------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class AlignSettings:
    """Options of ``hessdiag align``."""

    rule: str = "sam"
    rho: float = 0.05
    alpha: float = 0.2
    batches: int = 20
    batch_size: int = 128
    top_k: int = 1
    samples: int = 512
    tol: float = 1e-3
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class CheckpointAlignment:
    result: AlignmentResult
    checkpoint: Any  # hessdiag.checkpoints.CheckpointInfo
    final: bool
    analysis_id: str | None


def random_minibatches(dataset: Any, count: int, batch_size: int,
                       seed: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` minibatches drawn without replacement in a seeded random order (wrapping
    around the data set when it is smaller than ``count * batch_size``)."""
    n = len(dataset)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=gen)
                       for _ in range(math.ceil(count * batch_size / n))])
    return [stack_samples(dataset, order[b * batch_size:(b + 1) * batch_size])
            for b in range(count)]


def align_checkpoint(path: str, *, settings: AlignSettings, data: Any,
                     model_spec: str | None = None, store: Any = None,
                     progress: Callable[[int, int], None] | None = None
                     ) -> CheckpointAlignment:
    """Alignment at one checkpoint; written to ``store`` (kind ``alignment``, with the
    checkpoint's run id) when given. ``data`` is a :class:`hessdiag.spectrum.DataSettings`
    whose ``samples`` is ignored (the measurement set is ``settings.samples``)."""
    from dataclasses import asdict, replace
    from pathlib import Path

    from hessdiag.data import load_dataset
    from hessdiag.spectrum import load_for_analysis, measurement_batches, resolve_device

    if settings.batches < 2:
        raise ValueError(f"--batches must be at least 2 (for a confidence interval); got "
                         f"{settings.batches}")
    loaded, info = load_for_analysis(path, model_spec=model_spec,
                                     data=replace(data, samples=settings.samples))
    device = resolve_device(settings.device)
    full = load_dataset(info.name, split=info.split, root=info.root)
    minibatches = random_minibatches(full.dataset, settings.batches, settings.batch_size,
                                     settings.seed)
    result = measure_alignment(
        loaded.model, nn.CrossEntropyLoss(), measurement_batches(info.dataset, 256),
        minibatches, rule=settings.rule, rho=settings.rho, alpha=settings.alpha,
        top_k=settings.top_k, tol=settings.tol, seed=settings.seed, device=device,
        progress=progress)
    final = bool(loaded.extra.get("final", False))
    analysis_id = None
    if store is not None:
        ck = loaded.info
        attrs = {
            "checkpoint_path": str(Path(ck.path).resolve()), "checkpoint_sha256": ck.sha256,
            "checkpoint_format": ck.format, "run_id": ck.run_id,
            "step": -1 if ck.step is None else int(ck.step),
            "epoch": -1 if ck.epoch is None else int(ck.epoch),
            "model": ck.model_spec, "model_kwargs": ck.model_kwargs,
            "data": {"spec": info.name, "split": info.split, "root": info.root,
                     "measure_samples": info.samples},
            "samples": info.samples, "seed": settings.seed, "settings": asdict(settings),
            "method": "lanczos", "tol": settings.tol, "hvps": result.hvps,
            "seconds": result.seconds, "perturbation": settings.rule,
        }
        arrays = {
            "eigenvalues": result.eigenvalues, "residuals": result.residuals,
            "converged": result.converged.astype(bool),
            "alignment/cosine": result.cosines, "alignment/mean_abs": result.alignment,
            "alignment/ci95": np.array(result.ci95),
            "alignment/mean_signed": result.alignment_signed,
            "alignment/ci95_signed": np.array(result.ci95_signed),
        }
        if result.topk_share is not None:
            arrays["alignment/topk_share"] = result.topk_share
            arrays["alignment/topk_share_ci95"] = np.array(result.topk_share_ci95)
        analysis_id = store.write_analysis("alignment", attrs, arrays)
    return CheckpointAlignment(result=result, checkpoint=loaded.info, final=final,
                               analysis_id=analysis_id)
