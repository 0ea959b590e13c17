"""Plants one bug at a time in a scratch copy of kernels/ and checks that tests/test_cuda_emu.py fails.

    .venv/bin/python tests/cuda_emu/plant_bugs.py [--keep]

Each bug is a one-line edit of fused_loss_cuda.cuh (asserted to apply exactly once); the tests run
against the copy (DHM_EMU_KERNEL_DIR), which gets its own cached build. Exit status 1 when a bug
goes unnoticed. Not part of the test suite: three extra builds take minutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name: (the original text, its replacement)
BUGS = {
    # the last class of every row never gets its gradient written
    "off-by-one in a row's tail": (
        "  for (int64_t k = lane; k < K; k += ROW_THREADS) {\n    acc_t q[MAXH], s[MAXH], pt[MAXH];",
        "  for (int64_t k = lane; k < K - 1; k += ROW_THREADS) {\n    acc_t q[MAXH], s[MAXH], pt[MAXH];",
    ),
    # the warp's tree sum starts at 8 lanes apart: lanes 16-31 never reach lane 0
    "wrong shuffle offset": (
        "for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync",
        "for (int off = kWarp / 4; off > 0; off /= 2) v += __shfl_down_sync",
    ),
    # the warps of a block-row read each other's online states before they are written
    "removed __syncthreads": (
        "  if (kWarpsPerRow > 1) {\n    __syncthreads();\n#pragma unroll\n    for (int h = 0; h < MAXH; ++h) {",
        "  if (kWarpsPerRow > 1) {\n#pragma unroll\n    for (int h = 0; h < MAXH; ++h) {",
    ),
}


def plant(scratch: Path, original: str, replacement: str) -> None:
    header = scratch / "fused_loss_cuda.cuh"
    text = header.read_text()
    if text.count(original) != 1:
        raise SystemExit(f"the bug's original text occurs {text.count(original)} times in {header}; update BUGS")
    header.write_text(text.replace(original, replacement))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies (and their builds)")
    args = parser.parse_args()
    missed = []
    for i, (name, (original, replacement)) in enumerate(BUGS.items()):
        scratch = Path(tempfile.gettempdir()) / f"dhm_planted_bug_{i}"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(ROOT / "kernels", scratch, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        plant(scratch, original, replacement)
        env = {**os.environ, "DHM_EMU_KERNEL_DIR": str(scratch), "DHM_FAST_REQUIRE_CUDA_EMU": "1"}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/test_cuda_emu.py"], cwd=ROOT, env=env, capture_output=True, text=True)
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
        caught = proc.returncode == 1
        print(f"{'caught' if caught else 'MISSED'}: {name}: {summary}", flush=True)
        if not caught:
            missed.append(name)
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
