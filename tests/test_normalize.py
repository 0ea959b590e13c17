"""pipelines.normalize: uint8 batches -> normalised float32, natively on the CPU or with torch ops."""

import pytest
import torch

from pipelines.normalize import Normalizer, native_crop_normalize

NATIVE = native_crop_normalize()
needs_native = pytest.mark.skipif(NATIVE is None, reason="the native library (kernels._C) is not built")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def uint8_batch(layout, b=5, c=3, h=7, w=9, seed=0):
    """Random pixels (every level 0 and 255 included) in the layout a backend hands over."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, h, w, c), dtype=torch.uint8, generator=g)
    x.view(-1)[:2] = torch.tensor([0, 255], dtype=torch.uint8)
    if layout == "nhwc":  # FFCV's and DALI's: an NCHW view of NHWC memory
        return x.permute(0, 3, 1, 2)
    if layout == "nchw":
        return x.permute(0, 3, 1, 2).contiguous()
    return x.permute(0, 3, 1, 2)[:, :, 1:-1:2, ::2]  # strided (a crop with steps)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_native), False], ids=["native", "torch"])
def test_matches_a_float64_reference(native, layout, channels_last):
    images = uint8_batch(layout)
    normalise = Normalizer(MEAN, STD, channels_last=channels_last)
    assert (normalise._native is not None) == (NATIVE is not None)
    if not native:
        normalise._native = None
    out = normalise(images)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    want = (images.double() / 255 - mean) / std
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
def test_native_and_torch_are_bitwise_equal(layout, channels_last, channels):
    images = uint8_batch(layout, c=channels, seed=channels)
    mean, std = (0.1, 0.5, 0.9, 0.3)[:channels], (0.2, 0.7, 0.05, 1.5)[:channels]
    native = Normalizer(mean, std, channels_last=channels_last)
    plain = Normalizer(mean, std, channels_last=channels_last)
    plain._native = None
    assert torch.equal(native(images), plain(images))


@needs_native
def test_native_op_rejects_bad_arguments_with_a_message():
    images = torch.zeros(4, 3, 10, 10, dtype=torch.uint8)
    table = torch.zeros(3, 256)
    source, offsets = torch.tensor([0, 3]), torch.tensor([[0, 0], [2, 2]])
    assert NATIVE(images, source, offsets, 8, 8, table, False).shape == (2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="source index 4 is out of range"):
        NATIVE(images, torch.tensor([0, 4]), offsets, 8, 8, table, False)
    with pytest.raises(RuntimeError, match=r"crop at \(3, 0\) leaves"):
        NATIVE(images, source, torch.tensor([[0, 0], [3, 0]]), 8, 8, table, True)
    with pytest.raises(RuntimeError, match="images must be a uint8"):
        NATIVE(images.float(), source, offsets, 8, 8, table, False)
    with pytest.raises(RuntimeError, match="table must be float32"):
        NATIVE(images, source, offsets, 8, 8, table[:1], False)
