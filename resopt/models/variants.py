"""The ResNet variants of the pruning studies: depthwise-separable convolutions, and squeeze-and-excitation.

Both follow the CIFAR ResNet-(6n+2) layout of ``resnet.CifarResNet`` (three stages of 16, 32, 64 channels
times ``width``, 1x1-conv projection shortcuts) so results compare directly with ``resnet20``/``resnet56``.

- ``DSResNet``: each 3x3 convolution of a basic block becomes a depthwise 3x3 followed by a pointwise 1x1
  (MobileNet's factorisation), about 8x fewer MACs per block. Pruning a channel removes the matching
  depthwise filter, so the depthwise layer's ``groups`` shrinks with it; ``model_widths`` records
  ``[in, out, groups]`` for that reason.
- ``SEResNet``: a squeeze-and-excitation gate (Hu et al. 2018) rescales each block's residual branch
  before the addition. The gate uses 1x1 convolutions rather than linear layers: the dependency graph then
  couples the gate's output channels with the branch's channels without a reshape in between, and the
  ONNX graph stays a plain conv graph.
"""

from __future__ import annotations

import torch
from torch import nn

from resopt.models.resnet import _init_weights, _scaled


class DSConv(nn.Module):
    """Depthwise 3x3 (stride ``stride``) -> BN -> ReLU -> pointwise 1x1; the BN after the pointwise is the
    caller's, so the block keeps the conv -> BN -> add shape that BN folding and pruning expect."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.dw = nn.Conv2d(in_planes, in_planes, 3, stride, 1, groups=in_planes, bias=False)
        self.dw_bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pw = nn.Conv2d(in_planes, planes, 1, 1, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.relu(self.dw_bn(self.dw(x))))


class DSBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = DSConv(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = DSConv(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class SqueezeExcite(nn.Module):
    """Channel gate: global average -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid, times the input."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        # At least 4 gate channels: the narrow CIFAR widths (8-16 channels) would otherwise leave 0 or 1.
        hidden = max(4, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class SEBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, reduction: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes, reduction)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


class _CifarVariant(nn.Module):
    """Stem, three stages of ``block``, global pool, classifier: the CIFAR ResNet skeleton."""

    def __init__(self, block: type[nn.Module], depth: int, num_classes: int, width: float) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        planes = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = planes[0]
        stages = []
        for i, p in enumerate(planes):
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, p, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = p
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(planes[2], num_classes)
        _init_weights(self)
        # The shared initialiser zero-inits the last BN of the blocks it knows; do the same here so these
        # variants also start every block as identity.
        for m in self.modules():
            if isinstance(m, (DSBasicBlock, SEBasicBlock)):
                nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DSResNet(_CifarVariant):
    """CIFAR ResNet-(6n+2) whose 3x3 convolutions are depthwise-separable."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__(DSBasicBlock, depth, num_classes, width)


class SEResNet(_CifarVariant):
    """CIFAR ResNet-(6n+2) with a squeeze-and-excitation gate in every block."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__(SEBasicBlock, depth, num_classes, width)
