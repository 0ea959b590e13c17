"""--deterministic: PyTorch's deterministic algorithms, on the CPU and on CUDA.

On CUDA, cuBLAS is deterministic only with a fixed workspace configuration, and with deterministic algorithms
on PyTorch refuses every cuBLAS call unless CUBLAS_WORKSPACE_CONFIG is one of the two values NVIDIA documents
(https://docs.nvidia.com/cuda/cublas/#results-reproducibility). The variable is read when the cuBLAS handle
and its workspace are made, so `prepare` sets it before the process touches CUDA; a value the user set that
does not suit is refused in one line rather than silently replaced.

Every op of a training step must have a deterministic CUDA implementation too: heads pool with a mean
(dhm_fast/models/branching.py), and tests/test_determinism.py checks every architecture family's step against
PyTorch's list of ops that have none.
"""

from __future__ import annotations

import os

from dhm_fast.errors import UserError

CUBLAS_VAR = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")  # 8 buffers of 4 MiB or of 16 KiB (less memory, maybe slower)


def prepare(deterministic: bool) -> None:
    """Before CUDA starts: the cuBLAS workspace configuration --deterministic needs."""
    if not deterministic:
        return
    value = os.environ.get(CUBLAS_VAR)
    if value is None:
        os.environ[CUBLAS_VAR] = CUBLAS_DETERMINISTIC[0]
    elif value not in CUBLAS_DETERMINISTIC:
        raise UserError(f"--deterministic needs {CUBLAS_VAR}={CUBLAS_DETERMINISTIC[0]} or "
                        f"{CUBLAS_DETERMINISTIC[1]} (cuBLAS is not deterministic otherwise), but it is set to "
                        f"{value!r}; unset it or set one of those")

