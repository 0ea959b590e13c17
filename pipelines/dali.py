"""NVIDIA DALI loader: JPEG decoding and augmentation in C++ threads, or on the GPU ("mixed" decoding).

One pipeline definition serves both devices: with `config.device` on CUDA, images are decoded by
nvJPEG ("mixed") and cropped, resized, flipped and normalised on the GPU; otherwise everything runs
in DALI's CPU mode (`device_id=None`), which is also what the tests exercise.

  train: decode only the rectangle that pipelines.augment chose (the same rule and random numbers as
         the torchvision loader's), resize it to the epoch's side (image_size, or set_resolution's), flip it
         when chosen
  val:   decode, resize the shorter side to val_resize, centre crop val_size (default image_size)
then normalise with the ImageNet mean/std (channels-last when asked: DALI writes HWC and the batch is
viewed as NCHW, which costs nothing).

Each split has one pipeline, built on first use and reset at the start of every epoch. Its input is an
external source that this module feeds, batch by batch, with the file bytes of this process's shard
in the epoch's order (pipelines.sharding), from `start_batch` on, plus each train sample's crop
rectangle and flip: orders and augmentations depend only on (seed, epoch, rank, batch), so a resumed
epoch yields exactly the batches of the uninterrupted one. Files are read, and their headers parsed
for the image size, by a few threads ahead of the pipeline. An epoch left before its end (the consumer
stopped early) cannot be reset in DALI; its pipeline is dropped then and rebuilt for the next epoch.
"""

from __future__ import annotations

import io
import logging
import weakref
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pipelines.augment import TrainCrop, batch_draws, flipped
from pipelines.base import LoaderConfig, check_labels
from pipelines.imagefolder import ImageList, check_image, scan_dataset
from pipelines.normalize import IMAGENET_MEAN, IMAGENET_STD
from pipelines.sharding import epoch_indices, num_batches, shard_size
from pipelines.workers import resolve_num_workers

log = logging.getLogger(__name__)

PIPELINE_SEED = 0  # no DALI operator draws random numbers: augmentation comes with the input
READ_AHEAD = 3  # batches read by the file threads ahead of the pipeline


def _import_dali():
    try:
        from nvidia import dali
        from nvidia.dali.plugin import pytorch as dali_torch
    except ImportError as e:
        raise ImportError(
            f"--loader dali needs NVIDIA DALI ({e}); install it with "
            "`bash pipelines/install_extras.sh .venv/bin/pip` or `pip install -e .[dali]`"
        ) from None
    return dali, dali_torch


def build_pipeline(source, config: LoaderConfig, *, train: bool, gpu: bool, batch_size: int, threads: int,
                   device_id: int | None):
    """The pipeline of one split; `source` yields its batches (see _EpochSource)."""
    dali, _ = _import_dali()
    fn, types = dali.fn, dali.types
    size = config.val_size or config.image_size
    mean = [m * 255 for m in IMAGENET_MEAN]
    std = [s * 255 for s in IMAGENET_STD]
    decode_device = "mixed" if gpu else "cpu"
    op_device = "gpu" if gpu else "cpu"
    # nvJPEG buffers sized once for ImageNet-sized images, so they are not regrown batch after batch.
    # Orientation is left as stored, as PIL (the torchvision loader, the size parsing) leaves it.
    decode_opts = dict(output_type=types.RGB, adjust_orientation=False)
    if gpu:
        decode_opts.update(device_memory_padding=211_025_920, host_memory_padding=140_544_512)

    pipe = dali.pipeline.Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id,
                                  seed=PIPELINE_SEED, prefetch_queue_depth=2)
    with pipe:
        if train:
            jpegs, label, anchor, shape, mirror, side = fn.external_source(source=source, num_outputs=6,
                                                                             batch=True, cycle="raise")
            images = fn.decoders.image_slice(jpegs, anchor, shape, device=decode_device, axis_names="WH",
                                             normalized_anchor=False, normalized_shape=False, **decode_opts)
            # The side is an input, not a constant: a resolution schedule changes it without a rebuild.
            images = fn.resize(images, device=op_device, resize_x=side, resize_y=side)
            crop_opts = dict(mirror=mirror)
        else:
            jpegs, label = fn.external_source(source=source, num_outputs=2, batch=True, cycle="raise")
            images = fn.decoders.image(jpegs, device=decode_device, **decode_opts)
            images = fn.resize(images, device=op_device, resize_shorter=config.val_resize)
            crop_opts = dict(crop=(size, size))
        images = fn.crop_mirror_normalize(
            images, device=op_device, dtype=types.FLOAT, mean=mean, std=std,
            output_layout="HWC" if config.channels_last else "CHW", **crop_opts)
        if gpu:
            label = label.gpu()
        pipe.set_outputs(images, label)
    return pipe


