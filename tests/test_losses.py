"""dhm_loss against an independent float64 transcription of the DHM objective (the paper, section 3).

The reference below loops over ordered pairs exactly as the formula reads; it shares no code with
dhm_fast.losses. These tests force `reference=True` (the plain-PyTorch backend); the fused op has its
own tests against its own reference in test_fused.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from dhm_fast.losses import DIRECTIONS, METHODS, LossConfig, dhm_loss, mimic_weights


def expected_loss(logits, target, method, temperature=1.0, alpha=1.0, direction="both", eps=1e-8,
                  label_smoothing=0.0, active=None, ce_weights=None, kl_weights=None):
    """The formula, one term at a time, in float64 numpy-style arithmetic."""
    h = len(logits)
    active = active or [True] * h
    lam = ce_weights or [1.0] * h
    mu = kl_weights or [[1.0] * h for _ in range(h)]
    z = [x.double() for x in logits]
    b, k = z[0].shape
    total = 0.0
    for i in range(h):
        if not active[i] or (method == "baseline" and i > 0):
            continue
        logp = z[i] - z[i].logsumexp(1, keepdim=True)
        onehot = F.one_hot(target, k).double()
        soft = onehot * (1 - label_smoothing) + label_smoothing / k
        total = total + lam[i] * (-(soft * logp).sum(1).mean())
    if method in ("dks", "dhm"):
        for i, j in itertools.permutations(range(h), 2):  # i teacher, j student
            if not (active[i] and active[j]):
                continue
            if direction == "top-down" and not i < j:  # deeper (lower index) teaches
                continue
            if direction == "bottom-up" and not i > j:
                continue
            p = torch.softmax(z[i] / temperature, 1)
            q = torch.softmax(z[j] / temperature, 1)
            p_s = (p + eps) / (1 + k * eps)
            q_s = (q + eps) / (1 + k * eps)
            kl = (p_s * torch.log(p_s / q_s)).sum(1).mean()
            total = total + alpha * mu[i][j] * temperature**2 * kl
    return total


def random_heads(h=3, b=16, k=10, scale=3.0, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    logits = [(torch.randn(b, k, generator=g) * scale).to(dtype) for _ in range(h)]
    target = torch.randint(0, k, (b,), generator=g)
    return logits, target


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_all_methods_match_the_formula(method, direction, temperature):
    logits, target = random_heads()
    got = dhm_loss(logits, target, method=method, direction=direction, temperature=temperature,
                   alpha=0.7, reference=True)
    want = expected_loss(logits, target, method, temperature, 0.7, direction)
    assert got.dtype == torch.float64
    assert math.isclose(got.item(), want.item(), rel_tol=1e-6)


@pytest.mark.parametrize("eps", [0.0, 1e-8, 1e-3])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_eps_label_smoothing_weights_and_mask(eps, label_smoothing):
    logits, target = random_heads(h=4, b=7, k=33)
    active = [True, False, True, True]
    lam = [1.0, 0.5, 0.3, 2.0]
    mu = torch.rand(4, 4).tolist()
    got = dhm_loss(logits, target, method="dhm", eps=eps, label_smoothing=label_smoothing, active=active,
                   ce_weights=lam, kl_weights=mu, reference=True)
    want = expected_loss(logits, target, "dhm", eps=eps, label_smoothing=label_smoothing, active=active,
                         ce_weights=lam, kl_weights=mu)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-6)


def test_skipped_branch_given_as_none_equals_inactive_mask():
    logits, target = random_heads()
    masked = dhm_loss(logits, target, active=[True, True, False], reference=True)
    skipped = dhm_loss([logits[0], logits[1], None], target, reference=True)
    assert torch.equal(masked, skipped)


@pytest.mark.parametrize("scale", [1e4, 0.0])
def test_extreme_logits_stay_finite_and_correct(scale):
    logits, target = random_heads(scale=scale, k=50)
    logits[1][0] = 0.0  # an all-equal row
    logits[2][1, :] = -1e4
    logits[2][1, 3] = 1e4  # one-hot-like row
    for method in METHODS:
        got = dhm_loss(logits, target, method=method, reference=True)
        want = expected_loss(logits, target, method)
        assert torch.isfinite(got)
        assert math.isclose(got.item(), want.item(), rel_tol=1e-6, abs_tol=1e-9)


def test_float32_and_bfloat16_inputs_are_computed_in_float32():
    logits, target = random_heads(dtype=torch.float64)
    want = expected_loss(logits, target, "dhm").item()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)):
        cast = [x.to(dtype) for x in logits]
        got = dhm_loss(cast, target, reference=True)
        assert got.dtype == torch.float32
        # compare against the formula on the same rounded inputs, and loosely against the float64 ones
        assert math.isclose(got.item(), expected_loss(cast, target, "dhm").item(), rel_tol=1e-5)
        assert math.isclose(got.item(), want, rel_tol=tol)


def test_eps_zero_equals_torch_kl_div():
    logits, target = random_heads(h=2)
    t = 2.0
    kl_only = dhm_loss(logits, target, method="dhm", eps=0.0, temperature=t, ce_weights=[0.0, 0.0],
                       direction="top-down", reference=True)
    teacher = torch.softmax(logits[0] / t, 1)
    student_log = torch.log_softmax(logits[1] / t, 1)
    torch_kl = F.kl_div(student_log, teacher, reduction="batchmean") * t * t
    assert math.isclose(kl_only.item(), torch_kl.item(), rel_tol=1e-10)


def test_gradient_flows_to_students_only():
    logits, target = random_heads(h=3)
    z = [x.clone().requires_grad_() for x in logits]
    # top-down: main (0) teaches aux1 and aux2, aux1 teaches aux2; no CE so only KL gradients remain
    dhm_loss(z, target, direction="top-down", ce_weights=[0, 0, 0], reference=True).backward()
    assert z[0].grad.abs().max() == 0  # main is only ever a teacher
    assert z[1].grad.abs().max() > 0 and z[2].grad.abs().max() > 0


def test_gradient_matches_autograd_of_the_formula():
    logits, target = random_heads(h=3, b=5, k=7)
    z = [x.clone().requires_grad_() for x in logits]
    dhm_loss(z, target, eps=1e-3, temperature=2.0, reference=True).backward()
    # The formula with teachers detached, differentiated by autograd.
    z2 = [x.clone().requires_grad_() for x in logits]
    ce = sum(F.cross_entropy(x, target) for x in z2)
    kl = 0
    for i, j in itertools.permutations(range(3), 2):
        p = (torch.softmax(z2[i].detach() / 2, 1) + 1e-3) / (1 + 7e-3)
        q = (torch.softmax(z2[j] / 2, 1) + 1e-3) / (1 + 7e-3)
        kl = kl + 4 * (p * (p.log() - q.log())).sum(1).mean()
    (ce + kl).backward()
    for a, b in zip(z, z2, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_stats_report_per_head_ce_kl_and_correct_counts():
    logits, target = random_heads(h=3, b=20, k=5)
    _, stats = dhm_loss(logits, target, active=[True, False, True], return_stats=True, eps=0.0, reference=True)
    assert stats.ce[1] == 0 and stats.correct[1] == 0 and stats.kl[1].abs().sum() == 0
    ce2 = F.cross_entropy(logits[2], target)
    assert math.isclose(stats.ce[2].item(), ce2.item(), rel_tol=1e-5)
    assert stats.correct[0].item() == (logits[0].argmax(1) == target).sum().item()
    kl_02 = F.kl_div(F.log_softmax(logits[2], 1), F.softmax(logits[0], 1), reduction="batchmean")
    assert math.isclose(stats.kl[0, 2].item(), kl_02.item(), rel_tol=1e-5)


def test_method_weights():
    ce, kl = mimic_weights(3, "baseline")
    assert ce == [1.0, 0.0, 0.0] and all(v == 0 for r in kl for v in r)
    ce, kl = mimic_weights(3, "dsl")
    assert ce == [1.0, 1.0, 1.0] and all(v == 0 for r in kl for v in r)
    _, kl = mimic_weights(3, "dhm", "top-down")
    assert kl == [[0, 1, 1], [0, 0, 1], [0, 0, 0]]
    _, kl = mimic_weights(3, "dhm", "bottom-up")
    assert kl == [[0, 0, 0], [1, 0, 0], [1, 1, 0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "dhmx"}, "unknown method 'dhmx'"),
        ({"direction": "sideways"}, "unknown direction 'sideways'"),
        ({"active": [False, True, True]}, "main head"),
        ({"active": [True, True]}, "active has 2 entries"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    logits, target = random_heads()
    with pytest.raises(ValueError, match=message):
        dhm_loss(logits, target, reference=True, **kwargs)


# ---------------------------------------------------------------------------- configuration
def test_loss_config_is_frozen_hashable_and_validated():
    config = LossConfig(method="dks", direction="top-down", ce_weights=[1.0, 0.5], kl_weights=[[0, 1], [1, 0]])
    assert config.ce_weights == (1.0, 0.5) and config.kl_weights == ((0.0, 1.0), (1.0, 0.0))
    assert hash(config) == hash(LossConfig(method="dks", direction="top-down", ce_weights=(1, 0.5),
                                           kl_weights=((0, 1), (1, 0))))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.method = "dhm"
    for bad, message in [({"method": "dhmx"}, "unknown method 'dhmx'"),
                         ({"direction": "up"}, "unknown direction 'up'"),
                         ({"eps": -1e-8}, "eps must be"),
                         ({"eps": math.nan}, "eps must be"),
                         ({"label_smoothing": 1.5}, "label_smoothing must be")]:
        with pytest.raises(ValueError, match=message):
            LossConfig(**bad)


def test_compute_equals_dhm_loss_and_the_formula():
    logits, target = random_heads(h=3, b=9, k=12, seed=3)
    config = LossConfig(method="dhm", direction="bottom-up", eps=1e-3, label_smoothing=0.1,
                        ce_weights=(1.0, 0.4, 0.4), reference=True)
    loss, stats = config.compute(logits, target, active=[True, False, True], alpha=0.6, temperature=2.0)
    same, same_stats = dhm_loss(logits, target, method="dhm", direction="bottom-up", eps=1e-3,
                                label_smoothing=0.1, ce_weights=[1.0, 0.4, 0.4], active=[True, False, True],
                                alpha=0.6, temperature=2.0, reference=True, return_stats=True)
    assert torch.equal(loss, same) and torch.equal(stats.kl, same_stats.kl)
    want = expected_loss(logits, target, "dhm", 2.0, 0.6, "bottom-up", 1e-3, 0.1, [True, False, True],
                         [1.0, 0.4, 0.4])
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-7)  # the weights are float32 (0.4 to ~1e-8)


# ---------------------------------------------------------------------------- no host-device sync
class HostTraffic(TorchDispatchMode):
    """Counts what would stall a GPU step: scalar reads (`.item()`, `bool(t)`, ...) and tensors made
    from host data (`torch.tensor(...)`) or copied from the CPU to another device."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append("scalar read")
        elif func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            self.events.append("tensor from host data")
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device", src.device)
            if src.device.type == "cpu" and torch.device(dst).type != "cpu":
                self.events.append("host-to-device copy")
        return func(*args, **kwargs)


