"""The native library: C++/CUDA ops in the `dhm_fast` op namespace, built by setup.py as `kernels._C`.

This module is the only one that imports `kernels._C`; everything above it (pipelines, dhm_fast)
asks here for an op and whether it can run on a device:
- `op("fused_loss")` is `torch.ops.dhm_fast.fused_loss`, or None when the library is not built;
  `eager_entry("fused_loss")` the same op for plain eager tensors, called without torch.ops' overhead;
- `has_kernel("fused_loss", device)` says whether the library has a kernel for that device: for a
  GPU, also whether it holds a cubin or PTX that GPU's compute capability can run;
- `load_error()` says why the library did not load (None when it did).
Without the library (no compiler at install time) every caller has a plain-PyTorch path.
"""

from __future__ import annotations

import torch

from kernels import cuda_targets

_NAMESPACE = "dhm_fast"
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _load():
    """(module, None) when the library loads (its import registers the ops), else (None, why)."""
    try:
        from kernels import _C  # torch is imported first: _C links against it
    except (ImportError, OSError) as err:
        return None, f"{type(err).__name__}: {err}"
    return _C, None


def _registered_kernels() -> frozenset[tuple[str, str]]:
    """(op name, device type) of every kernel the library registered. Read once: the dispatcher
    query cannot be traced by torch.compile, a set lookup can."""
    if _C is None:
        return frozenset()
    prefix = f"{_NAMESPACE}::"
    return frozenset(
        (name[len(prefix):], device_type)
        for device_type, key in _DISPATCH_KEYS.items()
        for name in torch._C._dispatch_get_registrations_for_dispatch_key(key)
        if name.startswith(prefix)
    )


_C, _ERROR = _load()
# What the build put in (CUDA targets, OpenMP); a stale library from before build_info() says nothing.
_BUILD: dict = getattr(_C, "build_info", dict)() if _C is not None else {}
_REGISTERED = _registered_kernels()
_kernel_cache: dict[tuple[str, str, int | None], bool] = {}


def load_error() -> str | None:
    """Why the native library is unavailable, or None when it is loaded."""
    return _ERROR


def op(name: str):
    """`torch.ops.dhm_fast.<name>`, or None when the library (or that op) is absent."""
    if _C is None:
        return None
    return getattr(getattr(torch.ops, _NAMESPACE), name, None)


def eager_entry(name: str):
    """The library's direct entry of op `name` for plain eager tensors (`_C.<name>_eager`: no torch.ops
    argument parsing), or None. It returns NotImplemented for inputs it does not take (tensor
    subclasses, __torch_function__ modes); callers then use `op(name)`, as they do under torch.compile."""
    return getattr(_C, f"{name}_eager", None) if _C is not None else None


def built_cuda_targets() -> tuple[str, ...]:
    """The cubin ("sm_XY") and PTX ("compute_XY") targets compiled into the library; () without CUDA."""
    archs = _BUILD.get("cuda_targets", "")
    return tuple(a for a in archs.split(",") if a)


def built_with_openmp() -> bool:
    """Whether the CPU kernels were compiled with OpenMP (else at::parallel_for runs on one thread)."""
    return bool(_BUILD.get("openmp", False))


def has_kernel(op_name: str, device: torch.device | str) -> bool:
    """Whether op `op_name` can run on `device`: a kernel registered for its type and, on a GPU,
    code for its compute capability. Cached per device; a GPU is queried once."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    key = (op_name, device.type, device.index)
    if key not in _kernel_cache:
        _kernel_cache[key] = _has_kernel_uncached(op_name, device)
    return _kernel_cache[key]


def _has_kernel_uncached(op_name: str, device: torch.device) -> bool:
    if (op_name, device.type) not in _REGISTERED:
        return False
    if device.type == "cuda":
        return cuda_targets.runs_on(built_cuda_targets(), device_capability(device))
    return True


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fused_loss computes and saves the logits' gradient in: float16's range is too small
    for a gradient before the loss scale applies, so float16 logits get a float32 gradient."""
    return torch.float32 if dtype == torch.float16 else dtype


def _fake_fused_loss(logits, target, ce_weights, kl_weights, temperature, alpha, eps, label_smoothing,
                     compute_grad):
    """Shapes and dtypes of fused_loss's outputs, for torch.compile and other tracing."""
    h = len(logits)
    first = logits[0]
    loss_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    loss = first.new_empty((), dtype=loss_dtype)
    stats = first.new_empty((2 * h + h * h,), dtype=torch.float32)
    shape = tuple(first.shape) if compute_grad else (0,)
    grads = [x.new_empty(shape, dtype=saved_grad_dtype(x.dtype)) for x in logits]
    return loss, stats, grads


if _C is not None:
    torch.library.register_fake(f"{_NAMESPACE}::fused_loss")(_fake_fused_loss)


def device_capability(device: torch.device) -> tuple[int, int]:
    """The GPU's compute capability, (major, minor)."""
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor
