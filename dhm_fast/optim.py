"""The recipes' optimizers, with torch's fused kernels (CPU and CUDA) by default: SGD (the classification
recipes) or Adam with AMSGrad and L2 weight decay (the person re-ID recipes, docs/reid.md)."""

from __future__ import annotations

import torch
from torch import nn

from dhm_fast.config import TrainConfig

OPTIMIZER_IMPLS = ("fused", "foreach")


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list[dict]:
    """One group, or two when norm weights and biases (all 1-d tensors) are exempt from decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    impl: str = "fused") -> torch.optim.Optimizer:
    """`cfg.optimizer` with torch's `impl` kernels: fused SGD is 3-4x faster than foreach on the CPU too
    (measured with `python -m benchmarks.throughput --optimizer-impl`)."""
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"unknown SGD implementation {impl!r}; choose one of {', '.join(OPTIMIZER_IMPLS)}")
    groups = param_groups(model, cfg.weight_decay, cfg.decay_norm_bias)
    if cfg.optimizer == "amsgrad":  # its state starts at a parameter's first gradient: nothing to pre-fill
        return torch.optim.Adam(groups, lr=cfg.lr, amsgrad=True, **{impl: True})
    optimizer = torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, **{impl: True},
    )
    if cfg.momentum > 0 and impl == "fused":
        # The fused kernel fails when a parameter gets its first gradient after others already hold
        # momentum (a branch skipped at step 0 and drawn later). Zero buffers up front give the same
        # updates (dampening 0: the first step sets buf = grad either way).
        for group in optimizer.param_groups:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer
