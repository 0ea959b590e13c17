"""Builds the optional native extension `dhm_fast._C` (kernels/: the fused mimicking loss, and the
in-memory loader's crop + normalise).

Metadata lives in pyproject.toml; this file only adds the extension. It builds three ways:
- with nvcc: CPU and CUDA kernels (CUDA_HOME defaults to /usr/local/cuda, TORCH_CUDA_ARCH_LIST to
  "8.0;9.0"; both can be overridden from the environment);
- without nvcc, or with DHM_FAST_NO_CUDA=1: the CPU kernel alone;
- without a working compiler: no extension; the package still installs and falls back to the
  plain-PyTorch loss, saying so once.
DHM_FAST_REQUIRE_CUDA_BUILD=1 turns a missing nvcc or a failed CUDA build into an error (CI sets it).
Install with `pip install --no-build-isolation -e .` so the installed torch is used.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CPU_SOURCES = ["kernels/fused_loss.cpp", "kernels/fused_loss_cpu.cpp", "kernels/crop_normalize_cpu.cpp"]
# One file per logits dtype group: ninja compiles them in parallel.
CUDA_SOURCES = [
    "kernels/fused_loss_cuda.cu",
    "kernels/fused_loss_cuda_half.cu",
    "kernels/fused_loss_cuda_bf16.cu",
]
REQUIRE_CUDA = os.environ.get("DHM_FAST_REQUIRE_CUDA_BUILD") == "1"
NO_CUDA = os.environ.get("DHM_FAST_NO_CUDA") == "1"

# -fopenmp-simd: honour the kernels' `omp simd` loops without the OpenMP runtime;
# -fno-trapping-math: lets the compiler turn the branch-free selects of exp/log into vector blends.
CXX_FLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
NVCC_FLAGS = ["-O3"]


def _say(msg: str) -> None:
    print(f"dhm_fast setup: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit folder, exported as CUDA_HOME before torch's build helpers read it."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return home
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        # The nvcc on PATH may be a wrapper script: trust it only where a toolkit sits beside it.
        candidate = Path(nvcc).resolve().parent.parent
        if (candidate / "include" / "cuda_runtime.h").exists():
            return str(candidate)
    return None


def _cuda_include_dirs() -> list[str]:
    # The slim pip toolkit lacks headers (cusparse.h, ...) that ATen's CUDA headers include.
    extra = Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13" / "include"
    return [str(extra)] if extra.is_dir() else []


def _extensions(use_cuda: bool) -> list:
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    if use_cuda:
        return [
            CUDAExtension(
                "dhm_fast._C",
                CPU_SOURCES + CUDA_SOURCES,
                include_dirs=[str(ROOT / "kernels"), *_cuda_include_dirs()],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            )
        ]
    return [
        CppExtension(
            "dhm_fast._C",
            CPU_SOURCES,
            include_dirs=[str(ROOT / "kernels")],
            extra_compile_args={"cxx": CXX_FLAGS},
        )
    ]


def _plan() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when torch's build helpers are unusable."""
    if NO_CUDA and REQUIRE_CUDA:
        raise SystemExit("DHM_FAST_NO_CUDA=1 and DHM_FAST_REQUIRE_CUDA_BUILD=1 contradict each other")
    cuda_home = None if NO_CUDA else _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        # Without a GPU torch cannot guess the targets (and fails with an IndexError).
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    elif REQUIRE_CUDA:
        raise SystemExit("DHM_FAST_REQUIRE_CUDA_BUILD=1 but no CUDA toolkit (nvcc) was found")
    try:
        from torch.utils.cpp_extension import BuildExtension
    except Exception as err:  # noqa: BLE001 - any failure here means: no native build
        _say(f"torch's extension builder is unavailable ({err}); installing without dhm_fast._C")
        return [], {}

    class OptionalBuildExt(BuildExtension):
        """Falls back from CUDA to CPU-only to no extension, unless the CUDA build is required."""

        def run(self) -> None:
            kind = "CUDA" if cuda_home else "CPU-only"
            start = time.monotonic()
            try:
                super().run()
                _say(f"built dhm_fast._C ({kind}) in {time.monotonic() - start:.0f} s")
                return
            except Exception as err:  # noqa: BLE001 - compiler missing or failing
                if cuda_home and REQUIRE_CUDA:
                    raise
                _say(f"the {kind} build of dhm_fast._C failed: {err}")
            if cuda_home:
                _say("retrying with the CPU kernel only")
                self.extensions = _extensions(use_cuda=False)
                try:
                    super().run()
                    _say("built dhm_fast._C (CPU-only)")
                    return
                except Exception as err:  # noqa: BLE001
                    _say(f"the CPU-only build failed too: {err}")
            _say("installing without dhm_fast._C: dhm_loss will use the plain-PyTorch reference")
            self.extensions = []

    return _extensions(use_cuda=cuda_home is not None), {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _plan()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
