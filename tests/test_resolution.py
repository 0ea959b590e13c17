"""Progressive resizing: the schedule, every image backend following it across epochs, a test side of its
own, and a bounded number of compiled graphs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from imagenet_folder import write_tiny_imagenet
from pipeline_helpers import collect, make_loaders
from small_data import write_fashion_mnist

from dhm_fast.models import create_model
from dhm_fast.resolution import ResolutionSchedule, accumulation, compile_shapes
from dhm_fast.run import compile_limits
from pipelines import LoaderConfig, create_loaders


def test_the_schedule_holds_ramps_in_steps_and_holds_again():
    s = ResolutionSchedule(64, 128, ramp_start=2, ramp_end=4, step=32)
    assert s.sides(6) == [64, 64, 64, 96, 128, 128]
    ffcv_like = ResolutionSchedule(160, 192, ramp_start=65, ramp_end=76, step=32).sides(88)
    assert ffcv_like[:66] == [160] * 66 and ffcv_like[76:] == [192] * 12
    assert ffcv_like == sorted(ffcv_like) and set(ffcv_like) == {160, 192}
    assert ResolutionSchedule(40, 100, 0, 10, 32).sides(11)[1:-1] == [40, 64, 64, 64, 64, 64, 96, 96, 96]
    assert ResolutionSchedule(100, 100, 0, 10).sides(3) == [100] * 3
    assert ResolutionSchedule(48, 64, 3, 3, 16).sides(5) == [48] * 4 + [64]  # a jump at the ramp's end


def test_batch_scaling_keeps_micro_batch_times_pixels_at_most_the_start_value_with_the_fewest_micro_batches():
    assert [accumulation(8, 1, side, 16) for side in (16, 24, 32)] == [1, 4, 4]
    assert accumulation(256, 2, 192, 160) == 4  # 2 x 1.44 = 2.88 -> the next divisor of 256
    rng = np.random.default_rng(0)
    for _ in range(200):
        per_process = int(rng.choice([8, 96, 128, 256, 1000]))
        grad_accum = int(rng.choice([d for d in range(1, 9) if per_process % d == 0]))
        start = int(rng.integers(16, 200))
        side = start + int(rng.integers(0, 200))
        a = accumulation(per_process, grad_accum, side, start)
        assert per_process % a == 0 and a >= grad_accum
        assert a == per_process or (per_process // a) * side**2 <= (per_process // grad_accum) * start**2
        fewer = [d for d in range(grad_accum, a) if per_process % d == 0]
        assert all((per_process // d) * side**2 > (per_process // grad_accum) * start**2 for d in fewer)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_tiny_imagenet(tmp_path_factory.mktemp("tiny-in"), form="devkit", train_per_class=4)


@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_folder_backends_follow_the_schedule_epoch_by_epoch_and_test_at_their_own_side(
        imagenet, tmp_path, backend):
    train, val = make_loaders(backend, imagenet.root, tmp_path / "c", image_size=32, val_resize=48, val_size=40)
    assert train.resolution == 32
    for epoch, side in enumerate([16, 24, 32, 24]):
        train.set_resolution(side)
        train.set_epoch(epoch)
        images, _ = collect(train)
        assert images.shape[1:] == (3, side, side), (epoch, side)
        assert train.resolution == side
    val.set_epoch(0)
    assert collect(val)[0].shape[1:] == (3, 40, 40)
    if backend == "ffcv":  # FFCV's crops come from an unseeded RNG: nothing to compare exactly
        train.set_batch_size(2)
        train.set_epoch(1)
        assert len(train) == 6 and [len(y) for _, y in train] == [2] * 6
        return
    # A side and batch size set between epochs give exactly the batches of a loader built with them.
    built, _ = make_loaders(backend, imagenet.root, tmp_path / "c", image_size=24, val_resize=48, batch_size=2)
    train.set_resolution(24)
    train.set_batch_size(2)
    for loader in (train, built):
        loader.set_epoch(5, start_batch=1)
    images, labels = collect(train)
    assert len(train) == len(built) == 6 and images.shape == (10, 3, 24, 24)
    np.testing.assert_array_equal(images, collect(built)[0])
    for loader in (train, val, built):
        loader.close()


def test_the_memory_loader_resizes_its_training_crops(tmp_path):
    data = write_fashion_mnist(tmp_path / "fm", n_train=16, n_test=8)
    cfg = LoaderConfig(backend="memory", dataset="fashion-mnist", data_dir=str(data), batch_size=8)
    train, val = create_loaders(cfg)
    assert train.resolution == 28
    train.set_epoch(0)
    native, _ = collect(train)
    train.set_resolution(20)
    train.set_epoch(0)
    resized, _ = collect(train)
    assert resized.shape == (16, 1, 20, 20)
    train.set_batch_size(4)
    assert len(train) == 4 and [len(y) for _, y in train] == [4] * 4
    expected = torch.nn.functional.interpolate(torch.from_numpy(native).float(), size=(20, 20), mode="bilinear",
                                               antialias=True, align_corners=False).double().numpy()
    np.testing.assert_allclose(resized, expected, atol=1e-5)
    assert collect(val)[0].shape[2:] == (28, 28)  # validation stays native


@pytest.mark.parametrize("batches", [[2] * 5, [4, 4, 4, 2, 2]])  # with --res-batch-scale: a later batch change
def test_compiled_graphs_stay_bounded_however_many_sides_the_schedule_visits(batches):
    """Dynamo compiles the first side, then one graph with symbolic height and width for every later
    side; evaluation adds its own. Counted on the CPU with the eager backend (the count is Dynamo's)."""
    batch_scale = len(set(batches)) > 1
    torch._dynamo.reset()
    schedule = ResolutionSchedule(16, 48, ramp_start=0, ramp_end=4, step=8)
    model = create_model("resnet20", 10, method="dhm", in_channels=3)
    compile_limits(model.num_heads, compile_shapes(schedule, 5, batch_scale))
    compiled = torch.compile(model, backend="eager")
    counters = torch._dynamo.utils.counters
    counters.clear()
    for epoch in range(5):
        side = schedule.at(epoch)
        model.train()
        images = torch.randn(batches[epoch], 3, side, side)
        sum(out.sum() for out in compiled(images, active=(True,) * 3)).backward()
    model.eval()
    with torch.no_grad():
        compiled(torch.randn(2, 3, 56, 56), all_heads=True)
    assert schedule.sides(5) == [16, 24, 32, 40, 48]
    assert counters["stats"]["unique_graphs"] <= compile_shapes(schedule, 5, batch_scale) + 2, dict(counters["stats"])
    assert not counters["recompiles"].get("cache_size_limit"), dict(counters["recompiles"])
    torch._dynamo.reset()
