"""The fused loss's CUDA kernels, run from their unchanged sources on the CPU under the checking CUDA
execution model of tests/cuda_emu (docs/cuda_emulator.md).

The kernels' results are compared with the CPU op on the same inputs and with test_fused.py's float64
reference, at the CPU tests' tolerances; fibers run in forward, reverse and seeded random order and
must give the same bits; self-test kernels prove that each rule of the model can fail.
Set DHM_FAST_REQUIRE_CUDA_EMU=1 (CI does) to fail instead of skipping when the model cannot be built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest
import torch
from cuda_emu import build
from test_fused import assert_matches, reference64

import kernels
from dhm_fast import kernel_agreement as agreement

# Emulated devices: their opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
T4, A100, H100 = 65536, 166912, 232448
ORDERS = (("forward", 0), ("reverse", 0), ("random", 1), ("random", 2))


@pytest.fixture(scope="module")
def emu():
    try:
        module = build.load()
    except (RuntimeError, OSError) as err:  # no compiler or ninja
        if os.environ.get("DHM_FAST_REQUIRE_CUDA_EMU") == "1":
            raise
        pytest.skip(f"the CUDA execution model did not build: {err}")
    module.configure(H100, "forward", 0)
    module.take_launches()
    yield module
    module.configure(H100, "forward", 0)


@pytest.fixture(scope="module")
def cpu_op():
    if not kernels.has_kernel("fused_loss", "cpu"):
        if os.environ.get("DHM_FAST_REQUIRE_CUDA_EMU") == "1":
            pytest.fail(f"kernels._C is not built: {kernels.load_error()}")
        pytest.skip("kernels._C is not built")
    return kernels.op("fused_loss")


def emulated(emu, case, device=H100, order="forward", seed=0):
    emu.configure(device, order, seed)
    emu.take_launches()
    return agreement.run(emu.fused_loss, case)


def reference(case):
    logits, target, ce_w, kl_w = agreement.make_inputs(case)
    return reference64(logits, target, ce_w, kl_w, case.temperature, case.alpha, case.eps, case.smoothing)


def assert_same_bits(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert len(a[2]) == len(b[2]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))


# ---------------------------------------------------------------------------- the kernels' matrix
@pytest.mark.parametrize("case", agreement.cases(), ids=lambda c: c.name)
def test_cuda_kernels_match_cpu_op_and_float64_reference(emu, cpu_op, case):
    out = emulated(emu, case)
    launched = [name for name, *_ in emu.take_launches()]
    assert len(launched) == 3 and "fused_rows_kernel" in launched[0]
    cpu = agreement.run(cpu_op, case)
    report = agreement.disagreement(out, cpu, case.dtype)
    assert agreement.agrees(report), f"emulated CUDA vs CPU op: {report}"
    if not case.compute_grad:
        assert out[2] == [] or all(g.numel() == 0 for g in out[2])
        return
    dtype = getattr(torch, case.dtype)
    loss, stats, grads = out  # float16's gradient is kept in float32 until backward casts it
    assert_matches(loss, stats, [g.to(dtype) for g in grads], reference(case), dtype)


def test_the_gpu_checks_comparison_sees_a_wrong_kernel(emu, cpu_op):
    # benchmarks.gpu_check's kernel_matrix part, with the emulated kernels in the GPU's place: they
    # agree, and a loss 1% (+ 0.01) off does not.
    emu.configure(H100, "forward", 0)
    some = agreement.all_cases()[::9]
    assert all(row["agrees"] for row in agreement.compare_ops(emu.fused_loss, "cpu", cpu_op, some))

    def off(*args):
        loss, stats, grads = emu.fused_loss(*args)
        return loss * 1.01 + 0.01, stats, grads

    assert not any(row["agrees"] for row in agreement.compare_ops(off, "cpu", cpu_op, some))


@pytest.mark.parametrize("shape", [(4, 6, 100), (3, 2, 1000)], ids=["warp-rows", "block-rows"])
@pytest.mark.parametrize("case_index", range(len(agreement.SETTINGS)))
def test_every_method_and_setting_on_both_launch_paths(emu, cpu_op, shape, case_index):
    case = agreement.method_cases(shape)[case_index]
    out = emulated(emu, case)
    assert agreement.agrees(agreement.disagreement(out, agreement.run(cpu_op, case), case.dtype))
    assert_matches(*out, reference(case), torch.float32)


@pytest.mark.parametrize("case", [c for c in agreement.cases() if c.dtype in ("float32", "bfloat16")][::3],
                         ids=lambda c: c.name)
def test_fiber_order_does_not_change_a_bit(emu, case):
    first = emulated(emu, case)
    for order, seed in ORDERS[1:]:
        assert_same_bits(emulated(emu, case, order=order, seed=seed), first)


# Which path each shape takes: (rows per thread group, staged in shared memory), per device.
# Staging needs the whole row (H x K x 4 bytes) <= 64 KiB, and rows-per-block x row + the kernel's
# static shared memory within the device's opt-in limit.
PATHS = {
    (3, 7, 100): {T4: ("warp", True), A100: ("warp", True), H100: ("warp", True)},
    (8, 6, 512): {T4: ("warp", False), A100: ("warp", True), H100: ("warp", True)},
    (5, 4, 1000): {T4: ("block", True), A100: ("block", True), H100: ("block", True)},
    (4, 2, 4096): {T4: ("block", False), A100: ("block", True), H100: ("block", True)},
    (4, 2, 4097): {T4: ("block", False), A100: ("block", False), H100: ("block", False)},
    (8, 2, 2048): {T4: ("block", False), A100: ("block", True), H100: ("block", True)},
    (3, 3, 21843): {T4: ("block", False), A100: ("block", False), H100: ("block", False)},
}


@pytest.mark.parametrize("shape", sorted(PATHS), ids=lambda s: "H{}-B{}-K{}".format(*s))
def test_launch_path_per_device(emu, cpu_op, shape):
    case = agreement.Case(*shape, "float32", "dhm", "both", 2.0, 1.0, 1e-8, 0.1, 1.0, "contiguous", True, 3)
    cpu = agreement.run(cpu_op, case)
    for device, (rows, staged) in PATHS[shape].items():
        out = emulated(emu, case, device=device)
        kernel, grid, block, dynamic, static = emu.take_launches()[0]
        assert "fused_rows_kernel" in kernel
        per_block = 4 if rows == "warp" else 1
        assert (block, grid) == ((128, -(-shape[1] // 4)) if rows == "warp" else (256, shape[1]))
        assert (dynamic > 0) == staged, f"{device} B opt-in: {dynamic} B dynamic shared memory"
        if staged:
            assert dynamic == per_block * shape[0] * shape[2] * 4 and dynamic + static <= device
        assert agreement.agrees(agreement.disagreement(out, cpu, "float32"))


def test_out_of_range_target_fails_the_launch_not_the_process(emu):
    case = agreement.Case(2, 3, 10, "float32", "dhm", "both", 1.0, 1.0, 0.0, 0.0, 1.0, "contiguous", True, 0)
    logits, target, ce_w, kl_w = agreement.make_inputs(case)
    target[1] = 10
    with pytest.raises(RuntimeError, match=r"device-side assert triggered.*y >= 0 && y < K"):
        emu.fused_loss(logits, target, ce_w, kl_w, 1.0, 1.0, 0.0, 0.0, True)
    # the next launch runs normally
    assert torch.isfinite(agreement.run(emu.fused_loss, case)[0])


# ---------------------------------------------------------------------------- the model's own rules
FAULTS = {
    "divergent_barrier": (r"divergent __syncthreads.*threads 0-15 wait at selftest_kernels\.h:\d+; "
                          r"threads 16-31 wait at selftest_kernels\.h:\d+"),
    "shuffle_exited_lane": r"__shfl_sync at selftest_kernels\.h:\d+ with mask 0xffffffff: lane 5 of warp 0 has exited",
    "partial_warp_shuffle": (r"deadlock.*threads 0-15 wait in __shfl_down_sync at selftest_kernels\.h:\d+.*"
                             r"threads 16-31 wait in __syncwarp"),
    "lane_outside_mask": r"calling lane 16 is not in its mask",
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_each_planted_fault_fails_with_its_name(emu, name):
    emu.configure(H100, "forward", 0)
    with pytest.raises(RuntimeError, match=FAULTS[name]):
        emu.selftest(name)


def test_shared_memory_overrun_hits_the_canary(emu):
    emu.configure(H100, "forward", 0)
    with pytest.raises(RuntimeError, match=r"shared-memory overrun .* byte 256 written, past the 256 bytes"):
        emu.selftest("shared_overrun", 64)


def test_more_than_48k_of_shared_memory_needs_the_attribute(emu):
    emu.configure(H100, "forward", 0)
    with pytest.raises(RuntimeError, match=r"invalid argument.*65536 bytes of dynamic shared memory.*"
                                           r"cudaFuncSetAttribute"):
        emu.selftest("big_shared", 64 << 10, 0, 128)
    assert emu.selftest("big_shared", 64 << 10, 1, 128)[:128].eq(3).all()  # with it, the launch runs
    emu.configure(T4, "forward", 0)  # never above the device's opt-in limit
    with pytest.raises(RuntimeError, match=r"cudaFuncSetAttribute.*above the device's opt-in limit of 65536"):
        emu.selftest("big_shared", 100 << 10, 1, 128)


@pytest.mark.parametrize("threads,grid_y,message", [(1025, 1, r"block \(1025, 1, 1\) exceeds 1024 threads"),
                                                    (32, 65536, r"grid \(1, 65536, 1\) exceeds the grid limits"),
                                                    (0, 1, r"dimension is 0")])
def test_launch_limits(emu, threads, grid_y, message):
    emu.configure(H100, "forward", 0)
    with pytest.raises(RuntimeError, match=r"invalid configuration argument.*" + message):
        emu.selftest("threads", threads, grid_y)


def test_device_assert_fails_the_launch(emu):
    emu.configure(H100, "forward", 0)
    with pytest.raises(RuntimeError, match=r"device-side assert triggered.*thread 3 \(block 0\)"):
        emu.selftest("failing_assert", 7, 5)
    emu.selftest("failing_assert", 4, 5)


def documented_source(mode: str, lane: int, arg: int, width: int) -> int:
    """The lane a shuffle reads, from the CUDA C++ Programming Guide's description of the intrinsics."""
    base = lane // width * width
    if mode == "idx":  # srcLane outside [0, width) reads srcLane modulo width, in the caller's section
        return base + arg % width
    if mode == "up":  # lane - delta, unless that leaves the caller's section: then its own value
        return lane - arg if lane - arg >= base else lane
    if mode == "down":  # lane + delta, unless that leaves the caller's section
        return lane + arg if lane + arg < base + width else lane
    src = lane ^ arg  # xor: a later section cannot be read: its own value
    return src if src < base + width else lane


