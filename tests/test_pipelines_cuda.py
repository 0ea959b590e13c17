"""GPU variants of the loaders: DALI with nvJPEG ("mixed") decoding, FFCV with ToDevice, torchvision
with pinned memory, and synthetic data made on the GPU. Skipped without a CUDA device; each must
give what its CPU counterpart gives, on the GPU: the reference images pixel by pixel, up to decoder
and resampler noise (tests/test_image_checks.py shows the same check passing the CPU loaders and
failing mirrored, transposed and mis-cropped images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_checks import assert_matches_reference
from pipeline_helpers import collect, make_loaders, reference_val_image

from pipelines.imagefolder import scan_imagefolder
from pipelines.sample_data import write_imagefolder

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("gpu"), seed=5)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_val_on_gpu_matches_reference(backend, channels_last, dataset, cache_dir):
    _, val_list = scan_imagefolder(dataset.root, cache_dir=cache_dir)
    reference = np.stack([reference_val_image(f, 32, 40) for f in val_list.files])
    train, val = make_loaders(backend, dataset.root, cache_dir, device="cuda", channels_last=channels_last)
    if backend == "dali":
        assert val.name == "dali-gpu"
    images, labels = next(iter(val))
    assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last) == channels_last
    all_images, all_labels = collect(val)
    assert np.array_equal(all_labels, val_list.labels)
    # Pixel by pixel, in order: a mirrored, transposed or mis-cropped image fails (see image_checks).
    assert_matches_reference(all_images, reference)
    train_images, train_labels = next(iter(train))
    assert train_images.is_cuda and train_images.shape == (4, 3, 32, 32) and train_labels.is_cuda


def test_synthetic_on_gpu():
    from pipelines import LoaderConfig, create_loaders

    train, _ = create_loaders(LoaderConfig(backend="synthetic", device="cuda", batch_size=2,
                                           synthetic_shape=(3, 16, 16), synthetic_batches=3))
    images, labels = next(iter(train))
    assert images.is_cuda and labels.is_cuda and labels.dtype == torch.int64
