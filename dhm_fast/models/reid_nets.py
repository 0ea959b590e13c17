"""Person re-ID networks with DHM branches: ResNet-50 and MobileNetV2 (docs/reid.md).

Every head (main, aux1, aux2) ends in global average pooling -> BatchNorm1d -> a linear classifier over the
training identities. In training mode a head returns logits; in eval mode it returns the BatchNorm output,
the embedding that retrieval ranks (the classifier's input: the pooled feature, normalised).

* ``reid_resnet50``: the ImageNet ResNet-50 of imagenet_resnet.py, trunk names torchvision's, branches
  forked after layer2 and layer3 as in the paper's ImageNet models; the main head replaces ``fc``.
* ``reid_mobilenetv2``: torchvision's MobileNetV2 ``features`` as the trunk. As for the ResNets, the
  branches fork before the last two down-sampling stages: aux2 after block 6 (stride 8, 32 channels), aux1
  after block 13 (stride 16, 96 channels). aux2 repeats the stride-16 and stride-32 stages with fewer
  blocks, aux1 repeats the stride-32 stage at twice the width, as the ResNets' aux1 does.

`freeze_trunk(True)` trains only the new layers (heads and branches): the trunk's parameters stop
requiring gradients and its BatchNorm layers keep their statistics, the warm-up of a pretrained trunk.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ..catalog import REID_ARCHS
from .branching import Branch, BranchedNet, global_pool, init_weights
from .imagenet_resnet import AUX1_PLANES, ImageNetResNet, block_class

SPECS = REID_ARCHS  # declared in dhm_fast/catalog.py (torch-free, for --help)
NEW_LAYERS = ("head", "aux1", "aux2")  # everything else is the trunk


class ReidHead(nn.Module):
    """Pooled feature -> BatchNorm1d -> classifier (no bias: the BatchNorm's shift is the bias)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)
        self.classifier = nn.Linear(channels, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, pooled: Tensor) -> Tensor:
        embedding = self.bn(pooled)
        return self.classifier(embedding) if self.training else embedding


class FreezableTrunk(BranchedNet):
    """A re-ID network whose trunk (every child but the new layers) can be frozen for a warm-up."""

    trunk_frozen = False

    def freeze_trunk(self, frozen: bool) -> None:
        self.trunk_frozen = frozen
        for name, module in self.named_children():
            if name not in NEW_LAYERS:
                module.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> FreezableTrunk:
        super().train(mode)
        if mode and self.trunk_frozen:
            for name, module in self.named_children():
                if name not in NEW_LAYERS:
                    module.eval()
        return self


class ReidResNet50(FreezableTrunk, ImageNetResNet):
    def __init__(self, num_classes: int, in_channels: int, with_branches: bool) -> None:
        super().__init__("Bottleneck", [3, 4, 6, 3], [[3, 2], [3]], num_classes, in_channels, with_branches)
        del self.fc
        expansion = block_class("Bottleneck").expansion
        self.head = ReidHead(512 * expansion, num_classes)
        if with_branches:
            self.aux1.fc = ReidHead(AUX1_PLANES * expansion, num_classes)
            self.aux2.fc = ReidHead(512 * expansion, num_classes)

    def forward_main(self, x: Tensor) -> Tensor:
        return self.head(global_pool(x))


def inverted_residuals(channels: Sequence[int], stride: int) -> nn.Sequential:
    """MobileNetV2 blocks (expansion 6) through `channels`; the first block has the stride."""
    from torchvision.models.mobilenetv2 import InvertedResidual  # torchvision.models: imported when building

    return nn.Sequential(*(InvertedResidual(a, b, stride if i == 0 else 1, 6)
                           for i, (a, b) in enumerate(zip(channels, channels[1:], strict=False))))


def conv1x1(inp: int, out: int) -> nn.Module:
    from torchvision.ops.misc import Conv2dNormActivation

    return Conv2dNormActivation(inp, out, kernel_size=1, activation_layer=nn.ReLU6)


class ReidMobileNetV2(FreezableTrunk):
    SHALLOW, DEEP = 6, 13  # fork after these blocks of `features`: ends of the stride-8 and stride-16 stages

    def __init__(self, num_classes: int, in_channels: int, with_branches: bool) -> None:
        from torchvision.models import mobilenet_v2
        from torchvision.ops.misc import Conv2dNormActivation

        super().__init__()
        self.features = mobilenet_v2().features  # torchvision's names and init; ends with a 1x1 conv to 1280
        if in_channels != 3:
            self.features[0] = Conv2dNormActivation(in_channels, 32, stride=2, activation_layer=nn.ReLU6)
        self.head = ReidHead(1280, num_classes)
        if with_branches:
            aux2 = Branch({"stage16": inverted_residuals([32, 64, 64, 96, 96], 2),
                           "stage32": inverted_residuals([96, 160, 160, 320], 2), "conv": conv1x1(320, 1280)},
                          ReidHead(1280, num_classes))
            aux1 = Branch({"stage32": inverted_residuals([96, 320, 320, 320, 640], 2), "conv": conv1x1(640, 2560)},
                          ReidHead(2560, num_classes))
            init_weights(aux1)
            init_weights(aux2)
            self.set_branches(aux1, aux2)

    def forward_trunk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        shallow = deep = x
        for i, block in enumerate(self.features):
            x = block(x)
            if i == self.SHALLOW:
                shallow = x
            elif i == self.DEEP:
                deep = x
        return shallow, deep, x

    def forward_main(self, x: Tensor) -> Tensor:
        return self.head(global_pool(x))


def build(arch: str, num_classes: int, in_channels: int, with_branches: bool) -> FreezableTrunk:
    net = ReidResNet50 if arch == "reid_resnet50" else ReidMobileNetV2
    return net(num_classes, in_channels, with_branches)
