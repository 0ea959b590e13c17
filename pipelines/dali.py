"""NVIDIA DALI loader: JPEG decoding and augmentation in C++ threads, or on the GPU ("mixed" decoding).

One pipeline definition serves both devices: with `config.device` on CUDA, images are decoded by
nvJPEG ("mixed") and cropped, resized, flipped and normalised on the GPU; otherwise everything runs
in DALI's CPU mode (`device_id=None`), which is also what the tests exercise.

  train, scale_aug=True:  decode with a random crop of area in `scale` and aspect in `ratio`,
                          resize to image_size, flip with p=0.5
  train, scale_aug=False: decode, resize the shorter side to val_resize, random image_size crop, flip
  val:                    decode, resize the shorter side to val_resize, centre crop image_size
then normalise with the ImageNet mean/std (channels-last when asked: DALI writes HWC and the batch is
viewed as NCHW, which costs nothing).

The reader is fed this process's shard of the validated file list, in this epoch's order (see
pipelines.sharding), and a pipeline is built per epoch with a seed derived from (seed, epoch, rank):
orders and augmentations are reproducible, every backend visits the samples in the same order, and
val sees each sample exactly once across processes. Building a pipeline takes milliseconds on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import Tensor

from pipelines.base import LoaderConfig
from pipelines.folder import scan_folder_dataset
from pipelines.imagefolder import ImageList
from pipelines.normalize import IMAGENET_MEAN, IMAGENET_STD
from pipelines.sharding import epoch_indices, num_batches, shard_size

log = logging.getLogger(__name__)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


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


def build_pipeline(files: list[str], labels: list[int], config: LoaderConfig, *, train: bool, gpu: bool,
                   batch_size: int, seed: int, device_id: int | None):
    """The DALI pipeline for one epoch of one shard (`files` already in reading order)."""
    dali, _ = _import_dali()
    fn, types = dali.fn, dali.types
    size = config.image_size
    mean = [m * 255 for m in IMAGENET_MEAN]
    std = [s * 255 for s in IMAGENET_STD]
    decode_device = "mixed" if gpu else "cpu"
    op_device = "gpu" if gpu else "cpu"
    # nvJPEG buffers sized once for ImageNet-sized images, so they are not regrown batch after batch.
    decode_opts = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512) if gpu else {}

    pipe = dali.pipeline.Pipeline(batch_size=batch_size, num_threads=max(1, config.num_workers),
                                  device_id=device_id, seed=seed, prefetch_queue_depth=2)
    with pipe:
        jpegs, label = fn.readers.file(files=files, labels=labels, random_shuffle=False, name="Reader")
        if train and config.scale_aug:
            images = fn.decoders.image_random_crop(
                jpegs, device=decode_device, output_type=types.RGB, random_area=list(config.scale),
                random_aspect_ratio=list(config.ratio), num_attempts=10, **decode_opts)
            images = fn.resize(images, device=op_device, resize_x=size, resize_y=size)
            crop_opts: dict = {}
        else:
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **decode_opts)
            images = fn.resize(images, device=op_device, resize_shorter=config.val_resize)
            crop_opts = dict(crop=(size, size))
            if train:  # no-scale-aug recipe: random position of the crop
                crop_opts.update(crop_pos_x=fn.random.uniform(range=(0.0, 1.0)),
                                 crop_pos_y=fn.random.uniform(range=(0.0, 1.0)))
        if train:
            crop_opts["mirror"] = fn.random.coin_flip(probability=0.5)
        images = fn.crop_mirror_normalize(
            images, device=op_device, dtype=types.FLOAT, mean=mean, std=std,
            output_layout="HWC" if config.channels_last else "CHW", **crop_opts)
        if gpu:
            label = label.gpu()
        pipe.set_outputs(images, label)
    return pipe


def _decode_error_summary(err: RuntimeError, root: str) -> str:
    """The line of DALI's multi-line error that names the dataset's file, else its first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if root in line and not line.startswith("File ")]
    return (named or lines or [type(err).__name__])[0][:300]


