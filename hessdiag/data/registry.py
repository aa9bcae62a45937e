"""Data by name: image data sets, generated example tasks, folders and factories.

``load_dataset(spec, split="train", root=..., download=False, samples=None)`` returns a
:class:`DataInfo`: the samples ``(inputs, target)`` (or ready batches) and the facts a
model needs to know about them (:data:`FACTS`). ``spec`` is one of the image data sets

=================  ========  =====  ==========================  ==========================
name               in_shape  cls.   mean                        std
=================  ========  =====  ==========================  ==========================
``digits``         1x8x8     10     0.30539                     0.37551
``mnist``          1x28x28   10     0.1307                      0.3081
``fashion-mnist``  1x28x28   10     0.2860                      0.3530
``cifar10``        3x32x32   10     (0.4914, 0.4822, 0.4465)    (0.2470, 0.2435, 0.2616)
``cifar100``       3x32x32   100    (0.5071, 0.4865, 0.4409)    (0.2673, 0.2564, 0.2762)
``svhn``           3x32x32   10     (0.4377, 0.4438, 0.4728)    (0.1980, 0.2010, 0.1970)
=================  ========  =====  ==========================  ==========================

Every image is scaled to [0, 1] (``ToTensor``: pixel / 255; digits: pixel / 16) and then
normalised per channel, ``(x - mean) / std``, with the data set's training-split statistics
above (``DataInfo.normalization``). There is no augmentation anywhere: the same index gives
the same tensor every time, so a Hessian of the loss over the data is a fixed matrix.

``digits`` ships with hessdiag. The torchvision data sets are read from ``root`` in
torchvision's own layout, and fetched only with ``download=True``:

* ``mnist``, ``fashion-mnist``: ``root/MNIST/raw/`` and ``root/FashionMNIST/raw/`` holding
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``;
* ``cifar10``: ``root/cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
  ``test_batch``, ``batches.meta``); ``cifar100``: ``root/cifar-100-python/`` (``train``,
  ``test``, ``meta``); torchvision checks their md5 sums;
* ``svhn``: ``root/train_32x32.mat``, ``root/test_32x32.mat`` (label 10 is the digit 0
  and becomes 0).

With ``download=True`` and no ``root`` they go to ``$XDG_CACHE_HOME/hessdiag/data``
(``~/.cache/hessdiag/data``).

``imagefolder:PATH`` reads torchvision's ``ImageFolder`` layout, one sub-folder of images
per class, from ``PATH/<split>`` if that exists, else from ``PATH`` (then both splits are
the same images). Images are read as RGB and only converted to tensors in [0, 1]: no
resizing (all images must have the size of the first, which gives ``in_shape``) and no
normalisation (``normalization`` is ``None``).

``ecg``, ``molecules``, ``text`` and ``tabular`` are generated example tasks (a time
series classifier's, a graph classifier's, a language model's and a regression's; see
:mod:`hessdiag.data.synthetic`); they ship with hessdiag and name their default loss.

``package.module:factory`` or ``path/to/file.py:factory`` names a function that receives
``split``, ``root`` and ``download`` when it names them as parameters, and returns

* a map-style ``Dataset`` whose samples are ``(inputs, target)``: ``inputs`` a tensor of
  any shape, a tuple of tensors (passed to the model as positional arguments) or a dict of
  tensors (keyword arguments, e.g. token ids and an attention mask); ``target`` a class
  index, a float tensor (regression) or a tensor of token ids. Samples are batched by the
  data set's ``collate_fn`` attribute if it has one, else by PyTorch's default collate
  (which needs samples of equal shapes);
* a pair ``(dataset, collate_fn)``, e.g. to batch graphs of different sizes into one
  block-diagonal graph;
* or a ready list of batches ``(inputs, targets)`` (``targets`` a tensor whose first
  dimension counts the batch's samples).

A data set may carry a ``meta`` dict: its entries among :data:`FACTS` (``num_classes``,
``num_outputs``, ``in_shape``, ``num_features``, ``seq_len``, ``vocab_size``) override
what is read from the samples, ``loss`` names its default loss and ``description`` says
what it is. Read from the samples: ``in_shape`` of a tensor input; ``num_features`` and
``seq_len`` of a vector ``(F,)`` or sequence ``(T, F)`` input (``seq_len`` of token ids
``(T,)``; for several inputs, ``num_features`` is the last dimension of the first
floating-point one); ``num_outputs`` of a float target (its size); ``num_classes`` of an integer
target: ``len(dataset.classes)``, else ``max(label) + 1`` over ``dataset.targets``, else
over the first 10,000 samples. The first 64 samples must share one structure (and, without
a ``collate_fn``, one shape).

``samples=N`` keeps the first N samples in data set order (no shuffling), or all of them
if there are fewer; for ready batches, whole batches until they hold at least N.
"""

