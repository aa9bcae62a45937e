"""The demo: a small network fitted to the bundled digits, then its Hessian spectrum.

Real data, real training, real numbers, in a few seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from hessdiag.curvature.linear import Progress
from hessdiag.data import load_digits
from hessdiag.spectrum import SpectrumResult, compute_spectrum


@dataclass(frozen=True)
class DemoResult:
    spectrum: SpectrumResult
    train_accuracy: float
    test_accuracy: float
    epochs: int
    parameters: int
    seed: int


def digits_mlp(hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def run_demo(epochs: int = 30, seed: int = 0, density: bool = True,
             progress: Progress = None) -> DemoResult:
    """Fit ``digits_mlp`` with SGD (lr 0.1, momentum 0.9, batch 64) on the train split,
    then the spectrum of the train-loss Hessian over all 1,437 training samples."""
    torch.manual_seed(seed)
    train, test = load_digits("train"), load_digits("test")
    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=64, shuffle=True, generator=gen)
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    measure = list(DataLoader(train, batch_size=512))  # fixed batches, every sample
    spectrum = compute_spectrum(model, loss_fn, measure, top_k=5, density=density,
                                seed=seed, progress=progress)
    return DemoResult(
        spectrum=spectrum,
        train_accuracy=_accuracy(model, *train.tensors),
        test_accuracy=_accuracy(model, *test.tensors),
        epochs=epochs,
        parameters=sum(p.numel() for p in model.parameters()),
        seed=seed,
    )
