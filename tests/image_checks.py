"""Pixel-by-pixel comparison of a loader's validation images with the float64 reference images of
pipeline_helpers.reference_val_image, tolerant to decoder and resize-filter differences only.

Units: normalised pixels (one 8-bit level is 1 / 255 / std, about 0.017). Measured on the CPU
backends against the reference, per image mean absolute difference: torchvision < 0.001, DALI and
FFCV up to 0.03 (their resamplers and sub-pixel crop conventions differ from PIL's). nvJPEG's IDCT and
DALI's GPU resampler differ from libjpeg-turbo and the CPU resampler by a level or two, so a GPU
loader stays well below IMAGE_TOLERANCE. A geometric mistake does not: on the gradient images of
pipelines.sample_data a mirrored image is off by 0.19 or more, a transposed one by 0.42 or more, a
crop 4 pixels off centre by 0.2 or more.
"""

from __future__ import annotations

import numpy as np
from pipeline_helpers import match_to_reference

IMAGE_TOLERANCE = 0.1  # mean absolute difference of any one image
MEAN_TOLERANCE = 0.04  # ... averaged over the images


def image_errors(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each image [N, C, H, W] from its reference image."""
    assert images.shape == reference.shape, (images.shape, reference.shape)
    return np.abs(images - reference).mean(axis=(1, 2, 3))


def assert_matches_reference(images: np.ndarray, reference: np.ndarray) -> None:
    """Each image is its own reference image, in the same order, up to decoding and resampling noise."""
    errors = image_errors(images, reference)
    worst = int(errors.argmax())
    assert errors[worst] < IMAGE_TOLERANCE, f"image {worst} is off its reference by {errors[worst]:.3f}"
    assert errors.mean() < MEAN_TOLERANCE, f"images are off their references by {errors.mean():.3f} on average"
    assert np.array_equal(match_to_reference(images, reference), np.arange(len(reference)))
