"""Checkpoints: hessdiag's own format, plain ``state_dict`` files, and (only when asked)
pickled modules.

hessdiag's format is a ``torch.save`` of plain data: the model spec and its keyword
arguments, the ``state_dict``, optionally the optimizer state, step, epoch, run id, data
spec and the hessdiag version. It loads with ``torch.load(weights_only=True)``, which
refuses to run code, so a hostile file cannot execute anything. A plain ``state_dict``
(also wrapped as ``{"state_dict": ...}``, ``{"model": ...}`` or
``{"model_state_dict": ...}``, with DDP's ``module.`` prefixes) loads too when the
architecture is named. Files holding pickled Python objects (a whole ``nn.Module``)
load only with ``unsafe=True``: unpickling them runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hessdiag._errors import InputError, first_line
from hessdiag._files import replacing
from hessdiag._version import __version__

FORMAT = "hessdiag-checkpoint"
FORMAT_VERSION = 1
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


class CheckpointError(InputError):
    """A checkpoint cannot be loaded: missing, corrupted, unsafe, or not matching the model."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint file says about itself."""

    path: str
    sha256: str
    format: str  # "hessdiag", "state_dict" or "pickled-module"
    model_spec: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    loss: str | None = None
    output: str | None = None
    step: int | None = None
    epoch: int | None = None
    run_id: str | None = None
    hessdiag_version: str | None = None


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: nn.Module
    info: CheckpointInfo
    optimizer_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    model_spec: str,
    model_kwargs: dict[str, Any] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    step: int | None = None,
    epoch: int | None = None,
    run_id: str | None = None,
    data: dict[str, Any] | None = None,
    loss: str | None = None,
    output: str | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write a checkpoint in hessdiag's format, atomically; returns its sha256.

    The task is recorded with it (the model spec with every keyword argument it was built
    with, the data spec and the loss spec, and which of the model's outputs the loss takes
    when it is not the default, see :mod:`hessdiag.outputs`), so that the checkpoint alone
    says what to measure it on."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hessdiag_version": __version__,
        "model": {"spec": model_spec, "kwargs": dict(model_kwargs or {})},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer_state,
        "step": step,
        "epoch": epoch,
        "run_id": run_id,
        "data": data,
        "loss": loss,
        **({"output": output} if output is not None else {}),
        "extra": dict(extra or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        # through a Python file object, so that a full disk is an OSError (ENOSPC), not a
        # RuntimeError of torch's own writer
        torch.save(payload, fh)
    return sha256_of(path)


def read_checkpoint(path: str | os.PathLike, *, unsafe: bool = False) -> tuple[Any, str]:
    """``(payload, sha256)`` of a checkpoint file, loaded with ``weights_only=True``.
    With ``unsafe``, a file that safe loading refuses (it holds pickled Python objects) is
    unpickled, which runs the code it names: once per file and process (a second read of
    the same bytes gets the same objects, its tensors as first loaded), after a
    :class:`~hessdiag.specs.TrustedCodeWarning`. Raises :class:`CheckpointError` with a
    clear message."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    sha = sha256_of(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True), sha
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" not in text and "Weights only load failed" not in text:
            raise CheckpointError(f"checkpoint {path} is corrupted ({first_line(exc)})") from exc
        if not unsafe:
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects that safe loading "
                "refuses (running them could execute code); if you trust the file, pass "
                "unsafe=True", param="unsafe"
            ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, ImportError, IndexError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is not a readable PyTorch file (truncated or corrupted?): "
            f"{first_line(exc)}"
        ) from exc
    return _unpickle(path, sha), sha


# what unpickling each file gave, so that its code runs once per process: (payload, the
# tensors of its modules as loaded, restored on every later read)
_UNPICKLED: dict[str, tuple[Any, dict[str, Tensor] | None]] = {}


def _unpickle(path: Path, sha: str) -> Any:
    import warnings

    from hessdiag.specs import TrustedCodeWarning

    if sha in _UNPICKLED:
        payload, state = _UNPICKLED[sha]
        if state is not None:
            payload.load_state_dict(state)
        return payload
    warnings.warn(TrustedCodeWarning(f"checkpoint {path} holds pickled Python objects: "
                                     "unpickling it runs the code they name (trusted with "
                                     "unsafe)"), stacklevel=3)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling arbitrary files can raise anything
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(exc).__name__}: "
                              f"{first_line(exc)}") from exc
    state = None
    if isinstance(payload, nn.Module):
        state = {k: v.detach().clone() for k, v in payload.state_dict().items()}
    _UNPICKLED[sha] = (payload, state)
    return payload


@dataclass(frozen=True)
class OpenedCheckpoint:
    """A checkpoint file read and checked, before its model is built."""

    info: CheckpointInfo
    state: dict[str, Tensor] | None
    module: nn.Module | None = None  # a whole pickled model (unsafe loading only)
    optimizer_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def build_model(self, facts: dict[str, Any] | None = None) -> nn.Module:
        """The model with the checkpoint's weights (on the CPU, as saved). ``facts`` about
        the data (``num_classes``, ``in_shape``, ...) complete what the checkpoint does not
        record (a plain ``state_dict``'s architecture is built from them)."""
        from hessdiag.models import build_model

        if self.module is not None:
            return self.module
        model = build_model(self.info.model_spec, facts=facts, **self.info.model_kwargs)
        _load_state(model, _strip_prefix(self.state), self.info.path, self.info.model_spec)
        return model


def open_checkpoint(
    path: str | os.PathLike,
    *,
    model_spec: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    unsafe: bool = False,
    allow_nonfinite: bool = False,
) -> OpenedCheckpoint:
    """Read a checkpoint and what it records, without building its model yet.

    ``model_spec`` (and ``model_kwargs``) name the architecture for plain ``state_dict``
    files and override the one recorded in hessdiag checkpoints (naming the recorded
    architecture keeps its recorded arguments; ``model_kwargs`` update them). A recorded
    factory spec is imported only when ``model_spec`` names it or with ``unsafe`` (see
    :mod:`hessdiag.specs`). Weights that are not finite are refused (naming the tensor)
    unless ``allow_nonfinite``.
    """
    payload, sha = read_checkpoint(path, unsafe=unsafe)
    path_s = str(path)
    if isinstance(payload, nn.Module):
        if model_spec is not None:
            raise CheckpointError(f"checkpoint {path} holds a whole pickled model; do not "
                                  "pass model_spec with it")
        info = CheckpointInfo(path=path_s, sha256=sha, format="pickled-module",
                              model_spec=f"pickled:{type(payload).__name__}")
        return OpenedCheckpoint(info=info, state=None, module=payload.float().cpu())
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a "
                              "state_dict or a hessdiag checkpoint")

    if payload.get("format") == FORMAT:
        version = payload.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format version {version}, newer "
                                  f"than this hessdiag reads ({FORMAT_VERSION}): upgrade")
        recorded = payload.get("model") or {}
        if not isinstance(recorded, dict):
            raise CheckpointError(f"checkpoint {path} is corrupted: its model record is a "
                                  f"{type(recorded).__name__}, not a mapping")
        spec = model_spec or _recorded(recorded.get("spec"), "model", path, "model_spec",
                                       unsafe)
        # the recorded arguments hold unless another architecture is named
        same = model_spec is None or model_spec == recorded.get("spec")
        kwargs = recorded.get("kwargs") or {}
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise CheckpointError(f"checkpoint {path} is corrupted: its model arguments are "
                                  "not a mapping of names")
        kwargs = dict(kwargs) if same else {}
        kwargs.update(model_kwargs or {})
        state = payload.get("state_dict")
        info = CheckpointInfo(
            path=path_s, sha256=sha, format="hessdiag", model_spec=spec, model_kwargs=kwargs,
            data=_mapping(payload.get("data"), "data", path),
            loss=_string(payload.get("loss"), "loss", path),
            output=_string(payload.get("output"), "output", path), step=payload.get("step"),
            epoch=payload.get("epoch"), run_id=payload.get("run_id"),
            hessdiag_version=payload.get("hessdiag_version"),
        )
        optimizer_state = payload.get("optimizer")
        extra = dict(payload.get("extra") or {})
    else:
        state = _find_state_dict(payload)
        if state is None:
            raise CheckpointError(
                f"checkpoint {path} is a dict without tensors or a state_dict entry "
                f"(keys: {', '.join(map(str, list(payload)[:6]))})"
            )
        if model_spec is None:
            raise CheckpointError(f"checkpoint {path} is a plain state_dict: name its "
                                  "architecture with model_spec (see `hessdiag models`)",
                                  param="model_spec")
        info = CheckpointInfo(path=path_s, sha256=sha, format="state_dict",
                              model_spec=model_spec, model_kwargs=dict(model_kwargs or {}))
        optimizer_state, extra = None, {}

    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path}: its state_dict is not a mapping of tensors")
    if info.model_spec is None:
        raise CheckpointError(f"checkpoint {path} does not record its model: pass model_spec",
                              param="model_spec")
    if not allow_nonfinite:
        _require_finite(state, path)
    return OpenedCheckpoint(info=info, state=state, optimizer_state=optimizer_state,
                            extra=extra)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model_spec: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    facts: dict[str, Any] | None = None,
    unsafe: bool = False,
) -> LoadedCheckpoint:
    """Load a checkpoint and build its model (on the CPU, in float32 as saved); see
    :func:`open_checkpoint` and :meth:`OpenedCheckpoint.build_model`."""
    opened = open_checkpoint(path, model_spec=model_spec, model_kwargs=model_kwargs,
                             unsafe=unsafe)
    return LoadedCheckpoint(model=opened.build_model(facts), info=opened.info,
                            optimizer_state=opened.optimizer_state, extra=opened.extra)


