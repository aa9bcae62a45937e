"""The demo's network: a small model fitted to the bundled digits with plain SGD.

``checkpoints/make_digits_checkpoint.py`` uses it to make the shipped checkpoint
``checkpoints/digits-mlp.pt``, which ``make demo`` analyses with ``hessdiag spectrum``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from hessdiag.checkpoints import save_checkpoint
from hessdiag.data import load_digits
from hessdiag.models import build_model

MODEL_SPEC = "mlp"
MODEL_KWARGS = {"num_classes": 10, "in_shape": [1, 8, 8], "hidden": 32}


@dataclass(frozen=True)
class FittedDigits:
    model: nn.Module
    train_accuracy: float
    test_accuracy: float
    epochs: int
    steps: int
    seed: int


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def fit_digits(epochs: int = 30, seed: int = 0, lr: float = 0.05) -> FittedDigits:
    """SGD (momentum 0.9, batch 64, shuffled with a seeded generator) on the train split."""
    torch.manual_seed(seed)
    train, test = load_digits("train"), load_digits("test")
    model = build_model(MODEL_SPEC, **MODEL_KWARGS)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(train, batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    steps = 0
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            steps += 1
    return FittedDigits(model=model, train_accuracy=accuracy(model, *train.tensors),
                        test_accuracy=accuracy(model, *test.tensors), epochs=epochs,
                        steps=steps, seed=seed)


def save_digits_checkpoint(path: str | Path, fitted: FittedDigits) -> str:
    """Save in hessdiag's format with the model and data specs; returns the sha256."""
    return save_checkpoint(
        path, fitted.model, model_spec=MODEL_SPEC, model_kwargs=MODEL_KWARGS,
        step=fitted.steps, epoch=fitted.epochs,
        data={"spec": "digits", "split": "train"},
        extra={"train_accuracy": fitted.train_accuracy, "test_accuracy": fitted.test_accuracy,
               "seed": fitted.seed, "optimizer": "sgd lr 0.05 momentum 0.9 batch 64"},
    )
