"""Where and in what precision a job runs, and the versions it ran with."""

from __future__ import annotations

import platform

import torch

from hessdiag._errors import InputError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(name: str) -> torch.device:
    """``auto`` is the first CUDA device, else Apple's MPS, else the CPU; any other name is
    checked against what this machine has. In a job of several processes on GPUs
    (``torchrun``), ``auto`` and ``cuda`` are ``cuda:LOCAL_RANK``, one GPU per process."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        from hessdiag.distributed import local_device

        local = local_device()
        if local is not None:
            return local
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {name!r} is not a device ({DEVICES})", param="device") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name}: CUDA is not available on this machine; use cpu or "
                         "auto", param="device")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise InputError(f"device {name}: there are {torch.cuda.device_count()} CUDA devices",
                         param="device")
    if device.type == "mps" and not _mps_available():
        raise InputError("device mps: MPS is not available on this machine", param="device")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InputError(f"dtype must be float32 or float64; got {name!r}", param="dtype")
    return DTYPES[name]


def versions() -> dict[str, str]:
    """hessdiag's, torch's and Python's versions (recorded with every result)."""
    from hessdiag._version import __version__

    return {"hessdiag": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


def _proc_status(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` in bytes (Linux), or ``None``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set size to the current one (Linux 4.0+:
    writing 5 to ``/proc/self/clear_refs``); whether it could."""
    if _proc_status("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """The peak memory of a block of work, in bytes (a context manager; read ``peak``,
    ``growth`` and ``kind`` after it).

    On a CUDA device (``kind="cuda-max-allocated"``): ``torch.cuda.max_memory_allocated``
    of that device, its counter reset when the block starts, so ``peak`` is the most the
    caching allocator had allocated to tensors during the block (tensors allocated before
    it included; the allocator's cached but free memory is not). Elsewhere
    on Linux (``kind="block-peak-rss"``): the process's peak resident set size during the
    block (``VmHWM``, reset to the current RSS when the block starts), so it includes what
    the process held at the start (the interpreter, torch, the model, the data) but not
    earlier, higher peaks; ``growth`` is that peak above the RSS at the start. Where the
    peak cannot be reset (``kind="process-peak-rss"``): the high-water mark
    ``getrusage(RUSAGE_SELF).ru_maxrss`` when the block ends, a peak of the whole process
    since it started, and ``growth`` how far the block raised it (``0``: the block stayed
    below an earlier peak). ``None`` where neither can be read."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.kind = ("cuda-max-allocated" if self.device.type == "cuda"
                     else "process-peak-rss")
        self.peak: int | None = None
        self.growth: int | None = None
        self._start: int | None = None

    def _read(self) -> int | None:
        if self.kind == "cuda-max-allocated":
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.kind == "block-peak-rss":
            return _proc_status("VmHWM")
        try:
            import resource
        except ImportError:  # not on this platform (Windows)
            return None
        rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return rss if platform.system() == "Darwin" else rss * 1024  # KiB on Linux

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda-max-allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = int(torch.cuda.memory_allocated(self.device))
        elif _reset_peak_rss():
            # Linux: the process's peak RSS (VmHWM) reset to its current RSS, so the peak
            # read at the end is the block's own, memory held at its start included
            self.kind = "block-peak-rss"
            self._start = _proc_status("VmRSS")
        else:
            self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = self._read()
        if self.peak is not None and self._start is not None:
            self.growth = max(0, self.peak - self._start)
