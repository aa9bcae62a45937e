"""The data set registry, on tiny files written in each data set's real on-disk format and
read by the real torchvision and hessdiag code (only the md5 lists torchvision checks are
replaced by the sums of the files written here)."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import sys
import textwrap

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image
from torchvision import datasets

from hessdiag.data import (
    DIGITS_MEAN,
    DIGITS_STD,
    DataInfo,
    list_datasets,
    load_dataset,
    load_digits,
    registry,
)

RNG = np.random.default_rng(7)


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def normalised(pixels_chw: np.ndarray, mean, std, scale: float = 255.0) -> torch.Tensor:
    """What the documented normalisation makes of uint8 pixels (C, H, W), in float32."""
    x = torch.from_numpy(pixels_chw.astype(np.float32)) / scale
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------- CIFAR (Python pickles)

class _Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str``, as in the CIFAR files (made with Python 2),
    which torchvision reads with ``encoding="latin1"`` (so ``b"data"`` becomes ``"data"``)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def write_py2_pickle(path, obj) -> None:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    path.write_bytes(buffer.getvalue())


def cifar_batch(n: int, label_key: bytes, n_classes: int) -> dict:
    return {b"batch_label": b"tiny batch",
            b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(v) for v in RNG.integers(0, n_classes, n)],
            b"filenames": [b"img_%d.png" % i for i in range(n)]}


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    """``cifar-10-batches-py`` with 5 train batches of 2 images and a test batch of 3."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": cifar_batch(2, b"labels", 10) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(3, b"labels", 10)
    for name, batch in batches.items():
        write_py2_pickle(folder / name, batch)
    write_py2_pickle(folder / "batches.meta", {
        b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                         b"frog", b"horse", b"ship", b"truck"],
        b"num_cases_per_batch": 2, b"num_vis": 3072})
    monkeypatch.setattr(datasets.CIFAR10, "train_list",
                        [[f"data_batch_{i}", md5(folder / f"data_batch_{i}")]
                         for i in range(1, 6)])
    monkeypatch.setattr(datasets.CIFAR10, "test_list",
                        [["test_batch", md5(folder / "test_batch")]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta,
                                                   "md5": md5(folder / "batches.meta")})
    return tmp_path, batches


@pytest.fixture
def cifar100_root(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batches = {"train": cifar_batch(4, b"fine_labels", 100),
               "test": cifar_batch(2, b"fine_labels", 100)}
    for batch in batches.values():
        batch[b"coarse_labels"] = [0] * len(batch[b"fine_labels"])
    for name, batch in batches.items():
        write_py2_pickle(folder / name, batch)
    write_py2_pickle(folder / "meta", {b"fine_label_names": [b"c%d" % i for i in range(100)],
                                       b"coarse_label_names": [b"s%d" % i for i in range(20)]})
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [["train", md5(folder / "train")]])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [["test", md5(folder / "test")]])
    monkeypatch.setattr(datasets.CIFAR100, "meta", {**datasets.CIFAR100.meta,
                                                    "md5": md5(folder / "meta")})
    return tmp_path, batches


def test_cifar10_reads_the_real_format_and_normalises_as_documented(cifar10_root):
    root, batches = cifar10_root
    info = load_dataset("cifar10", root=root)
    assert isinstance(info, DataInfo)
    assert (info.name, info.split, info.num_classes, info.in_shape) == ("cifar10", "train", 10,
                                                                        (3, 32, 32))
    assert info.samples == len(info.dataset) == 10 and info.root == str(root)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    assert info.normalization == {"mean": list(mean), "std": list(std)}
    for index, (batch, row) in {0: ("data_batch_1", 0), 3: ("data_batch_2", 1),
                                9: ("data_batch_5", 1)}.items():
        x, y = info.dataset[index]
        pixels = batches[batch][b"data"][row].reshape(3, 32, 32)  # R, G, B planes, row-major
        assert torch.allclose(x, normalised(pixels, mean, std), rtol=0, atol=1e-6)
        assert y == batches[batch][b"labels"][row]

    test = load_dataset("cifar10", split="test", root=str(root), samples=2)
    assert (test.split, test.samples, len(test.dataset)) == ("test", 2, 2)
    x, y = test.dataset[1]
    pixels = batches["test_batch"][b"data"][1].reshape(3, 32, 32)
    assert torch.allclose(x, normalised(pixels, mean, std), rtol=0, atol=1e-6)
    assert y == batches["test_batch"][b"labels"][1]


