"""The training crop and flip of the folder backends (torchvision, DALI), drawn in the main process.

A batch's random numbers come from (seed, epoch, rank, batch index) alone, so neither the number of
workers nor where a resumed run restarts changes a batch (docs/data.md, "Augmentation"). Both backends
turn them into the same source rectangle, resized to image_size x image_size and flipped with
probability 1/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipelines.base import LoaderConfig
from pipelines.sharding import epoch_seed

ATTEMPTS = 10  # as torchvision's RandomResizedCrop
FLIP, POS_X, POS_Y = 2 * ATTEMPTS, 2 * ATTEMPTS + 1, 2 * ATTEMPTS + 2  # columns after the attempts
DRAWS = 2 * ATTEMPTS + 3  # uniforms per sample: (area, log-aspect) per attempt, flip, x, y


def batch_draws(seed: int, epoch: int, rank: int, batch: int, batch_size: int) -> np.ndarray:
    """Uniform [0, 1) numbers, float64 [batch_size, DRAWS], of batch `batch` of process `rank`."""
    return np.random.default_rng([epoch_seed(seed, epoch, rank), batch]).random((batch_size, DRAWS))


@dataclass(frozen=True)
class TrainCrop:
    scale_aug: bool
    scale: tuple[float, float]
    ratio: tuple[float, float]
    fraction: float  # side of the no-scale-augmentation square over the shorter side

    @classmethod
    def from_config(cls, config: LoaderConfig) -> TrainCrop:
        return cls(config.scale_aug, tuple(config.scale), tuple(config.ratio),
                   config.image_size / config.val_resize)

    def box(self, draws: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) in an image of `height` x `width` pixels: with scale_aug,
        torchvision's RandomResizedCrop rule; without, a square of `fraction` of the shorter side at a
        uniform position (= resize the shorter side to val_resize, then a random image_size crop)."""
        if not self.scale_aug:
            side = max(1, min(height, width, round(self.fraction * min(height, width))))
            return (_position(draws[POS_Y], height - side), _position(draws[POS_X], width - side), side, side)
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for k in range(ATTEMPTS):
            target = area * (self.scale[0] + draws[2 * k] * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + draws[2 * k + 1] * (log_hi - log_lo))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return _position(draws[POS_Y], height - h), _position(draws[POS_X], width - w), h, w
        # Every attempt missed: the whole image, cut to the nearest allowed aspect ratio, centred.
        if width / height < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif width / height > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


def flipped(draws: np.ndarray) -> bool:
    return bool(draws[FLIP] < 0.5)


def _position(u: float, room: int) -> int:
    """A uniform integer offset in [0, room] from a uniform u in [0, 1)."""
    return min(room, int(u * (room + 1)))
