"""The native library's build: which GPU code setup.py plans (checked on the CPU), and whether the
built library holds exactly that code (cuobjdump; required in CI, where DHM_FAST_REQUIRE_CUDA_BUILD=1)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import kernels
from kernels import cuda_targets

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = os.environ.get("DHM_FAST_REQUIRE_CUDA_BUILD") == "1"
NVCC_13_ARCHS = [75, 80, 86, 87, 88, 89, 90, 100, 110, 103, 120, 121]  # `nvcc --list-gpu-arch`, CUDA 13.0


def load_setup():
    """setup.py as a module: its build only runs as __main__, so this defines the functions alone."""
    spec = importlib.util.spec_from_file_location("dhm_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_cuda_home(tmp_path: Path, archs: list[int]) -> Path:
    """A folder whose bin/nvcc answers --list-gpu-arch like a real one, with these architectures."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    lines = "\n".join([f"compute_{a}" for a in archs] + ["compute_90a", "compute_100f"])
    nvcc.write_text(f"#!/bin/sh\n[ \"$1\" = --list-gpu-arch ] && printf '%s\\n' '{lines}'\n")
    nvcc.chmod(0o755)
    return tmp_path


# ---------------------------------------------------------------------------- the plan (CPU)
def test_without_a_gpu_one_cubin_per_major_from_sm75_is_built_plus_ptx_of_the_newest(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    home = fake_cuda_home(tmp_path, [70, *NVCC_13_ARCHS])
    flags = load_setup().cuda_gencode_flags(str(home))
    assert cuda_targets.nvcc_architectures(str(home / "bin" / "nvcc")) == sorted([70, *NVCC_13_ARCHS])
    targets = cuda_targets.targets_of(flags)
    assert targets == ["sm_75", "sm_80", "sm_90", "sm_100", "sm_110", "sm_120", "compute_121"]
    # Every GPU a cubin per architecture would run on (each architecture nvcc names), and a GPU newer
    # than the toolkit (PTX JIT); nothing older than sm_75, no longer a target of CUDA 13.
    for arch in [*NVCC_13_ARCHS, 130]:
        assert cuda_targets.runs_on(targets, divmod(arch, 10)), arch
    assert not cuda_targets.runs_on(targets, (7, 0))


def test_torch_cuda_arch_list_overrides_the_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    home = fake_cuda_home(tmp_path, NVCC_13_ARCHS)
    flags = load_setup().cuda_gencode_flags(str(home))
    assert cuda_targets.targets_of(flags) == ["sm_80", "compute_90", "sm_90"]


def test_a_visible_gpu_gets_its_own_architecture_and_ptx(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_90", "sm_100", "sm_120"])
    home = fake_cuda_home(tmp_path, NVCC_13_ARCHS)
    flags = load_setup().cuda_gencode_flags(str(home))
    assert cuda_targets.targets_of(flags) == ["compute_120", "sm_120"]


def test_an_nvcc_without_a_supported_architecture_is_refused():
    with pytest.raises(ValueError, match="no architecture from sm_75"):
        cuda_targets.default_gencode_flags([50, 60, 70])


@pytest.mark.parametrize(
    "targets,capability,runs",
    [
        (["sm_80", "sm_90"], (8, 0), True),
        (["sm_80", "sm_90"], (8, 6), True),  # a cubin runs on later minors of its major
        (["sm_86"], (8, 0), False),  # ... but not on earlier ones
        (["sm_80", "sm_90"], (10, 0), False),  # nor on another major: the bug this plan fixes
        (["sm_80", "sm_90"], (7, 5), False),
        (["sm_80", "compute_90"], (12, 0), True),  # PTX: JIT-compiled on any newer GPU
        (["compute_90"], (8, 9), False),
        (["sm_90a"], (9, 0), True),
        (["sm_90a"], (10, 0), False),
        (["compute_90a"], (10, 0), False),  # arch-specific PTX runs on that architecture alone
        ([], (8, 0), False),
    ],
)
def test_which_gpus_a_build_runs_on(targets, capability, runs):
    assert cuda_targets.runs_on(targets, capability) is runs


def test_targets_are_read_from_gencode_flags_and_cuobjdump_listings():
    flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=[sm_90,compute_90]"]
    assert cuda_targets.targets_of(flags) == ["sm_80", "compute_90", "sm_90"]
    listing = "\n".join([
        "ELF file    1: _C.cpython-311-x86_64-linux-gnu.1.sm_80.cubin",
        "ELF file    2: _C.cpython-311-x86_64-linux-gnu.2.sm_90.cubin",
        "ELF file    3: _C.cpython-311-x86_64-linux-gnu.3.sm_80.cubin",
        "PTX file    4: _C.cpython-311-x86_64-linux-gnu.4.sm_90.ptx",
    ])
    assert cuda_targets.cuobjdump_targets(listing) == ["sm_80", "compute_90", "sm_90"]


# ---------------------------------------------------------------------------- the built library
def find_cuobjdump() -> str | None:
    """cuobjdump from the triton wheel torch installs, else the CUDA toolkit's."""
    triton = importlib.util.find_spec("triton")
    candidates = []
    if triton is not None and triton.origin:
        candidates.append(Path(triton.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates.append(Path(home) / "bin" / "cuobjdump")
    found = next((str(p) for p in candidates if p.is_file()), None)
    return found or shutil.which("cuobjdump")


def test_built_library_holds_exactly_the_planned_gpu_code():
    planned = kernels.built_cuda_targets()
    if not planned:
        if REQUIRED:
            pytest.fail(f"DHM_FAST_REQUIRE_CUDA_BUILD=1 but kernels._C holds no CUDA code ({kernels.load_error()})")
        pytest.skip("kernels._C was built without CUDA")
    tool = find_cuobjdump()
    if tool is None:
        if REQUIRED:
            pytest.fail("cuobjdump not found (neither in the triton wheel nor in CUDA_HOME/bin)")
        pytest.skip("cuobjdump not found")
    library = kernels._C.__file__
    listing = ""
    for option in ("--list-elf", "--list-ptx"):
        # A library without PTX makes --list-ptx complain on stderr; the listing is what counts.
        proc = subprocess.run([tool, option, library], capture_output=True, text=True, timeout=300)
        listing += proc.stdout
    assert cuda_targets.cuobjdump_targets(listing) == list(planned)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert any(t.startswith("compute_") for t in planned), "no PTX: a newer GPU could not run the op"