@pytest.mark.parametrize("width", [32, 16, 8, 4, 2, 1])
@pytest.mark.parametrize("mode", ["idx", "up", "down", "xor"])
def test_shuffles_follow_cuda_semantics(emu, mode, width):
    emu.configure(H100, "forward", 0)
    args = range(-3, 40) if mode == "idx" else range(0, 32)
    for arg in args:
        got = emu.selftest("shuffle_sources", ["idx", "up", "down", "xor"].index(mode), arg, width).tolist()
        assert got == [documented_source(mode, lane, arg, width) for lane in range(32)], (mode, arg, width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32])
def test_shuffled_values_keep_every_bit(emu, dtype):
    emu.configure(H100, "forward", 0)
    gen = torch.Generator().manual_seed(5)
    if dtype.is_floating_point:
        values = torch.randn(32, generator=gen, dtype=torch.float64).to(dtype) * 1e30
        values[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -5e-324]).to(dtype)
    else:
        info = torch.iinfo(dtype)
        values = torch.randint(info.min, info.max, (32,), generator=gen, dtype=dtype)
        values[0], values[1] = info.min, info.max
    out = emu.shuffle_bits(values)
    expected = torch.cat([values[1:], values[31:]])  # lane 31 keeps its own value
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


def test_barrier_reduction_is_order_independent(emu):
    values = torch.randn(4 * 256, generator=torch.Generator().manual_seed(2))
    results = []
    for order, seed in ORDERS:
        emu.configure(H100, order, seed)
        results.append(emu.block_sum(values))
    assert all(torch.equal(r, results[0]) for r in results)
    torch.testing.assert_close(results[0].double(), values.double().reshape(4, 256).sum(1), rtol=1e-5, atol=1e-4)


