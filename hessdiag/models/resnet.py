"""ResNet-18 and ResNet-50 in their CIFAR form (He et al. 2016).

The CIFAR form replaces the ImageNet stem (7x7 stride-2 convolution and max-pool) with a
3x3 stride-1 convolution, so a 32x32 image reaches the last stage at 4x4. Otherwise the
blocks are torchvision's (stride on the 3x3 convolution of a bottleneck, 1x1 projection
shortcuts with BatchNorm), and the parameter counts are those usually quoted: 11,173,962
(ResNet-18) and 23,520,842 (ResNet-50) with 10 classes. Global average pooling makes any
input size of at least 8x8 work.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)
        # no in-place ReLU: it keeps the module safe under torch.func transforms
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with BatchNorm and a residual connection."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet with a 3x3 stride-1 stem and no max-pool, four stages of 64, 128, 256 and
    512 planes, global average pooling and a linear head."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _stage(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
               stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet18(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-18: BasicBlocks [2, 2, 2, 2]."""
    return CifarResNet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes)


def resnet50(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-50: Bottlenecks [3, 4, 6, 3]."""
    return CifarResNet(Bottleneck, [3, 4, 6, 3], in_channels, num_classes)
