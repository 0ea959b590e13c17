"""FFCV loader over .beton files written by `python -m pipelines.ffcv_convert`.

The same augmentation as the DALI and torchvision loaders, done by FFCV's JIT-compiled decoders:
  train, scale_aug=True:  random-resized-crop decode (area in `scale`, aspect in `ratio`), flip
  train, scale_aug=False: a random square crop of side image_size/val_resize of the shorter side,
                          resized to image_size (= resize the shorter side to val_resize, then a
                          random image_size crop), flip
  val:                    centre square crop of side val_size/val_resize of the shorter side,
                          resized to val_size (= resize to val_resize, centre crop val_size; val_size
                          defaults to image_size)
A resolution schedule sets the train decoder's output size between epochs (FFCV sizes its buffers
at each epoch's start).
Batches leave FFCV as uint8 channels-last views (ToDevice first on CUDA) and are normalised here on
the device with torch, which needs no cupy and no per-pixel JIT loop on the CPU.

Held batches (--grad-accum holds several at once): FFCV 1.0.2 writes each batch into one of
batches_ahead + 2 buffer slots and may refill a batch's slot as soon as it has handed out the next one,
so only the latest batch it returned is safe to read. Every batch is therefore copied (normalised into a
new tensor, labels cloned) before FFCV is asked for the next. On CUDA, FFCV orders a slot's refill, the
host-to-device copy included, after the work of the stream current when the epoch's iterator was made,
but writes its pinned host buffers without waiting for that copy: on the trainer's stream a copy could
wait behind the model's steps while FFCV's thread decoded a later batch into its source (the trainer
pulls all of a step's micro-batches before any compute). The loader therefore runs FFCV and the copies
on a stream of its own, which carries nothing else (docs/data.md, "FFCV and held batches").

Order and sharding follow pipelines.sharding, like every other backend: same permutation per
(seed, epoch), val sees each sample exactly once across processes. FFCV's own `distributed=True`
(a DistributedSampler) is therefore not used: it pads val with duplicates; ranks come from the
config, which the trainer fills from the initialised process group. `--train-subset` reaches FFCV as
its Loader's `indices` (the same samples as every backend's). FFCV's augmentation draws from numba's
unseeded per-thread RNG, so crops and flips (unlike the order) are not reproducible. Every label is
checked against the number of classes once, when the file is opened, from the file's metadata.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipelines.base import LoaderConfig, check_labels
from pipelines.normalize import Normalizer
from pipelines.sharding import epoch_indices, num_batches, shard_size, subset_indices
from pipelines.workers import resolve_num_workers

_torch_threads = torch.get_num_threads()  # importing FFCV sets torch's thread count to 1: undone below
try:
    import numba  # FFCV's
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import (
        CenterCropRGBImageDecoder,
        RandomResizedCropRGBImageDecoder,
        ResizedCropRGBImageDecoder,
    )
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler
    from ffcv.reader import Reader
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
    from ffcv.traversal_order.base import TraversalOrder
except ImportError as e:  # pragma: no cover - exercised only where FFCV is missing
    raise ImportError(
        f"--loader ffcv needs FFCV ({e}); install it with `bash pipelines/install_extras.sh .venv/bin/pip`"
    ) from None
finally:
    torch.set_num_threads(_torch_threads)


def _set_numba_threads(cls, n: int) -> None:
    """FFCV's Compiler.set_num_threads without its torch.set_num_threads. FFCV calls it on every Loader()
    and iter(loader) (and in its loader thread), each time setting the trainer's process-wide intra-op
    thread count to its worker count, which every call site then had to undo (a bare iter() in a test
    left the next run in the same process on 2 threads, not 1). Numba's count is what FFCV's decoding uses."""
    if n < 1:
        n = os.cpu_count() or 1
    cls.num_threads = n
    numba.set_num_threads(n)


Compiler.set_num_threads = classmethod(_set_numba_threads)

log = logging.getLogger(__name__)

FIELDS = {"image": RGBImageField, "label": IntField}  # what ffcv_convert writes, in this order
CONVERT = "python -m pipelines.ffcv_convert"


def _random_square_crop(height, width, scale, fraction):  # noqa: ARG001 - FFCV's crop signature
    """A square of side fraction * shorter side at a uniform random position (numba-compilable)."""
    side = int(fraction * min(height, width))
    i = int(np.random.uniform(0, height - side + 1))
    j = int(np.random.uniform(0, width - side + 1))
    return i, j, side, side


class RandomSquareCropRGBImageDecoder(ResizedCropRGBImageDecoder):
    """The no-scale-augmentation train decoder (see the module docstring)."""

    def __init__(self, output_size: tuple[int, int], fraction: float) -> None:
        super().__init__(output_size)
        self.scale = None
        self.ratio = fraction

    @property
    def get_crop_generator(self):
        return _random_square_crop


def check_beton(path: str | Path) -> Reader:
    """Open a .beton and check it holds exactly the fields ffcv_convert writes; one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FFCV file {path} does not exist (write it with {CONVERT})")
    try:
        reader = Reader(str(path))
    except Exception as e:  # FFCV raises AssertionError/ValueError/IndexError on foreign files
        raise ValueError(f"{path} is not a readable FFCV .beton file ({type(e).__name__}: {e})") from None
    found = {name: type(handler).__name__ for name, handler in reader.handlers.items()}
    expected = {name: cls.__name__ for name, cls in FIELDS.items()}
    if found != expected:
        have = ", ".join(f"{k}:{v}" for k, v in found.items())
        raise ValueError(
            f"{path} was written with other fields ({have}); expected image:RGBImageField, label:IntField "
            f"as written by {CONVERT}"
        )
    return reader