from __future__ import annotations

import inspect
import math
import operator
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from hessdiag._errors import InputError
from hessdiag.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits
from hessdiag.specs import call_factory, is_factory_spec, load_factory

SPLITS = ("train", "test")
LABEL_SCAN = 10_000  # labels read to find num_classes of a factory's data set


FACTS = ("num_classes", "num_outputs", "in_shape", "num_features", "seq_len", "vocab_size")
"""What a model may need to know about its data; a factory gets the ones it names."""
STRUCTURE_SCAN = 64  # samples compared with sample 0 when a data set is loaded


@dataclass(frozen=True)
class DataInfo:
    """Loaded data and its description.

    Either ``dataset`` (map-style, samples ``(inputs, target)``, batched by ``collate_fn``
    or the default collate) or ``batches`` (a ready list of ``(inputs, targets)``) is set.
    ``facts`` holds what a model may need (:data:`FACTS`); ``normalization`` is
    ``{"mean": [...], "std": [...]}`` per channel for images normalised by hessdiag, else
    ``None``; ``samples`` counts the samples after the cap; ``root`` is the folder read,
    if any; ``loss`` the data's default loss, if it names one."""

    dataset: Dataset | None
    name: str
    split: str
    facts: dict[str, Any]
    normalization: dict[str, list[float]] | None
    samples: int
    root: str | None
    collate_fn: Callable[[list], Any] | None = None
    batches: list | None = None
    loss: str | None = None
    description: str | None = None

    @property
    def num_classes(self) -> int | None:
        return self.facts.get("num_classes")

    @property
    def in_shape(self) -> tuple[int, ...] | None:
        shape = self.facts.get("in_shape")
        return None if shape is None else tuple(shape)

    def record(self, batch_size: int | None = None) -> dict[str, Any]:
        """The data as results and checkpoints record it (JSON-ready)."""
        facts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.facts.items()}
        out = {"spec": self.name, "split": self.split, "root": self.root,
               "samples": self.samples, "facts": facts, "normalization": self.normalization}
        if batch_size is not None:
            out["batch_size"] = batch_size
        return out


@dataclass(frozen=True)
class DatasetInfoRow:
    """One data set name of the registry: what it is, whether it needs a data root, and
    its number of classes (``None`` when the data decide)."""

    name: str
    description: str
    needs_root: bool
    classes: int | None


@dataclass(frozen=True)
class _Torchvision:
    title: str
    cls: str  # class name in torchvision.datasets
    num_classes: int
    in_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    holder: str  # what --data-root must hold
    files: str  # the files the holder holds

    def expected(self, root: Path, split: str) -> str:
        if self.cls == "SVHN":
            return str(root / f"{split}_32x32.mat")
        return f"{root / self.holder}/ holding {self.files}"


