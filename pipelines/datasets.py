"""The dataset names and their kinds, as plain data: the command line lists them without importing torch."""

from __future__ import annotations

# The datasets held in memory at their own resolution, with that side (where a resolution ramp ends).
NATIVE_SIDES = {"fashion-mnist": 28, "cifar10": 32, "cifar100": 32}
SMALL_DATASETS = tuple(NATIVE_SIDES)
# Person re-ID (pipelines/reid.py): decoded once at --image-size, held on the device.
REID_DATASETS = ("market1501", "dukemtmc")
