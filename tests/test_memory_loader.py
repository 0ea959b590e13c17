"""The in-memory loader and the small-dataset readers (Fashion-MNIST IDX, CIFAR python release)."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from pipelines.backend_choice import NATIVE_SIDES
from pipelines.base import Loader, LoaderConfig
from pipelines.memory import MemoryLoader, create_memory_loaders
from pipelines.normalize import native_crop_normalize
from pipelines.small_datasets import ArraySplit, load_small_dataset

MEAN, STD = (0.3, 0.5, 0.6), (0.2, 0.25, 0.3)


def random_split(n=50, c=3, h=8, w=6, classes=5):
    g = torch.Generator().manual_seed(n)
    return ArraySplit(torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g),
                      torch.randint(0, classes, (n,), generator=g))


def labels_seen(loader, epoch=0):
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader])


def test_val_shards_see_every_sample_exactly_once():
    split = random_split(n=53)
    split.labels = torch.arange(53)  # label = index, to track samples
    seen = torch.cat([labels_seen(MemoryLoader(split, MEAN, STD, batch_size=8, train=False, rank=r,
                                               world_size=2)) for r in range(2)])
    assert sorted(seen.tolist()) == list(range(53))


def test_train_shards_are_disjoint_and_reshuffled_each_epoch():
    split = random_split(n=40)
    split.labels = torch.arange(40)
    shards = [MemoryLoader(split, MEAN, STD, batch_size=4, train=True, rank=r, world_size=2, seed=1)
              for r in range(2)]
    e0 = [labels_seen(s, 0) for s in shards]
    assert sorted(torch.cat(e0).tolist()) == list(range(40))
    e1 = labels_seen(shards[0], 1)
    assert not torch.equal(e0[0], e1)
    assert torch.equal(e0[0], labels_seen(shards[0], 0))  # reproducible from (seed, epoch)


NATIVE = native_crop_normalize()
needs_native = pytest.mark.skipif(NATIVE is None, reason="kernels._C was built without crop_normalize")
paths = pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False], ids=["native", "torch"])


def loader_with(split, native, **kwargs):
    loader = MemoryLoader(split, MEAN[: split.images.shape[1]], STD[: split.images.shape[1]], **kwargs)
    assert (loader.native is not None) == (NATIVE is not None)  # the CPU uses the native op when built
    if not native:
        loader.native = None
    return loader


@paths
@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_flip_normalise_match_a_per_sample_reference(channels_last, native):
    split = random_split(n=12)
    loader = loader_with(split, native, batch_size=12, train=True, padding=3, seed=5, channels_last=channels_last)
    loader.set_epoch(2)
    images, labels = next(iter(loader))
    assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    order, source, origin = loader._plan
    flips = source >= 12  # mirrored copies follow the 12 originals
    assert torch.equal(source % 12, order)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for b in range(12):
        i = order[b].item()
        padded = torch.nn.functional.pad(split.images[i].double(), (3, 3, 3, 3))
        if flips[b]:
            padded = padded.flip(2)  # the origin of a flipped crop is in mirrored coordinates
        y0, x0 = origin[b].tolist()
        want = (padded[:, y0:y0 + 8, x0:x0 + 6] / 255 - mean) / std
        torch.testing.assert_close(images[b].double(), want, rtol=1e-6, atol=1e-6)
        assert labels[b] == split.labels[i]
    assert 0 < flips.sum() < 12 and origin.min() >= 0 and origin.max() <= 6


@needs_native
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_native_and_torch_batches_are_bitwise_equal(train, channels_last, channels):
    split = random_split(n=70, c=channels, h=9, w=7)
    kwargs = dict(batch_size=16, train=train, seed=3, channels_last=channels_last, padding=2)
    native, plain = loader_with(split, True, **kwargs), loader_with(split, False, **kwargs)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for epoch in (0, 1):
        native.set_epoch(epoch), plain.set_epoch(epoch)
        pairs = list(zip(native, plain, strict=True))
        assert len(pairs) == len(native) > 0
        for (x, y), (x_ref, y_ref) in pairs:
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
            assert x.is_contiguous(memory_format=layout) and x_ref.is_contiguous(memory_format=layout)


def test_resuming_mid_epoch_yields_the_remaining_batches():
    loader = MemoryLoader(random_split(n=30), MEAN, STD, batch_size=4, train=True, seed=2)
    loader.set_epoch(3)
    full = list(loader)
    loader.set_epoch(3, start_batch=5)
    tail = list(loader)
    assert len(tail) == len(full) - 5
    for (a, la), (b, lb) in zip(full[5:], tail, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_contract_and_channels_last():
    loader = MemoryLoader(random_split(), MEAN, STD, batch_size=16, train=True, channels_last=True)
    assert isinstance(loader, Loader)
    assert len(loader) == 3  # 50 // 16 with drop_last
    x, y = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
    assert y.dtype == torch.int64


def write_idx(path, array):
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder, n_train=64, n_test=32):
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, n_train))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (n_test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, n_test))


def test_fashion_mnist_reader_and_loaders(tmp_path):
    fake_fashion_mnist(tmp_path)
    train, val = create_memory_loaders(LoaderConfig(dataset="fashion-mnist", data_dir=str(tmp_path),
                                                    batch_size=16, train_subset=48))
    assert (train.num_samples, val.num_samples, train.num_classes, train.in_channels) == (48, 32, 10, 1)
    x, _ = next(iter(val))
    assert x.shape == (16, 1, 28, 28)
    assert train.resolution == NATIVE_SIDES["fashion-mnist"]  # where config ends a resolution ramp


def test_fashion_mnist_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing train-images-idx3-ubyte.gz.*expected the four"):
        load_small_dataset("fashion-mnist", str(tmp_path))
    fake_fashion_mnist(tmp_path)
    data = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(gzip.decompress(data)[:1000]))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz is truncated"):
        load_small_dataset("fashion-mnist", str(tmp_path))


def fake_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 10).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    return folder


def test_cifar_python_release_is_read(tmp_path):
    folder = fake_cifar10(tmp_path)
    data = load_small_dataset("cifar10", str(tmp_path))
    assert data.train.images.shape == (50, 3, 32, 32) and data.test.images.shape == (10, 3, 32, 32)
    # Where config ends a resolution ramp; CIFAR-100 is read by the same function.
    assert data.train.images.shape[2:] == (NATIVE_SIDES["cifar10"],) * 2 == (NATIVE_SIDES["cifar100"],) * 2
    with open(folder / "test_batch", "rb") as f:
        raw = pickle.load(f)  # the test's own file: trusted
    assert torch.equal(data.test.images[3].flatten(), torch.from_numpy(raw[b"data"][3]).long().to(torch.uint8))
    assert data.test.labels.tolist() == raw[b"labels"]


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    folder = fake_cifar10(tmp_path)
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR python batch.*refusing to load posix.system"):
        load_small_dataset("cifar10", str(tmp_path))
