"""Data by name (``load_dataset``, ``list_datasets``) and batching of any data
(:mod:`hessdiag.data.batching`); ``digits`` (the UCI handwritten digits, 1,797 8x8
images) and four generated example tasks ship with hessdiag."""

from hessdiag.data.batching import (
    Minibatches,
    batch_fingerprint,
    batch_of,
    collate,
    draw_minibatches,
    fixed_batches,
    random_minibatches,
    to_device,
)
from hessdiag.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits
from hessdiag.data.registry import (
    FACTS,
    DataInfo,
    DatasetInfoRow,
    batch_samples,
    default_download_root,
    list_datasets,
    load_dataset,
)

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "FACTS", "DataInfo", "DatasetInfoRow", "Minibatches",
           "batch_fingerprint", "batch_of", "batch_samples", "collate", "default_download_root",
           "draw_minibatches", "fixed_batches",
           "list_datasets", "load_dataset", "load_digits", "random_minibatches", "to_device"]
