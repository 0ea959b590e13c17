"""Every training setting, declared once: defaults here, a recipe file per paper row, flags on top.

Precedence: dataclass defaults < recipe (dhm_fast/recipes/<name>.toml) < command-line flags.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from dhm_fast.errors import UserError

DEFAULT_RECIPE = "fashion-mnist-resnet20"
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet")
AMP_CHOICES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    # what to train
    recipe: str = DEFAULT_RECIPE
    arch: str = "resnet20"
    method: str = "dhm"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    loader: str = "auto"
    train_beton: str | None = None  # FFCV files (pipelines.ffcv_convert writes them)
    val_beton: str | None = None
    data_validation: str = "header"  # folder datasets: "header" (fast) or "full" (decode every file)
    train_subset: int | None = None  # first N training images (quick protocols)
    num_workers: int = 2
    strict_data: bool = False
    image_size: int = 224  # ImageNet-style crops
    val_resize: int = 256  # shorter side before the validation centre crop
    no_scale_aug_methods: list[str] = field(default_factory=list)  # recipe switch (REFERENCE.md §4)
    dropout: float = 0.0
    # optimisation
    epochs: int = 3
    batch_size: int = 128  # GLOBAL: samples per optimizer step over all processes and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step and process (same global batch, less memory)
    scale_lr: bool = True  # recipe lr x global batch / recipe batch (+ warm-up) when the batch differs
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False
    lr_schedule: str = "multistep"
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    # the DHM objective (REFERENCE.md section 1)
    alpha: float = 1.0
    alpha_ramp: str = "constant"  # constant | linear | cosine
    alpha_ramp_epochs: float = 0.0  # epochs (>= 1) or fraction of training (< 1)
    temperature: float = 1.0
    temperature_ramp: str = "constant"
    temperature_ramp_epochs: float = 0.0
    temperature_start: float = 1.0
    direction: str = "both"
    eps: float = 1e-8
    label_smoothing: float = 0.0
    aux_weight: float = 1.0  # lambda_h of every auxiliary head's CE (the paper: 1)
    branch_prob: float = 1.0
    branch_sample_per: str = "step"  # step | epoch
    reference_loss: bool = False  # force the plain-PyTorch loss instead of the fused op
    # machinery
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
    out: str = "runs/default"
    resume: str | None = None  # path, or "auto": last.pt in --out when present
    save_every_steps: int = 0  # 0: checkpoint at epoch ends only
    log_every_steps: int = 50
    max_steps: int | None = None
    eval_only: bool = False
    weights: str | None = None
    # multi-process (torchrun); see docs/distributed.md
    sync_bn: bool = False  # SyncBatchNorm across processes (CUDA only)
    dist_timeout: float = 600.0  # seconds a collective may wait for a peer before the job fails
    # Filled by build_config: the recipe's batch and lr that the linear scaling rule starts from.
    reference_batch_size: int | None = None
    reference_lr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
RECIPE_KEYS = set(FIELDS) - {"recipe", "out", "resume", "eval_only", "weights", "device",
                             "reference_batch_size", "reference_lr"}


def recipe_names() -> list[str]:
    folder = resources.files("dhm_fast") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def load_recipe(name: str) -> dict[str, Any]:
    names = recipe_names()
    if name not in names:
        raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(names)}")
    text = (resources.files("dhm_fast") / "recipes" / f"{name}.toml").read_text()
    values = tomllib.loads(text)
    unknown = sorted(set(values) - RECIPE_KEYS)
    if unknown:
        raise UserError(f"recipe {name!r} has unknown settings: {', '.join(unknown)}")
    return values


def build_config(recipe: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the recipe's values, then every override that is not None."""
    name = recipe or DEFAULT_RECIPE
    recipe_values = load_recipe(name)
    values: dict[str, Any] = {"recipe": name, **recipe_values}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    validate(cfg)
    _apply_lr_scaling(cfg, recipe_values, overrides)
    return cfg


def _apply_lr_scaling(cfg: TrainConfig, recipe: dict[str, Any], overrides: dict[str, Any]) -> None:
    """The linear scaling rule (dhm_fast/batching.py): the recipe's lr follows the global batch."""
    from dhm_fast.batching import scale_lr

    cfg.reference_batch_size = int(recipe.get("batch_size", FIELDS["batch_size"].default))
    cfg.reference_lr = float(recipe.get("lr", FIELDS["lr"].default))
    scaled = scale_lr(
        recipe_lr=cfg.reference_lr, recipe_batch=cfg.reference_batch_size, batch=cfg.batch_size,
        epochs=cfg.epochs, recipe_warmup=float(recipe.get("warmup_epochs", FIELDS["warmup_epochs"].default)),
        enabled=cfg.scale_lr, explicit_lr=overrides.get("lr"), explicit_warmup=overrides.get("warmup_epochs"),
    )
    cfg.lr, cfg.warmup_epochs = scaled.lr, scaled.warmup_epochs


def validate(cfg: TrainConfig) -> None:
    if cfg.dataset not in DATASETS:
        raise UserError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    if cfg.amp not in AMP_CHOICES:
        raise UserError(f"unknown --amp {cfg.amp!r}; choose one of {', '.join(AMP_CHOICES)}")
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.temperature <= 0:
        raise UserError(f"--temperature must be positive, got {cfg.temperature}")
    if not 0.0 <= cfg.branch_prob <= 1.0:
        raise UserError(f"--branch-prob must lie in [0, 1], got {cfg.branch_prob}")
    if not (cfg.aux_weight >= 0.0 and math.isfinite(cfg.aux_weight)):
        raise UserError(f"--aux-weight must be a finite number >= 0, got {cfg.aux_weight}")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise UserError(f"--label-smoothing must lie in [0, 1), got {cfg.label_smoothing}")
    if cfg.dist_timeout <= 0:
        raise UserError(f"--dist-timeout must be positive (seconds), got {cfg.dist_timeout}")
    if cfg.eval_only and not cfg.weights:
        raise UserError("--eval-only needs --weights (a checkpoint or a state dict file)")
