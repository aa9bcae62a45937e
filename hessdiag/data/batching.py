"""Batches of any data :func:`~hessdiag.data.load_dataset` returns.

Every workflow batches through these functions, so a data set of images, sequences, dicts
of token ids or graphs (with its own ``collate_fn``) goes everywhere a batch goes:

* :func:`fixed_batches`: the samples in data set order, for measuring (a Hessian over a
  fixed set of samples is a fixed matrix); held in memory when they fit.
* :func:`batch_of`: the samples at given indices, for a training step.
* :func:`random_minibatches`: seeded random minibatches, for averaging over minibatches.
* :func:`to_device`: a batch's tensors moved (and floats cast), whatever its structure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset, default_collate

from hessdiag._errors import InputError, first_line
from hessdiag._tensors import to_device
from hessdiag.data.registry import DataInfo, batch_samples

MEMORY_LIMIT = 1 << 29  # bytes of fixed batches kept in memory


def collate(info: DataInfo, samples: list) -> tuple[Any, Any]:
    """A list of samples as one batch ``(inputs, targets)``: the data's ``collate_fn`` or
    PyTorch's default collate."""
    fn = info.collate_fn or default_collate
    try:
        batch = fn(samples)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        raise InputError(f"data {info.name}: {len(samples)} samples cannot be batched "
                         f"({first_line(exc)}); samples of different sizes need a collate_fn",
                         param="data") from exc
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise InputError(f"data {info.name}: a batch must be a pair (inputs, targets); the "
                         f"collate function returned {type(batch).__name__}", param="data")
    return batch[0], batch[1]


def batch_of(info: DataInfo, indices: Sequence[int] | Tensor) -> tuple[Any, Any]:
    """The samples at ``indices`` of a data set as one batch ``(inputs, targets)``."""
    if info.dataset is None:
        raise InputError(f"data {info.name} is a list of ready batches, which cannot be "
                         "re-batched by sample", param="data")
    return collate(info, [info.dataset[int(i)] for i in indices])


def _nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, tuple | list):
        return sum(_nbytes(v) for v in obj)
    return 8


def fixed_batches(info: DataInfo, batch_size: int, memory_limit: int = MEMORY_LIMIT, *,
                  shard: Callable[[int], range] | None = None) -> Any:
    """The samples in data set order in batches of ``batch_size``: a list when they fit in
    ``memory_limit`` bytes (decoding images once instead of once per product), else a
    non-shuffling ``DataLoader``. Ready batches are returned as they are.

    ``shard``: ``n -> range``, this process's share of the ``n`` samples (for ready
    batches: of the ``n`` batches) when the work is split across processes
    (:func:`hessdiag.distributed.shard`); the samples are sharded before they are batched,
    and whether they are kept in memory is decided on the whole data set, the same way on
    every process."""
    if batch_size < 1:
        raise InputError(f"batch_size must be positive; got {batch_size}", param="batch_size")
    if info.batches is not None:
        if shard is None:
            return info.batches
        return [info.batches[i] for i in shard(len(info.batches))]
    dataset = info.dataset
    size = _nbytes(dataset[0]) * len(dataset)
    if shard is not None:
        dataset = Subset(dataset, shard(len(dataset)))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=lambda samples: collate(info, samples))
    return list(loader) if size <= memory_limit else loader


def random_minibatches(info: DataInfo, count: int, batch_size: int,
                       seed: int) -> list[tuple[Any, Any]]:
    """``count`` minibatches drawn without replacement in a seeded random order (wrapping
    around the data when it is smaller than ``count * batch_size``). For ready batches,
    ``count`` of them in a seeded random order (wrapping around likewise)."""
    gen = torch.Generator().manual_seed(seed)
    if info.batches is not None:
        n = len(info.batches)
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(math.ceil(count / n))])
        return [info.batches[int(i)] for i in order[:count]]
    n = len(info.dataset)
    order = torch.cat([torch.randperm(n, generator=gen)
                       for _ in range(math.ceil(count * batch_size / n))])
    return [batch_of(info, order[b * batch_size:(b + 1) * batch_size]) for b in range(count)]


__all__ = ["MEMORY_LIMIT", "batch_of", "batch_samples", "collate", "fixed_batches",
           "random_minibatches", "to_device"]
