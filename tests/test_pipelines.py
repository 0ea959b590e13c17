"""The loader contract, checked the same way for torchvision, DALI (CPU mode) and FFCV, on small
ImageFolder datasets of gradient JPEGs (pipelines.sample_data) that include a grayscale, a CMYK and
a PNG-named-.JPEG file (valid) plus a garbage and a truncated file (invalid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_helpers import (
    collect,
    crop_geometry,
    make_loaders,
    match_to_reference,
    reference_val_image,
    write_undecodable_png,
)

from pipelines.imagefolder import scan_imagefolder
from pipelines.sample_data import write_imagefolder

BACKENDS = ["torchvision", "dali", "ffcv"]
AUG_SIZE = (150, 200)  # (height, width) of every image of the augmentation dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("folder"), seed=1)


@pytest.fixture(scope="module")
def aug_dataset(tmp_path_factory):
    # One size, so the crop geometry can be read back from every output.
    return write_imagefolder(tmp_path_factory.mktemp("aug"), num_classes=2, train_per_class=16,
                             val_per_class=1, sizes=[AUG_SIZE], odd_files=False, seed=2)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_matches_float64_reference_every_sample_once(backend, dataset, cache_dir):
    _, val_list = scan_imagefolder(dataset.root, cache_dir=cache_dir)
    reference = np.stack([reference_val_image(f, 32, 40) for f in val_list.files])
    train, val = make_loaders(backend, dataset.root, cache_dir)
    assert train.reason == "asked for with --loader"
    assert val.num_samples == len(val_list) == dataset.counts["val"]
    images, labels = collect(val)
    assert images.shape == (len(reference), 3, 32, 32)
    assert len(val) == -(-len(reference) // 4)  # val keeps the last partial batch
    # Same order as the file list, every sample once, same content (up to the resize filter and
    # sub-pixel crop conventions), normalised with ImageNet's mean/std.
    assert np.array_equal(match_to_reference(images, reference), np.arange(len(reference)))
    assert np.array_equal(labels, val_list.labels)
    channel_gap = np.abs(images.mean(axis=(2, 3)) - reference.mean(axis=(2, 3)))
    assert channel_gap.max() < 0.2 and channel_gap.mean() < 0.04
    assert abs(images.std() - reference.std()) < 0.03


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_two_shards_partition_the_split(backend, dataset, cache_dir):
    _, full = make_loaders(backend, dataset.root, cache_dir)
    images, labels = collect(full)
    parts = []
    for rank in range(2):
        _, val = make_loaders(backend, dataset.root, cache_dir, rank=rank, world_size=2)
        parts.append(collect(val))
        assert val.num_samples == len(range(rank, len(labels), 2))  # uneven shards, no padding
    # rank r reads samples r, r + 2, ...: interleaving the shards gives back the whole split.
    merged = np.empty_like(images)
    merged[0::2], merged[1::2] = parts[0][0], parts[1][0]
    assert np.allclose(merged, images, atol=1e-5)
    assert np.array_equal(labels[0::2], parts[0][1]) and np.array_equal(labels[1::2], parts[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_shards_are_disjoint_and_follow_the_epoch_order(backend, dataset, cache_dir):
    n = dataset.counts["train"]
    seen = []
    for rank in range(2):
        train, _ = make_loaders(backend, dataset.root, cache_dir, rank=rank, world_size=2, drop_last=False)
        assert train.num_samples == n // 2
        train.set_epoch(3)
        _, labels = collect(train)
        assert len(labels) == n // 2
        seen.append(labels)
    # Labels in order follow the shared permutation of pipelines.sharding, whatever the backend.
    from pipelines.sharding import epoch_indices

    train_list = scan_imagefolder(dataset.root, cache_dir=cache_dir)[0]
    for rank in range(2):
        idx = epoch_indices(n, rank=rank, world_size=2, shuffle=True, seed=0, epoch=3)
        assert np.array_equal(seen[rank], np.asarray(train_list.labels)[idx])


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epochs_reshuffle_and_resume(backend, dataset, cache_dir):
    train, _ = make_loaders(backend, dataset.root, cache_dir, drop_last=True)
    assert len(train) == dataset.counts["train"] // 4
    orders = {}
    for epoch in (0, 1, 0):
        train.set_epoch(epoch)
        orders.setdefault(epoch, []).append(collect(train)[1])
    assert np.array_equal(orders[0][0], orders[0][1])  # reproducible from the seed
    assert not np.array_equal(orders[0][0], orders[1][0])  # a new shuffle each epoch
    train.set_epoch(1, start_batch=2)  # resuming mid-epoch: the remaining batches, same order
    assert len(train) == dataset.counts["train"] // 4  # len() stays the whole epoch's
    assert np.array_equal(collect(train)[1], orders[1][0][8:])
    assert np.array_equal(collect(train)[1], orders[1][0])  # only the resumed pass is shortened
    train.close()


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_train_augmentation_is_reproducible(backend, dataset, cache_dir):
    # FFCV draws crops and flips from numba's unseeded RNG: only its order is reproducible.
    outs = []
    for _ in range(2):
        train, _ = make_loaders(backend, dataset.root, cache_dir)
        train.set_epoch(5)
        outs.append(collect(train)[0])
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.25, 0.5), (0.6, 1.5))])
def test_train_crops_respect_area_and_aspect_ranges_and_flip_half(backend, scale, ratio, aug_dataset,
                                                                   cache_dir):
    train, _ = make_loaders(backend, aug_dataset.root, cache_dir, scale=scale, ratio=ratio, image_size=48,
                            val_resize=56, batch_size=8)
    geometry = []
    for epoch in range(3):
        train.set_epoch(epoch)
        images, _ = collect(train)
        geometry += [crop_geometry(img, *AUG_SIZE) for img in images]
    area, aspect, flipped = (np.array(v) for v in zip(*geometry, strict=True))
    assert area.min() > scale[0] * 0.8 and area.max() < min(1.0, scale[1]) * 1.15
    assert aspect.min() > ratio[0] * 0.9 and aspect.max() < ratio[1] * 1.1
    # The draws cover the range rather than sitting at one value.
    span = scale[1] - scale[0]
    assert area.max() - area.min() > 0.5 * span
    assert 0.3 < flipped.mean() < 0.7


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_scale_augmentation_keeps_validation_scale(backend, aug_dataset, cache_dir):
    # scale_aug=False: shorter side to val_resize then a random image_size crop, i.e. a square of
    # image_size / val_resize of the shorter side, at a random position, flipped half the time.
    train, _ = make_loaders(backend, aug_dataset.root, cache_dir, scale_aug=False, image_size=48,
                            val_resize=64, batch_size=8)
    side = 48 / 64 * min(AUG_SIZE)
    widths, flips, offsets = [], [], []
    for epoch in range(2):
        train.set_epoch(epoch)
        for img in collect(train)[0]:
            area, aspect, flipped = crop_geometry(img, *AUG_SIZE)
            w = np.sqrt(area * AUG_SIZE[0] * AUG_SIZE[1] * aspect)
            widths.append(w)
            flips.append(flipped)
            offsets.append(img[0, :, 0].mean())  # red at the left edge: the crop's x position
            assert abs(aspect - 1) < 0.1
    assert np.allclose(widths, side, rtol=0.1)
    assert 0.25 < np.mean(flips) < 0.75
    assert np.ptp(offsets) > 0.5  # the position varies


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_gives_the_same_values(backend, dataset, cache_dir):
    _, val = make_loaders(backend, dataset.root, cache_dir)
    _, val_cl = make_loaders(backend, dataset.root, cache_dir, channels_last=True)
    a = next(iter(val))[0]
    b = next(iter(val_cl))[0]
    assert b.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous(
        memory_format=torch.channels_last)
    assert torch.allclose(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_files_are_skipped_and_reported(backend, dataset, cache_dir):
    train, val = make_loaders(backend, dataset.root, cache_dir)
    expected = {str(p) for p in dataset.bad_files}
    if backend == "ffcv":  # dropped when the .beton was written: the trainer sees clean files
        assert train.skipped == [] and val.num_samples == dataset.counts["val"]
        return
    reported = {path for path, _ in train.skipped} | {path for path, _ in val.skipped}
    assert reported == expected
    reasons = dict(train.skipped + val.skipped)
    assert {r.split(" ")[0] for r in reasons.values()} == {"not", "truncated"}
    assert train.num_classes == 3 and train.classes == dataset.classes


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_strict_data_fails_naming_the_file(backend, dataset, cache_dir):
    with pytest.raises(ValueError, match=r"bad image .*(garbage|truncated)\.JPEG"):
        make_loaders(backend, dataset.root, cache_dir, strict_data=True)


def test_torchvision_drops_a_file_that_fails_only_at_decode_time(tmp_path, cache_dir):
    ds = write_imagefolder(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=3, odd_files=False)
    bad = ds.root / "val" / ds.classes[1] / "zz_broken.JPEG"
    write_undecodable_png(bad)
    _, val = make_loaders("torchvision", ds.root, cache_dir, num_workers=0)
    images, labels = collect(val)
    assert len(labels) == 6 and np.array_equal(labels, [0, 0, 0, 1, 1, 1])  # no label shifted
    assert [p for p, _ in val.skipped] == [str(bad)]
    _, strict = make_loaders("torchvision", ds.root, cache_dir, strict_data=True, num_workers=0)
    with pytest.raises(ValueError, match="zz_broken"):
        collect(strict)
    # A full validation finds it up front, for every backend.
    _, full = make_loaders("torchvision", ds.root, cache_dir, validation="full", num_workers=0)
    assert [p for p, _ in full.skipped] == [str(bad)] and full.num_samples == 6


def test_dali_reports_a_file_that_fails_only_at_decode_time(tmp_path, cache_dir):
    ds = write_imagefolder(tmp_path / "d", num_classes=2, train_per_class=4, val_per_class=3, odd_files=False)
    write_undecodable_png(ds.root / "val" / ds.classes[1] / "zz_broken.JPEG")
    _, val = make_loaders("dali", ds.root, cache_dir)
    with pytest.raises(ValueError, match="--data-validation full") as err:
        collect(val)
    assert "zz_broken.JPEG" in str(err.value) and "\n" not in str(err.value)  # one line naming the file
    _, full = make_loaders("dali", ds.root, cache_dir, validation="full")
    assert collect(full)[1].tolist() == [0, 0, 0, 1, 1, 1]


def test_backends_agree_on_labels_and_pixels(dataset, cache_dir):
    outs = {b: collect(make_loaders(b, dataset.root, cache_dir)[1]) for b in BACKENDS}
    ref_images, ref_labels = outs["torchvision"]
    for backend, (images, labels) in outs.items():
        assert np.array_equal(labels, ref_labels), backend
        assert images.shape == ref_images.shape
        gap = np.abs(images.mean(axis=(2, 3)) - ref_images.mean(axis=(2, 3)))
        assert gap.mean() < 0.04, backend
        assert np.corrcoef(images.ravel(), ref_images.ravel())[0, 1] > 0.98, backend


def test_dali_name_says_cpu_mode(dataset, cache_dir):
    train, val = make_loaders("dali", dataset.root, cache_dir)
    assert train.name == val.name == "dali-cpu"
