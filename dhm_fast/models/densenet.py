"""CIFAR DenseNets (40-12, 100-12, BC-100-12) with DHM branches.

Trunk: ``conv1`` (16 channels, or 2x growth for BC), dense stages ``layer1..layer3`` (of the layers
below: basic, or bottleneck for BC) joined by ``transition1``/``transition2``, final ``bn`` + ReLU, ``fc``.

Branches (``branch_layers = [[a, b], [c]]``):

* ``aux2`` forks after ``transition1``: ``aux2.layer2`` (``a`` layers), its own
  ``aux2.transition2``, ``aux2.layer3`` (``b`` layers), ``aux2.bn``, ``aux2.fc``;
* ``aux1`` forks after ``transition2``: ``aux1.layer3`` (``c`` layers at 3x the growth rate),
  ``aux1.bn``, ``aux1.fc``.

Dense stages keep the resolution; aux2's own transition gives both branches the last stage's
resolution, like the main path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..catalog import DENSENETS
from .branching import Branch, BranchedNet, global_pool, init_weights

# name -> (bottleneck, depth, growth, compression, branch_layers [[a, b], [c]]); the table is in
# dhm_fast/catalog.py, torch-free, so that --help lists the names without importing torch.
SPECS = DENSENETS

AUX1_GROWTH_FACTOR = 3
BOTTLENECK_WIDTH = 4  # a BC layer's 1x1 conv outputs 4x the growth rate


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3 producing ``growth`` new channels, concatenated to the input."""

    def __init__(self, in_channels: int, growth: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, growth, 3, 1, 1, bias=False)
        self.dropout = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat((x, self.dropout(self.conv(F.relu(self.bn(x))))), 1)


class BottleneckLayer(nn.Module):
    """BN-ReLU-conv1x1 (4x growth) then BN-ReLU-conv3x3 (growth), concatenated to the input."""

    def __init__(self, in_channels: int, growth: int, dropout: float = 0.0):
        super().__init__()
        width = BOTTLENECK_WIDTH * growth
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, growth, 3, 1, 1, bias=False)
        self.dropout = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.dropout(self.conv2(F.relu(self.bn2(out), inplace=True)))
        return torch.cat((x, out), 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (compression) then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.dropout = _dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.dropout(self.conv(F.relu(self.bn(x)))), 2, 2, ceil_mode=True)


class DenseNet(BranchedNet):
    """A three-stage CIFAR DenseNet trunk with the DHM deep (aux1) and shallow (aux2) branches."""

    def __init__(
        self,
        bottleneck: bool,
        depth: int,
        growth: int,
        compression: float,
        branch_layers: list[list[int]],
        num_classes: int = 10,
        in_channels: int = 3,
        with_branches: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // (3 * (2 if bottleneck else 1))  # layers per dense stage (a BC layer has 2 convs)
        layer = BottleneckLayer if bottleneck else DenseLayer

        def stage(channels: int, layers: int, growth: int) -> tuple[nn.Sequential, int]:
            """`layers` dense layers and the channel count they end with (each adds `growth`)."""
            mods = [layer(channels + i * growth, growth, dropout) for i in range(layers)]
            return nn.Sequential(*mods), channels + layers * growth

        def transition(channels: int) -> tuple[Transition, int]:
            out = int(math.floor(channels * compression))
            return Transition(channels, out, dropout), out

        c = 2 * growth if bottleneck else 16
        self.conv1 = nn.Conv2d(in_channels, c, 3, 1, 1, bias=False)
        self.layer1, c = stage(c, n, growth)
        self.transition1, c_shallow = transition(c)
        self.layer2, c = stage(c_shallow, n, growth)
        self.transition2, c_deep = transition(c)
        self.layer3, c = stage(c_deep, n, growth)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

        if with_branches:
            (a, b), (k,) = branch_layers
            layer2, c = stage(c_shallow, a, growth)
            transition2, c = transition(c)
            layer3, c = stage(c, b, growth)
            aux2 = Branch(
                {"layer2": layer2, "transition2": transition2, "layer3": layer3},
                nn.Linear(c, num_classes),
                norm=nn.BatchNorm2d(c),
            )
            layer3, c = stage(c_deep, k, AUX1_GROWTH_FACTOR * growth)
            aux1 = Branch({"layer3": layer3}, nn.Linear(c, num_classes), norm=nn.BatchNorm2d(c))
            self.set_branches(aux1, aux2)
        init_weights(self)

    def forward_trunk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shallow = self.transition1(self.layer1(self.conv1(x)))
        deep = self.transition2(self.layer2(shallow))
        return shallow, deep, self.layer3(deep)

    def forward_main(self, x: Tensor) -> Tensor:
        return self.fc(global_pool(F.relu(self.bn(x))))


def build(
    arch: str, num_classes: int, in_channels: int, with_branches: bool, dropout: float = 0.0
) -> DenseNet:
    return DenseNet(*SPECS[arch], num_classes, in_channels, with_branches, dropout)
