"""Builds the optional native library `kernels._C` (kernels/: the fused mimicking loss, and the
in-memory loader's crop + normalise), loaded only by kernels/__init__.py.

Metadata lives in pyproject.toml; this file only adds the extension. It builds three ways:
- with nvcc: CPU and CUDA kernels (CUDA_HOME defaults to /usr/local/cuda). The GPU targets are
  TORCH_CUDA_ARCH_LIST when set, else the visible GPUs, else one cubin per major architecture this
  nvcc supports from sm_75 up (it runs on the later minors) plus PTX of the newest
  (kernels/cuda_targets.py); the list is compiled into the library (kernels.built_cuda_targets())
  and printed;
- without nvcc, or with DHM_FAST_NO_CUDA=1: the CPU kernel alone;
- without a working compiler: no extension; the package still installs and falls back to the
  plain-PyTorch loss, saying so once.
DHM_FAST_REQUIRE_CUDA_BUILD=1 turns a missing nvcc or a failed CUDA build into an error (CI sets it).
Install with `pip install --no-build-isolation -e .` so the installed torch is used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
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

# -fopenmp, as torch compiles its own C++ (and inductor its kernels): at::parallel_for is an inline
# OpenMP loop, serial without it. Linking with -fopenmp needs libgomp.so.1, which resolves to the copy
# torch has already loaded, so torch.set_num_threads sets our thread count too. It also honours the
# kernels' `omp simd` loops. -fno-trapping-math lets the compiler turn the branch-free selects of
# exp/log into vector blends.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
LINK_FLAGS = ["-fopenmp"]
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


def _cuda_targets_module():
    """kernels/cuda_targets.py, loaded by path: the kernels package itself needs the built library."""
    spec = importlib.util.spec_from_file_location("dhm_build_cuda_targets", ROOT / "kernels" / "cuda_targets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_gencode_flags(cuda_home: str) -> list[str]:
    """nvcc -gencode flags: TORCH_CUDA_ARCH_LIST, else the visible GPUs (both as torch builds its own
    extensions), else one cubin per major architecture of this nvcc from sm_75 up, plus PTX of the newest."""
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return cpp_extension._get_cuda_arch_flags()
    targets = _cuda_targets_module()
    return targets.default_gencode_flags(targets.nvcc_architectures(str(Path(cuda_home) / "bin" / "nvcc")))


def _extensions(cuda_flags: list[str] | None) -> list:
    """The extension; with CUDA kernels for these -gencode flags, or CPU-only when cuda_flags is None."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    if cuda_flags is not None:
        targets = _cuda_targets_module().targets_of(cuda_flags)
        _say(f"CUDA targets: {', '.join(targets)}")
        # Compiled in, so that the library can say at run time which GPUs it runs on.
        define = f"-DDHM_CUDA_TARGETS={','.join(targets)}"
        return [
            CUDAExtension(
                "kernels._C",
                CPU_SOURCES + CUDA_SOURCES,
                include_dirs=[str(ROOT / "kernels"), *_cuda_include_dirs()],
                extra_compile_args={"cxx": [*CXX_FLAGS, define], "nvcc": [*NVCC_FLAGS, *cuda_flags]},
                extra_link_args=LINK_FLAGS,
            )
        ]
    return [
        CppExtension(
            "kernels._C",
            CPU_SOURCES,
            include_dirs=[str(ROOT / "kernels")],
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    ]


def _plan() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(); empty when torch's build helpers are unusable."""
    if NO_CUDA and REQUIRE_CUDA:
        raise SystemExit("DHM_FAST_NO_CUDA=1 and DHM_FAST_REQUIRE_CUDA_BUILD=1 contradict each other")
    cuda_home = None if NO_CUDA else _find_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    elif REQUIRE_CUDA:
        raise SystemExit("DHM_FAST_REQUIRE_CUDA_BUILD=1 but no CUDA toolkit (nvcc) was found")
    try:
        from torch.utils.cpp_extension import BuildExtension
    except Exception as err:  # noqa: BLE001 - any failure here means: no native build
        _say(f"torch's extension builder is unavailable ({err}); installing without kernels._C")
        return [], {}
    cuda_flags = None
    if cuda_home:
        try:
            cuda_flags = cuda_gencode_flags(cuda_home)
        except ValueError as err:  # a TORCH_CUDA_ARCH_LIST that names no known architecture
            raise SystemExit(f"TORCH_CUDA_ARCH_LIST: {err}") from err
        except (OSError, subprocess.CalledProcessError) as err:
            if REQUIRE_CUDA:
                raise SystemExit(f"cannot list this nvcc's GPU architectures: {err}") from err
            _say(f"cannot list this nvcc's GPU architectures ({err}); building the CPU kernel only")
            cuda_home = None

    class OptionalBuildExt(BuildExtension):
        """Falls back from CUDA to CPU-only to no extension, unless the CUDA build is required."""

        def run(self) -> None:
            kind = "CUDA" if cuda_home else "CPU-only"
            start = time.monotonic()
            try:
                super().run()
                _say(f"built kernels._C ({kind}) in {time.monotonic() - start:.0f} s")
                return
            except Exception as err:  # noqa: BLE001 - compiler missing or failing
                if cuda_home and REQUIRE_CUDA:
                    raise
                _say(f"the {kind} build of kernels._C failed: {err}")
            if cuda_home:
                _say("retrying with the CPU kernel only")
                self.extensions = _extensions(cuda_flags=None)
                try:
                    super().run()
                    _say("built kernels._C (CPU-only)")
                    return
                except Exception as err:  # noqa: BLE001
                    _say(f"the CPU-only build failed too: {err}")
            _say("installing without kernels._C: dhm_loss will use the plain-PyTorch reference")
            self.extensions = []

    return _extensions(cuda_flags), {"build_ext": OptionalBuildExt}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it for the target plan
    ext_modules, cmdclass = _plan()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
