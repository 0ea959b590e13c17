"""--grad-accum with FFCV: the trainer holds a step's micro-batches at once (a zip over one iterator), while
FFCV 1.0.2 refills a batch's buffers as soon as it has handed out the next one. What the FFCV loader hands
out must stay intact however many batches are held and however far FFCV's thread runs ahead (and, on CUDA,
however busy the trainer's stream is)."""

from __future__ import annotations

import time

import pytest
import torch
from pipeline_helpers import make_loaders, require_extra

from pipelines.sample_data import write_imagefolder

require_extra("ffcv", "FFCV")

GRAD_ACCUM = 3


@pytest.fixture(scope="module")
def loaders(tmp_path_factory):
    """The FFCV train/val loaders of 24 validation images, 6 batches of 4 (more than FFCV's 5 buffer slots)."""
    tmp = tmp_path_factory.mktemp("held")
    ds = write_imagefolder(tmp / "data", num_classes=2, train_per_class=4, val_per_class=12, odd_files=False)
    return tmp, ds.root


def slowly(batches, pause: float = 0.05):
    """A consumer slower than FFCV's thread, which meanwhile decodes as far ahead as it may."""
    for batch in batches:
        time.sleep(pause)
        yield batch


def held_in_groups(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch of an epoch, read as dhm_fast.engine.train_one_epoch reads them (grouped, then used)."""
    return [batch for group in zip(*[iter(slowly(loader))] * GRAD_ACCUM, strict=False) for batch in group]


def test_ffcv_itself_refills_a_held_batch(loaders):
    # Why the loader copies: holding FFCV's own batches, the one before the latest is overwritten.
    tmp, root = loaders
    _, val = make_loaders("ffcv", root, tmp / "cache")
    batches = iter(val._loader)
    first, _ = next(batches)
    kept = first.clone()
    latest, _ = next(batches)
    latest_kept = latest.clone()
    deadline = time.monotonic() + 10
    while torch.equal(first, kept) and time.monotonic() < deadline:  # FFCV's thread decodes batch 5 into slot 0
        time.sleep(0.01)
    assert not torch.equal(first, kept), "FFCV 1.0.2 refilled a held batch; this FFCV does not (update the docs)"
    assert torch.equal(latest, latest_kept)


def test_held_batches_are_what_the_loader_handed_out(loaders):
    tmp, root = loaders
    _, val = make_loaders("ffcv", root, tmp / "cache")
    reference = [(images.clone(), labels.clone()) for images, labels in val]
    held = held_in_groups(val)
    assert len(held) == len(reference) == 6
    for (images, labels), (ref_images, ref_labels) in zip(held, reference, strict=True):
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_held_batches_survive_a_busy_gpu(loaders):
    # The trainer's stream busy for about a second: FFCV's copies must not wait for it while its thread
    # decodes later batches into the same pinned host buffers.
    tmp, root = loaders
    _, val = make_loaders("ffcv", root, tmp / "cache", device="cuda")
    reference = [(images.clone(), labels.clone()) for images, labels in val]
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # GPU clock cycles
    held = held_in_groups(val)
    torch.cuda.synchronize()
    for (images, labels), (ref_images, ref_labels) in zip(held, reference, strict=True):
        assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)




def test_ffcv_leaves_torchs_thread_count_alone(loaders):  # noqa: ARG001 - the fixture imports pipelines.ffcv
    # FFCV's Compiler.set_num_threads, called by every Loader() and iter(loader), also set torch's
    # process-wide thread count to FFCV's worker count: a bare iter() in a test left the next run in the
    # same pytest process on 2 threads instead of 1 (its results then differed from a fresh process's in
    # the last bits). pipelines/ffcv.py keeps it to numba's count.
    from ffcv.pipeline.compiler import Compiler

    before = torch.get_num_threads()
    other = 2 if before == 1 else 1  # numba allows 1 to the core count
    try:
        Compiler.set_num_threads(other)
        assert torch.get_num_threads() == before and Compiler.num_threads == other
    finally:
        torch.set_num_threads(before)
