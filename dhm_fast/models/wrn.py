"""Wide ResNets (WRN-16-8, WRN-28-10) with DHM branches; pre-activation wide basic blocks.

Trunk: ``conv`` (16 channels), ``layer1`` (16k), ``layer2`` (32k, stride 2), ``layer3`` (64k,
stride 2) of the blocks below, final ``bn`` + ReLU, ``fc``.

Branches (``branch_layers = [[a, b], [c]]``, k = widening factor):

* ``aux2`` forks after ``layer1``: ``aux2.layer2`` (32k, ``a`` blocks, stride 2), ``aux2.layer3``
  (64k, ``b`` blocks, stride 2), ``aux2.bn``, ``aux2.fc``;
* ``aux1`` forks after ``layer2``: ``aux1.layer3`` (128k = twice the last width, ``c`` blocks,
  stride 2), ``aux1.bn``, ``aux1.fc``.

``dropout`` (default 0; the paper's WRN-28-10 recipe uses 0.3) applies in every block, branches
included.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..catalog import WIDE_RESNETS
from .branching import Branch, BranchedNet, global_pool, init_weights

# name -> (depth, widening factor, branch_layers [[a, b], [c]]); the table is in dhm_fast/catalog.py,
# torch-free, so that --help lists the names without importing torch.
SPECS = WIDE_RESNETS


class WideBlock(nn.Module):
    """Pre-activation wide basic block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        projects = stride != 1 or in_channels != channels
        self.shortcut = nn.Conv2d(in_channels, channels, 1, stride, bias=False) if projects else None

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(self.dropout(F.relu(self.bn2(self.conv1(act)), inplace=True)))
        # A projecting shortcut sees the pre-activated input; an identity one the raw input.
        return out + (x if self.shortcut is None else self.shortcut(act))


def make_stage(in_channels: int, channels: int, blocks: int, stride: int, dropout: float) -> nn.Sequential:
    layers = [WideBlock(in_channels, channels, stride, dropout)]
    layers += [WideBlock(channels, channels, 1, dropout) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class WideResNet(BranchedNet):
    """A (6n+4)-layer wide ResNet trunk with the DHM deep (aux1) and shallow (aux2) branches."""

    def __init__(
        self,
        depth: int,
        widen: int,
        branch_layers: list[list[int]],
        num_classes: int = 10,
        in_channels: int = 3,
        with_branches: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        w1, w2, w3 = 16 * widen, 32 * widen, 64 * widen
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.layer1 = make_stage(16, w1, n, 1, dropout)
        self.layer2 = make_stage(w1, w2, n, 2, dropout)
        self.layer3 = make_stage(w2, w3, n, 2, dropout)
        self.bn = nn.BatchNorm2d(w3)
        self.fc = nn.Linear(w3, num_classes)

        if with_branches:
            (a, b), (c,) = branch_layers
            aux2 = Branch(
                {"layer2": make_stage(w1, w2, a, 2, dropout), "layer3": make_stage(w2, w3, b, 2, dropout)},
                nn.Linear(w3, num_classes),
                norm=nn.BatchNorm2d(w3),
            )
            aux1 = Branch(
                {"layer3": make_stage(w2, 2 * w3, c, 2, dropout)},
                nn.Linear(2 * w3, num_classes),
                norm=nn.BatchNorm2d(2 * w3),
            )
            self.set_branches(aux1, aux2)
        init_weights(self)

    def forward_trunk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shallow = self.layer1(self.conv(x))
        deep = self.layer2(shallow)
        return shallow, deep, self.layer3(deep)

    def forward_main(self, x: Tensor) -> Tensor:
        return self.fc(global_pool(F.relu(self.bn(x))))


def build(
    arch: str, num_classes: int, in_channels: int, with_branches: bool, dropout: float = 0.0
) -> WideResNet:
    return WideResNet(*SPECS[arch], num_classes, in_channels, with_branches, dropout)
