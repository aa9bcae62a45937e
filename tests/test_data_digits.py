"""The bundled digits data: the real UCI file, split and normalisation as documented."""

import torch

from hessdiag.data import load_digits


def test_digits_has_the_uci_shape_and_classes():
    full = load_digits("all")
    x, y = full.tensors
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    counts = torch.bincount(y, minlength=10)
    assert counts.sum() == 1797 and counts.min() >= 174 and counts.max() <= 183
    # raw pixels are integers 0..16 before normalisation
    from hessdiag.data.digits import DIGITS_MEAN, DIGITS_STD

    raw = (x * DIGITS_STD + DIGITS_MEAN) * 16
    assert torch.allclose(raw, raw.round(), atol=1e-3)
    assert raw.min() >= -1e-3 and raw.max() <= 16 + 1e-3


def test_digits_split_and_normalisation():
    train, test = load_digits("train"), load_digits("test")
    assert len(train) == 1437 and len(test) == 360
    x = train.tensors[0]
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2
    flat = load_digits("test", flatten=True)
    assert flat.tensors[0].shape == (360, 64)
    assert torch.equal(flat.tensors[0].view(-1, 1, 8, 8), test.tensors[0])
