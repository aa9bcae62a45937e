"""Data sets by name (``load_dataset``, ``list_datasets``); ``digits`` (the UCI handwritten
digits, 1,797 8x8 images) ships with hessdiag."""

from hessdiag.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits
from hessdiag.data.registry import (
    DataInfo,
    DatasetInfoRow,
    default_download_root,
    list_datasets,
    load_dataset,
)

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DataInfo", "DatasetInfoRow", "default_download_root",
           "list_datasets", "load_dataset", "load_digits", "stack_samples"]


def stack_samples(dataset, indices) -> tuple:
    """The samples at ``indices`` of a map-style dataset as one batch ``(x, y)``."""
    import torch

    items = [dataset[int(i)] for i in indices]
    return (torch.stack([t[0] for t in items]),
            torch.as_tensor([int(t[1]) for t in items]))