_MNIST_FILES = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                "and t10k-labels-idx1-ubyte")
_TORCHVISION: dict[str, _Torchvision] = {
    "mnist": _Torchvision("MNIST", "MNIST", 10, (1, 28, 28), (0.1307,), (0.3081,),
                          "MNIST/raw", _MNIST_FILES),
    "fashion-mnist": _Torchvision("Fashion-MNIST", "FashionMNIST", 10, (1, 28, 28),
                                  (0.2860,), (0.3530,), "FashionMNIST/raw", _MNIST_FILES),
    "cifar10": _Torchvision("CIFAR-10", "CIFAR10", 10, (3, 32, 32),
                            (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                            "cifar-10-batches-py",
                            "data_batch_1 .. data_batch_5, test_batch and batches.meta"),
    "cifar100": _Torchvision("CIFAR-100", "CIFAR100", 100, (3, 32, 32),
                             (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                             "cifar-100-python", "train, test and meta"),
    "svhn": _Torchvision("SVHN", "SVHN", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728),
                         (0.1980, 0.2010, 0.1970), "train_32x32.mat and test_32x32.mat",
                         "train_32x32.mat and test_32x32.mat"),
}

# examples of tasks beyond images, generated in hessdiag.data.synthetic (no files)
_SYNTHETIC: dict[str, tuple[str, str]] = {
    "ecg": ("ecg", "synthetic ECG-like signals (T, 1), 5 rhythm classes; cross-entropy"),
    "molecules": ("molecules", "synthetic molecule-like graphs of 6-20 atoms, 2 classes; "
                  "batched as one block-diagonal graph; cross-entropy"),
    "text": ("text", "next-token language modelling on a small generated corpus; "
             "per-token cross-entropy, padded batches"),
    "tabular": ("tabular", "tabular regression, 5 features, 1 target; mse"),
}
_KNOWN = ("digits, " + ", ".join(_TORCHVISION) + ", " + ", ".join(_SYNTHETIC)
          + ", imagefolder:PATH")


def list_datasets() -> list[DatasetInfoRow]:
    """The data set names ``load_dataset`` knows (factory specs aside)."""
    rows = [DatasetInfoRow("digits", "UCI handwritten digits, 1x8x8, 1,437 train / 360 test; "
                           "ships with hessdiag", False, 10)]
    for name, tv in _TORCHVISION.items():
        shape = "x".join(map(str, tv.in_shape))
        rows.append(DatasetInfoRow(name, f"{tv.title}, {shape} (torchvision); --data-root "
                                   f"holds {tv.holder}", True, tv.num_classes))
    for name, (_, text) in _SYNTHETIC.items():
        rows.append(DatasetInfoRow(name, text + "; ships with hessdiag", False, None))
    rows.append(DatasetInfoRow("imagefolder:PATH", "one sub-folder of images per class in "
                               "PATH/<split> or PATH; RGB in [0, 1], not resized or "
                               "normalised", False, None))
    return rows


def default_download_root() -> Path:
    """Where ``download=True`` without a ``root`` puts the torchvision data sets."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "hessdiag" / "data"


def _load_torchvision(name: str, split: str, root: str | Path | None,
                      download: bool) -> tuple[Dataset, Path]:
    import torchvision  # deferred: importing it takes seconds and most runs never need it
    from torchvision import transforms

    tv = _TORCHVISION[name]
    if root is None:
        if not download:
            raise InputError(f"{name} needs root (a folder holding {tv.holder}), or "
                             f"download=True to fetch it into {default_download_root()}",
                             param=("root", "download"))
        root = default_download_root()
    root = Path(root).expanduser()
    transform = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize(tv.mean, tv.std)])
    cls = getattr(torchvision.datasets, tv.cls)
    where = {"split": split} if tv.cls == "SVHN" else {"train": split == "train"}
    try:
        dataset = cls(str(root), transform=transform, download=download, **where)
    except RuntimeError as exc:
        if download:
            raise ValueError(f"{name}: fetching {tv.title} into {root} failed ({exc}); check "
                             f"the network, or put {tv.expected(root, split)} there "
                             "yourself") from exc
        raise InputError(f"{name}: {tv.title} {split} data not found or corrupted in {root} "
                         f"(expected {tv.expected(root, split)}); pass the folder holding "
                         f"{tv.holder} as root, or set download=True to fetch it",
                         param=("root", "download")) from exc
    except OSError as exc:  # network errors (URLError) and unwritable folders
        raise ValueError(f"{name}: fetching {tv.title} into {root} failed "
                         f"({type(exc).__name__}: {exc}); check the network and that {root} "
                         f"is writable, or put {tv.expected(root, split)} there yourself"
                         ) from exc
    return dataset, root


def _load_imagefolder(path_text: str, split: str) -> tuple[Dataset, Path]:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    if not path_text:
        raise ValueError("imagefolder needs a folder: imagefolder:PATH, with one sub-folder "
                         "of images per class in PATH or in PATH/train and PATH/test")
    base = Path(path_text).expanduser()
    if not base.is_dir():
        raise ValueError(f"imagefolder: {base} is not a folder; give imagefolder:PATH with one "
                         "sub-folder of images per class in PATH or in PATH/train and PATH/test")
    folder = base / split
    if not folder.is_dir():
        others = [s for s in SPLITS if (base / s).is_dir()]
        if others:
            # without this, PATH/train would pass for a class folder of the test split
            raise ValueError(f"imagefolder: {base} has {others[0]}/ but no {split}/; add "
                             f"{folder} or use split {others[0]!r}")
        folder = base
    try:
        dataset = ImageFolder(str(folder), transform=transforms.ToTensor())
    except FileNotFoundError as exc:
        raise ValueError(f"imagefolder: no images in {folder} ({exc}); it needs one sub-folder "
                         "per class holding .png, .jpg, ... files") from exc
    return dataset, folder


def _label(value: Any, spec: str, index: int) -> int:
    try:
        # integers, numpy integers and one-element integer tensors; not floats or bools
        label = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        label = None
    if label is None:
        raise InputError(f"data spec {spec!r}: sample {index} has label {value!r} where sample 0 "
                         "has an integer class index; targets must share one structure",
                         param="data")
    return label


def _num_classes(dataset: Dataset, spec: str) -> int:
    classes = getattr(dataset, "classes", None)
    if classes is not None:
        try:
            return len(classes)
        except TypeError:
            pass
    targets = getattr(dataset, "targets", None)
    labels = None
    if targets is not None:
        try:
            labels = [_label(t, spec, i) for i, t in enumerate(targets)]
        except (TypeError, ValueError):  # not labels after all: read the samples
            labels = None
    if not labels:
        labels = [_label(dataset[i][1], spec, i) for i in range(min(len(dataset), LABEL_SCAN))]
    if min(labels) < 0:
        raise InputError(f"data spec {spec!r}: negative label {min(labels)}; class labels must "
                         "be indices 0, 1, ...", param="data")
    return max(labels) + 1


def _call_factory(spec: str, split: str, root: str | Path | None, download: bool) -> Any:
    fn = load_factory(spec, "data")
    offered = {"split": split, "root": root, "download": download}
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to inspect: pass nothing
        signature = None
    call = {}
    if signature is not None:
        named = {p.name for p in signature.parameters.values()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        call = {k: v for k, v in offered.items() if k in named}
        try:
            signature.bind(**call)
        except TypeError as exc:
            raise InputError(f"data spec {spec!r}: cannot call the factory with "
                             f"{sorted(call)} (it may take split, root and download): "
                             f"{exc}", param="data") from exc
    return call_factory(fn, spec, "data", **call)


def _is_batch_list(obj: Any) -> bool:
    """A non-empty list of ``(inputs, targets)`` pairs whose targets are tensors."""
    return (isinstance(obj, list) and len(obj) > 0
            and all(isinstance(b, tuple | list) and len(b) == 2 and isinstance(b[1], torch.Tensor)
                    and b[1].dim() >= 1 for b in obj))


def _unpack_factory(spec: str, made: Any) -> tuple[Dataset | None, Callable | None,
                                                   list | None]:
    """``(dataset, collate_fn, batches)`` from what a data factory returned."""
    if (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], Dataset | list)
            and callable(made[1])):  # the dataset of a pair may be a plain list of samples
        dataset, collate = made
    elif isinstance(made, Dataset) and hasattr(made, "__len__"):
        dataset, collate = made, None
    elif _is_batch_list(made):
        return None, None, made
    else:
        raise InputError(f"data spec {spec!r}: the factory returned a {type(made).__name__}: "
                         "neither a map-style torch.utils.data.Dataset (with __getitem__ and "
                         "__len__), a (dataset, collate_fn) pair, nor a list of (inputs, "
                         "targets) batches", param="data")
    if len(dataset) == 0:
        raise InputError(f"data spec {spec!r}: the factory returned an empty data set",
                         param="data")
    return dataset, collate, None


def load_dataset(spec: str, *, split: str = "train", root: str | Path | None = None,
                 download: bool = False, samples: int | None = None) -> DataInfo:
    """The data named by ``spec`` (see the module docstring), ``split`` ``train`` or
    ``test``, capped at its first ``samples`` samples. Downloads only if ``download``."""
    if split not in SPLITS:
        raise InputError(f"split must be 'train' or 'test'; got {split!r}", param="split")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)):
        raise InputError(f"samples must be a positive integer; got {samples!r}",
                         param="samples")
    if samples is not None and samples <= 0:
        raise InputError(f"samples must be positive; got {samples}", param="samples")
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"data spec must be a non-empty string; got {spec!r}", param="data")
    spec = spec.strip()
    name = spec.lower().replace("_", "-")
    used_root: Path | str | None = None
    normalization = None
    collate = batches = None
    if name.startswith("imagefolder:"):
        dataset, used_root = _load_imagefolder(spec.split(":", 1)[1], split)
        name = spec
        facts = {"num_classes": len(dataset.classes), "in_shape": tuple(dataset[0][0].shape)}
    elif name == "digits":
        dataset = load_digits(split)
        facts = {"num_classes": 10, "in_shape": (1, 8, 8)}
        normalization = {"mean": [DIGITS_MEAN], "std": [DIGITS_STD]}
    elif name in _TORCHVISION:
        tv = _TORCHVISION[name]
        dataset, used_root = _load_torchvision(name, split, root, download)
        facts = {"num_classes": tv.num_classes, "in_shape": tv.in_shape}
        normalization = {"mean": list(tv.mean), "std": list(tv.std)}
    elif name in _SYNTHETIC:
        from hessdiag.data import synthetic

        dataset = getattr(synthetic, _SYNTHETIC[name][0])(split)
        facts = None
    elif is_factory_spec(spec) or ":" in spec:
        dataset, collate, batches = _unpack_factory(
            spec, _call_factory(spec, split, root, download))
        name, used_root, facts = spec, root, None
    else:
        raise InputError(f"unknown data set {spec!r}; known: {_KNOWN}; or give "
                         "package.module:factory or path/to/file.py:factory", param="data")
    meta = dict(getattr(dataset, "meta", None) or {}) if dataset is not None else {}
    if dataset is not None and collate is None:
        collate = getattr(dataset, "collate_fn", None)
    if batches is not None:
        facts = infer_facts(batches[0][0], batches[0][1], spec)
        batches = _cap_batches(batches, samples)
        count = sum(batch_samples(b[1]) for b in batches)
    else:
        if facts is None:
            facts = _dataset_facts(dataset, spec, collate is not None, meta)
        if samples is not None and samples < len(dataset):
            dataset = Subset(dataset, range(samples))
        count = len(dataset)
    facts = {**facts, **{k: v for k, v in meta.items() if k in FACTS}}
    if "num_classes" in facts and "num_outputs" not in facts:
        facts["num_outputs"] = facts["num_classes"]
    if "in_shape" in facts:
        facts["in_shape"] = tuple(facts["in_shape"])
    return DataInfo(dataset=dataset, name=name, split=split, facts=facts,
                    normalization=normalization, samples=count,
                    root=None if used_root is None else str(used_root), collate_fn=collate,
                    batches=batches, loss=meta.get("loss"),
                    description=meta.get("description"))


def batch_samples(targets: Any) -> int:
    """Samples in a batch: the first dimension of its targets."""
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.dim() else 1
    return len(targets)


def _cap_batches(batches: list, samples: int | None) -> list:
    """Whole batches, in order, until they hold at least ``samples`` samples."""
    if samples is None:
        return list(batches)
    kept, total = [], 0
    for batch in batches:
        if total >= samples:
            break
        kept.append(batch)
        total += batch_samples(batch[1])
    return kept


def _structure(obj: Any) -> Any:
    """What must agree between samples for them to be batched together (shapes aside)."""
    if isinstance(obj, torch.Tensor):
        kind = "float" if obj.is_floating_point() else "bool" if obj.dtype == torch.bool \
            else "int"
        return ("tensor", kind, obj.dim())
    if isinstance(obj, Mapping):
        return ("dict", tuple(sorted((str(k), _structure(v)) for k, v in obj.items())))
    if isinstance(obj, tuple | list):
        return ("sequence", tuple(_structure(v) for v in obj))
    if isinstance(obj, bool):
        return ("bool",)
    try:
        operator.index(obj)
        return ("int",)
    except TypeError:
        return (type(obj).__name__,)


def _shapes(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return tuple(obj.shape)
    if isinstance(obj, Mapping):
        return tuple(_shapes(v) for _, v in sorted(obj.items(), key=lambda kv: str(kv[0])))
    if isinstance(obj, tuple | list):
        return tuple(_shapes(v) for v in obj)
    return ()


def _dataset_facts(dataset: Dataset, spec: str, has_collate: bool,
                   meta: dict[str, Any]) -> dict[str, Any]:
    """Check that the first samples share one structure (and shapes, unless a collate_fn
    batches them), and read the facts a model may need from them."""
    first = dataset[0]
    if not isinstance(first, tuple | list) or len(first) != 2:
        raise InputError(f"data spec {spec!r}: samples must be (inputs, target) pairs; sample 0 "
                         f"is a {type(first).__name__}", param="data")
    structure, shapes = _structure(first), _shapes(first)
    for i in range(1, min(len(dataset), STRUCTURE_SCAN)):
        sample = dataset[i]
        if _structure(sample) != structure:
            raise InputError(f"data spec {spec!r}: samples of inconsistent structure: sample {i} "
                             f"is {_describe(sample)} but sample 0 is {_describe(first)}",
                             param="data")
        if not has_collate and _shapes(sample) != shapes:
            raise InputError(f"data spec {spec!r}: sample {i} has shapes {_shapes(sample)} but "
                             f"sample 0 has {shapes}: samples of different sizes need a "
                             "collate_fn (an attribute of the data set, or return "
                             "(dataset, collate_fn) from the factory)", param="data")
    facts = infer_facts(first[0], first[1], spec, batched=False)
    target = first[1]
    if _structure(target) == ("int",) or (isinstance(target, torch.Tensor) and target.dim() == 0
                                          and not target.is_floating_point()):
        if "num_classes" not in meta:
            facts["num_classes"] = _num_classes(dataset, spec)
    elif isinstance(target, torch.Tensor) and not target.is_floating_point() \
            and "num_classes" not in meta and "vocab_size" not in meta:
        # token targets: classes are the largest id seen (padding aside) + 1
        ids = torch.cat([dataset[i][1].reshape(-1) for i in range(min(len(dataset),
                                                                       LABEL_SCAN))])
        facts["num_classes"] = int(ids[ids >= 0].max()) + 1
    return facts


def infer_facts(inputs: Any, target: Any, spec: str, batched: bool = True) -> dict[str, Any]:
    """What a model factory may need, read from one sample (or batch, without its first
    dimension): ``in_shape`` of a tensor input; ``num_features`` of a vector ``(F,)`` or a
    sequence ``(T, F)``, or for several inputs the last dimension of the first
    floating-point one; ``seq_len`` of a sequence or of token ids ``(T,)``;
    ``num_outputs`` of a float target (its size)."""
    facts: dict[str, Any] = {}
    if isinstance(inputs, torch.Tensor):
        shape = tuple(inputs.shape[1:] if batched else inputs.shape)
        facts["in_shape"] = shape
        if inputs.is_floating_point() and len(shape) in (1, 2):
            facts["num_features"] = shape[-1]
            if len(shape) == 2:
                facts["seq_len"] = shape[0]
        elif not inputs.is_floating_point() and len(shape) == 1:
            facts["seq_len"] = shape[0]
    elif isinstance(inputs, Mapping | tuple | list):
        # several inputs (a graph's nodes and adjacency, ids and a mask): the features are
        # the last dimension of the first floating-point one
        values = inputs.values() if isinstance(inputs, Mapping) else inputs
        floats = [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point()
                  and v.dim() >= (2 if batched else 1)]
        if floats:
            facts["num_features"] = floats[0].shape[-1]
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        shape = tuple(target.shape[1:] if batched else target.shape)
        facts["num_outputs"] = int(math.prod(shape))
    elif batched and isinstance(target, torch.Tensor) and target.dim() == 1:
        facts["num_classes"] = int(target.max()) + 1 if target.numel() else 1
    return facts


def _describe(sample: Any) -> str:
    structure = _structure(sample)
    return str(structure).replace("'", "")


