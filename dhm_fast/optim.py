"""SGD as in the papers' recipes, with torch's fused (CUDA) or foreach (CPU) implementation."""

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
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(
        param_groups(model, cfg.weight_decay, cfg.no_decay_norm_bias),
        lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **fast,
    )
