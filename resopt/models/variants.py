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

from resopt.models.resnet import CifarBasicBlock, CifarResNet


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


class DSBasicBlock(CifarBasicBlock):
    """Basic block whose two 3x3 convolutions are depthwise-separable."""

    @staticmethod
    def make_conv(in_planes: int, planes: int, stride: int) -> nn.Module:
        return DSConv(in_planes, planes, stride)


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


class SEBasicBlock(CifarBasicBlock):
    """Basic block whose residual branch is rescaled by a squeeze-and-excitation gate before the add."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, reduction: int = 16) -> None:
        super().__init__(in_planes, planes, stride)
        self.se = SqueezeExcite(planes, reduction)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(super().residual(x))


class DSResNet(CifarResNet):
    """CIFAR ResNet-(6n+2) whose 3x3 convolutions are depthwise-separable."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__(depth, num_classes, width, block=DSBasicBlock)


class SEResNet(CifarResNet):
    """CIFAR ResNet-(6n+2) with a squeeze-and-excitation gate in every block."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__(depth, num_classes, width, block=SEBasicBlock)