def test_cifar100_reads_fine_labels(cifar100_root):
    root, batches = cifar100_root
    info = load_dataset("cifar100", root=root)
    assert (info.num_classes, info.in_shape, info.samples) == (100, (3, 32, 32), 4)
    x, y = info.dataset[2]
    pixels = batches["train"][b"data"][2].reshape(3, 32, 32)
    expected = normalised(pixels, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert torch.allclose(x, expected, rtol=0, atol=1e-6)
    assert y == batches["train"][b"fine_labels"][2]
    assert load_dataset("cifar100", split="test", root=root).samples == 2


def test_download_flag_with_the_files_present_does_not_touch_the_network(cifar10_root,
                                                                         no_network):
    root, _ = cifar10_root
    assert load_dataset("cifar10", root=root, download=True).samples == 10


def test_download_without_root_uses_the_cache_folder(cifar10_root, no_network, monkeypatch):
    root, _ = cifar10_root
    cache = root / "cache"
    (cache / "hessdiag" / "data").mkdir(parents=True)
    (root / "cifar-10-batches-py").rename(cache / "hessdiag" / "data" / "cifar-10-batches-py")
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    info = load_dataset("cifar10", download=True)
    assert info.root == str(cache / "hessdiag" / "data") and info.samples == 10


def test_cifar_files_that_fail_the_md5_check_are_reported(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        write_py2_pickle(folder / name, cifar_batch(1, b"labels", 10))  # the real md5s differ
    with pytest.raises(ValueError, match="not found or corrupted.*download=True"):
        load_dataset("cifar10", root=tmp_path)


# ----------------------------------------------------------------- MNIST (idx files)

def write_idx(path, array: np.ndarray) -> None:
    """The idx format: magic 0x0000 08 <ndim> (uint8), big-endian dimensions, the bytes."""
    magic = 0x0800 + array.ndim  # 2051 for images, 2049 for labels
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def mnist_root(tmp_path, folder: str, n_train: int = 5, n_test: int = 3):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = RNG.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = images, labels
    assert (raw / "train-images-idx3-ubyte").read_bytes()[:4] == struct.pack(">I", 2051)
    assert (raw / "train-labels-idx1-ubyte").read_bytes()[:4] == struct.pack(">I", 2049)
    return arrays


@pytest.mark.parametrize("name, folder, mean, std", [
    ("mnist", "MNIST", 0.1307, 0.3081),
    ("fashion-mnist", "FashionMNIST", 0.2860, 0.3530),
])
def test_mnist_family_reads_idx_files(tmp_path, name, folder, mean, std):
    arrays = mnist_root(tmp_path, folder)
    info = load_dataset(name, root=tmp_path)
    assert (info.num_classes, info.in_shape, info.samples) == (10, (1, 28, 28), 5)
    assert info.normalization == {"mean": [mean], "std": [std]}
    images, labels = arrays["train"]
    for i in (0, 4):
        x, y = info.dataset[i]
        assert torch.allclose(x, normalised(images[i][None], (mean,), (std,)), rtol=0,
                              atol=1e-6)
        assert y == int(labels[i]) and isinstance(y, int)
    test = load_dataset(name, split="test", root=tmp_path)
    images, labels = arrays["t10k"]
    x, y = test.dataset[2]
    assert test.samples == 3 and y == int(labels[2])
    assert torch.allclose(x, normalised(images[2][None], (mean,), (std,)), rtol=0, atol=1e-6)


def test_samples_cap_keeps_the_first_samples_in_order(tmp_path):
    mnist_root(tmp_path, "MNIST")
    full = load_dataset("mnist", root=tmp_path)
    capped = load_dataset("mnist", root=tmp_path, samples=3)
    assert capped.samples == len(capped.dataset) == 3
    for i in range(3):
        assert torch.equal(capped.dataset[i][0], full.dataset[i][0])
        assert capped.dataset[i][1] == full.dataset[i][1]
    everything = load_dataset("mnist", root=tmp_path, samples=1000)
    assert everything.samples == len(everything.dataset) == 5


# ------------------------------------------------------------------- SVHN (.mat files)

def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path, monkeypatch):
    n = 4
    X = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # height, width, channel, index
    y = np.array([[10], [3], [10], [9]], dtype=np.uint8)  # 10 is the digit 0
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": X, "y": y})
    split_list = {k: list(v) for k, v in datasets.SVHN.split_list.items()}
    split_list["train"][2] = md5(tmp_path / "train_32x32.mat")
    monkeypatch.setattr(datasets.SVHN, "split_list", split_list)

    info = load_dataset("svhn", root=tmp_path)
    assert (info.num_classes, info.in_shape, info.samples) == (10, (3, 32, 32), 4)
    assert [info.dataset[i][1] for i in range(n)] == [0, 3, 0, 9]
    mean, std = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
    for i in (0, 3):
        pixels = X[:, :, :, i].transpose(2, 0, 1)
        assert torch.allclose(info.dataset[i][0], normalised(pixels, mean, std), rtol=0,
                              atol=1e-6)
    with pytest.raises(ValueError, match="test_32x32.mat.*download=True"):
        load_dataset("svhn", split="test", root=tmp_path)


# ------------------------------------------------------------------ ImageFolder (PNGs)

def write_png(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_imagefolder_reads_pngs_per_split_without_normalising(tmp_path):
    train = {("cat", "a.png"): RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8),
             ("cat", "b.png"): RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8),
             ("dog", "c.png"): RNG.integers(0, 256, (4, 5, 3), dtype=np.uint8)}
    for (label, file), pixels in train.items():
        write_png(tmp_path / "train" / label / file, pixels)
    write_png(tmp_path / "test" / "cat" / "d.png", RNG.integers(0, 256, (4, 5, 3),
                                                                dtype=np.uint8))
    write_png(tmp_path / "test" / "dog" / "e.png", RNG.integers(0, 256, (4, 5), dtype=np.uint8))

    info = load_dataset(f"imagefolder:{tmp_path}")
    assert (info.num_classes, info.in_shape, info.samples) == (2, (3, 4, 5), 3)
    assert info.normalization is None and info.root == str(tmp_path / "train")
    for i, ((label, _), pixels) in enumerate(sorted(train.items())):
        x, y = info.dataset[i]
        assert torch.allclose(x, torch.from_numpy(pixels.transpose(2, 0, 1)).float() / 255,
                              rtol=0, atol=1e-6)
        assert y == ["cat", "dog"].index(label)
    test = load_dataset(f"imagefolder:{tmp_path}", split="test", samples=5)
    assert test.samples == 2 and test.dataset[1][0].shape == (3, 4, 5)  # grey read as RGB
    assert test.dataset[1][1] == 1


