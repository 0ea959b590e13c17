"""FLOPs (torch.utils.flop_counter: convolutions and matrix products, a multiply-add is 2) and saved
activations of a training step, per active-branch pattern. Counts are linear in the batch, so a batch of 2
is enough, and a model on the "meta" device costs no memory."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from dhm_fast.losses import LossConfig

Pattern = tuple[bool, ...]


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs that `fn()` performs (forward and any backward it runs)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_costs(model: nn.Module, images: Tensor, labels: Tensor, active: Pattern, loss: LossConfig,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
               ) -> tuple[int, int, int]:
    """Per image of one training step: forward FLOPs, forward + loss + backward FLOPs, and the bytes
    autograd saves for backward (each storage once, parameters excluded; 0 on the "meta" device). The
    saved bytes are device-independent: they stand in for peak memory where the CPU has no counter."""
    batch = images.shape[0]
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        ptr = t.untyped_storage().data_ptr()
        if t.device.type != "meta" and ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def forward() -> None:
        with torch.no_grad(), autocast():
            model(images, active=active)

    def train_step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast():
                outputs = model(images, active=active)
            value = loss.compute(outputs, labels, active=active)[0]
        value.backward()

    fwd, total = count_flops(forward), count_flops(train_step)
    model.zero_grad(set_to_none=True)
    return fwd // batch, total // batch, sum(saved.values()) // batch


def patterns(num_heads: int) -> list[Pattern]:
    """Every active-head pattern a sampler can draw (the main head is always on)."""
    return [(True, *rest) for rest in itertools.product((True, False), repeat=num_heads - 1)]


def pattern_probability(pattern: Pattern, branch_probs: Sequence[float]) -> float:
    """Probability of `pattern` when branch k is on independently with probability branch_probs[k]."""
    return math.prod(p if on else 1.0 - p for on, p in zip(pattern[1:], branch_probs, strict=True))


def expected(values: dict[Pattern, float], branch_probs: Sequence[float]) -> float:
    """Expectation of a per-pattern quantity under independent Bernoulli branch sampling."""
    return sum(pattern_probability(pat, branch_probs) * v for pat, v in values.items())


def model_step_flops(arch: str, method: str, image_size: int, num_classes: int = 1000,
                     in_channels: int = 3, branch_prob: float = 1.0) -> float:
    """Expected training-step FLOPs per image of `arch` trained with `method`, counted on "meta"."""
    from dhm_fast.models import create_model

    with torch.device("meta"):
        model = create_model(arch, num_classes, method=method, in_channels=in_channels)
        images = torch.empty(2, in_channels, image_size, image_size)
        labels = torch.zeros(2, dtype=torch.long)
    loss = LossConfig(method=method)
    if model.num_heads == 1 or branch_prob >= 1.0:
        return float(step_costs(model, images, labels, (True,) * model.num_heads, loss)[1])
    per = {pat: float(step_costs(model, images, labels, pat, loss)[1]) for pat in patterns(model.num_heads)}
    return expected(per, [branch_prob] * (model.num_heads - 1))