def test_the_device_math_path_of_dhm_row_runs(emu):
    # Under __CUDA_ARCH__, row_exp/row_log are expf/logf; the host path would be dhm_row.h's own
    # polynomials. The model's must be libm's, bit for bit.
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype = libm.logf.restype = ctypes.c_float
    libm.expf.argtypes = libm.logf.argtypes = [ctypes.c_float]
    gen = torch.Generator().manual_seed(11)
    x = -torch.rand(4000, generator=gen) * 87
    y = torch.rand(4000, generator=gen) * 10 + 1e-30
    assert emu.row_math(x, False).tolist() == [libm.expf(v) for v in x.tolist()]
    assert emu.row_math(y, True).tolist() == [libm.logf(v) for v in y.tolist()]


def test_a_new_launch_site_fails_the_build_loudly():
    source = (build.ROOT / "kernels" / build.KERNEL_HEADER).read_text()
    assert source.count("<<<") == build.LAUNCH_SITES
    build.rewrite_launches(source)
    with pytest.raises(build.LaunchSitesChanged, match="4 kernel launch site"):
        build.rewrite_launches(source + "\nvoid f() { k<float><<<1, 32, 0, s>>>(x); }\n")
    assert build.rewrite_launches("a<<<g, b, 0, stream>>>(x, y);", expected=1) == \
        "::dhm_emu::launch(a, ::dhm_emu::LaunchConfig(g, b, 0, stream), x, y);"
