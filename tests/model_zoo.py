"""The zoo of small models the solver and operator tests run on (each with its inputs):
BatchNorm in eval mode with non-trivial statistics, a ResNet in miniature, weight sharing,
dropout, a GRU and a transformer encoder layer. The dense float64 Hessian of
``conftest.dense_hessian`` is their truth."""

from __future__ import annotations

import torch
from torch import nn


class SharedWeights(nn.Module):
    """The same linear layer applied twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.gru(x)[0][:, -1])


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.1,
                                                  batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def _cnn_bn():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    )
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 6, 6) * 2 + 0.5)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


class _Block(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with BatchNorm, and a strided 1x1
    convolution with BatchNorm on the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet_bn():
    """A ResNet in miniature (stem, an identity block, a strided block with a projection
    shortcut, global pooling): 510 parameters, BatchNorm in eval mode with non-trivial
    running statistics and affine parameters."""
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3),
                          nn.ReLU(), _Block(3, 3), _Block(3, 4, stride=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(16, 1, 6, 6) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _batches(make_x, n_classes=3, sizes=(7, 5, 8)):
    return [(make_x(n), torch.randint(0, n_classes, (n,))) for n in sizes]


ZOO = {
    "mlp-tanh": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
                 lambda n: torch.randn(n, 4)),
    "cnn-batchnorm-eval": (_cnn_bn, lambda n: torch.randn(n, 1, 6, 6)),
    "resnet-batchnorm-eval": (_resnet_bn, lambda n: torch.randn(n, 1, 6, 6)),
    "mlp-dropout": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5),
                                          nn.Linear(6, 3)), lambda n: torch.randn(n, 4)),
    "weight-sharing": (SharedWeights, lambda n: torch.randn(n, 4)),
    "gru": (GRUClassifier, lambda n: torch.randn(n, 5, 3)),
    "transformer-encoder": (TinyTransformer, lambda n: torch.randn(n, 3, 4)),
}
