"""Global batch semantics: how `--batch-size` splits over processes and micro-batches, and how the
recipe's learning rate follows the global batch.

`--batch-size` is the GLOBAL batch: the samples behind one optimizer step, summed over every process
and every accumulated micro-batch. A recipe therefore means the same optimisation on 1 GPU or 64:

    per-process micro-batch = batch_size / (world_size * grad_accum)    (must divide exactly)

Linear scaling rule (Goyal et al., 2017): the recipe's `lr` belongs to the recipe's `batch_size`.
When the global batch differs and `--scale-lr` is on (the default), the recipe's rate is multiplied
by batch / recipe batch; a larger batch also gets a linear warm-up (unless one is asked for) of
min(5, epochs / 10) epochs. An explicit `--lr` is taken as given: the user chose it for their batch.
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
    if explicit_lr is not None:
        return ScaledLR(explicit_lr, warmup)
    if not enabled or batch == recipe_batch:
        return ScaledLR(recipe_lr, warmup)
    factor = batch / recipe_batch
    lr = recipe_lr * factor
    if factor > 1 and explicit_warmup is None:
        warmup = max(warmup, min(MAX_WARMUP_EPOCHS, epochs / 10))
    return ScaledLR(lr, warmup)