def _string(spec: Any, what: str, path: Any) -> str | None:
    if spec is not None and not isinstance(spec, str):
        raise CheckpointError(f"checkpoint {path} is corrupted: its {what} spec is a "
                              f"{type(spec).__name__}, not a string")
    return spec


def _mapping(record: Any, what: str, path: Any) -> dict[str, Any] | None:
    if record is not None and not isinstance(record, dict):
        raise CheckpointError(f"checkpoint {path} is corrupted: its {what} record is a "
                              f"{type(record).__name__}, not a mapping")
    return record


def _recorded(spec: Any, what: str, path: Any, option: str, unsafe: bool) -> str | None:
    """A spec the checkpoint records, through :func:`hessdiag.specs.recorded` (a factory
    spec only with ``unsafe``)."""
    from hessdiag.specs import recorded

    return recorded(_string(spec, what, path), what=f"{what} spec",
                    source=f"checkpoint {path}", option=option, trusted=unsafe)


def _require_finite(state: dict[str, Tensor], path: Any) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise CheckpointError(
                    f"checkpoint {path}: tensor {key} has {bad} non-finite value"
                    f"{'s' if bad != 1 else ''} (NaN or inf) of {tensor.numel()}: the model "
                    "diverged or the file is damaged; pass allow_nonfinite=True to measure "
                    "it anyway", param="allow_nonfinite")


