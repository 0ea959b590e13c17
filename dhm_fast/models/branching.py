"""Shared head logic of every DHM network: the trunk-plus-branches forward and the branch container.

A network is a trunk (the ordinary backbone with its ``main`` classifier) plus, unless it was built
with ``method="baseline"``, two auxiliary branches forked from intermediate trunk features:

* ``aux1`` forks at the deeper fork point (before the last trunk stage),
* ``aux2`` forks at the shallower one (before the last two trunk stages).

Heads are always returned in the order ``(main, aux1, aux2)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..catalog import METHODS

HEAD_NAMES: tuple[str, ...] = ("main", "aux1", "aux2")
BRANCH_PREFIXES: tuple[str, ...] = ("aux1.", "aux2.")

Heads = tuple[Tensor | None, ...]


def check_method(method: str) -> bool:
    """Validate ``method`` and return whether it needs the auxiliary branches."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    return method != "baseline"


def global_pool(x: Tensor) -> Tensor:
    """Global average pooling to a [B, C] matrix (any input resolution works).

    A mean over H and W, whose CUDA backward is deterministic (--deterministic); adaptive_avg_pool2d's own
    backward is not. PyTorch 2.14 happens to run a 1x1 adaptive pool as this same mean (so outputs are
    bitwise unchanged), an implementation choice that the mean does not depend on.
    """
    return x.mean((-2, -1))


def init_weights(module: nn.Module) -> None:
    """He-normal (fan_out) convolutions and unit/zero BatchNorm: torchvision's and the CIFAR nets' init.

    ``normal(0, sqrt(2 / (k*k*out_channels)))`` of the CIFAR references is exactly kaiming fan_out.
    Linear layers keep PyTorch's default init, as in both references.
    """
    first = next(module.parameters(), None)
    if first is not None and first.is_meta:  # shapes only (FLOP counts, export's skeleton): nothing to draw,
        return  # and meta normal_ runs a slow decomposition that imports torch._dynamo
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Branch(nn.Module):
    """An auxiliary head: named stages run in order, optional final BN + ReLU, global pool, linear.

    Stage names mirror the trunk stage they imitate (``layer3``, ``transition2`` ...) so that a
    release checkpoint's ``layer3_head2`` maps to ``aux2.layer3`` by a plain rename.
    """

    def __init__(self, stages: Mapping[str, nn.Module], fc: nn.Linear, norm: nn.Module | None = None):
        super().__init__()
        if not stages:
            raise ValueError("a branch needs at least one stage")
        self.stage_names = tuple(stages)
        for name, stage in stages.items():
            self.add_module(name, stage)
        # Pre-activation nets (WRN, DenseNet) end every head with BN + ReLU before pooling.
        self.bn = norm
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(global_pool(x))


class BranchedNet(nn.Module):
    """Base class: a trunk with a main classifier and, optionally, the ``aux1``/``aux2`` branches.

    Subclasses build their trunk, call :meth:`set_branches`, and implement :meth:`forward_trunk`
    (returning the features at the shallow fork, at the deep fork, and after the last stage) and
    :meth:`forward_main` (the main classifier on the last-stage features).
    """

    num_heads: int
    head_names: tuple[str, ...]

    def __init__(self) -> None:
        super().__init__()
        self.aux1: Branch | None = None
        self.aux2: Branch | None = None
        self.num_heads = 1
        self.head_names = HEAD_NAMES[:1]
        # Filled by the registry so that export.strip_branches can rebuild the same architecture.
        self.arch: str = ""
        self.build_config: dict[str, object] = {}

    def set_branches(self, aux1: Branch | None, aux2: Branch | None) -> None:
        if (aux1 is None) != (aux2 is None):
            raise ValueError("either both branches or none")
        self.aux1, self.aux2 = aux1, aux2
        self.num_heads = 1 if aux1 is None else 3
        self.head_names = HEAD_NAMES[: self.num_heads]

    def forward_trunk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def forward_main(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_active(self, active: Sequence[bool] | None) -> tuple[bool, ...]:
        if active is None:
            return (True,) * self.num_heads
        # Plain Python bools only: deciding on tensor values here would sync the device every step.
        flags = tuple(bool(a) for a in active)
        if len(flags) != self.num_heads:
            raise ValueError(f"active has {len(flags)} entries but the model has {self.num_heads} heads")
        if not flags[0]:
            raise ValueError("active[0] (the main head) must be True")
        return flags

    def forward(
        self, x: Tensor, active: Sequence[bool] | None = None, all_heads: bool = False
    ) -> Tensor | Heads:
        """Run the trunk once and the active branches on its intermediate features.

        Training mode (or ``all_heads=True``): a tuple ``(main, aux1, aux2)`` of logits (just
        ``(main,)`` for a baseline model), with ``None`` in the slot of a branch that ``active``
        switched off; that branch is not run at all. Eval mode: the main logits as one Tensor.
        """
        flags = self._check_active(active)
        shallow, deep, last = self.forward_trunk(x)
        main = self.forward_main(last)
        if not (self.training or all_heads):
            return main
        if self.num_heads == 1:
            return (main,)
        assert self.aux1 is not None and self.aux2 is not None
        aux1 = self.aux1(deep) if flags[1] else None
        aux2 = self.aux2(shallow) if flags[2] else None
        return (main, aux1, aux2)


def is_branch_key(name: str) -> bool:
    """True for a parameter/buffer name that belongs to an auxiliary branch."""
    return name.startswith(BRANCH_PREFIXES)
