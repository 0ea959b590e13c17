"""Model zoo: every network of the DHM paper with its auxiliary branches, behind one registry.

``create_model(name, num_classes, method="dhm", in_channels=3, **options)`` builds one. Every model
has ``num_heads`` (1 or 3), ``head_names`` (``("main",)`` or ``("main", "aux1", "aux2")``) and
``forward(x, active=None, all_heads=False)``; see :class:`~dhm_fast.models.branching.BranchedNet`.
Branch parameters live under ``aux1.`` and ``aux2.``; everything else is the trunk.

Options: ``dropout`` (WRN and DenseNet only, default 0.0); ``fork_at`` (two fork points, ``tv:``/``timm:``
backbones only, see :mod:`~dhm_fast.models.backbones`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ..catalog import ARCH_CHOICES, MODEL_NAMES  # ARCH_CHOICES: for `in` also every tv:NAME / timm:NAME
from . import backbones, cifar_resnet, densenet, imagenet_resnet, reid_nets, wrn
from .branching import HEAD_NAMES, METHODS, Branch, BranchedNet, check_method, is_branch_key

__all__ = [
    "ARCH_CHOICES",
    "HEAD_NAMES",
    "IMAGENET_ARCHS",
    "METHODS",
    "MODEL_NAMES",
    "Branch",
    "BranchedNet",
    "create_model",
    "param_counts",
    "unwrap",
]

_BUILDERS: dict[str, Callable[..., BranchedNet]] = {}
for _module in (imagenet_resnet, cifar_resnet, wrn, densenet, reid_nets):
    for _name in _module.SPECS:
        _BUILDERS[_name] = _module.build

IMAGENET_ARCHS: tuple[str, ...] = tuple(sorted(imagenet_resnet.SPECS))

_BUILD_ARGS = ("arch", "num_classes", "in_channels", "with_branches")


def create_model(
    name: str, num_classes: int, method: str = "dhm", in_channels: int = 3, **options: object
) -> BranchedNet:
    """Build architecture ``name``; with ``method="baseline"`` no branches are built.

    To count parameters of a huge model without allocating it, build it under
    ``with torch.device("meta"):``.
    """
    if name not in ARCH_CHOICES:
        raise ValueError(f"unknown arch '{name}'; choose one of {', '.join(MODEL_NAMES)}, tv:NAME or timm:NAME")
    with_branches = check_method(method)
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    if int(in_channels) != in_channels or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels}")
    builder = backbones.build if backbones.is_backbone(name) else _BUILDERS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p not in _BUILD_ARGS]
    for key in options:
        if key not in accepted:
            allowed = ", ".join(accepted) or "none"
            raise ValueError(f"arch '{name}' has no option '{key}' (options: {allowed})")
    model = builder(name, int(num_classes), int(in_channels), with_branches, **options)
    model.arch = name
    model.build_config = {"num_classes": int(num_classes), "in_channels": int(in_channels), **options}
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside torch.compile (``_orig_mod``) and DDP/DataParallel (``module``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(total parameters, trunk parameters), the trunk being everything outside ``aux1``/``aux2``."""
    named = list(unwrap(model).named_parameters())
    total = sum(p.numel() for _, p in named)
    trunk = sum(p.numel() for n, p in named if not is_branch_key(n))
    return total, trunk
