"""Models by name: hessdiag's own models, torchvision's, and factories.

``build_model(spec, facts={...}, **kwargs)`` builds a randomly initialised ``nn.Module``
for data described by ``facts`` (``num_classes``, ``num_outputs``, ``in_shape``,
``num_features``, ``seq_len``, ``vocab_size``: what :func:`hessdiag.data.load_dataset`
reads from the data). ``spec`` is one of

* a hessdiag name (``list_models()`` describes them):

  ``mlp``       flatten, two hidden layers of ``hidden`` (128) units with ``activation``
                (relu), linear head of ``num_outputs`` (classes or regression outputs);
                any input shape.
  ``cnn6``      the six-layer CNN of the Eigen-SAM analysis; ``width`` (32), ``hidden`` (256).
  ``resnet18``, ``resnet50``  CIFAR ResNets (3x3 stride-1 stem, no max-pool).
  ``wrn28-10``  WideResNet-28-10; ``dropout`` (0.0).
  ``wrn``       WideResNet-depth-k; ``depth`` (28), ``widen_factor`` (10), ``dropout`` (0.0).
  ``transformer``  sequence classifier of ``(T, F)`` inputs (``ecg``).
  ``gcn``       graph classifier of ``{x, adj, graph_index}`` batches (``molecules``).
  ``tiny-lm``   causal transformer language model of token ids (``text``).

  The image models adapt to ``in_shape``: the input channels always, the spatial size
  where the architecture allows (the first linear layer of ``cnn6``; global pooling in
  the ResNets); without facts they build for 10 classes of 3x32x32.
* any classification model of ``torchvision.models`` that hessdiag does not name itself
  (``vit_b_16``, ``mobilenet_v3_small``, ``convnext_tiny``, ...), built with
  ``weights=None`` and ``num_classes``; keyword arguments go to torchvision's builder
  (``vit_b_16`` takes ``image_size``, e.g. 32). ``in_shape`` is *not* adapted: the model
  expects its native 3-channel input (3x224x224 for most, including the ViTs unless
  ``image_size`` says otherwise). Pretrained weights are never downloaded; load a
  checkpoint instead.
* ``package.module:factory`` or ``path/to/file.py:factory``: ``factory(**kwargs)`` must
  return an ``nn.Module``; it also receives each fact it names as a parameter (a bare
  ``**kwargs`` does not count, so that torchvision-style builders are not handed
  arguments they reject).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from hessdiag._errors import InputError
from hessdiag.models.resnet import CifarResNet, resnet18, resnet50
from hessdiag.models.simple import CNN6, MLP
from hessdiag.models.wideresnet import WideResNet
from hessdiag.specs import call_factory, is_factory_spec, load_factory

# the facts a model may take from its data (hessdiag.data.FACTS; not imported from there,
# so that building a model does not import the data registry)
FACTS = ("num_classes", "num_outputs", "in_shape", "num_features", "seq_len", "vocab_size")
DEFAULT_NUM_CLASSES = 10
DEFAULT_IN_SHAPE = (3, 32, 32)

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
    build: Callable[..., nn.Module]  # (facts, **kwargs)
    defaults: dict[str, Any]  # the accepted keyword arguments and their defaults


def _positive_int(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"model {name!r}: {key} must be a positive integer; got {value!r}",
                         param="model")
    return value


def _dropout(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise InputError(f"model {name!r}: dropout must be a number in [0, 1); got {value!r}",
                         param="model")
    return float(value)


def _need(name: str, facts: dict[str, Any], *keys: str) -> list[Any]:
    """The facts a model needs from its data, or a clear error naming the missing ones."""
    missing = [k for k in keys if facts.get(k) is None]
    if missing:
        raise InputError(f"model {name!r} needs {' and '.join(missing)} from the data, which "
                         f"does not say {'it' if len(missing) == 1 else 'them'} (give "
                         f"{', '.join(missing)} in the data set's meta, or as model keyword "
                         "arguments)", param="model")
    return [facts[k] for k in keys]


def _image_shape(name: str, facts: dict[str, Any]) -> tuple[int, int, int]:
    shape = facts.get("in_shape") or DEFAULT_IN_SHAPE
    if len(shape) != 3:
        raise InputError(f"model {name!r} takes images (channels, height, width); the data's "
                         f"inputs have shape {tuple(shape)} (use mlp, transformer, gcn, tiny-lm "
                         "or a factory for other inputs)", param="model")
    return _check_in_shape(shape)


def _outputs(facts: dict[str, Any]) -> int:
    return facts.get("num_outputs") or facts.get("num_classes") or DEFAULT_NUM_CLASSES


def _classes(facts: dict[str, Any]) -> int:
    return facts.get("num_classes") or DEFAULT_NUM_CLASSES


def _mlp(facts: dict[str, Any], hidden: int, activation: str) -> nn.Module:
    shape = facts.get("in_shape") or DEFAULT_IN_SHAPE
    if activation not in MLP.ACTIVATIONS:
        raise InputError(f"model 'mlp': activation must be one of {', '.join(MLP.ACTIVATIONS)}; "
                         f"got {activation!r}", param="model")
    return MLP(tuple(shape), _outputs(facts), _positive_int("mlp", "hidden", hidden),
               activation=activation)


def _cnn6(facts: dict[str, Any], width: int, hidden: int) -> nn.Module:
    in_shape = _image_shape("cnn6", facts)
    if in_shape[1] < 4 or in_shape[2] < 4:
        raise InputError(f"model 'cnn6' pools twice by 2 and needs images of at least 4x4; "
                         f"in_shape is {in_shape}", param="model")
    return CNN6(in_shape, _classes(facts), _positive_int("cnn6", "width", width),
                _positive_int("cnn6", "hidden", hidden))


def _wrn(facts: dict[str, Any], depth: int, widen_factor: int, dropout: float,
         name: str = "wrn") -> nn.Module:
    depth = _positive_int(name, "depth", depth)
    if depth < 10 or (depth - 4) % 6:
        raise InputError(f"model {name!r}: depth must be 6n + 4 (10, 16, 22, 28, 34, 40, ...); "
                         f"got {depth}", param="model")
    return WideResNet(depth, _positive_int(name, "widen_factor", widen_factor),
                      _dropout(name, dropout), _image_shape(name, facts)[0], _classes(facts))


def _transformer(facts: dict[str, Any], **kwargs: Any) -> nn.Module:
    from hessdiag.models.families import SequenceTransformer

    classes, seq_len, features = _need("transformer", facts, "num_classes", "seq_len",
                                       "num_features")
    return SequenceTransformer(classes, seq_len, features, **kwargs)


def _gcn(facts: dict[str, Any], **kwargs: Any) -> nn.Module:
    from hessdiag.models.families import GCN

    features, classes = _need("gcn", facts, "num_features", "num_classes")
    return GCN(features, classes, **kwargs)


def _tiny_lm(facts: dict[str, Any], **kwargs: Any) -> nn.Module:
    from hessdiag.models.families import TinyLM

    if facts.get("vocab_size") is None and facts.get("num_classes") is not None:
        facts = {**facts, "vocab_size": facts["num_classes"]}
    vocab, seq_len = _need("tiny-lm", facts, "vocab_size", "seq_len")
    return TinyLM(vocab, seq_len, **kwargs)


_REGISTRY: dict[str, _Entry] = {
    "mlp": _Entry("MLP: flatten, Linear(inputs, hidden=128), activation (relu, tanh or gelu), "
                  "Linear(hidden, hidden), activation, Linear(hidden, outputs); any input "
                  "shape; classes or regression outputs; 411,146 parameters on 3x32x32",
                  _mlp, {"hidden": 128, "activation": "relu"}),
    "cnn6": _Entry("6-layer CNN of the Eigen-SAM analysis: 4 conv (32, 32, 64, 64; "
                   "width=32) + 2 linear (hidden=256); 1,116,970 parameters on 3x32x32",
                   _cnn6, {"width": 32, "hidden": 256}),
    "resnet18": _Entry("ResNet-18, CIFAR variant (3x3 stem, no max-pool); 11,173,962 "
                       "parameters",
                       lambda f: resnet18(_image_shape("resnet18", f)[0], _classes(f)), {}),
    "resnet50": _Entry("ResNet-50, CIFAR variant (3x3 stem, no max-pool); 23,520,842 "
                       "parameters",
                       lambda f: resnet50(_image_shape("resnet50", f)[0], _classes(f)), {}),
    "wrn28-10": _Entry("WideResNet-28-10 (Zagoruyko & Komodakis); dropout=0.0; 36,479,194 "
                       "parameters",
                       lambda f, dropout: _wrn(f, 28, 10, dropout, "wrn28-10"),
                       {"dropout": 0.0}),
    "wrn": _Entry("WideResNet-depth-k: depth=28 (6n+4), widen_factor=10, dropout=0.0",
                  _wrn, {"depth": 28, "widen_factor": 10, "dropout": 0.0}),
    "transformer": _Entry("sequence classifier: linear embedding of (T, F) inputs, learned "
                          "positions, TransformerEncoder (d_model=32, heads=4, layers=2), mean "
                          "pooling, linear head; for ecg and any (T, F) data",
                          _transformer, {"d_model": 32, "heads": 4, "layers": 2,
                                         "dim_feedforward": 64, "dropout": 0.0}),
    "gcn": _Entry("graph classifier: Kipf-Welling GCN layers (hidden=32, layers=2) on a "
                  "normalised adjacency, mean pooling per graph, linear head; for molecules "
                  "and any {x, adj, graph_index} batches",
                  _gcn, {"hidden": 32, "layers": 2}),
    "tiny-lm": _Entry("causal transformer language model: token and position embeddings, "
                      "TransformerEncoder with a causal mask (d_model=32, heads=2, layers=2), "
                      "logits per token; for text and any token-id data",
                      _tiny_lm, {"d_model": 32, "heads": 2, "layers": 2,
                                 "dim_feedforward": 64, "dropout": 0.0}),
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
        raise InputError(f"in_shape must be three positive integers (channels, height, width); "
                         f"got {in_shape!r}", param="model")
    return shape  # type: ignore[return-value]


def _check_facts(facts: dict[str, Any]) -> dict[str, Any]:
    for key in ("num_classes", "num_outputs", "num_features", "seq_len", "vocab_size"):
        value = facts.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InputError(f"{key} must be a positive integer; got {value!r}", param="model")
    shape = facts.get("in_shape")
    if shape is not None:
        if (not isinstance(shape, tuple | list) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                           for d in shape)):
            raise InputError(f"in_shape must be positive integers; got {shape!r}", param="model")
        facts["in_shape"] = tuple(shape)
    return facts


def _build_registered(name: str, facts: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    entry = _REGISTRY[name]
    unknown = sorted(set(kwargs) - set(entry.defaults))
    if unknown:
        accepted = ", ".join(entry.defaults) or "no keyword arguments"
        raise InputError(f"model {name!r} takes no argument {unknown[0]!r}; it accepts: "
                         f"{accepted}", param="model")
    return entry.build(facts, **{**entry.defaults, **kwargs})


def _build_torchvision(name: str, facts: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    given = [k for k in _NO_WEIGHTS if k in kwargs]
    if given:
        raise InputError(f"model {name!r}: hessdiag builds torchvision models with "
                         f"{given[0]}=None and never downloads weights; load a checkpoint "
                         "instead", param="model")
    in_shape = _image_shape(name, facts)
    if in_shape[0] != 3:
        raise InputError(f"model {name!r} (torchvision) takes 3-channel images but in_shape "
                         f"is {in_shape}; use a hessdiag model (e.g. cnn6, resnet18) for "
                         f"{in_shape[0]}-channel data", param="model")
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=_classes(facts),
                                            **kwargs)
    except TypeError as exc:
        # an unknown keyword argument surfaces as a TypeError from the model's constructor
        raise InputError(f"model {name!r} (torchvision): bad keyword arguments "
                         f"{sorted(kwargs)}: {exc}", param="model") from exc


def _build_factory(spec: str, facts: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    factory = load_factory(spec, "model")
    call = dict(kwargs)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have no signature: call it as given
        signature = None
    if signature is not None:
        named = {n for n, p in signature.parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        for key, value in facts.items():
            if key in named and key not in call:
                call[key] = value
        try:
            signature.bind(**call)
        except TypeError as exc:
            raise InputError(f"model spec {spec!r}: cannot call the factory with "
                             f"{sorted(call)}: {exc}", param="model") from exc
    model = call_factory(factory, spec, "model", **call)
    if not isinstance(model, nn.Module):
        raise InputError(f"model spec {spec!r}: the factory returned a "
                         f"{type(model).__name__}, not a torch.nn.Module", param="model")
    return model


def build_model(spec: str, *, facts: dict[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """A randomly initialised model named by ``spec`` (see the module docstring).

    ``facts`` describe the data (:data:`hessdiag.data.FACTS`: ``num_classes``,
    ``num_outputs``, ``in_shape``, ``num_features``, ``seq_len``, ``vocab_size``); they may
    also be given as keyword arguments. Registry models take the ones they need (image
    models default to 10 classes of 3x32x32); a factory gets those it names as
    parameters. Every other keyword argument goes to the model as it is.
    """
    facts = dict(facts or {})
    for key in FACTS:
        if key in kwargs:
            facts[key] = kwargs.pop(key)
    facts = _check_facts(facts)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"model spec must be a non-empty string; got {spec!r}", param="model")
    spec = spec.strip()
    if is_factory_spec(spec) or ":" in spec:
        return _build_factory(spec, facts, kwargs)
    name = spec.lower()
    if name in _REGISTRY:
        return _build_registered(name, facts, kwargs)
    if name in _torchvision_names():
        return _build_torchvision(name, facts, kwargs)
    raise InputError(f"unknown model {spec!r}; known: {', '.join(_REGISTRY)} and torchvision's "
                     "(hessdiag models); or give package.module:factory or "
                     "path/to/file.py:factory", param="model")
