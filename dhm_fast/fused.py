"""Python side of the fused mimicking-loss op `torch.ops.dhm_fast.fused_loss` (kernels/).

The op computes, in one pass over every head's logits, the per-head CE, all pairwise KL terms, the
loss, the logging stats and the gradient w.r.t. every head's logits. The gradient is saved in the
logits' dtype, except for float16, where it is saved in float32: a GradScaler's loss scale (up to
2^16 and more) is applied in backward, and many unscaled entries would be subnormal or zero in
float16. Backward multiplies by grad_output, then casts to the logits' dtype.

This module gives the op (from `kernels`) the signature of `dhm_fast.losses.reference_backend`;
`dhm_fast.losses.select_backend` decides which of the two runs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

import kernels

OP_NAME = "fused_loss"


def fused_loss(
    logits: Sequence[Tensor],
    target: Tensor,
    ce_weights: Tensor,
    kl_weights: Tensor,
    temperature: float,
    alpha: float,
    eps: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """Loss (0-d) and flat float32 stats [ce (H), kl (H*H), correct (H)] over the given heads.

    Same contract as `dhm_fast.losses.reference_backend`: `logits` are the active heads' [B, K]
    tensors (float32/bfloat16/float16, or float64 for gradient checks), teacher row / student
    column in `kl_weights`. The caller has checked that the op has a kernel for the device.
    """
    logits = list(logits)
    if not logits:
        raise ValueError("fused_loss needs at least one head's logits")
    device = logits[0].device
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in logits))
    logits = [x.to(dtype) for x in logits]  # mixed precisions across heads: compute in the widest one
    compute_grad = torch.is_grad_enabled() and any(x.requires_grad for x in logits)
    loss, stats, _ = kernels.op(OP_NAME)(
        logits,
        target,
        ce_weights.to(device=device, dtype=torch.float32),
        kl_weights.to(device=device, dtype=torch.float32),
        float(temperature),
        float(alpha),
        float(eps),
        float(label_smoothing),
        compute_grad,
    )
    return loss, stats
