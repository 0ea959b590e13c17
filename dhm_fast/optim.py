"""SGD as in the papers' recipes, with torch's fused kernel (CPU and CUDA)."""

from __future__ import annotations

import torch
from torch import nn

from dhm_fast.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """One group, or two when norm weights and biases (all 1-d tensors) are exempt from decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.SGD:
    # Fused SGD: 3-4x faster than foreach on the CPU too (benchmarks/throughput.py --optimizer-impl).
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias),
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, fused=True,
    )
    if cfg.momentum > 0:
        # The fused kernel fails when a parameter gets its first gradient after others already hold
        # momentum (a branch skipped at step 0 and drawn later). Zero buffers up front give the same
        # updates (dampening 0: the first step sets buf = grad either way).
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer
