"""Small fully connected and convolutional classifiers: ``mlp`` and ``cnn6``."""

from __future__ import annotations

import math

from torch import Tensor, nn


class MLP(nn.Module):
    """Flatten, then ``Linear(prod(in_shape), hidden)``, activation, ``Linear(hidden,
    hidden)``, activation, ``Linear(hidden, num_classes)``: logits of ``num_classes``
    classes, or ``num_classes`` regression outputs. ``activation``: ``relu`` (default),
    ``tanh`` or ``gelu``."""

    ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}

    def __init__(self, in_shape: tuple[int, ...], num_classes: int = 10, hidden: int = 128,
                 activation: str = "relu"):
        super().__init__()
        act = self.ACTIVATIONS[activation]
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(in_shape), hidden),
            act(),
            nn.Linear(hidden, hidden),
            act(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN6(nn.Module):
    """The six-layer CNN (four 3x3 convolutions, two linear layers) of the Eigen-SAM
    analysis (Luo et al., NeurIPS 2024).

    ``conv(C, w) ReLU conv(w, w) ReLU maxpool2 conv(w, 2w) ReLU conv(2w, 2w) ReLU maxpool2
    flatten Linear(2w * (H//4) * (W//4), hidden) ReLU Linear(hidden, num_classes)`` with
    ``w = width`` (32) and ``hidden`` 256: 1,116,970 parameters on 3x32x32 with 10
    classes, 133,354 on 1x8x8.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int = 10, width: int = 32,
                 hidden: int = 256):
        super().__init__()
        channels, height, breadth = in_shape
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        # max-pooling floors odd sizes: 28 -> 14 -> 7, 8 -> 4 -> 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * (height // 4) * (breadth // 4), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))