def test_imagefolder_without_split_folders_and_its_errors(tmp_path):
    write_png(tmp_path / "flat" / "only" / "a.png", np.zeros((2, 2, 3), dtype=np.uint8))
    flat = load_dataset(f"imagefolder:{tmp_path / 'flat'}", split="test")
    assert (flat.num_classes, flat.samples, flat.in_shape) == (1, 1, (3, 2, 2))
    with pytest.raises(ValueError, match="is not a folder"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    write_png(tmp_path / "half" / "train" / "x" / "a.png", np.zeros((2, 2, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="has train/ but no test/"):
        load_dataset(f"imagefolder:{tmp_path / 'half'}", split="test")
    with pytest.raises(ValueError, match="imagefolder needs a folder"):
        load_dataset("imagefolder:")


# --------------------------------------------------------------------- digits, registry

def test_digits_through_the_registry():
    info = load_dataset("digits", samples=10)
    assert (info.num_classes, info.in_shape, info.samples, info.root) == (10, (1, 8, 8), 10,
                                                                          None)
    assert info.normalization == {"mean": [DIGITS_MEAN], "std": [DIGITS_STD]}
    reference = load_digits("test")
    test = load_dataset("digits", split="test")
    assert test.samples == len(reference) == 360
    assert torch.equal(test.dataset[5][0], reference[5][0])
    assert int(test.dataset[5][1]) == int(reference[5][1])


def test_list_datasets():
    rows = {row.name: row for row in list_datasets()}
    assert list(rows) == ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn",
                          "ecg", "molecules", "text", "tabular", "imagefolder:PATH"]
    assert not rows["digits"].needs_root and rows["cifar10"].needs_root
    assert rows["cifar100"].classes == 100 and rows["imagefolder:PATH"].classes is None


def test_errors_for_roots_names_splits_and_sample_counts(tmp_path):
    with pytest.raises(ValueError, match=r"cifar10 needs root \(a folder holding "
                       r"cifar-10-batches-py\), or download=True"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="mnist needs root"):
        load_dataset("mnist", split="test")
    for name, expected in [("cifar10", "data_batch_1"), ("cifar100", "cifar-100-python"),
                           ("mnist", "train-images-idx3-ubyte"),
                           ("fashion-mnist", "FashionMNIST"), ("svhn", "train_32x32.mat")]:
        with pytest.raises(ValueError) as caught:
            load_dataset(name, root=tmp_path)
        message = str(caught.value)
        assert str(tmp_path) in message and "download=True" in message and expected in message
        assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing was fetched or created
    with pytest.raises(ValueError, match=r"unknown data set 'imagenet'; known: digits, mnist, "
                       r".*imagefolder:PATH; or give package\.module:factory"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'; got 'val'"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="samples must be positive; got 0"):
        load_dataset("digits", samples=0)
    with pytest.raises(ValueError, match="samples must be positive; got -3"):
        load_dataset("digits", samples=-3)


# --------------------------------------------------------------------------- factories

DATA_FACTORIES = textwrap.dedent("""
    import torch
    from torch.utils.data import Dataset, TensorDataset

    class WithClasses(Dataset):
        classes = ["a", "b", "c", "d"]

        def __init__(self, split, root):
            self.split, self.root = split, root

        def __len__(self):
            return 6 if self.split == "train" else 2

        def __getitem__(self, i):
            return torch.full((2, 3, 3), float(i)), i % 2

    def with_classes(split, root=None):
        return WithClasses(split, root)

    def scanned():
        x = torch.zeros(5, 1, 2, 2)
        return TensorDataset(x, torch.tensor([0, 6, 1, 2, 1]))

    def flat():
        return TensorDataset(torch.zeros(3, 4), torch.tensor([0, 1, 0]))

    def a_list(split):
        return [(torch.zeros(1, 2, 2), 0)]

    def float_labels():
        return TensorDataset(torch.zeros(3, 1, 2, 2), torch.tensor([0.0, 1.0, 0.5]))

    class Mixed(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(4), (1 if i != 2 else 0.5)

    def mixed():
        return Mixed()

    class Ragged(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.zeros(i + 2, 3), i % 2

    def ragged():
        return Ragged()

    def pad(samples):
        longest = max(x.shape[0] for x, _ in samples)
        x = torch.stack([torch.cat([s, torch.zeros(longest - len(s), 3)]) for s, _ in samples])
        return x, torch.tensor([y for _, y in samples])

    def ragged_with_collate():
        return Ragged(), pad

    def batches(split):
        return [(torch.zeros(4, 6), torch.zeros(4, 1)), (torch.ones(3, 6), torch.ones(3, 1))]
""")


def test_file_factory_receives_split_and_root(tmp_path):
    path = tmp_path / "my_data.py"
    path.write_text(DATA_FACTORIES)
    info = load_dataset(f"{path}:with_classes", split="test", root=tmp_path / "r")
    assert info.dataset.split == "test" and info.dataset.root == tmp_path / "r"
    assert (info.num_classes, info.in_shape, info.samples) == (4, (2, 3, 3), 2)
    assert info.normalization is None and info.name == f"{path}:with_classes"
    capped = load_dataset(f"{path}:with_classes", samples=4)
    assert capped.samples == 4 and float(capped.dataset[3][0][0, 0, 0]) == 3.0
    # no classes attribute: max label + 1 over the labels
    assert load_dataset(f"{path}:scanned").num_classes == 7


def test_module_factory_on_sys_path(tmp_path, monkeypatch):
    (tmp_path / "hessdiag_test_data_factories.py").write_text(DATA_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "hessdiag_test_data_factories", raising=False)
    info = load_dataset("hessdiag_test_data_factories:scanned", samples=2)
    assert (info.num_classes, info.in_shape, info.samples) == (7, (1, 2, 2), 2)
    sys.modules.pop("hessdiag_test_data_factories", None)


def test_factories_of_any_shape_collate_functions_and_ready_batches(tmp_path):
    from hessdiag.data import fixed_batches

    path = tmp_path / "any_data.py"
    path.write_text(DATA_FACTORIES)
    flat = load_dataset(f"{path}:flat")  # tabular: vectors and class indices
    assert flat.facts == {"in_shape": (4,), "num_features": 4, "num_classes": 2,
                          "num_outputs": 2}
    regression = load_dataset(f"{path}:float_labels")  # float targets: regression
    assert regression.num_classes is None and regression.facts["num_outputs"] == 1
    ragged = load_dataset(f"{path}:ragged_with_collate")
    assert ragged.facts["num_features"] == 3 and ragged.collate_fn is not None
    x, y = fixed_batches(ragged, batch_size=3)[0]
    assert x.shape == (3, 4, 3) and y.tolist() == [0, 1, 0]
    ready = load_dataset(f"{path}:batches")
    assert ready.dataset is None and ready.samples == 7
    assert ready.facts == {"in_shape": (6,), "num_features": 6, "num_outputs": 1}
    assert fixed_batches(ready, batch_size=100) == ready.batches
    assert load_dataset(f"{path}:batches", samples=2).samples == 4  # whole batches


def test_factory_errors(tmp_path, monkeypatch):
    path = tmp_path / "bad_data.py"
    path.write_text(DATA_FACTORIES)
    with pytest.raises(ValueError, match="returned a list: neither a map-style"):
        load_dataset(f"{path}:a_list")
    with pytest.raises(ValueError, match="samples of inconsistent structure: sample 2"):
        load_dataset(f"{path}:mixed")
    with pytest.raises(ValueError, match="sample 1 has shapes .* need a collate_fn"):
        load_dataset(f"{path}:ragged")
    with pytest.raises(ValueError, match="has no callable 'nothing'"):
        load_dataset(f"{path}:nothing")
    with pytest.raises(ValueError, match="cannot import module"):
        load_dataset("hessdiag_no_such_module_xyz:f")
    monkeypatch.setattr(registry, "LABEL_SCAN", 2)  # the scan stops at the cap
    assert load_dataset(f"{path}:scanned").num_classes == 7
