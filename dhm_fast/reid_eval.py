"""What a run does differently for person re-ID (docs/reid.md): evaluation by retrieval, every head's
embeddings ranked by dhm_fast/reid_metrics.py, mAP of the main head as the headline; the frozen-trunk
warm-up; `--quick`'s generated data."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from dhm_fast.config import TrainConfig
from dhm_fast.reid_metrics import rank_metrics
from pipelines.reid import REID_DATASETS
from pipelines.reid_sample import write_reid_sample

HEADLINE = "mAP"  # what picks best.pt, as top-1 does for classification


def is_reid(cfg: TrainConfig) -> bool:
    return cfg.dataset in REID_DATASETS


def data_dir(cfg: TrainConfig) -> str | None:
    """--data-dir, or with --quick a generated set in <out>/sample-data (written once, then reused)."""
    if not cfg.quick:
        return cfg.data_dir
    root = Path(cfg.out) / "sample-data"
    if not root.is_dir():
        partial = root.with_name(f".sample-data.{os.getpid()}")
        write_reid_sample(partial, cfg.dataset)
        partial.replace(root)  # whole or absent: an interrupted write leaves only the hidden folder
    return str(root)


def freeze_epochs(cfg: TrainConfig) -> tuple[int, str | None]:
    """Epochs of frozen-trunk warm-up, and the line to log when a recipe's pretrained trunk is missing."""
    if not (is_reid(cfg) and cfg.freeze_trunk_epochs):
        return 0, None
    if cfg.init_weights:
        return cfg.freeze_trunk_epochs, None
    return 0, (f"no --init-weights: the {cfg.arch} trunk trains from scratch, without the {cfg.freeze_trunk_epochs}-"
               f"epoch frozen-trunk warm-up (the paper started it from ImageNet weights; docs/reid.md)")


@torch.no_grad()
def evaluate_reid(model: nn.Module, loader, autocast: Callable, head_names: Sequence[str]) -> dict:
    """{"heads": {name: {"mAP", "rank1", "rank5", "rank10"}}, "samples", "queries", "valid_queries"}: the
    loader yields every query, then every gallery image, with its index (pipelines/reid.py)."""
    model.eval()
    features: list[torch.Tensor] = []
    for images, index in loader:
        with autocast():
            outputs = model(images, all_heads=True) if len(head_names) > 1 else (model(images),)
        if not features:
            features = [o.new_empty((loader.num_samples, o.shape[1]), dtype=torch.float32) for o in outputs]
        for store, out in zip(features, outputs, strict=True):
            store[index] = out.float()
    q, ids, cams = loader.num_query, loader.pids, loader.camids
    heads, valid = {}, 0
    for name, f in zip(head_names, features, strict=True):
        result = rank_metrics(f[:q], f[q:], ids[:q], ids[q:], cams[:q], cams[q:])
        valid = result.pop("valid_queries")
        result.pop("queries")
        heads[name] = result
    return {"heads": heads, "samples": loader.num_samples, "queries": q, "valid_queries": valid}


def describe(val: dict) -> str:
    return "  ".join(f"{name} mAP {h['mAP']:.2f}% rank-1 {h['rank1']:.2f}%" for name, h in val["heads"].items())
