"""The fused mimicking-loss op (kernels/, dhm_fast.losses.fused_backend) against an independent float64 reference.

The CPU kernel splits rows over threads: the float64-reference and determinism tests run at 1, 2 and
4 threads (the `threads` fixture), so a race between threads fails them.

The reference below is written from the paper's definition of the objective (a loop over heads and ordered pairs,
autograd for the gradients) and shares no code with dhm_fast.losses or the kernels.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels
from dhm_fast import losses
from dhm_fast.kernel_agreement import random_logits

needs_ext = pytest.mark.skipif(not kernels.has_kernel("fused_loss", "cpu"), reason="kernels._C is not built")
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and kernels.has_kernel("fused_loss", "cuda")),
    reason="needs a GPU and the CUDA kernel",
)
# function_scoped_fixture: `threads` only sets the thread count, which every example may share.
PROPERTY = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DIRECTIONS = ("both", "top-down", "bottom-up")


# ---------------------------------------------------------------------------- the float64 reference
def reference64(logits, target, ce_w, kl_w, temperature, alpha, eps, smoothing):
    """(loss, stats, grads) in float64: sum_h lambda_h CE_h + alpha T^2 sum_{i!=j} w_ij KL(p~_i||q~_j)."""
    z = [x.detach().to("cpu", torch.float64).requires_grad_() for x in logits]
    y = target.cpu()
    h = len(z)
    b, k = z[0].shape
    ce_w = [float(v) for v in ce_w.flatten()]
    kl_w = torch.as_tensor(kl_w, dtype=torch.float64).reshape(h, h).tolist()

    def log_smoothed(x):  # log q~ = log((softmax(x/T) + eps) / (1 + K eps))
        if eps == 0:
            return F.log_softmax(x / temperature, dim=1)
        return torch.log((F.softmax(x / temperature, dim=1) + eps) / (1 + k * eps))

    loss = torch.zeros((), dtype=torch.float64)
    ce = torch.zeros(h, dtype=torch.float64)
    kl = torch.zeros(h, h, dtype=torch.float64)
    correct = torch.zeros(h, dtype=torch.float64)
    for i in range(h):
        log_s = F.log_softmax(z[i], dim=1)
        nll = -log_s[torch.arange(b), y]
        ce_i = ((1 - smoothing) * nll - smoothing * log_s.mean(dim=1)).mean()
        loss = loss + ce_w[i] * ce_i
        ce[i] = ce_i.detach()
        correct[i] = (z[i].detach().argmax(dim=1) == y).sum()
    for i in range(h):  # teacher
        log_p = log_smoothed(z[i]).detach()
        for j in range(h):  # student
            if i == j:
                continue
            kl_ij = (log_p.exp() * (log_p - log_smoothed(z[j]))).sum(dim=1).mean()
            loss = loss + alpha * temperature**2 * kl_w[i][j] * kl_ij
            kl[i, j] = kl_ij.detach()
    grads = torch.autograd.grad(loss, z, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, z, strict=True)]
    stats = torch.cat([ce, kl.flatten(), correct])
    return loss.detach(), stats, grads


def assert_matches(loss, stats, grads, ref, dtype):
    """Loss and stats are float32 math on exactly representable inputs; gradients are rounded to dtype."""
    ref_loss, ref_stats, ref_grads = ref
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert stats.dtype == torch.float32 and stats.shape == ref_stats.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=tol, atol=tol)
    # Stats are float32 even for float64 logits. A KL entry is a class sum of terms as large as the
    # log-probabilities: scale atol with them.
    stat_tol = max(tol, 1e-7)
    stat_scale = max(1.0, ref_stats.abs().max().item())
    torch.testing.assert_close(stats.double().cpu(), ref_stats, rtol=stat_tol, atol=stat_tol * stat_scale)
    g_scale = max(g.abs().max().item() for g in ref_grads)
    rtol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    floor = {torch.float16: 2.0**-24}.get(dtype, 0.0)  # float16 subnormal spacing
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == r.shape
        torch.testing.assert_close(g.double().cpu(), r, rtol=rtol, atol=tol * g_scale + floor)


def call_fused(logits, target, ce_w, kl_w, temperature, alpha, eps, smoothing):
    """The op through its Python entry point, gradients by autograd (so backward is covered)."""
    leaves = [x.detach().requires_grad_() for x in logits]
    loss, stats = losses.fused_backend(leaves, target, ce_w, kl_w, temperature, alpha, eps, smoothing)
    grads = torch.autograd.grad(loss, leaves)
    return loss, stats, grads


make_logits = random_logits  # the same inputs as the CUDA kernels' agreement matrix


def random_weights(gen, h, sparse=True):
    ce_w = torch.rand(h, generator=gen) + 0.1
    kl_w = torch.rand(h, h, generator=gen) * 1.5
    if sparse:
        kl_w = kl_w * (torch.rand(h, h, generator=gen) > 0.3)
    return ce_w.float(), kl_w.fill_diagonal_(0).float()


@st.composite
def op_cases(draw, max_k=5000):
    h = draw(st.integers(1, 8))
    k = draw(st.one_of(st.integers(2, 40), st.integers(41, max_k)))
    b = draw(st.integers(1, 16 if k <= 1000 else 4))
    return dict(
        h=h,
        b=b,
        k=k,
        dtype=draw(st.sampled_from(DTYPES)),
        temperature=draw(st.sampled_from([0.5, 1.0, 4.0])),
        eps=draw(st.sampled_from([0.0, 1e-8])),
        smoothing=draw(st.sampled_from([0.0, 0.1])),
        alpha=draw(st.sampled_from([1.0, 0.5])),
        scale=draw(st.sampled_from([0.1, 1.0, 10.0])),
        layout=draw(st.sampled_from(["contiguous", "contiguous", "transposed", "strided"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run_case(case, device="cpu"):
    gen = torch.Generator().manual_seed(case["seed"])
    h, b, k = case["h"], case["b"], case["k"]
    logits = make_logits(gen, h, b, k, case["dtype"], case["scale"], case["layout"], device)
    target = torch.randint(0, k, (b,), generator=gen).to(device)
    ce_w, kl_w = random_weights(gen, h)
    args = (ce_w.to(device), kl_w.to(device), case["temperature"], case["alpha"], case["eps"],
            case["smoothing"])
    out = call_fused(logits, target, *args)
    ref = reference64(logits, target, ce_w, kl_w, *args[2:])
    return out, ref


# ---------------------------------------------------------------------------- properties (CPU)
@pytest.fixture(params=[1, 2, 4], ids=lambda n: f"{n}threads")
def threads(request):
    """Runs the test with torch (and so the kernel's at::parallel_for) at 1, 2 and 4 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@needs_ext
@PROPERTY
@given(case=op_cases())
def test_op_matches_float64_reference(threads, case):
    out, ref = run_case(case)
    assert_matches(*out, ref, case["dtype"])


@needs_ext
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64))
@pytest.mark.parametrize("h,b,k", [(3, 64, 1000), (4, 96, 100), (2, 33, 5000)])
def test_rows_split_over_threads_match_float64_reference(threads, dtype, h, b, k):
    # Batches big enough (>= ~64k logits per task) that at::parallel_for gives each thread rows.
    case = dict(h=h, b=b, k=k, dtype=dtype, temperature=2.0, eps=1e-8, smoothing=0.1, alpha=0.9, scale=3.0,
                layout="contiguous", seed=h * b * k)
    out, ref = run_case(case)
    assert_matches(*out, ref, dtype)