def beton_labels(reader: Reader) -> np.ndarray:
    """Every sample's label, straight from the file's metadata (no decoding)."""
    return np.asarray(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64)


def read_classes(beton: str | Path) -> list[str] | None:
    """Class names written by ffcv_convert beside the .beton files, if present."""
    path = Path(beton).parent / "classes.txt"
    if not path.is_file():
        return None
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


class _EpochOrder(TraversalOrder):
    """Plugs pipelines.sharding into FFCV's loader (set after construction: see FfcvLoader)."""

    def __init__(self, loader: Loader, *, rank: int, world_size: int, shuffle: bool, seed: int) -> None:
        super().__init__(loader)
        self.rank, self.world_size, self.shuffle, self.shuffle_seed = rank, world_size, shuffle, seed
        self.skip = 0

    def sample_order(self, epoch: int) -> Sequence[int]:
        idx = epoch_indices(len(self.indices), rank=self.rank, world_size=self.world_size,
                            shuffle=self.shuffle, seed=self.shuffle_seed, epoch=epoch)[self.skip:]
        if self.loader.drop_last:
            idx = idx[: len(idx) // self.loader.batch_size * self.loader.batch_size]
        return self.indices[idx]


def _on(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _hand_over(stream: torch.cuda.Stream | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Tensors made on the loader's stream, ready for the current one (which waits for them; their memory
    is not reused before its work is done)."""
    if stream is not None:
        current = torch.cuda.current_stream(stream.device)
        current.wait_stream(stream)
        for t in tensors:
            t.record_stream(current)
    return tensors


class FfcvLoader:
    """FFCV loader honouring the `pipelines.base.Loader` contract."""

    name = "ffcv"
    reason = ""  # set by create_loaders

    def __init__(self, beton: str | Path, config: LoaderConfig, *, train: bool) -> None:
        reader = check_beton(beton)
        self.path = Path(beton)
        self.train = train
        self.device = torch.device(config.device)
        self.batch_size = config.batch_size
        self.drop_last = config.drop_last and train
        labels = beton_labels(reader)
        self.classes = read_classes(beton)
        self.num_classes = len(self.classes) if self.classes else int(labels.max(initial=0)) + 1
        check_labels(labels, self.num_classes, lambda i: f"{self.path}: sample {i}")
        self.in_channels = 3
        self.skipped: list[tuple[str, str]] = []  # bad files were dropped at conversion time
        subset = subset_indices(len(labels), config.train_subset if train else None)
        n = len(subset)
        self.num_samples = shard_size(n, rank=config.rank, world_size=config.world_size, shuffle=train)
        self.normalize = Normalizer(channels_last=config.channels_last)
        self.epoch = 0

        size = (config.image_size, config.image_size)
        if train and config.scale_aug:
            decoder = RandomResizedCropRGBImageDecoder(size, scale=tuple(config.scale),
                                                       ratio=tuple(config.ratio))
        elif train:
            decoder = RandomSquareCropRGBImageDecoder(size, config.image_size / config.val_resize)
        else:
            side = config.val_size or config.image_size
            decoder = CenterCropRGBImageDecoder((side, side), ratio=side / config.val_resize)
        self._decoder = decoder  # its output_size is re-read at every epoch's start (set_resolution)
        on_gpu = self.device.type == "cuda"
        image_ops = [decoder] + ([RandomHorizontalFlip()] if train else []) + [ToTensor()]
        label_ops = [IntDecoder(), ToTensor(), Squeeze()]
        if on_gpu:
            image_ops.append(ToDevice(self.device, non_blocking=True))
            label_ops.append(ToDevice(self.device, non_blocking=True))
        image_ops.append(ToTorchImage(channels_last=True))  # a free NHWC -> NCHW view
        self._loader = Loader(
            str(beton), batch_size=self.batch_size, num_workers=max(1, resolve_num_workers(config.num_workers)),
            order=OrderOption.SEQUENTIAL, drop_last=self.drop_last, os_cache=True, indices=subset,
            pipelines={"image": image_ops, "label": label_ops}, batches_ahead=3,
        )
        self._order = _EpochOrder(self._loader, rank=config.rank, world_size=config.world_size,
                                  shuffle=train, seed=config.seed)
        self._loader.traversal_order = self._order
        self._loader.first_traversal_order = self._order.sample_order(0)
        self._stream: torch.cuda.Stream | None = None  # on CUDA: FFCV's and the copies' (see the module docstring)

    def __len__(self) -> int:  # batches in a whole epoch, also when resuming mid-epoch
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    @property
    def resolution(self) -> int:
        return self._decoder.output_size[0]

    def set_resolution(self, size: int) -> None:
        self._decoder.output_size = (size, size)

    def set_batch_size(self, batch_size: int) -> None:
        self.batch_size = self._loader.batch_size = batch_size  # FFCV sizes its buffers at each epoch's start

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self._order.skip = start_batch * self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # FFCV advances its epoch on every pass; here, as in every backend, set_epoch decides.
        self._loader.next_epoch = self.epoch
        if len(self) == 0 or len(self._order.sample_order(self.epoch)) == 0:
            self._order.skip = 0
            return
        stream = self._own_stream()
        with _on(stream):  # FFCV orders the refill of its buffers after this stream's work
            epoch_iter = iter(self._loader)
        self._order.skip = 0  # a resumed epoch starts mid-way once only
        non_blocking = self.device.type == "cuda"
        for images, labels in epoch_iter:
            with _on(stream):
                if images.device != self.device:
                    images = images.to(self.device, non_blocking=non_blocking)
                    labels = labels.to(self.device, non_blocking=non_blocking)
                # Copies, before FFCV is asked for the next batch (once it hands that out, it refills this one's slot).
                # Squeeze() leaves a batch of one label 0-d: reshape it back to [1].
                images, labels = self.normalize(images), labels.long().reshape(-1).clone()
            yield _hand_over(stream, images, labels)

    def _own_stream(self) -> torch.cuda.Stream | None:
        if self.device.type == "cuda" and self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def close(self) -> None:
        self._loader = None


def create_ffcv_loaders(config: LoaderConfig) -> tuple[FfcvLoader, FfcvLoader]:
    if not config.train_beton or not config.val_beton:
        raise ValueError(f"--loader ffcv needs --train-beton and --val-beton (see {CONVERT})")
    train = FfcvLoader(config.train_beton, config, train=True)
    return train, FfcvLoader(config.val_beton, config, train=False)
