"""The CPU op's fast paths (kernels/fused_loss.cpp, fused_loss_cpu.cpp): the direct eager entry against
torch.ops, its refusal of inputs it does not take, and the per-thread scratch kept between calls.
The values themselves are checked against float64 in tests/test_fused.py."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

import kernels
from dhm_fast import losses

pytestmark = pytest.mark.skipif(kernels.eager_entry("fused_loss") is None, reason="kernels._C is not built")


def problem(h, b, k, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = [(torch.randn(b, k, generator=gen, dtype=torch.float64) * 3).to(dtype) for _ in range(h)]
    target = torch.randint(0, k, (b,), generator=gen)
    kl_w = (torch.rand(h, h, generator=gen) * (torch.rand(h, h, generator=gen) > 0.3)).fill_diagonal_(0)
    return logits, target, torch.rand(h, generator=gen) + 0.1, kl_w


def through(call, logits, target, ce_w, kl_w):
    """(loss, stats, grads) of `call(leaves, target, ce_w, kl_w) -> (loss, stats)` with autograd."""
    leaves = [x.detach().clone().requires_grad_() for x in logits]
    loss, stats = call(leaves, target, ce_w, kl_w)
    return loss, stats, torch.autograd.grad(loss, leaves)


def by_torch_ops(leaves, target, ce_w, kl_w):
    loss, stats, _ = kernels.op("fused_loss").default(leaves, target, ce_w, kl_w, 2.0, 0.9, 1e-8, 0.1, True)
    return loss, stats


def by_backend(leaves, target, ce_w, kl_w):
    return losses.fused_backend(leaves, target, ce_w, kl_w, 2.0, 0.9, 1e-8, 0.1)


def assert_same_bits(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_eager_entry_gives_torch_ops_bits(dtype):
    args = problem(3, 9, 37, dtype)
    assert_same_bits(through(by_backend, *args), through(by_torch_ops, *args))


class Tagged(torch.Tensor):
    """A tensor subclass: __torch_function__ must see the op, so the direct entry declines it."""


def test_subclasses_and_torch_function_modes_take_torch_ops():
    logits, target, ce_w, kl_w = problem(2, 4, 10)
    eager = kernels.eager_entry("fused_loss")
    rest = (target, ce_w, kl_w, 1.0, 1.0, 1e-8, 0.0, False)
    assert eager(logits, *rest) is not NotImplemented
    assert eager([logits[0].as_subclass(Tagged), logits[1]], *rest) is NotImplemented
    assert eager(logits, target.as_subclass(Tagged), *rest[1:]) is NotImplemented
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Record():
        assert eager(logits, *rest) is NotImplemented
        loss, _ = losses.fused_backend(logits, target, ce_w, kl_w, 1.0, 1.0, 1e-8, 0.0)  # via torch.ops
    assert any("fused_loss" in name for name in seen)
    expected, _ = losses.fused_backend(logits, target, ce_w, kl_w, 1.0, 1.0, 1e-8, 0.0)
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_scratch_kept_between_calls_leaves_nothing_behind(threads):
    # Each thread keeps its scratch between calls (and a large problem gets its own buffer): a call's
    # result must not depend on what ran before it, at any class count (padded or whole vectors).
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shapes = [(3, 64, 100), (3, 2, 21843), (4, 40, 1000), (2, 5, 16), (3, 64, 100), (3, 2, 21843)]
        first = {}
        for i, (h, b, k) in enumerate(shapes):
            out = through(by_backend, *problem(h, b, k, seed=k))
            if (h, b, k) in first:
                assert_same_bits(out, first[h, b, k])
            first.setdefault((h, b, k), out)
            assert torch.isfinite(out[0]), (i, h, b, k)
    finally:
        torch.set_num_threads(before)
