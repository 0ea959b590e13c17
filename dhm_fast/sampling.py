"""Dynamic branch sampling: which auxiliary heads are active at a step.

The draw is a pure function of (seed, epoch or step), so every process of a multi-process run draws
the same set without communicating, and a resumed run draws what the uninterrupted one would have.
The main head is always active. With every probability 1 (the release's setting) nothing is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dhm_fast.catalog import PER_CHOICES


class BranchSampler:
    def __init__(self, num_heads: int, branch_prob: float | Sequence[float] = 1.0, per: str = "step",
                 seed: int = 0) -> None:
        if per not in PER_CHOICES:
            raise ValueError(f"unknown branch sampling unit {per!r}; choose one of {', '.join(PER_CHOICES)}")
        n_branches = num_heads - 1
        probs = [float(branch_prob)] * n_branches if isinstance(branch_prob, (int, float)) else list(branch_prob)
        if len(probs) != n_branches:
            raise ValueError(f"branch_prob has {len(probs)} entries for {n_branches} branches")
        if any(not 0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"branch_prob must lie in [0, 1], got {probs}")
        self.num_heads = num_heads
        self.probs = probs
        self.per = per
        self.seed = seed

    @property
    def always_all(self) -> bool:
        return all(p >= 1.0 for p in self.probs)

    def active(self, epoch: int, step: int) -> tuple[bool, ...]:
        """Active heads (main first) at global step `step` of epoch `epoch`."""
        if self.always_all:
            return (True,) * self.num_heads
        unit = step if self.per == "step" else epoch
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + unit) & 0x7FFF_FFFF_FFFF_FFFF)
        draws = torch.rand(len(self.probs), generator=g).tolist()
        return (True,) + tuple(u < p for u, p in zip(draws, self.probs, strict=True))
