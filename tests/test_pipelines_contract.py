"""What every backend promises the trainer (pipelines.base.Loader), checked on every backend: the
attributes and their values, exact mid-epoch restarts, one meaning of --train-subset, labels checked
once when a dataset is loaded, and the shared seeds and worker defaults."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import MEAN, STD, collect, make_loaders, require_extra, small_config

import pipelines
from pipelines import BACKENDS, create_loaders
from pipelines.base import Loader, LoaderConfig
from pipelines.imagefolder import ImageList, scan_imagefolder
from pipelines.sample_data import write_imagefolder
from pipelines.sharding import SUBSET_SEED, epoch_indices, epoch_seed, subset_indices

FOLDER_BACKENDS = ["torchvision", "dali", "ffcv"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # No odd files: every image's blue level is distinct within its split and identifies it.
    return write_imagefolder(tmp_path_factory.mktemp("contract"), num_classes=3, train_per_class=8,
                             val_per_class=3, odd_files=False, seed=3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def write_idx(path, array):
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fashion_mnist(folder, n_train=60, n_test=20, train_labels=None):
    """Fake Fashion-MNIST whose image i is the constant 4 * i (so a crop's centre names its sample)."""
    images = np.repeat((4 * np.arange(n_train))[:, None, None], 28, 1).repeat(28, 2)
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    labels = np.arange(n_train) % 10 if train_labels is None else train_labels
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


def folder_loaders(backend, dataset, cache_dir, **overrides):
    return make_loaders(backend, dataset.root, cache_dir, **overrides)


# --- the contract ---------------------------------------------------------------------------------

def test_backends_are_listed_once_with_auto_first():
    assert BACKENDS == ("auto", "torchvision", "dali", "ffcv", "memory", "synthetic")


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_folder_backends_honour_the_contract_with_its_values(backend, dataset, cache_dir):
    train, val = folder_loaders(backend, dataset, cache_dir)
    for loader, n in ((train, dataset.counts["train"]), (val, dataset.counts["val"])):
        assert isinstance(loader, Loader)
        assert loader.name.startswith(backend) and loader.reason == "asked for with --loader"
        assert (loader.num_samples, loader.num_classes, loader.in_channels) == (n, 3, 3)
        assert loader.skipped == []
        loader.set_epoch(2, start_batch=1)
        assert len(loader) == (-(-n // 4) if loader is val else n // 4)
        assert sum(len(y) for _, y in loader) == n - 4  # one batch skipped, once
        loader.close()


def test_memory_and_synthetic_honour_the_contract_with_its_values(tmp_path):
    fashion_mnist(tmp_path)
    train, val = create_loaders(LoaderConfig(dataset="fashion-mnist", data_dir=str(tmp_path), batch_size=8))
    for loader, n in ((train, 60), (val, 20)):
        assert isinstance(loader, Loader)
        assert loader.name == "memory" and "fits in memory" in loader.reason
        assert (loader.num_samples, loader.num_classes, loader.in_channels, loader.skipped) == (n, 10, 1, [])
        assert loader.resolution == 28  # the native side until a schedule sets another
    cfg = LoaderConfig(backend="synthetic", batch_size=2, synthetic_shape=(2, 4, 4), synthetic_classes=7,
                       synthetic_batches=3)
    train, val = create_loaders(cfg)
    assert isinstance(train, Loader) and train.reason == "asked for with --loader"
    assert (train.num_samples, train.num_classes, train.in_channels, train.skipped) == (6, 7, 2, [])
    train.set_resolution(4)  # its own side: accepted
    with pytest.raises(ValueError, match="fixed image size"):
        train.set_resolution(8)
    with pytest.raises(ValueError, match="fixed batch size"):
        train.set_batch_size(1)


# --- mid-epoch restarts: the very batches of the uninterrupted pass ---------------------------------

@pytest.mark.parametrize("backend,workers", [("torchvision", 0), ("torchvision", 2), ("dali", 2)])
def test_restart_mid_epoch_yields_the_same_images(backend, workers, dataset, cache_dir):
    train, _ = folder_loaders(backend, dataset, cache_dir, num_workers=workers)
    train.set_epoch(4)
    full_x, full_y = collect(train)
    train.set_epoch(4, start_batch=3)
    tail_x, tail_y = collect(train)
    assert np.array_equal(tail_y, full_y[12:]) and np.array_equal(tail_x, full_x[12:])
    train.close()


def test_torchvision_augmentation_does_not_depend_on_the_worker_count(dataset, cache_dir):
    outs = []
    for workers in (0, 1, 2):
        train, _ = folder_loaders("torchvision", dataset, cache_dir, num_workers=workers)
        train.set_epoch(1)
        outs.append(collect(train))
        train.close()
    for x, y in outs[1:]:
        assert np.array_equal(x, outs[0][0]) and np.array_equal(y, outs[0][1])


def test_torchvision_and_dali_cut_the_same_rectangles(dataset, cache_dir):
    # Same rule, same random numbers: only the resampling filters differ.
    outs = {}
    for backend in ("torchvision", "dali"):
        train, _ = folder_loaders(backend, dataset, cache_dir, image_size=48, val_resize=56)
        train.set_epoch(2)
        outs[backend] = collect(train)
        train.close()
    (a, ya), (b, yb) = outs["torchvision"], outs["dali"]
    assert np.array_equal(ya, yb)
    for i in range(len(a)):
        assert np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] > 0.97, i
    assert np.abs(a - b).mean() < 0.05


def test_torchvision_workers_persist_across_epochs(dataset, cache_dir):
    train, _ = folder_loaders("torchvision", dataset, cache_dir, num_workers=2)
    assert train._loader.persistent_workers and train._loader.prefetch_factor >= 2
    assert not train._loader.pin_memory  # pinned only when training on CUDA
    pids = []
    for epoch in range(2):
        train.set_epoch(epoch)
        collect(train)
        pids.append([w.pid for w in train._loader._iterator._workers])
    assert pids[0] == pids[1]
    train.close()
    assert train._loader._iterator is None


def test_dali_builds_one_pipeline_and_resets_it_each_epoch(dataset, cache_dir):
    train, val = folder_loaders("dali", dataset, cache_dir)
    epochs = {}
    for epoch in (0, 1, 0):
        train.set_epoch(epoch)
        epochs.setdefault(epoch, []).append(collect(train)[1])
        collect(val)
    assert train.builds == 1 and val.builds == 1
    assert np.array_equal(epochs[0][0], epochs[0][1]) and not np.array_equal(epochs[0][0], epochs[1][0])
    train.set_epoch(1)
    next(iter(train))  # an epoch left after one batch: that pipeline is dropped
    assert train._pipe is None
    train.set_epoch(1)
    assert np.array_equal(collect(train)[1], epochs[1][0]) and train.builds == 2
    train.close()
    assert train._pipe is None and train._source is None


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_a_whole_epoch_skipped_by_start_batch_yields_nothing(backend, dataset, cache_dir):
    train, _ = folder_loaders(backend, dataset, cache_dir)
    train.set_epoch(0, start_batch=len(train))
    assert sum(len(y) for _, y in train) == 0
    train.set_epoch(0)
    assert sum(len(y) for _, y in train) == len(train) * 4  # start_batch applied to one pass only
    train.close()


# --- --train-subset: one index set for every backend and every seed ----------------------------------

def blue_level(images: np.ndarray) -> np.ndarray:
    """Each normalised image's blue level in 0..255 (constant over an image of pipelines.sample_data)."""
    return images[:, 2].mean(axis=(1, 2)) * STD[2] * 255 + MEAN[2] * 255


def file_blue(path: str) -> float:
    with Image.open(path) as img:
        return float(np.asarray(img.convert("RGB"))[..., 2].mean())


@pytest.mark.parametrize("backend", FOLDER_BACKENDS)
def test_train_subset_is_the_same_fixed_draw_on_folder_backends(backend, dataset, cache_dir):
    files = scan_imagefolder(dataset.root, cache_dir=cache_dir)[0].files
    blues = np.array([file_blue(f) for f in files])
    expected = set(subset_indices(len(files), 10).tolist())
    for seed in (0, 7):
        train, _ = folder_loaders(backend, dataset, cache_dir, train_subset=10, seed=seed, drop_last=False)
        assert train.num_samples == 10
        images, labels = collect(train)
        seen = [int(np.abs(blues - b).argmin()) for b in blue_level(images)]
        assert set(seen) == expected and len(seen) == 10
        assert np.array_equal(labels, [dataset.classes.index(files[i].split("/")[-2]) for i in seen])
        train.close()


def test_train_subset_is_the_same_fixed_draw_in_memory(tmp_path):
    fashion_mnist(tmp_path)
    expected = set(subset_indices(60, 16).tolist())
    for seed in (0, 7):
        train, _ = create_loaders(LoaderConfig(dataset="fashion-mnist", data_dir=str(tmp_path), batch_size=4,
                                               train_subset=16, seed=seed))
        assert train.num_samples == 16
        images, labels = (torch.cat(parts) for parts in zip(*train, strict=True))
        centre = images[:, 0, 14, 14] * 0.3530 + 0.2860  # the reader's Fashion-MNIST mean/std
        seen = torch.round(centre * 255 / 4).long()
        assert set(seen.tolist()) == expected and len(seen) == 16
        assert torch.equal(labels, seen % 10)  # each image keeps its own label


def test_subset_rule():
    assert np.array_equal(subset_indices(5, None), np.arange(5)) and np.array_equal(subset_indices(5, 9),
                                                                                      np.arange(5))
    keep = subset_indices(1000, 100)
    assert len(set(keep.tolist())) == 100 and np.all(np.diff(keep) > 0)  # distinct, in dataset order
    assert keep.max() > 500  # a spread draw, not the first N
    assert np.array_equal(keep, np.sort(np.random.default_rng(SUBSET_SEED).permutation(1000)[:100]))
    with pytest.raises(ValueError, match="--train-subset must be positive"):
        subset_indices(10, 0)


# --- labels checked once, where the dataset is loaded ------------------------------------------------

def test_memory_label_out_of_range_names_file_and_sample(tmp_path):
    labels = np.arange(60) % 10
    labels[17] = 12
    fashion_mnist(tmp_path, train_labels=labels)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: sample 17 has label 12, outside \[0, 10\)"):
        create_loaders(LoaderConfig(dataset="fashion-mnist", data_dir=str(tmp_path)))


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_folder_label_out_of_range_names_the_file(backend, dataset, cache_dir):
    if backend == "dali":
        require_extra("nvidia.dali", "NVIDIA DALI")
        from pipelines.dali import DaliLoader as cls
    else:
        from pipelines.torchvision_loader import TorchvisionLoader as cls
    train = scan_imagefolder(dataset.root, cache_dir=cache_dir)[0]
    bad = ImageList(train.root, train.classes, list(train.files), list(train.labels))
    bad.labels[5] = -1
    with pytest.raises(ValueError, match=rf"{bad.files[5]} has label -1, outside \[0, 3\)") as err:
        cls(bad, small_config(dataset.root, cache_dir), train=True)
    assert "\n" not in str(err.value)


def test_ffcv_label_out_of_range_names_the_file_and_sample(tmp_path):
    require_extra("ffcv", "FFCV")
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from pipelines.ffcv import FfcvLoader

    path = tmp_path / "train.beton"
    samples = [(np.full((8, 8, 3), 10 * i, dtype=np.uint8), i % 3) for i in range(6)]
    samples[4] = (samples[4][0], 3)
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                           num_workers=1, page_size=1 << 21)
    writer.from_indexed_dataset(samples)
    (tmp_path / "classes.txt").write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.beton: sample 4 has label 3, outside \[0, 3\)"):
        FfcvLoader(path, small_config(tmp_path, tmp_path / "c"), train=True)


# --- seeds and workers --------------------------------------------------------------------------------

def test_epoch_seed_separates_seeds_epochs_and_ranks():
    shared = {epoch_seed(s, e) for s in range(20) for e in range(50)}
    assert len(shared) == 1000
    private = {epoch_seed(s, e, r) for s in range(10) for e in range(20) for r in range(16)}
    assert len(private) == 10 * 20 * 16
    for value in (epoch_seed(2**40, 10**6, 7), epoch_seed(-3, 0), epoch_seed(0, 0, 2**20)):
        assert 0 <= value < 2**63
    assert epoch_indices(30, rank=0, world_size=1, shuffle=True, seed=3, epoch=1).tolist() == (
        torch.randperm(30, generator=torch.Generator().manual_seed(epoch_seed(3, 1))).tolist())


@pytest.mark.parametrize("cores,local,expected", [(16, None, 15), (16, "8", 1), (96, "8", 11), (2, None, 1),
                                                  (1, None, 1), (4, "8", 1)])
def test_default_workers_share_the_cores_of_the_node(monkeypatch, cores, local, expected):
    monkeypatch.setattr(pipelines.workers.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert pipelines.default_num_workers() == expected


def test_negative_worker_count_is_refused(dataset, cache_dir):
    with pytest.raises(ValueError, match="--num-workers must be >= 0"):
        folder_loaders("torchvision", dataset, cache_dir, num_workers=-1)


def test_every_dataset_reader_refuses_a_file_named_as_its_folder(tmp_path):
    # The benchmarks and ffcv_convert reach the readers without train.py's up-front check.
    from pipelines.imagefolder import scan_imagefolder
    from pipelines.reid import find_root
    from pipelines.small_datasets import load_small_dataset

    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    message = f"^--data-dir {afile} is a file, not a dataset folder$"
    for read in (lambda: scan_imagefolder(str(afile)), lambda: find_root("market1501", str(afile)),
                 lambda: load_small_dataset("fashion-mnist", str(afile)),
                 lambda: load_small_dataset("cifar10", str(afile))):
        with pytest.raises(NotADirectoryError, match=message):
            read()
