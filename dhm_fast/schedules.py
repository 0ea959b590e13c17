"""Schedules as pure functions of training progress, so resuming at a step restores them exactly: the
learning rate (multistep, cosine or constant, with optional linear warm-up) and the ramps of alpha and
the temperature (docs/short_schedules.md says why a ramp helps short schedules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("multistep", "cosine", "constant")
RAMP_SHAPES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class LRSchedule:
    base_lr: float
    kind: str = "multistep"
    milestones: tuple[float, ...] = ()  # in epochs (fractions allowed)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    total_epochs: float = 1.0
    min_lr: float = 0.0
    warmup_start: float = 0.01  # warm-up begins at this fraction of the scheduled rate

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {', '.join(LR_SCHEDULES)}")

    def lr(self, epoch_progress: float) -> float:
        """Learning rate at `epoch_progress` epochs into training (e.g. 2.5 = half-way through epoch 3)."""
        e = epoch_progress
        if self.kind == "multistep":
            lr = self.base_lr * self.gamma ** sum(e >= m for m in self.milestones)
        elif self.kind == "cosine":
            span = max(self.total_epochs - self.warmup_epochs, 1e-12)
            t = min(max(e - self.warmup_epochs, 0.0) / span, 1.0)
            lr = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))
        else:
            lr = self.base_lr
        if self.warmup_epochs > 0 and e < self.warmup_epochs:
            lr *= self.warmup_start + (1.0 - self.warmup_start) * e / self.warmup_epochs
        return lr


@dataclass(frozen=True)
class Ramp:
    """A value that ramps from `start` to `value` over the first `epochs` epochs (then stays)."""

    value: float
    shape: str = "constant"
    epochs: float = 0.0
    start: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in RAMP_SHAPES:
            raise ValueError(f"unknown ramp shape {self.shape!r}; choose one of {', '.join(RAMP_SHAPES)}")
        if self.epochs < 0:
            raise ValueError(f"ramp length must be >= 0 epochs, got {self.epochs}")

    def at(self, epoch_progress: float) -> float:
        if self.shape == "constant" or self.epochs <= 0 or epoch_progress >= self.epochs:
            return self.value
        t = max(epoch_progress, 0.0) / self.epochs
        if self.shape == "cosine":
            t = 0.5 * (1 - math.cos(math.pi * t))
        return self.start + (self.value - self.start) * t


def ramp_epochs(spec: float, total_epochs: float) -> float:
    """A warm-up length given as epochs (>= 1) or as a fraction of training (< 1)."""
    return spec * total_epochs if 0 < spec < 1 else spec
