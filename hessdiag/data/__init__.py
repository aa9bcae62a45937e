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
           "list_datasets", "load_dataset", "load_digits"]
