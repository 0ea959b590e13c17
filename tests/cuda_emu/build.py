"""Builds the CUDA execution model (emu_module.cpp) with the fused loss's CUDA kernels, on the CPU.

The kernel header is compiled as it is; the one mechanical change is its launch sites,
`kernel<<<grid, block, smem, stream>>>(args)` -> `::dhm_emu::launch(kernel, LaunchConfig(grid, block,
smem, stream), args)`, written to the build folder. Their number is asserted, so a new launch site
fails the build loudly instead of going unchecked. The build is cached in build/cuda_emu/ (ninja
tracks the headers); another kernel folder (a scratch copy with a planted bug) gets its own build.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
KERNEL_HEADER = "fused_loss_cuda.cuh"
LAUNCH_SITES = 3  # fused_rows_kernel, reduce_stats_kernel, finish_kernel
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


class LaunchSitesChanged(RuntimeError):
    """The kernel header's launch sites are not the ones the model was written for."""


def rewrite_launches(source: str, expected: int = LAUNCH_SITES) -> str:
    """`k<<<cfg>>>(args)` -> `::dhm_emu::launch(k, ::dhm_emu::LaunchConfig(cfg), args)`; exactly `expected`."""
    out, count = LAUNCH.subn(r"::dhm_emu::launch(\1, ::dhm_emu::LaunchConfig(\2), ", source)
    if count != expected:
        raise LaunchSitesChanged(f"{KERNEL_HEADER} has {count} kernel launch site(s), the execution model expects "
                                 f"{expected}: update tests/cuda_emu/build.py (LAUNCH_SITES) and its tests")
    if "<<<" in out:
        raise LaunchSitesChanged(f"{KERNEL_HEADER} has a launch the rewrite did not understand")
    return out


def kernel_dir() -> Path:
    """The kernel sources: kernels/, or DHM_EMU_KERNEL_DIR (a scratch copy, e.g. with a planted bug)."""
    return Path(os.environ.get("DHM_EMU_KERNEL_DIR", ROOT / "kernels")).resolve()


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def load(kernels: Path | None = None, verbose: bool = False):
    """The built module (built now if its sources changed)."""
    from torch.utils import cpp_extension

    kernels = (kernels or kernel_dir()).resolve()
    tag = hashlib.sha1(str(kernels).encode()).hexdigest()[:8]
    build = ROOT / "build" / "cuda_emu" / tag
    build.mkdir(parents=True, exist_ok=True)
    _write_if_changed(build / "fused_loss_cuda_emu.cuh", rewrite_launches((kernels / KERNEL_HEADER).read_text()))
    return cpp_extension.load(
        name=f"dhm_cuda_emu_{tag}",
        sources=[str(HERE / "emu_module.cpp")],
        # The stand-ins for ATen's and c10's CUDA headers come first, then the rewritten header, then
        # the kernel folder (fused_loss.h, dhm_row.h).
        extra_include_paths=[str(HERE / "include"), str(HERE), str(build), str(kernels)],
        extra_cflags=["-O2", "-g0", "-Wno-unknown-pragmas", "-fvisibility=default"],
        build_directory=str(build),
        verbose=verbose,
    )