class _EpochSource:
    """The external source of one split: each `iter()` (at build and at every reset) starts the epoch
    the loader is set to, and yields its batches as (encoded files, labels[, anchor, shape, mirror])."""

    def __init__(self, loader: DaliLoader, threads: int) -> None:
        self.loader = weakref.proxy(loader)  # the pipeline holds this source: no cycle back to the loader
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="dali-files")
        self.fed: deque[list[str]] = deque(maxlen=READ_AHEAD + 4)  # files of the latest batches handed over

    def __iter__(self) -> Iterator[tuple]:
        d = self.loader
        epoch, start, d.start_batch = d.epoch, d.start_batch, 0  # a resumed epoch starts mid-way once only
        idx = epoch_indices(len(d.images), rank=d.rank, world_size=d.world_size, shuffle=d.train,
                            seed=d.seed, epoch=epoch)
        stop = num_batches(len(idx), d.batch_size, d.drop_last)
        pending: deque[Future] = deque()
        for b in range(start, stop):
            chunk = idx[b * d.batch_size:(b + 1) * d.batch_size]
            pending.append(self.pool.submit(self._load, chunk, epoch, b, d.resolution))
            if len(pending) > READ_AHEAD:
                yield self._hand_over(pending.popleft())
        while pending:
            yield self._hand_over(pending.popleft())

    def _hand_over(self, batch: Future) -> tuple:
        files, outputs = batch.result()
        self.fed.append(files)
        return outputs

    def _load(self, chunk: np.ndarray, epoch: int, batch: int, side: int) -> tuple[list[str], tuple]:
        d = self.loader
        files = [d.images.files[i] for i in chunk]
        data = [np.fromfile(f, dtype=np.uint8) for f in files]
        labels = np.array([d.images.labels[i] for i in chunk], dtype=np.int32).reshape(-1, 1)
        if not d.train:
            return files, (data, labels)
        draws = batch_draws(d.seed, epoch, d.rank, batch, len(chunk))
        boxes = np.empty((len(chunk), 4), dtype=np.float32)  # x, y, width, height
        for k, encoded in enumerate(data):
            with Image.open(io.BytesIO(encoded.tobytes())) as img:  # header only: the size
                width, height = img.size
            top, left, h, w = d.crop.box(draws[k], height, width)
            boxes[k] = (left, top, w, h)
        mirror = np.array([flipped(row) for row in draws], dtype=np.int32)
        sides = np.full(len(chunk), side, dtype=np.float32)
        return files, (data, labels, boxes[:, :2].copy(), boxes[:, 2:].copy(), mirror, sides)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _decode_error_summary(err: RuntimeError, root: str) -> str:
    """The line of DALI's multi-line error that names the dataset's file, else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if root in line and not line.startswith("File ")]
    return (named or lines or [type(err).__name__])[0][:300]


class DaliLoader:
    """DALI loader honouring the `pipelines.base.Loader` contract."""

    reason = ""  # set by create_loaders

    def __init__(self, images: ImageList, config: LoaderConfig, *, train: bool) -> None:
        _import_dali()
        self.images = images
        self.config = config
        self.train = train
        self.crop = TrainCrop.from_config(config)
        self.device = torch.device(config.device)
        self.gpu = self.device.type == "cuda"
        self.name = "dali-gpu" if self.gpu else "dali-cpu"
        self.device_id: int | None = None
        if self.gpu:
            index = self.device.index
            self.device_id = index if index is not None else torch.cuda.current_device()
        self.batch_size = config.batch_size
        self.drop_last = config.drop_last and train
        self.seed = config.seed
        self.rank, self.world_size = config.rank, config.world_size
        self.threads = max(1, resolve_num_workers(config.num_workers))
        self.classes = images.classes
        self.num_classes = len(images.classes)
        check_labels(images.labels, self.num_classes, lambda i: images.files[i])
        self.in_channels = 3
        self.skipped: list[tuple[str, str]] = list(images.skipped)
        self.num_samples = shard_size(len(images), rank=self.rank, world_size=self.world_size, shuffle=train)
        self.epoch = 0
        self.start_batch = 0
        self.resolution = config.image_size  # train output side (set_resolution)
        self._source: _EpochSource | None = None
        self._pipe = None
        self._iterator = None
        self.builds = 0  # pipelines built so far (one, unless an epoch was left before its end)

    def __len__(self) -> int:  # batches in a whole epoch, also when resuming mid-epoch
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def set_resolution(self, size: int) -> None:
        self.resolution = size

    def set_batch_size(self, batch_size: int) -> None:
        if batch_size != self.batch_size:  # a pipeline's batch size is fixed: the next epoch builds another
            self.batch_size = batch_size
            self.close()

    def _start_epoch(self):
        """The pipeline's iterator, positioned at the start of the set epoch (from start_batch)."""
        _, dali_torch = _import_dali()
        if self._iterator is not None:
            self._iterator.reset()  # the source is iterated anew: this epoch, from start_batch
            return self._iterator
        self._source = _EpochSource(self, self.threads)
        self._pipe = build_pipeline(self._source, self.config, train=self.train, gpu=self.gpu,
                                    batch_size=self.batch_size, threads=self.threads, device_id=self.device_id)
        self._pipe.build()
        self.builds += 1
        self._iterator = dali_torch.DALIGenericIterator(
            [self._pipe], ["images", "labels"], last_batch_policy=dali_torch.LastBatchPolicy.PARTIAL,
            auto_reset=False, prepare_first_batch=False)
        return self._iterator

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        remaining = len(self) - self.start_batch
        if remaining <= 0:
            self.start_batch = 0
            return
        iterator = self._start_epoch()
        finished = False
        try:
            while True:
                try:
                    batch = next(iterator)[0]
                except StopIteration:
                    finished = True
                    return
                except RuntimeError as e:
                    raise ValueError(self._decode_error(e)) from None
                images, labels = batch["images"], batch["labels"].view(-1).long()
                if self.config.channels_last:
                    images = images.permute(0, 3, 1, 2)  # NHWC memory viewed as channels-last NCHW
                if images.device != self.device:  # only a CPU pipeline feeding another device
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                yield images, labels
        finally:
            if not finished:  # left early or failed: DALI cannot reset mid-epoch, so start afresh next time
                self.close()

    def _decode_error(self, err: RuntimeError) -> str:
        """One line naming the file DALI failed on: the first recently fed file that PIL cannot decode
        either (DALI's own message names no file fed by an external source)."""
        root = str(self.images.root)
        recent = [f for files in (self._source.fed if self._source else []) for f in files]
        culprit = next((f"{f} ({why})" for f in recent if (why := check_image(f, full=True))), None)
        return (f"DALI could not decode a batch of {root} ({culprit or _decode_error_summary(err, root)}): "
                "a file passed the header check but does not decode; re-run with --data-validation full "
                "to find and skip it (training resumes from the last checkpoint)")

    def close(self) -> None:
        """Release the pipeline, its buffers and threads now (not when the cycle collector gets to it)."""
        self._iterator = None
        self._pipe = None
        if self._source is not None:
            self._source.close()
            self._source = None


def create_dali_loaders(config: LoaderConfig) -> tuple[DaliLoader, DaliLoader]:
    train_list, val_list = scan_dataset(config)
    train = DaliLoader(train_list, config, train=True)
    val = DaliLoader(val_list, config, train=False)
    log.info("DALI loader on %s (%s decoding)", config.device, "GPU" if train.gpu else "CPU")
    return train, val
