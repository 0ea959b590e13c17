"""CIFAR ResNets (6n+2 layers: resnet20/32/110/1202) with DHM branches and option-A shortcuts.

Trunk: ``conv1`` (16 channels), ``bn1``, ``layer1`` (16), ``layer2`` (32, stride 2), ``layer3`` (64,
stride 2) of the blocks below, ``fc``. The parameter-free option-A shortcut also covers the deep
branch's jump from 32 to 128 channels.

Branches (``branch_layers = [[a, b], [c]]``):

* ``aux2`` forks after ``layer1``: ``aux2.layer2`` (32, ``a`` blocks, stride 2), ``aux2.layer3``
  (64, ``b`` blocks, stride 2), ``aux2.fc``;
* ``aux1`` forks after ``layer2``: ``aux1.layer3`` (128 = twice the last width, ``c`` blocks,
  stride 2), ``aux1.fc``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..catalog import CIFAR_RESNETS
from .branching import Branch, BranchedNet, global_pool, init_weights

# name -> (n blocks per stage, branch_layers [[a, b], [c]]); the table is in dhm_fast/catalog.py,
# torch-free, so that --help lists the names without importing torch.
SPECS = CIFAR_RESNETS

WIDTHS = (16, 32, 64)
AUX1_WIDTH = 128


class PadShortcut(nn.Module):
    """Option-A identity shortcut: average-pool for the stride, zero-pad the extra channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            # ceil_mode keeps the shortcut's size equal to the strided conv's on odd inputs.
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a parameter-free shortcut (post-activation)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        projects = stride != 1 or in_channels != channels
        self.shortcut = PadShortcut(in_channels, channels, stride) if projects else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + identity, inplace=True)


def make_stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, channels, stride)]
    layers += [BasicBlock(channels, channels) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class CifarResNet(BranchedNet):
    """A 6n+2-layer CIFAR ResNet trunk with the DHM deep (aux1) and shallow (aux2) branches."""

    def __init__(
        self,
        n: int,
        branch_layers: list[list[int]],
        num_classes: int = 10,
        in_channels: int = 3,
        with_branches: bool = True,
    ):
        super().__init__()
        w1, w2, w3 = WIDTHS
        self.conv1 = nn.Conv2d(in_channels, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.layer1 = make_stage(w1, w1, n, 1)
        self.layer2 = make_stage(w1, w2, n, 2)
        self.layer3 = make_stage(w2, w3, n, 2)
        self.fc = nn.Linear(w3, num_classes)

        if with_branches:
            (a, b), (c,) = branch_layers
            aux2 = Branch(
                {"layer2": make_stage(w1, w2, a, 2), "layer3": make_stage(w2, w3, b, 2)},
                nn.Linear(w3, num_classes),
            )
            aux1 = Branch({"layer3": make_stage(w2, AUX1_WIDTH, c, 2)}, nn.Linear(AUX1_WIDTH, num_classes))
            self.set_branches(aux1, aux2)
        init_weights(self)

    def forward_trunk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        shallow = self.layer1(x)
        deep = self.layer2(shallow)
        return shallow, deep, self.layer3(deep)

    def forward_main(self, x: Tensor) -> Tensor:
        return self.fc(global_pool(x))


def build(arch: str, num_classes: int, in_channels: int, with_branches: bool) -> CifarResNet:
    return CifarResNet(*SPECS[arch], num_classes, in_channels, with_branches)