def _find_state_dict(payload: dict) -> dict | None:
    if payload and all(isinstance(v, Tensor) for v in payload.values()):
        return payload
    for key in STATE_DICT_KEYS:
        inner = payload.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, Tensor)
                                                    for v in inner.values()):
            return inner
    return None


def _strip_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_state(model: nn.Module, state: dict[str, Tensor], path, spec: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise CheckpointError(f"checkpoint {path} does not match model {spec}: "
                              f"{'; '.join(parts)} (wrong model_spec or model options?)",
                              param="model_spec")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"checkpoint {path} does not match model {spec}: tensor {key} has shape "
                f"{tuple(tensor.shape)} in the checkpoint but {tuple(own[key].shape)} in the "
                "model (different number of classes or input channels?)"
            )
    model.load_state_dict(state, strict=True)


def _few(keys: list[str], n: int = 3) -> str:
    text = ", ".join(keys[:n])
    return text + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def checkpoint_files(directory: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """``(checkpoints, skipped)`` in a directory: ``*.pt`` files in step order (by the
    number in ``step-NNNNNN.pt``, else by name), and the other files."""
    import re

    directory = Path(directory)
    files = [p for p in sorted(directory.iterdir()) if p.is_file()
             and not p.name.startswith(".")]
    pts = [p for p in files if p.suffix == ".pt"]

    def key(p: Path) -> tuple[int, str]:
        m = re.search(r"step-(\d+)", p.name)
        return (int(m.group(1)) if m else -1, p.name)

    return sorted(pts, key=key), [p for p in files if p.suffix != ".pt"]
