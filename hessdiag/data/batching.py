"""Batches of any data :func:`~hessdiag.data.load_dataset` returns.

Every workflow batches through these functions, so a data set of images, sequences, dicts
of token ids or graphs (with its own ``collate_fn``) goes everywhere a batch goes:

* :func:`fixed_batches`: the samples in data set order, for measuring (a Hessian over a
  fixed set of samples is a fixed matrix); held in memory when they fit.
* :func:`batch_of`: the samples at given indices, for a training step.
* :func:`draw_minibatches` (:func:`random_minibatches`: as a list): seeded random
  minibatches of distinct samples, never one twice, for averaging over minibatches; with
  a note when the data holds fewer distinct minibatches than asked.
* :func:`batch_fingerprint`: a digest of a batch's contents (to see a repeated one).
* :func:`to_device`: a batch's tensors moved (and floats cast), whatever its structure.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Minibatches:
    """Minibatches for averaging over minibatches (:func:`draw_minibatches`): iterable
    like a list of ``(inputs, targets)``. ``requested``: how many were asked for;
    ``batch_size``: samples in each (fewer than asked when the data set is smaller than one
    minibatch); ``samples``: samples in the data set (``None`` for ready batches);
    ``note``: one sentence when the draw is not what was asked for (fewer distinct
    minibatches, smaller ones, or overlapping ones), else empty."""

    batches: list[tuple[Any, Any]]
    requested: int
    batch_size: int | None
    samples: int | None
    note: str = ""

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.batches[i]


def _distinct_subsets(n: int, count: int, batch_size: int, gen: torch.Generator
                      ) -> list[list[int]]:
    """Up to ``count`` distinct subsets of ``batch_size`` of ``range(n)`` (``batch_size <=
    n``), each of distinct samples: rounds of a seeded permutation cut into disjoint
    minibatches (a round's remainder left out), a subset already drawn skipped. All of
    them when fewer than ``count`` exist."""
    possible = math.comb(n, batch_size)
    if possible <= count:  # few enough to list: every one, in a seeded order
        every = [list(c) for c in itertools.combinations(range(n), batch_size)]
        return [every[int(i)] for i in torch.randperm(len(every), generator=gen)]
    per_round = n // batch_size
    seen: set[tuple[int, ...]] = set()
    out: list[list[int]] = []
    while len(out) < count:
        order = torch.randperm(n, generator=gen).tolist()
        for b in range(per_round):
            subset = order[b * batch_size:(b + 1) * batch_size]
            key = tuple(sorted(subset))
            if key not in seen:
                seen.add(key)
                out.append(subset)
                if len(out) == count:
                    break
    return out


def draw_minibatches(info: DataInfo, count: int, batch_size: int, seed: int) -> Minibatches:
    """``count`` seeded random minibatches of ``batch_size`` distinct samples, never the
    same minibatch twice.

    * ``count * batch_size`` samples or more: disjoint minibatches (one permutation).
    * fewer, but at least ``batch_size``: rounds of disjoint minibatches, each round a new
      permutation (so minibatches of different rounds overlap), a repeated minibatch
      skipped; when fewer than ``count`` distinct ones exist, all of them.
    * fewer than ``batch_size``: one minibatch of all the samples.

    Ready batches: ``count`` of them in a seeded order, or each once when there are fewer.
    ``note`` says when the draw differs from what was asked."""
    if count < 1 or batch_size < 1:
        raise InputError(f"minibatches: count and batch_size must be positive; got {count} "
                         f"and {batch_size}", param="batches")
    gen = torch.Generator().manual_seed(seed)
    if info.batches is not None:
        n = len(info.batches)
        order = torch.randperm(n, generator=gen)[:count]
        note = "" if n >= count else (f"data {info.name} holds {n} ready batches: {n} "
                                       f"distinct minibatches instead of {count}")
        return Minibatches([info.batches[int(i)] for i in order], count, None, None, note)
    n = len(info.dataset)
    if n >= count * batch_size:
        order = torch.randperm(n, generator=gen)
        chosen = [order[b * batch_size:(b + 1) * batch_size] for b in range(count)]
        note = ""
    elif n < batch_size:
        chosen = [torch.randperm(n, generator=gen)]
        note = (f"data {info.name} has {n} samples, fewer than one minibatch of {batch_size}: "
                f"1 minibatch of all {n} samples instead of {count}")
    else:
        chosen = _distinct_subsets(n, count, batch_size, gen)
        if len(chosen) < count:
            note = (f"data {info.name} has {n} samples: only {len(chosen)} distinct "
                    f"minibatches of {batch_size} exist, used instead of {count}")
        else:
            note = (f"data {info.name} has {n} samples, fewer than {count} x {batch_size}: "
                    f"{count} distinct minibatches that overlap (disjoint within each pass "
                    "over the data)")
    return Minibatches([batch_of(info, idx) for idx in chosen], count,
                       min(batch_size, n), n, note)


def random_minibatches(info: DataInfo, count: int, batch_size: int,
                       seed: int) -> list[tuple[Any, Any]]:
    """The minibatches of :func:`draw_minibatches` as a list (at most ``count``: fewer
    when the data holds fewer distinct minibatches; see its ``note``)."""
    return list(draw_minibatches(info, count, batch_size, seed))


def batch_fingerprint(batch: Any) -> str | None:
    """A digest of a batch's contents (tensors' shapes, dtypes and values, through tuples,
    lists and dicts; other leaves by ``repr`` when it is plain), so that a minibatch given
    twice is seen as one; ``None`` when a part cannot be read (then it counts as new)."""
    digest = hashlib.blake2b(digest_size=16)

    def feed(obj: Any) -> bool:
        if isinstance(obj, Tensor):
            t = obj.detach().to("cpu").contiguous()
            digest.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes()
                          if t.numel() else b"")
            return True
        if isinstance(obj, Mapping | tuple | list):
            items = (sorted(obj.items(), key=lambda kv: str(kv[0]))
                     if isinstance(obj, Mapping) else list(enumerate(obj)))
            digest.update(b"{" if isinstance(obj, Mapping) else b"(")
            ok = all(feed(k) and feed(v) for k, v in items)
            digest.update(b"}")
            return ok
        if obj is None or isinstance(obj, bool | int | float | str | bytes):
            digest.update(repr(obj).encode())
            return True
        return False

    return digest.hexdigest() if feed(batch) else None


__all__ = ["MEMORY_LIMIT", "Minibatches", "batch_fingerprint", "batch_of", "batch_samples",
           "collate", "draw_minibatches", "fixed_batches", "random_minibatches", "to_device"]
