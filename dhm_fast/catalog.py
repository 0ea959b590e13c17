"""What a run chooses among, as plain data: the methods, KL directions, branch sampling units and networks.

This module imports nothing, so `train.py --help` and `--list-recipes`, which show these choices, answer
without importing torch (tests/test_imports.py checks it in a fresh process). The modules that implement
a choice take its names from here: losses.py and models/branching.py the methods, sampling.py the
sampling units, each models/ family its table of networks.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("baseline", "dsl", "dks", "dhm")
DIRECTIONS: tuple[str, ...] = ("both", "top-down", "bottom-up")
PER_CHOICES: tuple[str, ...] = ("step", "epoch")  # branch sampling: a draw per step or per epoch

# The paper's networks, one table per family (models/<family>.py builds them).
# imagenet_resnet: name -> (torchvision block, trunk blocks per stage, branch_layers [[a, b], [c]])
IMAGENET_RESNETS: dict[str, tuple[str, list[int], list[list[int]]]] = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2], [[1, 2], [2]]),
    "resnet34": ("BasicBlock", [3, 4, 6, 3], [[3, 2], [3]]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3], [[3, 2], [3]]),
    "resnet101": ("Bottleneck", [3, 4, 23, 3], [[12, 2], [3]]),
    "resnet152": ("Bottleneck", [3, 8, 36, 3], [[18, 2], [3]]),
}
# cifar_resnet: name -> (n blocks per stage, branch_layers [[a, b], [c]])
CIFAR_RESNETS: dict[str, tuple[int, list[list[int]]]] = {
    # The family's smallest member; branches follow resnet34's ImageNet pattern (the demo model).
    "resnet20": (3, [[3, 2], [3]]),
    "resnet32": (5, [[5, 3], [5]]),
    "resnet110": (18, [[9, 9], [18]]),
    "resnet1202": (200, [[100, 100], [200]]),
}
# wrn: name -> (depth, widening factor, branch_layers [[a, b], [c]])
WIDE_RESNETS: dict[str, tuple[int, int, list[list[int]]]] = {
    "wrn_16_8": (16, 8, [[2, 1], [2]]),
    "wrn_28_10": (28, 10, [[4, 2], [4]]),
}
# densenet: name -> (bottleneck, depth, growth, compression, branch_layers [[a, b], [c]])
DENSENETS: dict[str, tuple[bool, int, int, float, list[list[int]]]] = {
    "densenet_40_12": (False, 40, 12, 1.0, [[12, 6], [12]]),
    "densenet_100_12": (False, 100, 12, 1.0, [[16, 16], [32]]),
    "densenet_bc_100_12": (True, 100, 12, 0.5, [[16, 16], [32]]),
}
REID_ARCHS: tuple[str, ...] = ("reid_resnet50", "reid_mobilenetv2")  # reid_nets (docs/reid.md)

MODEL_NAMES: tuple[str, ...] = tuple(sorted({*IMAGENET_RESNETS, *CIFAR_RESNETS, *WIDE_RESNETS, *DENSENETS,
                                             *REID_ARCHS}))
BACKBONE_PREFIXES: tuple[str, ...] = ("tv:", "timm:")  # any torchvision / timm classifier (models/backbones.py)


def is_backbone(name: str) -> bool:
    return name.startswith(BACKBONE_PREFIXES)


class _ArchNames(tuple):
    """The paper's names, and also (for ``in``) every ``tv:NAME`` / ``timm:NAME`` (checked when built)."""

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and is_backbone(name))


ARCH_CHOICES: tuple[str, ...] = _ArchNames(MODEL_NAMES)
