"""The image comparison the GPU loader tests rely on (image_checks.assert_matches_reference), checked
where it can run everywhere: it accepts what every CPU loader produces for the validation split, and it
rejects the same images mirrored, flipped, transposed, cropped off centre, with channels swapped or
out of order, which per-image channel means cannot see."""

from __future__ import annotations

import numpy as np
import pytest
from image_checks import IMAGE_TOLERANCE, assert_matches_reference, image_errors
from pipeline_helpers import collect, make_loaders, reference_val_image

from pipelines.imagefolder import scan_imagefolder
from pipelines.sample_data import write_imagefolder

SIZE, RESIZE = 32, 40  # the crop and shorter side of pipeline_helpers.small_config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("compare"), seed=5)  # the GPU tests' dataset


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def val_files(dataset, cache_dir) -> list[str]:
    return scan_imagefolder(dataset.root, cache_dir=cache_dir)[1].files


@pytest.fixture(scope="module")
def reference(val_files) -> np.ndarray:
    return np.stack([reference_val_image(f, SIZE, RESIZE) for f in val_files])


@pytest.fixture(scope="module")
def torchvision_images(dataset, cache_dir) -> np.ndarray:
    return collect(make_loaders("torchvision", dataset.root, cache_dir)[1])[0]


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_every_cpu_loader_passes(backend, dataset, cache_dir, reference):
    images, _ = collect(make_loaders(backend, dataset.root, cache_dir)[1])
    assert_matches_reference(images, reference)


def _off_centre(val_files: list[str]) -> np.ndarray:
    # The top-left SIZE x SIZE of the centred RESIZE x RESIZE square: 4 pixels off on each axis.
    return np.stack([reference_val_image(f, RESIZE, RESIZE)[:, :SIZE, :SIZE] for f in val_files])


BROKEN = {
    "mirrored": lambda x, files: x[..., ::-1],
    "upside down": lambda x, files: x[..., ::-1, :],
    "transposed": lambda x, files: x.swapaxes(2, 3),
    "cropped off centre": lambda x, files: _off_centre(files),
    "BGR": lambda x, files: x[:, ::-1],
    "out of order": lambda x, files: np.roll(x, 1, axis=0),
}


@pytest.mark.parametrize("mistake", sorted(BROKEN))
def test_geometric_and_order_mistakes_fail(mistake, torchvision_images, reference, val_files):
    broken = np.ascontiguousarray(BROKEN[mistake](torchvision_images, val_files))
    with pytest.raises(AssertionError):
        assert_matches_reference(broken, reference)


@pytest.mark.parametrize("mistake", ["mirrored", "transposed", "cropped off centre"])
def test_every_image_is_caught_alone(mistake, torchvision_images, reference, val_files):
    # One wrong image among right ones fails too: the tolerance is per image, not only on average.
    broken = np.ascontiguousarray(BROKEN[mistake](torchvision_images, val_files))
    errors = image_errors(broken, reference)
    assert errors.min() > IMAGE_TOLERANCE, errors.round(3).tolist()
