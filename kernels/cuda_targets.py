"""Which GPU code the native library holds: chosen at build time (setup.py), checked at run time.

A target is a cubin, "sm_XY" (machine code for one architecture), or PTX, "compute_XY" (the virtual
ISA, compiled by the driver for any GPU at least as new). The build plan is, in order of precedence:
1. TORCH_CUDA_ARCH_LIST when set (torch's own syntax and flags);
2. the visible GPUs when there are any (torch's default: their architectures, PTX of the newest);
3. otherwise one cubin per major architecture this nvcc supports from MIN_ARCH up (its oldest minor:
   sm_75, sm_80, sm_90, sm_100, sm_110, sm_120 for CUDA 13.0), plus PTX of the newest, so that a GPU
   newer than the toolkit still runs the op (JIT-compiled from the PTX). A cubin runs on every later
   minor of its major (sm_80 on 8.6, 8.7, 8.9; sm_120 on 12.1), so this covers every GPU that a cubin
   per architecture would, at half the nvcc time on a GPU-less machine (docs/benchmarks.md); the
   kernels use nothing a later minor adds. TORCH_CUDA_ARCH_LIST still builds any list.
The list is compiled into the library, so that `kernels.has_kernel` can tell before the first launch
whether a device can run the op, and CI can compare it with what cuobjdump finds in the binary.

Pure Python without torch at import time: setup.py loads this file by path, before the package builds.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence

MIN_ARCH = 75  # Turing (T4): the oldest GPU the CUDA 13 toolkit still targets
_TARGET = re.compile(r"^(sm|compute)_(\d+)([af]?)$")


def nvcc_architectures(nvcc: str) -> list[int]:
    """The plain (not arch- or family-specific) architectures `nvcc --list-gpu-arch` names, sorted."""
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
    return sorted({int(m.group(1)) for m in re.finditer(r"^compute_(\d+)$", out, re.MULTILINE)})


def default_gencode_flags(nvcc_archs: Iterable[int], min_arch: int = MIN_ARCH) -> list[str]:
    """-gencode flags for the oldest architecture >= min_arch of each major (its cubin runs on the later
    minors), plus PTX of the newest."""
    archs = sorted(a for a in set(nvcc_archs) if a >= min_arch)
    if not archs:
        raise ValueError(f"this nvcc supports no architecture from sm_{min_arch} up")
    oldest_of_major: dict[int, int] = {}
    for arch in archs:
        oldest_of_major.setdefault(arch // 10, arch)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in oldest_of_major.values()]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def targets_of(gencode_flags: Sequence[str]) -> list[str]:
    """The cubin and PTX targets a list of nvcc -gencode flags builds, e.g. ["sm_80", "compute_90"]."""
    found: set[str] = set()
    for flag in gencode_flags:
        match = re.search(r"[,\s]code=\[?([\w,]+)\]?", flag)
        if match is None:
            raise ValueError(f"cannot read the targets of nvcc flag {flag!r}")
        for code in match.group(1).split(","):
            if not _TARGET.match(code):
                raise ValueError(f"unexpected nvcc target {code!r} in {flag!r}")
            found.add(code)
    return sorted(found, key=_sort_key)


def _sort_key(target: str) -> tuple[int, str, str]:
    kind, number, suffix = _TARGET.match(target).groups()
    return int(number), suffix, kind


def runs_on(targets: Iterable[str], capability: tuple[int, int]) -> bool:
    """Whether a library holding `targets` has code a GPU of this compute capability can run.

    A cubin sm_XY runs on X.Y and on later minor versions of the same major (X.Z, Z >= Y); an arch-
    specific one (sm_90a) only on X.Y itself; PTX compute_XY on any X.Y or newer (JIT-compiled).
    """
    major, minor = capability
    device = major * 10 + minor
    for target in targets:
        match = _TARGET.match(target)
        if match is None:
            continue
        kind, number, suffix = match.group(1), int(match.group(2)), match.group(3)
        if suffix == "a":
            fits = device == number
        elif kind == "sm" or suffix == "f":
            fits = major == number // 10 and minor >= number % 10
        else:
            fits = device >= number
        if fits:
            return True
    return False


def cuobjdump_targets(listing: str) -> list[str]:
    """Targets in `cuobjdump --list-elf` / `--list-ptx` output (file names like x.sm_90.cubin, x.sm_90.ptx).

    cuobjdump names PTX after its virtual architecture with an sm_ prefix; it is returned as compute_XY.
    """
    found: set[str] = set()
    for line in listing.splitlines():
        match = re.search(r"\.sm_(\d+[af]?)\.(cubin|ptx)\b", line)
        if match:
            found.add(("sm_" if match.group(2) == "cubin" else "compute_") + match.group(1))
    return sorted(found, key=_sort_key)