BACKENDS = [True] + ([False] if kernels.has_kernel("fused_loss", "cpu") else [])


@pytest.mark.parametrize("reference", BACKENDS, ids=lambda r: "reference" if r else "fused")
@pytest.mark.parametrize("pattern", ["all", "masked", "skipped"])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_repeated_steps_make_no_host_device_sync(reference, pattern, eps):
    logits, target = random_heads(h=3, b=8, k=10, dtype=torch.float32, seed=5)
    leaves = [x.requires_grad_() for x in logits]
    given = [leaves[0], leaves[1], None] if pattern == "skipped" else leaves
    active = [True, False, True] if pattern == "masked" else None
    config = LossConfig(eps=eps, label_smoothing=0.1, ce_weights=(1.0, 0.3, 0.3), reference=reference)

    def step():
        loss, stats = config.compute(given, target, active=active, alpha=0.5, temperature=2.0)
        loss.backward()
        return stats

    step()  # warm-up: the per-pattern weight and index tensors are made here, once
    with HostTraffic() as traffic:
        for _ in range(3):
            stats = step()
    assert traffic.events == []
    assert config.backend("cpu").name == ("reference" if reference else "fused")
    if pattern != "all":  # the stats still land on the right heads
        off, on = (2, 1) if pattern == "skipped" else (1, 2)
        assert stats.ce[off] == 0 and stats.kl[0, off] == 0 and stats.ce[on] > 0 and stats.kl[0, on] > 0


def test_the_counter_sees_a_sync():
    # The check above is only worth something if the counter catches what it looks for.
    x = torch.randn(3)
    with HostTraffic() as traffic:
        x.sum().item()
        torch.log1p(torch.tensor(3.0))
    assert traffic.events == ["scalar read", "tensor from host data"]
