"""ImageNet ResNets (18/34/50/101/152) with DHM branches; the trunk is torchvision's, name for name.

Trunk: ``conv1, bn1, layer1..layer4, fc`` built from torchvision's own ``BasicBlock``/``Bottleneck``
(stride on the 3x3 conv), so ``export.to_torchvision`` is a filter and outputs match exactly.

Branches (``branch_layers = [[a, b], [c]]``):

* ``aux2`` forks after ``layer2``: ``aux2.layer3`` (256 planes, ``a`` blocks, stride 2),
  ``aux2.layer4`` (512 planes, ``b`` blocks, stride 2), ``aux2.fc``;
* ``aux1`` forks after ``layer3``: ``aux1.layer4`` (1024 planes, ``c`` blocks, stride 2), ``aux1.fc``.

Release names map as ``layer3_head2 -> aux2.layer3``, ``layer4_head1 -> aux1.layer4`` etc.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..catalog import IMAGENET_RESNETS
from .branching import Branch, BranchedNet, global_pool, init_weights

# name -> (torchvision block, trunk blocks per stage, branch_layers [[a, b], [c]]); the table is in
# dhm_fast/catalog.py, torch-free, so that --help lists the names without importing torch.
SPECS = IMAGENET_RESNETS


def block_class(name: str) -> type[nn.Module]:
    """torchvision's ``BasicBlock`` or ``Bottleneck``, imported when a model is built: importing
    torchvision.models takes about a second, which `train.py --help` and a refused flag need not pay."""
    from torchvision.models import resnet

    return getattr(resnet, name)


AUX1_PLANES = 1024  # the deep branch is a layer4 of twice the usual width


def make_stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A torchvision ``layerN``: projection shortcut (1x1 conv + BN) on the first block when needed."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ImageNetResNet(BranchedNet):
    """A torchvision-layout ResNet trunk with the DHM deep (aux1) and shallow (aux2) branches."""

    def __init__(
        self,
        block_name: str,
        layers: list[int],
        branch_layers: list[list[int]],
        num_classes: int = 1000,
        in_channels: int = 3,
        with_branches: bool = True,
    ):
        super().__init__()
        block = block_class(block_name)
        exp = block.expansion
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = make_stage(block, 64, 64, layers[0], 1)
        self.layer2 = make_stage(block, 64 * exp, 128, layers[1], 2)
        self.layer3 = make_stage(block, 128 * exp, 256, layers[2], 2)
        self.layer4 = make_stage(block, 256 * exp, 512, layers[3], 2)
        self.fc = nn.Linear(512 * exp, num_classes)

        if with_branches:
            (a, b), (c,) = branch_layers
            aux2 = Branch(
                {
                    "layer3": make_stage(block, 128 * exp, 256, a, 2),
                    "layer4": make_stage(block, 256 * exp, 512, b, 2),
                },
                nn.Linear(512 * exp, num_classes),
            )
            aux1 = Branch(
                {"layer4": make_stage(block, 256 * exp, AUX1_PLANES, c, 2)},
                nn.Linear(AUX1_PLANES * exp, num_classes),
            )
            self.set_branches(aux1, aux2)
        init_weights(self)

    def forward_trunk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        shallow = self.layer2(x)
        deep = self.layer3(shallow)
        return shallow, deep, self.layer4(deep)

    def forward_main(self, x: Tensor) -> Tensor:
        return self.fc(global_pool(x))  # torchvision's avgpool, as a mean (branching.global_pool)


def build(arch: str, num_classes: int, in_channels: int, with_branches: bool) -> ImageNetResNet:
    block, layers, branch_layers = SPECS[arch]
    return ImageNetResNet(block, layers, branch_layers, num_classes, in_channels, with_branches)
