"""Loader of the fused mimicking-loss op (kernels/, built as `dhm_fast._C`).

`torch.ops.dhm_fast.fused_loss` computes, in one pass over every head's logits, the per-head CE,
all pairwise KL terms, the loss, the logging stats and the gradient w.r.t. every head's logits
(returned and saved in the logits' dtype; its C++ autograd formula only scales it by grad_output).
This module registers the op's fake (meta) implementation for torch.compile and exposes
`fused_loss` with the signature of `dhm_fast.losses.reference_backend`. When the extension was not
built (no compiler), `available()` is False and the caller uses the reference; that is logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

_LOG = logging.getLogger(__name__)
_OP_NAME = "dhm_fast::fused_loss"
MAX_HEADS = 8  # kernels/dhm_row.h: kMaxHeads


def _load() -> str | None:
    """Import the extension (registers the op); None on success, else why it failed."""
    try:
        from dhm_fast import _C  # noqa: F401  (torch is imported first: _C links against it)
    except (ImportError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return None


_state: dict = {"error": _load(), "warned": False, "registered": False, "kernels": frozenset()}


def available() -> bool:
    """True when the native op is loaded; otherwise logs (once) that the reference is used."""
    if _state["error"] is None:
        return True
    if not _state["warned"] and not torch.compiler.is_compiling():
        _state["warned"] = True
        _LOG.warning(
            "dhm_fast._C is not built (%s); dhm_loss uses the plain-PyTorch reference, which is "
            "slower. Rebuild with `pip install --no-build-isolation -e .`",
            _state["error"],
        )
    return False


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension has a kernel for this device type ("cpu", "cuda")."""
    return _state["error"] is None and device_type in _state["kernels"]


def fused_loss(
    logits: Sequence[Tensor],
    target: Tensor,
    ce_weights: Tensor,
    kl_weights: Tensor,
    temperature: float,
    alpha: float,
    eps: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    """Loss (0-d) and flat float32 stats [ce (H), kl (H*H), correct (H)] over the given heads.

    Same contract as `dhm_fast.losses.reference_backend`: `logits` are the active heads' [B, K]
    tensors (float32/bfloat16/float16, or float64 for gradient checks), teacher row / student
    column in `kl_weights`. Devices without a compiled kernel go to the reference.
    """
    logits = list(logits)
    if not logits:
        raise ValueError("fused_loss needs at least one head's logits")
    device = logits[0].device
    if not has_kernel(device.type):
        from dhm_fast.losses import reference_backend

        available()  # logs the fallback once when the extension is missing altogether
        return reference_backend(
            logits, target, ce_weights, kl_weights, temperature, alpha, eps, label_smoothing
        )
    dtype = logits[0].dtype
    if any(x.dtype != dtype for x in logits):
        # Mixed precisions across heads: compute in the widest one.
        for x in logits[1:]:
            dtype = torch.promote_types(dtype, x.dtype)
        logits = [x.to(dtype) for x in logits]
    compute_grad = torch.is_grad_enabled() and any(x.requires_grad for x in logits)
    loss, stats, _ = torch.ops.dhm_fast.fused_loss(
        logits,
        target,
        ce_weights.to(device=device, dtype=torch.float32),
        kl_weights.to(device=device, dtype=torch.float32),
        float(temperature),
        float(alpha),
        float(eps),
        float(label_smoothing),
        compute_grad,
    )
    return loss, stats


def _fake_fused_loss(
    logits: list[Tensor],
    target: Tensor,
    ce_weights: Tensor,
    kl_weights: Tensor,
    temperature: float,
    alpha: float,
    eps: float,
    label_smoothing: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    h = len(logits)
    first = logits[0]
    loss_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    loss = first.new_empty((), dtype=loss_dtype)
    stats = first.new_empty((2 * h + h * h,), dtype=torch.float32)
    shape = tuple(first.shape) if compute_grad else (0,)
    grads = [x.new_empty(shape) for x in logits]
    return loss, stats, grads


def _register() -> None:
    if _state["error"] is not None or _state["registered"]:
        return
    torch.library.register_fake(_OP_NAME)(_fake_fused_loss)
    # Looked up once: the dispatcher query is not traceable by torch.compile.
    _state["kernels"] = frozenset(
        device
        for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, key)
    )
    _state["registered"] = True


_register()
