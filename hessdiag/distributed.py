"""Running hessdiag across processes with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc-per-node N -m hessdiag spectrum CKPT`` starts N processes, each with
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment. :func:`init` joins them
into one process group (NCCL for CUDA tensors, Gloo for CPU ones), once. Each process then
holds a contiguous shard of the measured samples (:func:`shard`), computes its part of
every Hessian-vector product, and the parts are summed across processes
(:meth:`Collective.sum_and_count`) so that every process holds the product of the whole
data set, exactly the single-process operator. Solvers then run identically on every
process from the same seed; only rank 0 writes the store.

Nothing here holds state of its own: whether a job is distributed is what
``torch.distributed`` says (:func:`world`), and a :class:`Collective` is a thin handle on
its default process group. Outside ``torchrun`` (no process group), :func:`collective`
returns ``None`` and nothing of this module runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from hessdiag._errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

# torch is imported where it is used: the command line's entry point asks :func:`launched`
# before every command, and `hessdiag --help` should not wait for torch.

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
TIMEOUT_ENV = "HESSDIAG_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # seconds a process waits in a collective for the others


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` processes, and its ``local_rank`` on its node
    (``World(0, 1, 0)`` when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise InputError(f"environment variable {name}={value!r} is not an integer (torchrun "
                         "sets WORLD_SIZE, RANK and LOCAL_RANK)", param=None) from exc


def launched() -> World | None:
    """The :class:`World` the environment describes when launched by ``torchrun`` with more
    than one process; ``None`` otherwise."""
    size = _env_int("WORLD_SIZE")
    if size is None or size <= 1:
        return None
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None or not 0 <= rank < size:
        raise InputError(f"WORLD_SIZE is {size} but RANK is {os.environ.get('RANK')!r}: launch "
                         "with torchrun, which sets both")
    return World(rank=rank, size=size, local_rank=rank if local is None else local)


def _available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> World:
    """This process's place in the process group; ``World(0, 1, 0)`` without one."""
    if not _available():
        return World()
    import torch.distributed as dist

    local = _env_int("LOCAL_RANK")
    rank = dist.get_rank()
    return World(rank=rank, size=dist.get_world_size(), local_rank=rank if local is None
                 else local)


def is_main() -> bool:
    """Whether this process is rank 0 (always, when not distributed): the one that prints
    and writes."""
    return world().rank == 0


def timeout() -> float:
    """Seconds a process waits in a collective for the others (``HESSDIAG_DIST_TIMEOUT``,
    default 1800): a process that fails makes the others stop after at most this long,
    whatever else tears the job down first."""
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InputError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


def _wants_cuda(device: str | None) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    return device is None or device == "auto" or str(device).startswith("cuda")


def init(device: str | None = "auto") -> World:
    """Join the process group ``torchrun`` describes, once (later calls return the same
    :class:`World`): NCCL for CUDA tensors (and ``cuda:LOCAL_RANK`` as this process's
    device) when ``device`` is CUDA or ``auto`` on a machine with GPUs, Gloo for CPU
    tensors always. Not launched by ``torchrun`` (or with one process): nothing happens
    and ``World(0, 1, 0)`` is returned."""
    import torch
    import torch.distributed as dist

    if _available():
        return world()
    env = launched()
    if env is None:
        return World()
    if not dist.is_available():
        raise InputError("this torch has no torch.distributed: run one process, or install a "
                         "torch built with distributed support")
    cuda = _wants_cuda(device)
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise InputError(f"local rank {env.local_rank} has no GPU: this node has "
                             f"{torch.cuda.device_count()}; start at most that many "
                             "processes per node (--nproc-per-node)", param="device")
        torch.cuda.set_device(env.local_rank)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    kwargs: dict[str, Any] = {}
    if cuda:
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout()), **kwargs)
    return world()


def shutdown() -> None:
    """Leave the process group (if there is one)."""
    if _available():
        import torch.distributed as dist

        dist.destroy_process_group()


def local_device() -> torch.device | None:
    """``cuda:LOCAL_RANK`` in a distributed job on a machine with GPUs, else ``None``."""
    import torch

    if not torch.cuda.is_available():
        return None
    env = launched()
    if env is None:
        return None
    return torch.device("cuda", env.local_rank)


def shard(n_samples: int, rank: int | None = None, size: int | None = None) -> range:
    """This process's contiguous share of ``range(n_samples)``: the shares of all ranks are
    disjoint, in rank order, cover every index once, and differ in length by at most one
    (no padding, no duplicates). Every process needs at least one."""
    here = world()
    rank = here.rank if rank is None else rank
    size = here.size if size is None else size
    if n_samples < size:
        raise InputError(f"{n_samples} samples (or batches) cannot be shared among {size} "
                         "processes: each needs at least one; use more samples or fewer "
                         "processes", param="samples")
    base, extra = divmod(n_samples, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes, in place; returned. Unchanged when not
    distributed."""
    if _available():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (picklable objects); ``obj`` itself when not
    distributed."""
    if not _available():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not _available():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Collective:
    """The reductions a distributed computation needs, over the default process group.

    Curvature operators take one (``collective=``) and call :meth:`sum_and_count` once
    per product with their partial weighted sum and their count of terms; a GGN or Fisher
    operator reuses the same call. Every process must make the same calls in the same
    order."""

    def __init__(self) -> None:
        here = world()
        self.rank, self.size = here.rank, here.size

    def sum_and_count(self, partial: Tensor, *counts: float,
                      error: BaseException | None = None) -> tuple[Tensor, tuple[float, ...]]:
        """Sum a partial product (in place) and counts over all processes. ``error``: what
        went wrong on this process while computing its part (its partial sum is then
        meaningless); if any process passes one, every process raises (this one its own
        error, the others :class:`PeerFailed`), so that none is left waiting for the
        others. Counts are summed in float64 (exact below 2**53)."""
        all_reduce_sum(partial)
        return partial, self.counts(*counts, error=error, device=partial.device)

    def counts(self, *values: float, error: BaseException | None = None,
               device: torch.device | str = "cpu") -> tuple[float, ...]:
        """Sum numbers over all processes (float64); raise as :meth:`sum_and_count` does
        when any process passes an ``error``."""
        import torch

        box = torch.tensor([*values, float(error is not None)], dtype=torch.float64,
                           device=device)
        all_reduce_sum(box)
        summed = box.tolist()
        if summed[-1] > 0:
            if error is not None:
                raise error
            raise PeerFailed(f"{int(summed[-1])} other process(es) of the job failed; this "
                             "one stops with them")
        return tuple(float(x) for x in summed[:-1])

    def sum(self, tensor: Tensor) -> Tensor:
        """:func:`all_reduce_sum`."""
        return all_reduce_sum(tensor)

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """Whether ``flag`` is true on any process."""
        return self.counts(float(bool(flag)), device=device)[0] > 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """:func:`broadcast_object`."""
        return broadcast_object(obj, src)

    def gather(self, obj: Any) -> list[Any]:
        """:func:`all_gather_object`."""
        return all_gather_object(obj)

    def broadcast_tensors(self, tensors: list[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` (in place) with rank ``src``'s values."""
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t.data, src=src)

    def shard(self, n: int) -> range:
        """:func:`shard` for this process."""
        return shard(n, self.rank, self.size)


def collective() -> Collective | None:
    """A :class:`Collective` over the default process group when this process is one of
    several, else ``None`` (the single-process path, at no cost)."""
    if not _available():
        return None
    import torch.distributed as dist

    if dist.get_world_size() <= 1:
        return None
    return Collective()


class PeerFailed(Exception):  # noqa: N818 (a report, not an error of this process)
    """Another process of the job failed; this one stops with it."""


__all__ = ["Collective", "PeerFailed", "World", "all_gather_object", "all_reduce_sum",
           "broadcast_object", "collective", "init", "is_main", "launched", "local_device",
           "shard", "shutdown", "timeout", "world"]
