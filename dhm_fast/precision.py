"""The speed settings that depend on the device: autocast dtype, memory layout and TF32.

`--amp auto` and an unset `--channels-last` resolve here once the device is known (explicit values are
kept); `Speed.notes` says what was chosen and why, for the log's first lines. On the CPU bf16 needs
native bf16 arithmetic (AMX or AVX512-BF16): on an AVX2-only CPU a ResNet-20 DHM step measured 10x
slower in bf16 than in fp32. The CPU's layout is channels-last from AVX2 up (`cpu_channels_last`; the
measurements are in docs/configuration.md). TF32 is off under --deterministic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from dhm_fast.errors import UserError


@dataclass(frozen=True)
class Speed:
    amp: str  # none | bf16 | fp16
    channels_last: bool
    tf32: bool
    notes: list[str] = field(default_factory=list)

    @property
    def needs_scaler(self) -> bool:
        return self.amp == "fp16"


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo; elsewhere none are known)."""
    try:
        with open("/proc/cpuinfo") as f:
            # "flags\t\t: fpu vme ...": the names after the colon
            return frozenset(next((line.partition(":")[2].split() for line in f if line.startswith("flags")), ()))
    except OSError:
        return frozenset()


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX512-BF16)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_channels_last() -> tuple[bool, str]:
    """The CPU's default layout and why. Measured with benchmarks.bench_layout (docs/configuration.md):
    channels-last trained the demo's ResNet-20 and CIFAR's ResNet-32 faster than NCHW on every x86 level
    measured: 1.14-1.29x in fp32 and bf16 with AVX512-BF16, 1.23-1.24x in bf16 with AMX (issue 24),
    1.23-1.30x in fp32 at AVX-512 without bf16 and 1.14-1.15x at AVX2 (the same CPU with oneDNN's and
    torch's vector code capped to those levels). CPUs below AVX2, or not x86, were not measured: NCHW."""
    if "avx2" in cpu_flags():
        return True, "measured faster on x86 CPUs with AVX2 or newer"
    return False, "the default where it was not measured (no AVX2)"


def choose(amp: str, channels_last: bool | None, device: torch.device, deterministic: bool) -> Speed:
    """Resolve "auto" settings for `device`, and refuse combinations the device cannot run."""
    notes = []
    cuda = device.type == "cuda"
    if amp == "auto":
        if cuda:
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            why = "the GPU supports bf16" if amp == "bf16" else "no bf16 on this GPU; fp16 with a GradScaler"
        else:
            amp = "bf16" if cpu_has_bf16() else "none"
            why = "the CPU has native bf16" if amp == "bf16" else "fp32: this CPU has no native bf16"
        notes.append(f"--amp auto -> {amp} ({why})")
    if amp == "fp16" and not cuda:
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    if channels_last is None:
        channels_last, why = (True, "tensor-core convolutions want NHWC") if cuda else cpu_channels_last()
        notes.append(f"channels-last {'on' if channels_last else 'off'} ({why})")
    tf32 = cuda and not deterministic
    if cuda:
        notes.append("TF32 matmuls/convolutions " + ("on" if tf32 else "off (--deterministic)"))
    return Speed(amp, channels_last, tf32, notes)


def apply(speed: Speed) -> None:
    """Process-wide switches: TF32 for matmuls and cuDNN convolutions."""
    if speed.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_factory(speed: Speed, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast contexts a step and an evaluation run under."""
    if speed.amp == "none":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if speed.amp == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype)
