"""Turn a uint8 image batch into the model's input: float32, normalised, optionally channels-last.

On the CPU the native op `dhm_fast::crop_normalize` (from `kernels`) does it in one pass through a
[C, 256] table; elsewhere, or without the library, torch's multiply-add gives the same bits
(docs/data.md).
"""

from __future__ import annotations

import torch
from torch import Tensor

import kernels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def native_crop_normalize():
    """`torch.ops.dhm_fast.crop_normalize` when the native library holds its CPU kernel, else None."""
    return kernels.op("crop_normalize") if kernels.has_kernel("crop_normalize", "cpu") else None


class Normalizer:
    """x -> (x / 255 - mean) / std as one multiply-add, cached per device."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 channels_last: bool = False) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.channels_last = channels_last
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}
        self._native = native_crop_normalize()

    def coefficients(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, shift) as [1, C, 1, 1] float32, x * scale + shift = (x / 255 - mean) / std, and
        the native op's [C, 256] table of the same values; made once per device."""
        if device not in self._cache:
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            scale, shift = 1.0 / (255.0 * std), -mean / std
            # Table[c, v] = v * scale[c] + shift[c]: the same float32 ops as torch's uint8 * scale + shift,
            # so the native op's output is bitwise-equal to the torch formulation's.
            levels = torch.arange(256, dtype=torch.float32, device=device).view(1, 256)
            self._cache[device] = (scale, shift, levels.mul(scale.reshape(-1, 1)).add_(shift.reshape(-1, 1)))
        return self._cache[device]

    def __call__(self, images: Tensor) -> Tensor:
        """uint8 [B, C, H, W] (any memory format) -> float32 [B, C, H, W]."""
        scale, shift, table = self.coefficients(images.device)
        if self._native is not None and images.device.type == "cpu" and images.dtype == torch.uint8:
            b, _, h, w = images.shape
            whole = torch.zeros(b, 2, dtype=torch.long)  # every image, uncropped
            return self._native(images, torch.arange(b), whole, h, w, table, self.channels_last)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # Written straight into a buffer of the wanted memory format: one pass, no extra copy.
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device, memory_format=fmt)
        torch.mul(images, scale, out=out)
        return out.add_(shift)
