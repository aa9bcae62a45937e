"""Models by name: a registry of hessdiag's own classifiers, torchvision's, and factories.

``build_model(spec, num_classes=..., in_shape=(C, H, W), **kwargs)`` builds a randomly
initialised ``nn.Module`` that maps a batch ``(B, C, H, W)`` to logits ``(B, num_classes)``.
``spec`` is one of

* a hessdiag name (``list_models()`` describes them):

  ``mlp``       flatten, two hidden ReLU layers of ``hidden`` (128) units, linear head.
  ``cnn6``      the six-layer CNN of the Eigen-SAM analysis; ``width`` (32), ``hidden`` (256).
  ``resnet18``, ``resnet50``  CIFAR ResNets (3x3 stride-1 stem, no max-pool).
  ``wrn28-10``  WideResNet-28-10; ``dropout`` (0.0).
  ``wrn``       WideResNet-depth-k; ``depth`` (28), ``widen_factor`` (10), ``dropout`` (0.0).

  These adapt to ``in_shape``: the input channels always, the spatial size where the
  architecture allows (the first linear layer of ``mlp`` and ``cnn6``; global pooling in
  the ResNets).
* any classification model of ``torchvision.models`` that hessdiag does not name itself
  (``vit_b_16``, ``mobilenet_v3_small``, ``convnext_tiny``, ...), built with
  ``weights=None`` and ``num_classes``; keyword arguments go to torchvision's builder
  (``vit_b_16`` takes ``image_size``, e.g. 32). ``in_shape`` is *not* adapted: the model
  expects its native 3-channel input (3x224x224 for most, including the ViTs unless
  ``image_size`` says otherwise). Pretrained weights are never downloaded; load a
  checkpoint instead.
* ``package.module:factory`` or ``path/to/file.py:factory``: ``factory(**kwargs)`` must
  return an ``nn.Module``; it also receives ``num_classes`` and ``in_shape`` when it names
  them as parameters (a bare ``**kwargs`` does not count, so that torchvision-style
  builders are not handed arguments they reject).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from hessdiag.models.resnet import CifarResNet, resnet18, resnet50
from hessdiag.models.simple import CNN6, MLP
from hessdiag.models.wideresnet import WideResNet
from hessdiag.specs import is_factory_spec, load_factory

__all__ = ["CNN6", "MLP", "CifarResNet", "ModelInfo", "WideResNet", "build_model",
           "list_models"]

_NO_WEIGHTS = ("weights", "weights_backbone")


@dataclass(frozen=True)
class ModelInfo:
    """One buildable model name: what it is and where it comes from (``hessdiag`` or
    ``torchvision``)."""

    name: str
    description: str
    source: str


@dataclass(frozen=True)
class _Entry:
    description: str
    build: Callable[..., nn.Module]  # (num_classes, in_shape, **kwargs)
    defaults: dict[str, Any]  # the accepted keyword arguments and their defaults


def _positive_int(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model {name!r}: {key} must be a positive integer; got {value!r}")
    return value


def _dropout(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"model {name!r}: dropout must be a number in [0, 1); got {value!r}")
    return float(value)


def _mlp(num_classes: int, in_shape: tuple[int, int, int], hidden: int) -> nn.Module:
    return MLP(in_shape, num_classes, _positive_int("mlp", "hidden", hidden))


def _cnn6(num_classes: int, in_shape: tuple[int, int, int], width: int,
          hidden: int) -> nn.Module:
    if in_shape[1] < 4 or in_shape[2] < 4:
        raise ValueError(f"model 'cnn6' pools twice by 2 and needs images of at least 4x4; "
                         f"in_shape is {in_shape}")
    return CNN6(in_shape, num_classes, _positive_int("cnn6", "width", width),
                _positive_int("cnn6", "hidden", hidden))


def _wrn(num_classes: int, in_shape: tuple[int, int, int], depth: int, widen_factor: int,
         dropout: float, name: str = "wrn") -> nn.Module:
    depth = _positive_int(name, "depth", depth)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"model {name!r}: depth must be 6n + 4 (10, 16, 22, 28, 34, 40, ...); "
                         f"got {depth}")
    return WideResNet(depth, _positive_int(name, "widen_factor", widen_factor),
                      _dropout(name, dropout), in_shape[0], num_classes)


_REGISTRY: dict[str, _Entry] = {
    "mlp": _Entry("MLP: flatten, Linear(C*H*W, hidden=128), ReLU, Linear(hidden, hidden), "
                  "ReLU, Linear(hidden, classes); 411,146 parameters on 3x32x32",
                  _mlp, {"hidden": 128}),
    "cnn6": _Entry("6-layer CNN of the Eigen-SAM analysis: 4 conv (32, 32, 64, 64; "
                   "width=32) + 2 linear (hidden=256); 1,116,970 parameters on 3x32x32",
                   _cnn6, {"width": 32, "hidden": 256}),
    "resnet18": _Entry("ResNet-18, CIFAR variant (3x3 stem, no max-pool); 11,173,962 "
                       "parameters", lambda nc, shape: resnet18(shape[0], nc), {}),
    "resnet50": _Entry("ResNet-50, CIFAR variant (3x3 stem, no max-pool); 23,520,842 "
                       "parameters", lambda nc, shape: resnet50(shape[0], nc), {}),
    "wrn28-10": _Entry("WideResNet-28-10 (Zagoruyko & Komodakis); dropout=0.0; 36,479,194 "
                       "parameters",
                       lambda nc, shape, dropout: _wrn(nc, shape, 28, 10, dropout, "wrn28-10"),
                       {"dropout": 0.0}),
    "wrn": _Entry("WideResNet-depth-k: depth=28 (6n+4), widen_factor=10, dropout=0.0",
                  _wrn, {"depth": 28, "widen_factor": 10, "dropout": 0.0}),
}
# parameter counts above are for 10 classes


def _torchvision_names() -> list[str]:
    import torchvision  # deferred: importing it takes seconds and most runs never need it

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[ModelInfo]:
    """hessdiag's models, then torchvision's classification models (those hessdiag does not
    shadow with a name of its own)."""
    ours = [ModelInfo(name, entry.description, "hessdiag") for name, entry in _REGISTRY.items()]
    theirs = [
        ModelInfo(name, f"torchvision.models.{name} with weights=None; expects its native "
                  "3-channel input size (in_shape is not adapted)", "torchvision")
        for name in _torchvision_names() if name not in _REGISTRY
    ]
    return ours + theirs


def _check_in_shape(in_shape: Any) -> tuple[int, int, int]:
    shape = tuple(in_shape) if isinstance(in_shape, tuple | list) else None
    if (shape is None or len(shape) != 3
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise ValueError(f"in_shape must be three positive integers (channels, height, width); "
                         f"got {in_shape!r}")
    return shape  # type: ignore[return-value]


def _build_registered(name: str, num_classes: int, in_shape: tuple[int, int, int],
                      kwargs: dict[str, Any]) -> nn.Module:
    entry = _REGISTRY[name]
    unknown = sorted(set(kwargs) - set(entry.defaults))
    if unknown:
        accepted = ", ".join(entry.defaults) or "no keyword arguments"
        raise ValueError(f"model {name!r} takes no argument {unknown[0]!r}; it accepts: "
                         f"{accepted}")
    return entry.build(num_classes, in_shape, **{**entry.defaults, **kwargs})


def _build_torchvision(name: str, num_classes: int, in_shape: tuple[int, int, int],
                       kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    given = [k for k in _NO_WEIGHTS if k in kwargs]
    if given:
        raise ValueError(f"model {name!r}: hessdiag builds torchvision models with "
                         f"{given[0]}=None and never downloads weights; load a checkpoint "
                         "instead")
    if in_shape[0] != 3:
        raise ValueError(f"model {name!r} (torchvision) takes 3-channel images but in_shape "
                         f"is {in_shape}; use a hessdiag model (e.g. cnn6, resnet18) for "
                         f"{in_shape[0]}-channel data")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                            **kwargs)
    except TypeError as exc:
        # an unknown keyword argument surfaces as a TypeError from the model's constructor
        raise ValueError(f"model {name!r} (torchvision): bad keyword arguments "
                         f"{sorted(kwargs)}: {exc}") from exc


def _build_factory(spec: str, num_classes: int, in_shape: tuple[int, int, int],
                   kwargs: dict[str, Any]) -> nn.Module:
    factory = load_factory(spec, "model")
    call = dict(kwargs)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: call it as given
        signature = None
    if signature is not None:
        named = {n for n, p in signature.parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if "num_classes" in named:
            call["num_classes"] = num_classes
        if "in_shape" in named:
            call["in_shape"] = in_shape
        try:
            signature.bind(**call)
        except TypeError as exc:
            raise ValueError(f"model spec {spec!r}: cannot call the factory with "
                             f"{sorted(call)}: {exc}") from exc
    model = factory(**call)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model spec {spec!r}: the factory returned a "
                         f"{type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(spec: str, *, num_classes: int = 10,
                in_shape: tuple[int, int, int] = (3, 32, 32), **kwargs: Any) -> nn.Module:
    """A randomly initialised classifier named by ``spec`` (see the module docstring) for
    ``num_classes`` classes and inputs of shape ``in_shape`` = (C, H, W)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer; got {num_classes!r}")
    in_shape = _check_in_shape(in_shape)
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string; got {spec!r}")
    spec = spec.strip()
    if is_factory_spec(spec) or ":" in spec:
        return _build_factory(spec, num_classes, in_shape, kwargs)
    name = spec.lower()
    if name in _REGISTRY:
        return _build_registered(name, num_classes, in_shape, kwargs)
    if name in _torchvision_names():
        return _build_torchvision(name, num_classes, in_shape, kwargs)
    raise ValueError(f"unknown model {spec!r}; known: {', '.join(_REGISTRY)} and torchvision's "
                     "(hessdiag models); or give package.module:factory or "
                     "path/to/file.py:factory")
