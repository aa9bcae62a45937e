"""Moving the tensors of a batch of any structure, shared by the curvature operator and
the data layer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def to_device(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """``obj``'s tensors on ``device`` (floating-point ones cast to ``dtype`` if given),
    through tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(v, device, dtype) for v in obj)
    return obj
