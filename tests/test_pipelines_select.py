"""The synthetic loader, `--loader auto` selection, and create_loaders' dispatch."""

from __future__ import annotations

import pytest
import torch

import pipelines.backend_choice as backend_choice
from pipelines import create_loaders
from pipelines.base import Loader, LoaderConfig
from pipelines.synthetic import SyntheticLoader, create_synthetic_loaders


def test_synthetic_batches_come_from_a_fixed_device_pool():
    cfg = LoaderConfig(backend="synthetic", batch_size=3, synthetic_shape=(3, 8, 6), synthetic_classes=5,
                       synthetic_batches=7, channels_last=True, seed=2)
    train, val = create_loaders(cfg)
    assert isinstance(train, Loader) and isinstance(val, Loader)
    assert len(train) == 7 and train.num_samples == 21 and len(val) == 1
    batches = list(train)
    assert len(batches) == 7
    for images, labels in batches:
        assert images.shape == (3, 3, 8, 6) and images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < 5)).all()
    # No per-step work: batch i is pool entry i % pool size, the very same tensor.
    pool_ptrs = [x.data_ptr() for x, _ in train.pool]
    assert [x.data_ptr() for x, _ in batches] == [pool_ptrs[i % len(pool_ptrs)] for i in range(7)]
    assert len(set(pool_ptrs)) == len(pool_ptrs)
    # Random, roughly standard normal, reproducible from the seed, different per rank.
    x = torch.cat([b[0].flatten() for b in batches[:4]])
    assert abs(x.mean()) < 0.2 and 0.8 < x.std() < 1.2
    again, _ = create_synthetic_loaders(cfg)
    assert torch.equal(next(iter(again))[0], batches[0][0])
    cfg.rank, cfg.world_size = 1, 2
    other, _ = create_synthetic_loaders(cfg)
    assert not torch.equal(next(iter(other))[0], batches[0][0])
    train.set_epoch(1, start_batch=5)
    assert len(list(train)) == 2 and len(list(train)) == 7 and len(train) == 7
    train.close()


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive batch size"):
        SyntheticLoader(batch_size=0, num_batches=1, shape=(3, 4, 4), num_classes=2)
    with pytest.raises(ValueError, match=r"\[C, H, W\] shape"):
        SyntheticLoader(batch_size=1, num_batches=1, shape=(3, 4), num_classes=2)


@pytest.mark.parametrize("dataset,device,cuda,have,beton,expected,why", [
    ("cifar100", "cuda", True, {"ffcv", "nvidia.dali"}, False, "memory", "fits in memory"),
    ("fashion-mnist", "cpu", False, set(), False, "memory", "fits in memory"),
    ("imagenet", "cuda", True, {"ffcv", "nvidia.dali"}, True, "ffcv", ".beton"),
    ("imagenet", "cuda", True, {"nvidia.dali"}, True, "dali", "GPU"),
    ("imagenet", "cuda", True, {"ffcv", "nvidia.dali"}, False, "dali", "GPU"),
    ("imagenet", "cuda", True, set(), False, "torchvision", "DALI is not installed"),
    ("imagenet", "cpu", False, {"nvidia.dali"}, False, "torchvision", "no CUDA device"),
    ("imagenet", "cuda", False, {"nvidia.dali"}, False, "torchvision", "no CUDA device"),
    ("imagenet", "cpu", False, {"ffcv"}, True, "ffcv", ".beton"),
    ("imagenet", "cpu", False, set(), True, "torchvision", "FFCV is not installed"),
])
def test_auto_selection(monkeypatch, dataset, device, cuda, have, beton, expected, why):
    monkeypatch.setattr(backend_choice, "module_available", lambda name: name in have)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cfg = LoaderConfig(dataset=dataset, device=device, train_beton="t.beton" if beton else None,
                       val_beton="v.beton" if beton else None)
    backend, reason = backend_choice.resolve_backend(cfg)
    assert backend == expected and why in reason


def test_explicit_choice_and_bad_combinations():
    assert backend_choice.resolve_backend(LoaderConfig(backend="dali")) == ("dali", "asked for with --loader")
    with pytest.raises(ValueError, match="both --train-beton and --val-beton"):
        backend_choice.resolve_backend(LoaderConfig(dataset="imagenet", train_beton="t.beton"))
    with pytest.raises(ValueError, match="unknown loader"):
        create_loaders(LoaderConfig(backend="webdataset"))
    assert backend_choice.module_available("torch") and not backend_choice.module_available("no_such_module_here")
