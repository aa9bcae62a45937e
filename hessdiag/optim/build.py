"""Optimizers built from a run's settings (``hessdiag train``'s ``TrainConfig``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from hessdiag.optim.eigensam import EigenSAM
from hessdiag.optim.sam import SAM, make_base_optimizer


def build_optimizer(params: Iterable[torch.nn.Parameter], config: Any) -> torch.optim.Optimizer:
    """The optimizer ``config`` describes: ``config.optimizer`` is ``sgd`` (the base
    optimizer alone), ``sam`` or ``eigensam`` around ``config.base`` (``sgd``, ``adam``,
    ``adamw``) with ``lr``, ``weight_decay`` and, for SGD, ``momentum`` and ``nesterov``;
    SAM takes ``rho`` and ``adaptive``; Eigen-SAM ``rho``, ``alpha``, ``eig_every``,
    ``eig_iters``, ``renormalize`` and ``seed`` (of its first random start).

    Eigen-SAM's products use ``double-backward`` mode: ``auto`` chooses by timing, and the
    modes differ in the last bits, which a resumed run must not."""
    params = list(params)
    base_kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.base == "sgd":
        base_kwargs.update(momentum=config.momentum, nesterov=config.nesterov)
    base = make_base_optimizer(config.base)
    if config.optimizer == "sgd":
        return base(params, **base_kwargs)
    if config.optimizer == "sam":
        return SAM(params, base, rho=config.rho, adaptive=config.adaptive, **base_kwargs)
    if config.optimizer == "eigensam":
        return EigenSAM(params, base, rho=config.rho, alpha=config.alpha,
                        eig_every=config.eig_every, eig_iters=config.eig_iters,
                        renormalize=config.renormalize, eig_seed=config.seed,
                        hvp_mode="double-backward", **base_kwargs)
    raise ValueError(f"optimizer must be sgd, sam or eigensam; got {config.optimizer!r}")