class DaliLoader:
    """DALI loader honouring the `pipelines.base.Loader` contract."""

    def __init__(self, images: ImageList, config: LoaderConfig, *, train: bool) -> None:
        _import_dali()
        self.images = images
        self.config = config
        self.train = train
        self.device = torch.device(config.device)
        self.gpu = self.device.type == "cuda"
        self.name = "dali-gpu" if self.gpu else "dali-cpu"
        self.device_id: int | None = None
        if self.gpu:
            index = self.device.index
            self.device_id = index if index is not None else torch.cuda.current_device()
        self.batch_size = config.batch_size if train else (config.val_batch_size or config.batch_size)
        self.drop_last = config.drop_last and train
        self.rank, self.world_size = config.rank, config.world_size
        self.classes = images.classes
        self.num_classes = len(images.classes)
        self.in_channels = 3
        self.skipped: list[tuple[str, str]] = list(images.skipped)
        self.num_samples = shard_size(len(images), rank=self.rank, world_size=self.world_size, shuffle=train)
        self.epoch = 0
        self.start_batch = 0
        self._pipe = None

    def __len__(self) -> int:  # batches in a whole epoch, also when resuming mid-epoch
        return num_batches(self.num_samples, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        _, dali_torch = _import_dali()
        idx = epoch_indices(len(self.images), rank=self.rank, world_size=self.world_size, shuffle=self.train,
                            seed=self.config.seed, epoch=self.epoch)
        idx = idx[self.start_batch * self.batch_size:]
        self.start_batch = 0  # a resumed epoch starts mid-way once only
        if len(idx) == 0 or (self.drop_last and len(idx) < self.batch_size):
            return
        files = [self.images.files[i] for i in idx]
        labels = [self.images.labels[i] for i in idx]
        seed = (self.config.seed * 100_003 + self.epoch) * 1_000 + self.rank
        self.close()
        self._pipe = build_pipeline(files, labels, self.config, train=self.train, gpu=self.gpu,
                                    batch_size=self.batch_size, seed=seed % (2**31), device_id=self.device_id)
        self._pipe.build()
        policy = dali_torch.LastBatchPolicy.DROP if self.drop_last else dali_torch.LastBatchPolicy.PARTIAL
        iterator = dali_torch.DALIGenericIterator([self._pipe], ["images", "labels"], reader_name="Reader",
                                                  last_batch_policy=policy, auto_reset=False)
        try:
            while True:
                try:
                    batch = next(iterator)[0]
                except StopIteration:
                    return
                except RuntimeError as e:
                    # A data problem, not a bug: a ValueError is what the command line prints as one line.
                    root = str(self.images.root)
                    raise ValueError(
                        f"DALI could not decode a batch of {root} ({_decode_error_summary(e, root)}): "
                        "a file passed the header check but does not decode; re-run with --data-validation "
                        "full to find and skip it (training resumes from the last checkpoint)"
                    ) from None
                images, labels = batch["images"], batch["labels"].view(-1).long()
                if self.config.channels_last:
                    images = images.permute(0, 3, 1, 2)  # NHWC memory viewed as channels-last NCHW
                if images.device != self.device:  # only a CPU pipeline feeding another device
                    images = images.to(self.device, non_blocking=True)
                    labels = labels.to(self.device, non_blocking=True)
                yield images, labels
        finally:
            del iterator
            self.close()

    def close(self) -> None:
        self._pipe = None  # DALI frees its threads and buffers when the pipeline is collected


def create_dali_loaders(config: LoaderConfig) -> tuple[DaliLoader, DaliLoader]:
    train_list, val_list = scan_folder_dataset(config)
    train = DaliLoader(train_list, config, train=True)
    val = DaliLoader(val_list, config, train=False)
    log.info("DALI loader on %s (%s decoding)", config.device, "GPU" if train.gpu else "CPU")
    return train, val
