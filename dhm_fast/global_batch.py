"""The global batch: how `--batch-size` splits over processes and micro-batches, and how the recipe's
learning rate follows it (the linear scaling rule of Goyal et al., 2017). docs/distributed.md, "The
batch size is global", gives the rules and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from dhm_fast.errors import UserError

MAX_WARMUP_EPOCHS = 5.0  # Goyal et al.'s gradual warm-up for large-batch ImageNet


def micro_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    """Samples per forward pass on one process; refuses splits that would change the global batch."""
    if grad_accum < 1:
        raise UserError(f"--grad-accum must be at least 1, got {grad_accum}")
    parts = world_size * grad_accum
    if global_batch % parts:
        raise UserError(
            f"--batch-size {global_batch} (the global batch) does not split evenly over {world_size} "
            f"process(es) x {grad_accum} micro-batch(es); use a multiple of {parts}"
        )
    return global_batch // parts


@dataclass(frozen=True)
class ScaledLR:
    lr: float
    warmup_epochs: float


def scale_lr(
    *, recipe_lr: float, recipe_batch: int, batch: int, epochs: float, recipe_warmup: float,
    enabled: bool, explicit_lr: float | None = None, explicit_warmup: float | None = None,
) -> ScaledLR:
    """The learning rate and warm-up a run uses, from the recipe's and the user's values."""
    warmup = recipe_warmup if explicit_warmup is None else explicit_warmup
    if explicit_lr is not None or not enabled:  # an explicit lr was chosen for the user's batch
        return ScaledLR(recipe_lr if explicit_lr is None else explicit_lr, warmup)
    factor = batch / recipe_batch
    if factor > 1 and explicit_warmup is None:
        warmup = max(warmup, min(MAX_WARMUP_EPOCHS, epochs / 10))
    return ScaledLR(recipe_lr * factor, warmup)
