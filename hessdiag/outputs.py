"""Which tensor of a model's outputs a loss is taken of.

Models do not all return one tensor. A Hugging Face model returns a ``ModelOutput`` (a
dict with attributes: ``logits``, ``past_key_values``, ``hidden_states``, often ``loss``);
other models return a dict or a tuple. hessdiag's built-in losses and its Gauss-Newton and
Fisher operators take one tensor from them by one rule:

* a tensor is used as it is;
* a dict (``ModelOutput`` included): its ``logits`` when it has them, else its first
  tensor value (in the dict's order);
* a tuple or list: its first tensor.

``output=KEY`` (``--model-output KEY`` on the command line) chooses instead: a key of a
dict, or the index of a tuple (``--model-output 1``). A loss factory of your own receives
the model's outputs as they are, unless ``--model-output`` is given.

>>> import torch
>>> select_output({"loss": torch.tensor(1.0), "logits": torch.zeros(2, 3)}).shape
torch.Size([2, 3])
>>> select_output((torch.ones(1), torch.zeros(4)), "1").shape
torch.Size([4])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from hessdiag._errors import InputError


def select_output(outputs: Any, key: str | None = None) -> Tensor:
    """The tensor of ``outputs`` a loss is taken of (see the module docstring)."""
    if key is None:
        found = _by_rule(outputs)
        if found is None:
            raise InputError(f"the model returned {describe_outputs(outputs)}, with no tensor "
                             "to take the loss of: return a tensor, or a dict or tuple holding "
                             "one (see --model-output)", param="output")
        return found[1]
    if isinstance(outputs, Mapping):
        if key not in outputs:
            raise InputError(f"--model-output {key}: the model returned "
                             f"{describe_outputs(outputs)}; choose one of its keys",
                             param="output")
        value = outputs[key]
    elif isinstance(outputs, tuple | list):
        if not key.lstrip("-").isdigit() or not -len(outputs) <= int(key) < len(outputs):
            raise InputError(f"--model-output {key}: the model returned "
                             f"{describe_outputs(outputs)}; give an index from 0 to "
                             f"{len(outputs) - 1}", param="output")
        value = outputs[int(key)]
    else:
        raise InputError(f"--model-output {key}: the model returned "
                         f"{describe_outputs(outputs)}, which has no parts to choose from; "
                         "leave --model-output out", param="output")
    if not isinstance(value, Tensor):
        raise InputError(f"--model-output {key}: that part of the model's outputs is a "
                         f"{type(value).__name__}, not a tensor", param="output")
    return value


def _by_rule(outputs: Any) -> tuple[str, Tensor] | None:
    """``(words, tensor)`` of the part the rule takes without a key (``key logits``,
    ``item 0``; ``tensor`` for a tensor), or ``None`` when nothing is a tensor."""
    if isinstance(outputs, Tensor):
        return "tensor", outputs
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits") if "logits" in outputs else None
        if isinstance(logits, Tensor):
            return "key logits", logits
        return next(((f"key {k}", v) for k, v in outputs.items() if isinstance(v, Tensor)),
                    None)
    if isinstance(outputs, tuple | list):
        return next(((f"item {i}", v) for i, v in enumerate(outputs)
                     if isinstance(v, Tensor)), None)
    return None


def chosen_part(outputs: Any, key: str | None = None) -> str | None:
    """Which part of ``outputs`` :func:`select_output` takes, in words (``key logits``,
    ``item 0``); ``None`` for a tensor or when nothing would be taken."""
    if isinstance(outputs, Tensor):
        return None
    if key is not None:
        return f"key {key}" if isinstance(outputs, Mapping) else f"item {key}"
    found = _by_rule(outputs)
    return None if found is None else found[0]


def describe_outputs(outputs: Any) -> str:
    """``outputs`` in a few words, naming a dict's keys (``a CausalLMOutput with keys
    logits, past_key_values``) and a tuple's length."""
    if isinstance(outputs, Tensor):
        return f"a tensor of shape {tuple(outputs.shape)}"
    name = type(outputs).__name__
    if isinstance(outputs, Mapping):
        keys = ", ".join(str(k) for k in outputs) or "none"
        return f"a {name} with keys {keys}"
    if isinstance(outputs, tuple | list):
        return f"a {name} of {len(outputs)}"
    return f"a {name}"


def validate_key(key: str | None) -> str | None:
    """``key`` stripped; ``None`` for nothing; :class:`InputError` for a blank key."""
    if key is None:
        return None
    if not isinstance(key, str) or not key.strip():
        raise InputError(f"--model-output must name a key or an index; got {key!r}", param="output")
    return key.strip()


__all__ = ["chosen_part", "describe_outputs", "select_output", "validate_key"]