@needs_ext
def test_built_with_openmp():
    # Without OpenMP, at::parallel_for is a serial loop and the threads above never run.
    assert kernels.built_with_openmp()


def expected_weights(h, method, direction, active):
    """lambda and w from the method's definition (the DHM paper, section 3), for all H heads."""
    ce = [1.0 if active[i] and (method != "baseline" or i == 0) else 0.0 for i in range(h)]
    kl = [[0.0] * h for _ in range(h)]
    if method in ("dks", "dhm"):
        for i in range(h):
            for j in range(h):
                # Head 0 is the deepest: "top-down" makes the shallower (higher index) head the student.
                allowed = {"both": i != j, "top-down": i < j, "bottom-up": i > j}[direction]
                if allowed and active[i] and active[j]:
                    kl[i][j] = 1.0
    return torch.tensor(ce), torch.tensor(kl)


@needs_ext
@PROPERTY
@given(
    h=st.integers(1, 5),
    method=st.sampled_from(losses.METHODS),
    direction=st.sampled_from(DIRECTIONS),
    mask=st.lists(st.booleans(), min_size=4, max_size=4),
    skipped_as_none=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([0.5, 1.0, 4.0]),
    eps=st.sampled_from([0.0, 1e-8]),
    k=st.integers(2, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_dhm_loss_uses_fused_and_matches_with_random_masks(
    h, method, direction, mask, skipped_as_none, dtype, temperature, eps, k, seed
):
    assert losses.select_backend("cpu").name == "fused"
    gen = torch.Generator().manual_seed(seed)
    active = [True] + mask[: h - 1]
    b = 6
    logits = [x.requires_grad_() for x in make_logits(gen, h, b, k, dtype, 3.0)]
    target = torch.randint(0, k, (b,), generator=gen)
    given_logits = [x if a or not skipped_as_none else None for x, a in zip(logits, active, strict=True)]
    loss, st_ = losses.dhm_loss(
        given_logits, target, method=method, direction=direction, temperature=temperature, alpha=0.7,
        eps=eps, active=None if skipped_as_none else active, return_stats=True,
    )
    loss.backward()
    ce_w, kl_w = expected_weights(h, method, direction, active)
    idx = [i for i in range(h) if active[i]]
    ref_loss, ref_stats, ref_grads = reference64(
        [logits[i] for i in idx], target, ce_w[idx], kl_w[idx][:, idx], temperature, 0.7, eps, 0.0
    )
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    n = len(idx)
    ref_ce, ref_kl, ref_correct = ref_stats[:n], ref_stats[n : n + n * n].view(n, n), ref_stats[n + n * n :]
    where = torch.tensor(idx)
    torch.testing.assert_close(st_.ce.double()[where], ref_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st_.kl.double()[where][:, where], ref_kl, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(st_.correct.double()[where], ref_correct)
    inactive = [i for i in range(h) if not active[i]]
    assert all(st_.ce[i] == 0 and st_.correct[i] == 0 for i in inactive)
    g_scale = max(g.abs().max().item() for g in ref_grads)
    rtol = {torch.float32: 1e-4, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    for pos, i in enumerate(idx):
        torch.testing.assert_close(
            logits[i].grad.double(), ref_grads[pos], rtol=rtol, atol=1e-5 * g_scale + 2.0**-24
        )
    for i in inactive:  # an inactive head takes no part in the loss
        assert logits[i].grad is None


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_k_32768(dtype):
    case = dict(h=3, b=3, k=32768, dtype=dtype, temperature=1.0, eps=1e-8, smoothing=0.1, alpha=1.0,
                scale=4.0, layout="contiguous", seed=7)
    out, ref = run_case(case)
    assert_matches(*out, ref, dtype)


@needs_ext
@pytest.mark.parametrize("kind", ["huge", "equal", "one_hot"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,eps", [(1.0, 1e-8), (0.5, 0.0), (4.0, 1e-8), (1.0, 0.0)])
def test_extreme_logits_stay_finite_and_correct(kind, dtype, temperature, eps):
    gen = torch.Generator().manual_seed(hash((kind, str(dtype), temperature, eps)) % 2**31)
    h, b, k = 3, 5, 50
    if kind == "huge":  # magnitudes around 1e4
        logits = [torch.randn(b, k, generator=gen, dtype=torch.float64) * 1e4 for _ in range(h)]
    elif kind == "equal":  # every class tied: argmax is class 0
        logits = [torch.full((b, k), float(v), dtype=torch.float64) for v in (0.0, 1e4, -1e4)]
    else:  # one class at 1e4 above the rest, different classes per head
        logits = []
        for _ in range(h):
            x = torch.randn(b, k, generator=gen, dtype=torch.float64)
            x[torch.arange(b), torch.randint(0, k, (b,), generator=gen)] = 1e4
            logits.append(x)
    logits = [x.to(dtype) for x in logits]
    target = torch.randint(0, k, (b,), generator=gen)
    target[0] = 0
    ce_w, kl_w = random_weights(gen, h, sparse=False)
    loss, stats, grads = call_fused(logits, target, ce_w, kl_w, temperature, 1.0, eps, 0.1)
    assert torch.isfinite(loss) and torch.isfinite(stats).all()
    assert all(torch.isfinite(g).all() for g in grads)
    ref = reference64(logits, target, ce_w, kl_w, temperature, 1.0, eps, 0.1)
    assert_matches(loss, stats, grads, ref, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64))
@pytest.mark.parametrize("h", [1, 2, 3])
def test_batch_of_one_and_two_classes(dtype, h):
    gen = torch.Generator().manual_seed(h)
    logits = make_logits(gen, h, 1, 2, dtype, 2.0)
    target = torch.tensor([1])
    ce_w, kl_w = random_weights(gen, h, sparse=False)
    for temperature, eps in [(1.0, 1e-8), (4.0, 0.0)]:
        out = call_fused(logits, target, ce_w, kl_w, temperature, 1.0, eps, 0.2)
        assert_matches(*out, reference64(logits, target, ce_w, kl_w, temperature, 1.0, eps, 0.2), dtype)


@needs_ext
@pytest.mark.parametrize("k", [16, 48, 100, 511, 512, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_and_padded_row_paths(k, dtype):
    # Every row is copied into buffers padded to whole vectors (16 float32 / 8 float64 lanes): K below,
    # at and above a multiple of the vector, in place-read dtypes, must agree with the reference.
    gen = torch.Generator().manual_seed(k)
    logits = make_logits(gen, 3, 4, k, dtype, 3.0)
    target = torch.randint(0, k, (4,), generator=gen)
    ce_w, kl_w = random_weights(gen, 3)
    for temperature, eps in [(1.0, 1e-8), (2.0, 0.0)]:
        args = (ce_w, kl_w, temperature, 0.9, eps, 0.1)
        assert_matches(*call_fused(logits, target, *args), reference64(logits, target, *args), dtype)


@needs_ext
@pytest.mark.parametrize("h", [3, 4, 8])
@pytest.mark.parametrize("k", [100, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_equal_pair_weights_path(h, k, dtype):
    # When every head teaches every other with one weight (DHM's default), the CPU kernel builds each
    # student's teacher mixture as (sum over all heads) - (its own term); it must match the reference,
    # also when a head is near one-hot (the subtraction then cancels most of the sum).
    gen = torch.Generator().manual_seed(h * k)
    logits = make_logits(gen, h, 6, k, dtype, 3.0)
    logits[1][0, 3] = 40.0
    target = torch.randint(0, k, (6,), generator=gen)
    ce_w = torch.rand(h, generator=gen) + 0.1
    for w in (0.25, 1.0):
        kl_w = torch.full((h, h), w).fill_diagonal_(0)
        for temperature, eps in [(1.0, 1e-8), (2.0, 0.0), (0.5, 1e-8)]:
            args = (ce_w, kl_w, temperature, 0.9, eps, 0.1)
            assert_matches(*call_fused(logits, target, *args), reference64(logits, target, *args), dtype)


@needs_ext
@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_match_contiguous(layout, dtype):
    gen = torch.Generator().manual_seed(3)
    logits = make_logits(gen, 3, 7, 33, dtype, 2.0, layout)
    assert not any(x.is_contiguous() for x in logits)
    target = torch.randint(0, 33, (7,), generator=gen)
    ce_w, kl_w = random_weights(gen, 3)
    args = (ce_w, kl_w, 2.0, 1.0, 1e-8, 0.1)
    strided = call_fused(logits, target, *args)
    dense = call_fused([x.contiguous() for x in logits], target, *args)
    for a, b in zip([strided[0], strided[1], *strided[2]], [dense[0], dense[1], *dense[2]], strict=True):
        assert torch.equal(a, b)
    assert_matches(*strided, reference64(logits, target, *args), dtype)


# ---------------------------------------------------------------------------- autograd and registration
@needs_ext
@pytest.mark.parametrize("temperature,eps,smoothing", [(1.0, 1e-8, 0.0), (0.5, 0.0, 0.1), (4.0, 1e-3, 0.1)])
def test_gradcheck_float64(temperature, eps, smoothing):
    # Teachers are detached by definition, so finite differences of the whole loss only agree with
    # the gradient for heads that teach nobody: head 0 teaches, heads 1 and 2 are checked.
    gen = torch.Generator().manual_seed(11)
    teacher, *students = make_logits(gen, 3, 4, 6, torch.float64, 2.0)
    students = [x.requires_grad_() for x in students]
    target = torch.randint(0, 6, (4,), generator=gen)
    ce_w = torch.rand(3, generator=gen) + 0.1
    kl_w = torch.zeros(3, 3)
    kl_w[0, 1], kl_w[0, 2] = 0.7, 1.3

    def students_loss(*zs):
        return losses.fused_backend([teacher, *zs], target, ce_w, kl_w, temperature, 0.8, eps, smoothing)[0]

    assert torch.autograd.gradcheck(students_loss, students, eps=1e-6, atol=1e-8, rtol=1e-6)

    def ce_only(*zs):  # every head's CE gradient, teacher included
        return losses.fused_backend(zs, target, ce_w, torch.zeros(3, 3), temperature, 0.8, eps, smoothing)[0]

    heads = [teacher.clone().requires_grad_(), *students]
    assert torch.autograd.gradcheck(ce_only, heads, eps=1e-6, atol=1e-8, rtol=1e-6)


@needs_ext
def test_double_backward_is_refused():
    z = [torch.randn(2, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ce_w, kl_w = torch.ones(2), torch.ones(2, 2).fill_diagonal_(0)
    loss, _ = losses.fused_backend(z, torch.tensor([0, 3]), ce_w, kl_w, 1.0, 1.0, 0.0, 0.0)
    (g0, _) = torch.autograd.grad(loss, z, create_graph=True)
    with pytest.raises(RuntimeError):
        g0.sum().backward()


@needs_ext
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_teachers_get_no_gradient_from_kl(eps):
    gen = torch.Generator().manual_seed(5)
    logits = [x.requires_grad_() for x in make_logits(gen, 3, 4, 20, torch.float32, 3.0)]
    target = torch.randint(0, 20, (4,), generator=gen)
    kl_w = torch.zeros(3, 3)
    kl_w[0, 2] = 1.0  # head 0 teaches head 2; head 1 teaches nobody
    kl_w[1, 2] = 0.5
    loss, stats = losses.fused_backend(logits, target, torch.zeros(3), kl_w, 2.0, 1.0, eps, 0.0)
    loss.backward()
    assert torch.count_nonzero(logits[0].grad) == 0
    assert torch.count_nonzero(logits[1].grad) == 0
    assert torch.count_nonzero(logits[2].grad) > 0
    assert (stats[3:12].view(3, 3) > 0).sum() == 6  # all off-diagonal KL values are still reported


def _opcheck_args(dtype, requires_grad, device="cpu"):
    gen = torch.Generator().manual_seed(2)
    logits = [x.to(device).requires_grad_(requires_grad) for x in make_logits(gen, 3, 4, 10, dtype, 2.0)]
    ce_w, kl_w = random_weights(gen, 3)
    target = torch.randint(0, 10, (4,), generator=gen).to(device)
    return (logits, target, ce_w.to(device), kl_w.to(device), 2.0, 0.5, 1e-8, 0.1, requires_grad)


@needs_ext
@pytest.mark.parametrize("dtype", (*DTYPES, torch.float64))
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck(dtype, requires_grad):
    torch.library.opcheck(torch.ops.dhm_fast.fused_loss.default, _opcheck_args(dtype, requires_grad))


@needs_ext
@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # constants traced, not cached
def test_torch_compile_fullgraph_on_cpu():
    torch._dynamo.reset()

    def step(a, b, c, y):
        loss, st_ = losses.dhm_loss([a, b, c], y, temperature=2.0, active=[True] * 3, return_stats=True)
        return loss, st_.kl

    compiled = torch.compile(step, fullgraph=True)
    gen = torch.Generator().manual_seed(9)
    eager_in = [x.requires_grad_() for x in make_logits(gen, 3, 8, 17, torch.float32, 2.0)]
    compiled_in = [x.detach().clone().requires_grad_() for x in eager_in]
    y = torch.randint(0, 17, (8,), generator=gen)
    loss_c, kl_c = compiled(*compiled_in, y)
    loss_c.backward()
    loss_e, kl_e = step(*eager_in, y)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(kl_c, kl_e)
    for a, b in zip(compiled_in, eager_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [300, 1000])
def test_bitwise_deterministic_across_calls_and_thread_counts(threads, dtype, k):
    gen = torch.Generator().manual_seed(4)
    logits = make_logits(gen, 4, 64, k, dtype, 3.0)
    target = torch.randint(0, k, (64,), generator=gen)
    ce_w, kl_w = random_weights(gen, 4)
    args = (target, ce_w, kl_w, 2.0, 1.0, 1e-8, 0.1)
    first = call_fused(logits, *args)
    second = call_fused(logits, *args)
    torch.set_num_threads(1)  # the fixture restores the count
    single = call_fused(logits, *args)
    for other in (second, single):
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
        assert all(torch.equal(a, b) for a, b in zip(first[2], other[2], strict=True))


@needs_ext
def test_backward_scales_by_grad_output_and_survives_retain_graph():
    gen = torch.Generator().manual_seed(10)
    z = [x.requires_grad_() for x in make_logits(gen, 3, 5, 11, torch.float32, 2.0)]
    target = torch.randint(0, 11, (5,), generator=gen)
    ce_w, kl_w = random_weights(gen, 3, sparse=False)
    loss, _ = losses.fused_backend(z, target, ce_w, kl_w, 2.0, 1.0, 1e-8, 0.1)
    unit = torch.autograd.grad(loss, z, retain_graph=True)
    again = torch.autograd.grad(loss, z, retain_graph=True)
    scaled = torch.autograd.grad(loss * -2.5, z)
    for u, a, s in zip(unit, again, scaled, strict=True):
        assert torch.equal(u, a)
        torch.testing.assert_close(s, -2.5 * u)
    # The unscaled gradient is handed out as saved: accumulating it must not alias the saved copy.
    loss, _ = losses.fused_backend(z, target, ce_w, kl_w, 2.0, 1.0, 1e-8, 0.1)
    for _ in range(3):
        loss.backward(retain_graph=True)
    for x, u in zip(z, unit, strict=True):
        torch.testing.assert_close(x.grad, 3 * u)


@needs_ext
@pytest.mark.parametrize("loss_scale", [65536.0, 2.0**20])
def test_float16_gradient_under_a_loss_scale_keeps_float16_precision(loss_scale):
    # GradScaler multiplies the loss by a large scale so that small gradient entries survive float16.
    # A gradient stored in float16 before the scale applies has already lost them: entries below
    # 2^-14 are subnormal (few bits) or zero. After the scale they must match float64 to float16
    # precision. The CPU runs the same float16 path as the GPU (float32 math, float16 in and out).
    gen = torch.Generator().manual_seed(21)
    h, b, k = 3, 32, 1000
    logits = make_logits(gen, h, b, k, torch.float16, 4.0)
    target = torch.randint(0, k, (b,), generator=gen)
    ce_w, kl_w = random_weights(gen, h, sparse=False)
    args = (ce_w, kl_w, 2.0, 1.0, 1e-8, 0.1)
    leaves = [x.detach().requires_grad_() for x in logits]
    loss, _ = losses.fused_backend(leaves, target, *args)
    (loss * loss_scale).backward()
    _, _, ref_grads = reference64(logits, target, *args)
    checked = 0
    for x, ref in zip(leaves, ref_grads, strict=True):
        assert x.grad.dtype == torch.float16
        want = ref * loss_scale
        tiny = (ref.abs() < 2.0**-14) & (want.abs() < 60000)  # subnormal or zero unscaled; finite scaled
        checked += int(tiny.sum())
        got = x.grad.double()[tiny]
        # float16 rounding (2^-11 relative) plus float32 math, relative to each entry
        torch.testing.assert_close(got, want[tiny], rtol=2.0**-10, atol=loss_scale * 2.0**-36)
    assert checked > 1000  # the inputs do produce many such entries


@needs_ext
def test_no_grad_call_returns_the_same_loss():
    gen = torch.Generator().manual_seed(6)
    logits = make_logits(gen, 2, 3, 9, torch.float32, 1.0)
    target = torch.randint(0, 9, (3,), generator=gen)
    ce_w, kl_w = random_weights(gen, 2, sparse=False)
    with_grad = call_fused(logits, target, ce_w, kl_w, 1.0, 1.0, 1e-8, 0.0)
    with torch.no_grad():
        loss, stats = losses.fused_backend(logits, target, ce_w, kl_w, 1.0, 1.0, 1e-8, 0.0)
    assert torch.equal(loss, with_grad[0]) and torch.equal(stats, with_grad[1])


@needs_ext
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(target=a["target"].int()), "target must be int64"),
        (lambda a: a.update(target=a["target"] + 10), "outside the class range"),
        (lambda a: a.update(target=a["target"][:2]), "target must have shape"),
        (lambda a: a["logits"].append(torch.randn(4, 7)), "logits of head 2 have shape"),
        (lambda a: a.update(temperature=0.0), "temperature must be positive"),
        (lambda a: a.update(eps=-1.0), "eps must be 0 or between"),
        (lambda a: a.update(eps=1e-35), "eps must be 0 or between"),
        (lambda a: a.update(label_smoothing=1.5), "label_smoothing must be in"),
        (lambda a: a.update(kl_weights=torch.ones(3)), "kl_weights must be 2x2"),
        (lambda a: a.update(logits=[x.int() for x in a["logits"]]), "logits must be float32"),
    ],
)
def test_bad_arguments_raise_value_error(change, message):
    args = dict(logits=[torch.randn(4, 10), torch.randn(4, 10)], target=torch.tensor([0, 1, 2, 9]),
                ce_weights=torch.ones(2), kl_weights=torch.ones(2, 2), temperature=1.0, alpha=1.0, eps=0.0,
                label_smoothing=0.0)
    change(args)
    with pytest.raises(ValueError, match=message):
        losses.fused_backend(**args)


# ---------------------------------------------------------------------------- fallback without a kernel
@pytest.fixture
def fresh_backends(monkeypatch):
    """An empty backend cache and warning record, so that a test sees the decision being made."""
    monkeypatch.setattr(losses, "_BACKENDS", {})
    monkeypatch.setattr(losses, "_warned", set())


def test_fallback_to_reference_when_extension_missing(monkeypatch, caplog, fresh_backends):
    monkeypatch.setattr(kernels, "load_error", lambda: "ImportError: simulated")
    monkeypatch.setattr(kernels, "has_kernel", lambda op, device: False)
    backend = losses.select_backend("cpu")
    assert backend.name == "reference" and "not built (ImportError: simulated)" in backend.reason
    gen = torch.Generator().manual_seed(8)
    logits = make_logits(gen, 3, 4, 12, torch.float32, 2.0)
    target = torch.randint(0, 12, (4,), generator=gen)
    with caplog.at_level(logging.WARNING, logger="dhm_fast.losses"):
        a = losses.dhm_loss(logits, target)
        b = losses.dhm_loss(logits, target)
    warnings = [r for r in caplog.records if r.name == "dhm_fast.losses"]
    assert len(warnings) == 1 and "not built" in warnings[0].getMessage()
    ref = losses.dhm_loss(logits, target, reference=True)
    assert torch.equal(a, ref) and torch.equal(b, ref)


def test_meta_device_takes_the_reference_without_a_warning(caplog, fresh_backends):
    # FLOP counting runs the loss on meta tensors: nothing is computed, so a warning would only mislead
    with caplog.at_level(logging.WARNING, logger="dhm_fast.losses"):
        backend = losses.select_backend("meta")
    assert backend.name == "reference" and "no kernel for meta" in backend.reason
    assert not [r for r in caplog.records if r.name == "dhm_fast.losses"]


def test_gpu_without_code_for_its_architecture_falls_back_with_one_warning(monkeypatch, caplog, fresh_backends):
    # A library built for sm_80 and sm_90 (cubins only) on a compute capability 12.0 GPU: the op would
    # fail with "no kernel image is available"; the loss must use the reference and say why, once.
    monkeypatch.setattr(kernels, "load_error", lambda: None)
    monkeypatch.setattr(kernels, "_REGISTERED", frozenset({("fused_loss", "cpu"), ("fused_loss", "cuda")}))
    monkeypatch.setattr(kernels, "_BUILD", {"cuda_targets": "sm_80,sm_90", "openmp": True})
    monkeypatch.setattr(kernels, "_kernel_cache", {})
    monkeypatch.setattr(kernels, "device_capability", lambda device: (12, 0))
    with caplog.at_level(logging.WARNING, logger="dhm_fast.losses"):
        for _ in range(3):
            backend = losses.LossConfig().backend("cuda:1")
    assert backend.name == "reference" and backend.run is losses.reference_backend
    warnings = [r.getMessage() for r in caplog.records if r.name == "dhm_fast.losses"]
    assert len(warnings) == 1
    assert "cuda:1" in warnings[0] and "compute capability 12.0" in warnings[0] and "sm_90" in warnings[0]
    # The same library on a compute capability 8.6 GPU runs its sm_80 cubin.
    monkeypatch.setattr(kernels, "device_capability", lambda device: (8, 6))
    assert losses.select_backend("cuda:2").name == "fused"


def test_backend_is_reported_and_forced_reference_is_honoured():
    config = losses.LossConfig(reference=True)
    assert config.backend("cpu").name == "reference" and "reference=True" in config.backend("cpu").reason
    expected = "fused" if kernels.has_kernel("fused_loss", "cpu") else "reference"
    assert losses.LossConfig().backend(torch.device("cpu")).name == expected


def test_package_imports_and_falls_back_without_the_built_module():
    # A fresh interpreter in which `kernels._C` cannot be imported (as after a failed build).
    code = textwrap.dedent(
        """
        import logging, sys
        sys.modules["kernels._C"] = None  # makes `from kernels import _C` raise ImportError
        logging.basicConfig(level=logging.WARNING)
        import torch
        import kernels
        from dhm_fast import losses
        from pipelines.normalize import native_crop_normalize
        z = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
        y = torch.tensor([0, 1, 2, 5])
        for _ in range(3):
            loss = losses.dhm_loss(z, y)
        loss.backward()
        assert kernels.load_error() is not None and kernels.op("fused_loss") is None
        assert losses.select_backend("cpu").name == "reference" and native_crop_normalize() is None
        assert z[2].grad is not None
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert proc.stderr.count("native library is not built") == 1


# ---------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@needs_cuda
@PROPERTY
@given(case=op_cases(max_k=8000))
def test_cuda_matches_float64_reference_and_cpu(case):
    (loss, stats, grads), ref = run_case(case, device="cuda")
    assert loss.is_cuda and stats.is_cuda and all(g.is_cuda for g in grads)
    assert_matches(loss, stats, grads, ref, case["dtype"])
    cpu = run_case(case, device="cpu")[0]
    torch.testing.assert_close(loss.cpu(), cpu[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.cpu(), cpu[1], rtol=1e-5, atol=1e-4)
    for g, c in zip(grads, cpu[2], strict=True):
        scale = c.abs().max().item() + 1e-30
        torch.testing.assert_close(g.cpu().double(), c.double(), rtol=1e-2, atol=1e-5 * scale + 2.0**-24)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("h,k", [(3, 32768), (7, 700), (8, 100), (2, 512), (2, 513)])
def test_cuda_large_k_and_many_heads(h, k):
    case = dict(h=h, b=5, k=k, dtype=torch.float32, temperature=2.0, eps=1e-8, smoothing=0.1, alpha=1.0,
                scale=4.0, layout="transposed", seed=h * k)
    out, ref = run_case(case, device="cuda")
    assert_matches(*out, ref, torch.float32)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["huge", "equal", "one_hot"])
def test_cuda_extreme_logits(kind):
    gen = torch.Generator().manual_seed(1)
    h, b, k = 3, 4, 600
    if kind == "huge":
        logits = [torch.randn(b, k, generator=gen, dtype=torch.float64) * 1e4 for _ in range(h)]
    elif kind == "equal":
        logits = [torch.full((b, k), v, dtype=torch.float64) for v in (0.0, 1e4, -1e4)]
    else:
        logits = [torch.randn(b, k, generator=gen, dtype=torch.float64) for _ in range(h)]
        for x in logits:
            x[:, 7] = 1e4
    target = torch.tensor([0, 7, 3, 599])
    ce_w, kl_w = random_weights(gen, h, sparse=False)
    for dtype in DTYPES:
        zs = [x.to(dtype).cuda() for x in logits]
        out = call_fused(zs, target.cuda(), ce_w.cuda(), kl_w.cuda(), 0.5, 1.0, 1e-8, 0.1)
        assert torch.isfinite(out[0]) and all(torch.isfinite(g).all() for g in out[2])
        assert_matches(*out, reference64(zs, target, ce_w, kl_w, 0.5, 1.0, 1e-8, 0.1), dtype)


@pytest.mark.cuda
@needs_cuda
def test_cuda_gradcheck_opcheck_and_determinism():
    gen = torch.Generator().manual_seed(12)
    teacher, *students = make_logits(gen, 3, 4, 6, torch.float64, 2.0, device="cuda")
    students = [x.requires_grad_() for x in students]
    y = torch.randint(0, 6, (4,), generator=gen).cuda()
    ce_w = torch.rand(3, generator=gen).cuda()
    kl_w = torch.zeros(3, 3)
    kl_w[0, 1:] = 1.0  # only head 0 teaches (see test_gradcheck_float64)
    kl_w = kl_w.cuda()
    assert torch.autograd.gradcheck(
        lambda *a: losses.fused_backend([teacher, *a], y, ce_w, kl_w, 2.0, 1.0, 1e-8, 0.1)[0], students,
        eps=1e-6, atol=1e-8,
    )
    for dtype in (*DTYPES, torch.float64):
        torch.library.opcheck(torch.ops.dhm_fast.fused_loss.default, _opcheck_args(dtype, True, "cuda"))
    big = make_logits(gen, 4, 256, 1000, torch.bfloat16, 3.0, device="cuda")
    yb = torch.randint(0, 1000, (256,), generator=gen).cuda()
    w = [t.cuda() for t in random_weights(gen, 4)]
    a = call_fused(big, yb, *w, 1.0, 1.0, 1e-8, 0.0)
    b = call_fused(big, yb, *w, 1.0, 1.0, 1e-8, 0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(p, q) for p, q in zip(a[2], b[2], strict=True))


@pytest.mark.cuda
@needs_cuda
def test_cuda_dhm_loss_uses_the_kernel_and_compiles():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(13)
    z = [x.cuda().requires_grad_() for x in make_logits(gen, 3, 32, 100, torch.float16, 2.0)]
    y = torch.randint(0, 100, (32,), generator=gen).cuda()
    compiled = torch.compile(lambda a, b, c, t: losses.dhm_loss([a, b, c], t), fullgraph=True)
    loss = compiled(*z, y)
    loss.backward()
    ref = losses.dhm_loss([x.detach().float() for x in z], y, reference=True)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
