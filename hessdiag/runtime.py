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
