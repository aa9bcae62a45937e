"""Wide residual networks (Zagoruyko & Komodakis 2016), WRN-depth-k for CIFAR.

Pre-activation basic blocks (BN, ReLU, 3x3 conv, BN, ReLU, dropout, 3x3 conv) in three
groups of ``(depth - 4) / 6`` blocks with ``16k``, ``32k`` and ``64k`` channels after a
16-channel 3x3 stem; a 1x1 projection where the width or stride changes; then BN, ReLU,
global average pooling and a linear head. WRN-28-10 has 36,479,194 parameters with 10
classes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WideBlock(nn.Module):
    """A pre-activation basic block with optional dropout between the convolutions."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = (nn.Identity() if self.equal else
                         nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.dropout(self.relu(self.bn2(self.conv1(pre)))))
        # the projection sees the pre-activated input, as in the reference implementation
        return out + (x if self.equal else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth`` must be 6n + 4."""

    def __init__(self, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0,
                 in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [WideBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1],
                                stride if i == 0 else 1, dropout) for i in range(n)]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.pool(self.relu(self.bn(out)))
        return self.fc(torch.flatten(out, 1))
