"""The UCI handwritten digits (Alpaydin & Kaynak 1998), shipped with hessdiag.

1,797 grey-scale 8x8 images of the digits 0-9, pixel values 0..16; the copy distributed
with scikit-learn (see ``DIGITS-LICENSE.txt``). No download, so every example and test
runs on a real data set offline.

Split: the first 1,437 images (80%) are ``train``, the last 360 ``test``; the order is the
file's, so the split is the same everywhere. Normalisation: ``(x / 16 - mean) / std``
with the train split's pixel mean and standard deviation (``DIGITS_MEAN``, ``DIGITS_STD``).
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

import numpy as np
import torch
from torch.utils.data import TensorDataset

N_TRAIN = 1437
DIGITS_MEAN = 0.30539
DIGITS_STD = 0.37551


@lru_cache(maxsize=1)
def _read() -> tuple[np.ndarray, np.ndarray]:
    """The file's pixels and labels, parsed once a process (about 25 ms a parse; a sweep
    loads the data set dozens of times). Never handed out: callers get copies."""
    with resources.files("hessdiag.data").joinpath("digits.csv.gz").open("rb") as raw:
        table = np.loadtxt(gzip.open(raw), delimiter=",", dtype=np.float32)
    return table[:, :64], table[:, 64].astype(np.int64)


def load_digits(split: str = "train", *, flatten: bool = False) -> TensorDataset:
    """The digits as a ``TensorDataset`` of normalised ``(1, 8, 8)`` images (or 64-vectors
    with ``flatten=True``) and integer labels. ``split`` is ``train``, ``test`` or ``all``."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    pixels, labels = _read()
    rows = {"train": slice(0, N_TRAIN), "test": slice(N_TRAIN, None), "all": slice(None)}[split]
    x = (torch.from_numpy(pixels[rows]) / 16.0 - DIGITS_MEAN) / DIGITS_STD
    x = x if flatten else x.view(-1, 1, 8, 8)
    return TensorDataset(x, torch.from_numpy(labels[rows].copy()))
