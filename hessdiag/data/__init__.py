"""Data sets. ``digits`` (the UCI handwritten digits, 1,797 8x8 images) ships with hessdiag."""

from hessdiag.data.digits import DIGITS_MEAN, DIGITS_STD, load_digits

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "load_digits"]
