"""The agreement matrix of the fused loss's CUDA kernels: shapes, dtypes and loss settings on which
they must give what the CPU kernel gives.

tests/test_cuda_emu.py runs it under the CUDA execution model on the CPU; `benchmarks.gpu_check` runs
it on a real GPU, so one lent GPU confirms or refutes the model's verdict. The shapes reach both
launch paths (a warp per row for K <= 512, a block per row above), partly filled last blocks, B = 1,
K = 1, K on both sides of the 64 KiB row-staging limit, K = 21843 and every head count from 1 to 8.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch

from dhm_fast.losses import mimic_weights

# (heads, batch, classes): what each one reaches.
SHAPES: tuple[tuple[int, int, int], ...] = (
    (1, 1, 1),  # K = 1, B = 1, one head
    (2, 5, 1),  # K = 1; warp rows: 4 a block, the last block holds one row
    (3, 1, 37),  # B = 1, K not a multiple of 32
    (3, 7, 100),  # the CIFAR-100 shape, a partly filled last block
    (4, 9, 512),  # the largest K with a warp per row
    (4, 3, 513),  # the smallest K with a block per row
    (5, 4, 1000),  # ImageNet's classes
    (4, 2, 4096),  # a 64 KiB row: staged where the device's opt-in shared memory allows
    (4, 2, 4097),  # one class more: never staged
    (6, 3, 2000),
    (7, 5, 300),  # a warp per row with 7 heads
    (8, 6, 512),  # 8 heads, 4 rows of 16 KiB: above 48 KiB of shared memory, needs the opt-in
    (8, 2, 2048),  # 8 heads, a 64 KiB row
    (3, 3, 21843),  # ImageNet-21k's classes
)
DTYPES = ("float32", "float16", "bfloat16", "float64")

# (method, direction, temperature, alpha, eps, label smoothing, logit scale): every method's weights.
SETTINGS: tuple[tuple, ...] = (
    ("dhm", "both", 1.0, 1.0, 0.0, 0.0, 1.0),
    ("dhm", "top-down", 2.0, 0.5, 1e-8, 0.1, 3.0),
    ("dhm", "bottom-up", 4.0, 1.0, 1e-4, 0.0, 10.0),
    ("dks", "both", 0.5, 0.9, 0.0, 0.1, 30.0),
    ("dsl", "both", 1.0, 1.0, 0.0, 0.1, 0.1),
    ("baseline", "both", 3.0, 1.0, 1e-6, 0.0, 1.0),
)
LAYOUTS = ("contiguous", "transposed", "strided")

# Tolerances of the CPU kernel's float64-reference tests (tests/test_fused.py), per logits dtype:
# (loss and stats, gradient rtol). Gradients also get atol = loss tolerance x the largest gradient.
TOLERANCE = {
    "float32": (1e-5, 1e-4),
    "float64": (1e-12, 1e-10),
    "bfloat16": (1e-5, 2**-7),
    "float16": (1e-5, 2**-10),
}


@dataclass(frozen=True)
class Case:
    heads: int
    batch: int
    classes: int
    dtype: str
    method: str
    direction: str
    temperature: float
    alpha: float
    eps: float
    smoothing: float
    scale: float
    layout: str
    compute_grad: bool
    seed: int

    @property
    def name(self) -> str:
        return (f"H{self.heads}-B{self.batch}-K{self.classes}-{self.dtype}-{self.method}-{self.direction}"
                f"-T{self.temperature}-eps{self.eps}-ls{self.smoothing}-{self.layout}"
                + ("" if self.compute_grad else "-nograd"))

    def as_dict(self) -> dict:
        return asdict(self)


def cases() -> list[Case]:
    """Every shape in every dtype. Settings and layouts rotate, so that each setting meets both launch
    paths and several dtypes; every third case of a shape also runs without gradients (evaluation)."""
    out = []
    rotation = itertools.cycle(range(len(SETTINGS)))
    for s, (h, b, k) in enumerate(SHAPES):
        for d, dtype in enumerate(DTYPES):
            method, direction, temperature, alpha, eps, smoothing, scale = SETTINGS[next(rotation)]
            out.append(Case(h, b, k, dtype, method, direction, temperature, alpha, eps, smoothing, scale,
                            LAYOUTS[(s + d) % len(LAYOUTS)], compute_grad=(s + d) % 3 != 2, seed=1000 * s + d))
    return out


def method_cases(shape: tuple[int, int, int], dtype: str = "float32") -> list[Case]:
    """Every setting (each method, direction, temperature, eps, smoothing) on one shape."""
    h, b, k = shape
    return [Case(h, b, k, dtype, *setting, layout="contiguous", compute_grad=True, seed=7 * i)
            for i, setting in enumerate(SETTINGS)]


def random_logits(gen: torch.Generator, h: int, b: int, k: int, dtype: torch.dtype, scale: float,
                  layout: str = "contiguous", device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Random [B, K] logits per head; non-contiguous layouts are views made after the dtype cast."""
    out = []
    for _ in range(h):
        if layout == "transposed":  # column-major rows: stride (1, B)
            x = (torch.randn(k, b, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device).t()
        elif layout == "strided":  # every other column of a wider tensor
            x = (torch.randn(b, 2 * k, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)[:, ::2]
        else:
            x = (torch.randn(b, k, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
        out.append(x)
    return out


def make_inputs(case: Case, device: str | torch.device = "cpu"):
    """(logits, target, ce_weights, kl_weights) of a case, the same on every device."""
    gen = torch.Generator().manual_seed(case.seed)
    h, b, k = case.heads, case.batch, case.classes
    logits = random_logits(gen, h, b, k, getattr(torch, case.dtype), case.scale, case.layout, device)
    target = torch.randint(0, k, (b,), generator=gen).to(device)
    ce_w, kl_w = mimic_weights(h, case.method, case.direction)
    return (logits, target, torch.tensor(ce_w, dtype=torch.float32, device=device),
            torch.tensor(kl_w, dtype=torch.float32, device=device))


def run(op, case: Case, device: str | torch.device = "cpu"):
    """(loss, stats, grads) of `op` (fused_loss's signature) on the case's inputs, on the CPU."""
    logits, target, ce_w, kl_w = make_inputs(case, device)
    loss, stats, grads = op(logits, target, ce_w, kl_w, case.temperature, case.alpha, case.eps, case.smoothing,
                            case.compute_grad)
    return loss.cpu(), stats.cpu(), [g.cpu() for g in grads]


def disagreement(result, reference, dtype: str, slack: float = 1.0) -> dict[str, float]:
    """How far `result` is from `reference` as multiples of the allowed error (<= 1 agrees): the CPU
    tests' tolerances per dtype, times `slack` (2 when both sides are approximations)."""
    tol, grad_rtol = TOLERANCE[dtype]
    (loss, stats, grads), (ref_loss, ref_stats, ref_grads) = result, reference

    def worst(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> float:
        if a.shape != b.shape:
            return float("inf")
        if a.numel() == 0:
            return 0.0
        a, b = a.double(), b.double()
        err = (a - b).abs()
        allowed = (atol + rtol * b.abs()) * slack
        ratio = torch.where(err == 0, torch.zeros_like(err), err / allowed)  # exact zeros agree
        return float(torch.nan_to_num(ratio, nan=float("inf")).max())

    stat_atol = max(tol, 1e-7) * max(1.0, float(ref_stats.double().abs().max()))
    report = {
        "loss": worst(loss.reshape(1), ref_loss.reshape(1), tol, tol),
        "stats": worst(stats, ref_stats, max(tol, 1e-7), stat_atol),
        "grads": 0.0,
    }
    if len(grads) != len(ref_grads):
        report["grads"] = float("inf")
    elif ref_grads and ref_grads[0].numel():
        # The gradient is a difference of terms of size lambda/B: where it cancels to ~0 (K = 1),
        # float32 rounding of those terms is the error to allow.
        scale = max(max(float(g.double().abs().max()) for g in ref_grads), 1.0 / ref_grads[0].shape[0])
        floor = 2.0**-24 if dtype == "float16" else 0.0
        atol = tol * scale + floor
        report["grads"] = max(worst(g, r, grad_rtol, atol) for g, r in zip(grads, ref_grads, strict=True))
    return report


def agrees(report: dict[str, float]) -> bool:
    return all(v <= 1.0 for v in report.values())


def compare_ops(candidate, device: str | torch.device, baseline, cases_to_run: list[Case] | None = None) -> list[dict]:
    """One row per case: `candidate` on `device` against `baseline` on the CPU, same inputs, in
    multiples of the allowed error (`agrees` when every entry is <= 1)."""
    rows = []
    for case in cases_to_run if cases_to_run is not None else all_cases():
        report = disagreement(run(candidate, case, device), run(baseline, case, "cpu"), case.dtype)
        rows.append({"case": case.name, **report, "agrees": agrees(report)})
    return rows


def all_cases() -> list[Case]:
    """The matrix, then every setting on a warp-per-row and a block-per-row shape."""
    return cases() + method_cases((4, 6, 100)) + method_cases((3, 2, 1000))
