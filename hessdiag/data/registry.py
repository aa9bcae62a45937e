"""Data sets by name: a registry of image classification data sets, folders and factories.

``load_dataset(spec, split="train", root=..., download=False, samples=None)`` returns a
``DataInfo``: a map-style ``Dataset`` of ``(image tensor (C, H, W), int label)`` pairs and
what a model needs to know about it. ``spec`` is one of

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

``package.module:factory`` or ``path/to/file.py:factory`` names a function returning a
map-style ``Dataset`` of ``(tensor (C, H, W), int label)``; it receives ``split``,
``root`` and ``download`` when it names them as parameters. ``in_shape`` is the first
sample's shape; ``num_classes`` is ``len(dataset.classes)`` if the data set has
``classes``, else ``max(label) + 1`` over ``dataset.targets`` if it has those, else over
the first 10,000 samples.

``samples=N`` keeps the first N samples in data set order (no shuffling), or all of them
if there are fewer.
"""

from __future__ import annotations

import inspect
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from hessdiag.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits
from hessdiag.specs import is_factory_spec, load_factory

SPLITS = ("train", "test")
LABEL_SCAN = 10_000  # labels read to find num_classes of a factory's data set


@dataclass(frozen=True)
class DataInfo:
    """A loaded data set and its description: ``dataset`` yields ``(x, label)`` with ``x``
    of shape ``in_shape`` (C, H, W) already normalised with ``normalization``
    (``{"mean": [...], "std": [...]}`` per channel, or ``None`` if not normalised);
    ``samples`` is ``len(dataset)`` after the cap; ``root`` is the folder read, if any."""

    dataset: Dataset
    name: str
    split: str
    num_classes: int
    in_shape: tuple[int, int, int]
    normalization: dict[str, list[float]] | None
    samples: int
    root: str | None


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

_KNOWN = "digits, " + ", ".join(_TORCHVISION) + ", imagefolder:PATH"


def list_datasets() -> list[DatasetInfoRow]:
    """The data set names ``load_dataset`` knows (factory specs aside)."""
    rows = [DatasetInfoRow("digits", "UCI handwritten digits, 1x8x8, 1,437 train / 360 test; "
                           "ships with hessdiag", False, 10)]
    for name, tv in _TORCHVISION.items():
        shape = "x".join(map(str, tv.in_shape))
        rows.append(DatasetInfoRow(name, f"{tv.title}, {shape} (torchvision); --data-root "
                                   f"holds {tv.holder}", True, tv.num_classes))
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
            raise ValueError(f"{name} needs --data-root (a folder holding {tv.holder}), or "
                             f"--download to fetch it into {default_download_root()}")
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
        raise ValueError(f"{name}: {tv.title} {split} data not found or corrupted in {root} "
                         f"(expected {tv.expected(root, split)}); pass the folder holding "
                         f"{tv.holder} as --data-root, or add --download to fetch it") from exc
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
        raise ValueError(f"data spec {spec!r}: sample {index} has label {value!r}; labels "
                         "must be integers (class indices)")
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
        raise ValueError(f"data spec {spec!r}: negative label {min(labels)}; labels must be "
                         "class indices 0, 1, ...")
    return max(labels) + 1


def _load_factory(spec: str, split: str, root: str | Path | None,
                  download: bool) -> Dataset:
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
            raise ValueError(f"data spec {spec!r}: cannot call the factory with "
                             f"{sorted(call)} (it may take split, root and download): "
                             f"{exc}") from exc
    dataset = fn(**call)
    if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
        raise ValueError(f"data spec {spec!r}: the factory returned a "
                         f"{type(dataset).__name__}, not a map-style torch.utils.data.Dataset "
                         "(with __getitem__ and __len__)")
    if len(dataset) == 0:
        raise ValueError(f"data spec {spec!r}: the factory returned an empty data set")
    return dataset


def _first_shape(dataset: Dataset, spec: str) -> tuple[int, int, int]:
    sample = dataset[0]
    if not isinstance(sample, tuple | list) or len(sample) != 2:
        raise ValueError(f"data spec {spec!r}: samples must be (input tensor, label) pairs; "
                         f"sample 0 is a {type(sample).__name__}")
    x = sample[0]
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        what = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"data spec {spec!r}: inputs must be image tensors (C, H, W); sample "
                         f"0 has {what} (reshape in the factory, e.g. x.view(1, 1, -1))")
    _label(sample[1], spec, 0)
    return tuple(x.shape)  # type: ignore[return-value]


def load_dataset(spec: str, *, split: str = "train", root: str | Path | None = None,
                 download: bool = False, samples: int | None = None) -> DataInfo:
    """The data set named by ``spec`` (see the module docstring), ``split`` ``train`` or
    ``test``, capped at its first ``samples`` samples. Downloads only if ``download``."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)):
        raise ValueError(f"--samples must be a positive integer; got {samples!r}")
    if samples is not None and samples <= 0:
        raise ValueError(f"--samples must be positive; got {samples}")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"data spec must be a non-empty string; got {spec!r}")
    spec = spec.strip()
    name = spec.lower().replace("_", "-")
    used_root: Path | str | None = None
    normalization = None
    if name.startswith("imagefolder:"):
        dataset, used_root = _load_imagefolder(spec.split(":", 1)[1], split)
        name = spec
        num_classes, in_shape = len(dataset.classes), tuple(dataset[0][0].shape)
    elif name == "digits":
        dataset = load_digits(split)
        num_classes, in_shape = 10, (1, 8, 8)
        normalization = {"mean": [DIGITS_MEAN], "std": [DIGITS_STD]}
    elif name in _TORCHVISION:
        tv = _TORCHVISION[name]
        dataset, used_root = _load_torchvision(name, split, root, download)
        num_classes, in_shape = tv.num_classes, tv.in_shape
        normalization = {"mean": list(tv.mean), "std": list(tv.std)}
    elif is_factory_spec(spec) or ":" in spec:
        dataset = _load_factory(spec, split, root, download)
        name, used_root = spec, root
        in_shape = _first_shape(dataset, spec)
        num_classes = _num_classes(dataset, spec)
    else:
        raise ValueError(f"unknown data set {spec!r}; known: {_KNOWN}; or give "
                         "package.module:factory or path/to/file.py:factory")
    if samples is not None and samples < len(dataset):
        dataset = Subset(dataset, range(samples))
    return DataInfo(dataset=dataset, name=name, split=split, num_classes=num_classes,
                    in_shape=in_shape, normalization=normalization, samples=len(dataset),
                    root=None if used_root is None else str(used_root))
