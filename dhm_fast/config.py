"""Every training setting, declared once: type, default, allowed values and help, in `TrainConfig`.

The command line (dhm_fast/cli.py) is generated from these declarations, recipes are checked against
them, and `validate` refuses every bad value before any data is read or any model is built.
Precedence: declared defaults < recipe (dhm_fast/recipes/<name>.toml) < command-line flags.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import tomllib
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

# Only torch-free modules here: `train.py --help` and `--list-recipes` must not import torch (1.4 s).
from dhm_fast.catalog import ARCH_CHOICES, DIRECTIONS, METHODS, PER_CHOICES, REID_ARCHS, is_backbone
from dhm_fast.errors import UserError
from dhm_fast.schedules import LR_SCHEDULES, RAMP_SHAPES
from pipelines import BACKENDS
from pipelines.base import dataset_folder
from pipelines.datasets import NATIVE_SIDES, REID_DATASETS, SMALL_DATASETS

DEFAULT_RECIPE = "fashion-mnist-resnet20"
DATASETS = (*SMALL_DATASETS, "imagenet", *REID_DATASETS)
OPTIMIZERS = ("sgd", "amsgrad")
AMP_CHOICES = ("auto", "none", "bf16", "fp16")

GROUPS = ("what to train", "data", "optimisation", "the DHM objective", "machinery",
          "multi-process (launch with torchrun; see docs/distributed.md)")


def setting(default: Any, help: str, group: int, *, choices: tuple | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None, flag: str | None = None,
            recipe: bool = True, cli: bool = True) -> Any:
    """A dataclass field carrying everything the command line and the validator need to know.

    ge/gt/le/lt bound a number (or each number of a list); `flag` renames the option (default: the field
    name with dashes); `recipe=False` keeps a setting out of recipe files; `cli=False` out of the flags.
    """
    meta = {"help": help, "group": GROUPS[group], "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "flag": flag, "recipe": recipe, "cli": cli}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what to train
    recipe: str = setting(DEFAULT_RECIPE, "a paper row (e.g. imagenet-resnet152) or one of ours; see --list-recipes", 0,
                          recipe=False, cli=False)
    arch: str = setting("resnet20", "network: one of the paper's, or tv:NAME / timm:NAME, any torchvision / timm "
                        "classifier with generic branches (docs/backbones.md)", 0, choices=ARCH_CHOICES)
    fork_at: str | None = setting(None, "tv:/timm: networks: the two fork points of the branches, fx node or module "
                                  "names, e.g. layer2,layer3 (default: the outputs of the two stages before the "
                                  "last)", 0)
    list_fork_points: str | None = setting(None, "print the fork points of this network (e.g. tv:convnext_tiny) "
                                           "with their shapes, and exit", 0, recipe=False)
    method: str = setting("dhm", "baseline: main head only; dsl: CE on every head; dks: CE + all-pairs KL; "
                          "dhm: CE + pairwise KL with direction and branch sampling", 0, choices=METHODS)
    dropout: float = setting(0.0, "dropout inside wide-ResNet blocks (other networks have none)", 0, ge=0, lt=1)
    init_weights: str | None = setting(None, "start the trunk from a local weights file (safetensors or a torch state "
                                       "dict, e.g. torchvision's ImageNet weights); new heads keep their init", 0,
                                       recipe=False)
    # data
    dataset: str = setting("fashion-mnist", "dataset (person re-ID: market1501, dukemtmc, at --image-size x half "
                           "that width; docs/reid.md)", 1, choices=DATASETS, flag="data")
    data_dir: str | None = setting(None, "dataset folder (Fashion-MNIST: the four IDX .gz files, default "
                                   "/usr/share/datasets/fashion-mnist; CIFAR: the python release; ImageNet: "
                                   "train/ and val/)", 1, recipe=False)
    loader: str = setting("auto", "data backend; auto picks the fastest available", 1, choices=BACKENDS)
    train_beton: str | None = setting(None, "FFCV training file (python -m pipelines.ffcv_convert writes it)", 1,
                                      recipe=False)
    val_beton: str | None = setting(None, "FFCV validation file", 1, recipe=False)
    data_validation: str = setting("header", "image-folder check before training: header (fast) or full "
                                   "(decode every file once)", 1, choices=("header", "full"))
    train_subset: int | None = setting(None, "train on N training images, the same N for every --seed and "
                                       "backend (drawn with a fixed seed, kept in dataset order)", 1, ge=1)
    num_workers: int | None = setting(None, "loader worker processes / threads (default: from the cores "
                                      "available to each process)", 1, ge=0)
    strict_data: bool = setting(False, "fail on the first corrupt image instead of skipping it", 1)
    quick: bool = setting(False, "re-ID: train on a generated tiny set in the dataset's layout (written to "
                          "<out>/sample-data) instead of --data-dir, to try a recipe without the data", 1,
                          recipe=False)
    image_size: int = setting(224, "train/val crop size of folder datasets (ImageNet); the end of a --res-start "
                              "ramp", 1, ge=16)
    val_resize: int = setting(256, "shorter side before the validation centre crop (ImageNet)", 1, ge=16)
    val_size: int | None = setting(None, "validation crop size (default --image-size), e.g. test at 224 after "
                                   "training at 192 (ImageNet)", 1, ge=16)
    val_labels: str | None = setting(None, "ground truth of ImageNet's flat val/: LOC_val_solution.csv or the "
                                     "ILSVRC2012 devkit, folder or .tar.gz (default: found in or above --data-dir; "
                                     "docs/imagenet.md)", 1, recipe=False)
    res_start: int | None = setting(None, "progressive resizing: the training side of the first epochs, ramping "
                                    "to --image-size (a small dataset's native side); default: no ramp", 1, ge=8)
    res_ramp_start: float = setting(0.0, "epoch where the resolution ramp starts", 1, ge=0)
    res_ramp_end: float = setting(0.0, "epoch where the resolution ramp reaches its end", 1, ge=0)
    res_step: int = setting(32, "ramp sides are multiples of this many pixels", 1, ge=1)
    res_batch_scale: bool = setting(False, "smaller micro-batches at larger sides, accumulated to the same step "
                                    "(activation memory at most that of --grad-accum at --res-start; batch, lr "
                                    "and steps unchanged)", 1)
    no_scale_aug_methods: list[str] = setting([], "methods that train without scale augmentation (the paper: "
                                              "DHM on the shallow ResNets)", 1, choices=METHODS, cli=False)
    # optimisation
    epochs: int = setting(3, "epochs to train", 2, ge=1)
    batch_size: int = setting(128, "GLOBAL batch: samples per optimizer step over every process and "
                              "micro-batch (each process runs batch / (processes x --grad-accum))", 2, ge=1)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step (same global batch on fewer "
                              "GPUs)", 2, ge=1)
    scale_lr: bool = setting(True, "linear scaling rule: the recipe's lr x global batch / recipe batch, with "
                             "warm-up for larger batches (an explicit --lr is used as given)", 2)
    optimizer: str = setting("sgd", "sgd (with --momentum) or amsgrad (Adam with AMSGrad; the re-ID recipes)", 2,
                             choices=OPTIMIZERS)
    lr: float = setting(0.1, "base learning rate", 2, gt=0)
    momentum: float = setting(0.9, "SGD momentum", 2, ge=0, lt=1)
    nesterov: bool = setting(False, "Nesterov momentum", 2)
    weight_decay: float = setting(1e-4, "L2 weight decay", 2, ge=0)
    freeze_trunk_epochs: int = setting(0, "re-ID: first epochs train only the new layers (heads, branches) with "
                                       "the --init-weights trunk frozen (a random trunk is never frozen)", 2, ge=0)
    decay_norm_bias: bool = setting(True, "apply weight decay to norm weights and biases too "
                                    "(--no-decay-norm-bias exempts them)", 2)
    lr_schedule: str = setting("multistep", "learning-rate schedule", 2, choices=LR_SCHEDULES)
    milestones: list[float] = setting([], "multistep: epochs where lr is multiplied by gamma, e.g. 30,60", 2, ge=0)
    gamma: float = setting(0.1, "multistep factor", 2, gt=0)
    warmup_epochs: float = setting(0.0, "linear lr warm-up length in epochs", 2, ge=0)
    # the DHM objective (the paper, section 3)
    alpha: float = setting(1.0, "weight of the mimicking (KL) terms", 3, ge=0)
    alpha_ramp: str = setting("constant", "ramp alpha up from 0 (linear/cosine) or not", 3, choices=RAMP_SHAPES)
    alpha_ramp_epochs: float = setting(0.0, "ramp length: epochs, or a fraction of training if < 1", 3, ge=0)
    temperature: float = setting(1.0, "softmax temperature T of the KL terms (scaled by T^2)", 3, gt=0)
    temperature_ramp: str = setting("constant", "ramp T from --temperature-start", 3, choices=RAMP_SHAPES)
    temperature_ramp_epochs: float = setting(0.0, "temperature ramp length", 3, ge=0)
    temperature_start: float = setting(1.0, "temperature at the start of its ramp", 3, gt=0)
    direction: str = setting("both", "which heads mimic which: both, top-down (shallower heads learn from "
                             "deeper ones), bottom-up (the reverse)", 3, choices=DIRECTIONS)
    eps: float = setting(1e-8, "smoothing of both distributions in the KL (the release: 1e-8)", 3, ge=0, lt=1)
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy terms", 3, ge=0, lt=1)
    aux_weight: float = setting(1.0, "weight of every auxiliary head's cross-entropy (lambda_h, h > 0; the "
                                "paper: 1)", 3, ge=0)
    branch_prob: float = setting(1.0, "probability that each branch is active (1 = always)", 3, ge=0, le=1)
    branch_sample_per: str = setting("step", "draw the active branches per step or epoch", 3, choices=PER_CHOICES)
    reference_loss: bool = setting(False, "use the plain-PyTorch loss, not the fused op", 3)
    # machinery
    device: str = setting("auto", "cpu, cuda, cuda:N or auto", 4, recipe=False)
    amp: str = setting("auto", "autocast: bf16 (CPU or GPU), fp16 (GPU, with a GradScaler), none, or auto: bf16 "
                       "on GPUs that support it (else fp16), on the CPU bf16 only with native bf16 (see "
                       "dhm_fast/precision.py)", 4, choices=AMP_CHOICES)
    channels_last: bool | None = setting(None, "channels-last memory format (default: on for CUDA and for x86 "
                                         "CPUs from AVX2 up, where it measured faster; off on other CPUs)", 4)
    compile: bool = setting(False, "torch.compile the model", 4)
    deterministic: bool = setting(False, "deterministic algorithms (bitwise-reproducible runs and resumes; on "
                                  "CUDA it sets CUBLAS_WORKSPACE_CONFIG=:4096:8 unless that is :16:8)", 4)
    seed: int = setting(0, "random seed", 4, ge=0)
    out: str = setting("runs/default", "output folder (checkpoints, logs, curves); re-running into it resumes",
                       4, recipe=False)
    resume: str | None = setting(None, "checkpoint to resume from (default: <out>/last.pt when present)", 4,
                                 recipe=False)
    save_every_steps: int = setting(0, "also checkpoint every N steps (0: epoch ends only)", 4, ge=0)
    log_every_steps: int = setting(50, "interval in steps of the training records in log.jsonl and the "
                                   "progress bar", 4, ge=1)
    tensorboard: bool = setting(False, "also write the logged scalars as TensorBoard event files in --out "
                                "(needs the tensorboard package)", 4, recipe=False)
    max_steps: int | None = setting(None, "stop after N steps in total (smoke runs); resumable", 4, ge=1,
                                    recipe=False)
    eval_only: bool = setting(False, "evaluate --weights and exit", 4, recipe=False)
    weights: str | None = setting(None, "weights to evaluate: a dhm_fast checkpoint, a state dict, or the "
                                  "authors' released checkpoint", 4, recipe=False)
    # multi-process (torchrun); see docs/distributed.md
    sync_bn: bool = setting(False, "SyncBatchNorm: batch statistics over every process (CUDA only)", 5)
    dist_timeout: float = setting(600.0, "seconds a collective waits for a peer before the job fails (a dead "
                                  "or hung process then stops the others)", 5, gt=0)
    # Filled by build_config: the recipe's batch and lr that the linear scaling rule starts from.
    reference_batch_size: int | None = setting(None, "", 2, recipe=False, cli=False)
    reference_lr: float | None = setting(None, "", 2, recipe=False, cli=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)
RECIPE_KEYS = frozenset(name for name, f in FIELDS.items() if f.metadata["recipe"])
CLI_FIELDS = tuple(f for f in FIELDS.values() if f.metadata["cli"])


def flag_name(name: str) -> str:
    return "--" + (FIELDS[name].metadata["flag"] or name.replace("_", "-"))


def base_type(name: str) -> type:
    """int, float, str, bool or list for a field (an optional field's non-None type)."""
    tp = TYPES[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is list:
        return list
    return args[0] if args else tp


def recipe_names() -> list[str]:
    folder = resources.files("dhm_fast") / "recipes"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def recipe_origin(name: str) -> str:
    """"paper" for a row of the DHM paper, "ours" for the rest (budget, demo and protocol recipes): each
    recipe file's first line says which."""
    first = (resources.files("dhm_fast") / "recipes" / f"{name}.toml").read_text().partition("\n")[0]
    return "paper" if "of the DHM paper" in first else "ours"


def load_recipe(name: str) -> dict[str, Any]:
    names = recipe_names()
    if name not in names:
        raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(names)}")
    values = tomllib.loads((resources.files("dhm_fast") / "recipes" / f"{name}.toml").read_text())
    unknown = sorted(set(values) - RECIPE_KEYS)
    if unknown:
        raise UserError(f"recipe {name!r} has unknown settings: {', '.join(unknown)}")
    return {key: _coerce(key, value, f"recipe {name!r}") for key, value in values.items()}


def _coerce(name: str, value: Any, where: str) -> Any:
    """A recipe value of the declared type (an integer is a valid float), or a one-line error."""
    kind = base_type(name)
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, int | float) and not isinstance(v, bool), str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list)}[kind]
    if not ok(value):
        raise UserError(f"{where}: {name} must be a {kind.__name__}, got {value!r}")
    if kind is float:
        return float(value)
    if kind is list:
        item = typing.get_args(TYPES[name])[0]
        return [float(v) if item is float else v for v in value]
    return value


def build_config(recipe: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the recipe's values, then every override that is not None; validated."""
    name = recipe or DEFAULT_RECIPE
    recipe_values = load_recipe(name)
    values: dict[str, Any] = {"recipe": name, **recipe_values}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    validate(cfg)
    _apply_lr_scaling(cfg, recipe_values, overrides)
    return cfg


def _apply_lr_scaling(cfg: TrainConfig, recipe: dict[str, Any], overrides: dict[str, Any]) -> None:
    """The linear scaling rule (dhm_fast/global_batch.py): the recipe's lr follows the global batch."""
    from dhm_fast.global_batch import scale_lr

    cfg.reference_batch_size = int(recipe.get("batch_size", FIELDS["batch_size"].default))
    cfg.reference_lr = float(recipe.get("lr", FIELDS["lr"].default))
    scaled = scale_lr(
        recipe_lr=cfg.reference_lr, recipe_batch=cfg.reference_batch_size, batch=cfg.batch_size,
        epochs=cfg.epochs, recipe_warmup=float(recipe.get("warmup_epochs", FIELDS["warmup_epochs"].default)),
        enabled=cfg.scale_lr, explicit_lr=overrides.get("lr"), explicit_warmup=overrides.get("warmup_epochs"),
    )
    cfg.lr, cfg.warmup_epochs = scaled.lr, scaled.warmup_epochs


def validate(cfg: TrainConfig) -> None:
    """Every declared bound and choice, then the rules that tie settings together; one line per error."""
    for name, f in FIELDS.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            problem = _check_value(item, f.metadata)
            if problem:
                raise UserError(f"{flag_name(name)} {problem}")
    if is_backbone(cfg.arch) or cfg.fork_at:
        from dhm_fast.models import backbones

        try:
            backbones.check(cfg.arch, cfg.fork_at.split(",") if cfg.fork_at else None, cfg.method != "baseline")
        except ValueError as e:
            raise UserError(str(e)) from None
    if cfg.init_weights and not Path(cfg.init_weights).is_file():
        raise UserError(f"--init-weights {cfg.init_weights} " + ("is a folder, not a weights file"
                        if Path(cfg.init_weights).is_dir() else "does not exist"))
    if cfg.data_dir:
        try:  # a file named as the folder: refused before anything is built
            dataset_folder(cfg.data_dir)
        except NotADirectoryError as e:
            raise UserError(str(e)) from None
    if cfg.eval_only and not cfg.weights:
        raise UserError("--eval-only needs --weights (a checkpoint or a state dict file)")
    if (cfg.dataset in REID_DATASETS) != (cfg.arch in REID_ARCHS):
        raise UserError(f"--arch {cfg.arch} and --data {cfg.dataset} do not go together: the re-ID datasets "
                        f"({', '.join(REID_DATASETS)}) need a re-ID network ({', '.join(REID_ARCHS)}) and back")
    if cfg.quick and cfg.dataset not in REID_DATASETS:
        raise UserError(f"--quick generates re-ID data; --data {cfg.dataset} has no generator")
    if bool(cfg.train_beton) != bool(cfg.val_beton):
        raise UserError("give both --train-beton and --val-beton, or neither")
    crop, crop_flag = (cfg.val_size, "--val-size") if cfg.val_size else (cfg.image_size, "--image-size")
    if cfg.dataset == "imagenet" and cfg.val_resize < crop:
        raise UserError(f"--val-resize {cfg.val_resize} is smaller than the {crop_flag} {crop} crop")
    if cfg.res_ramp_end < cfg.res_ramp_start:
        raise UserError(f"--res-ramp-end {cfg.res_ramp_end:g} is before --res-ramp-start {cfg.res_ramp_start:g}")
    if cfg.res_start is not None:
        _check_resolution_ramp(cfg)
    if any(m > cfg.epochs for m in cfg.milestones):
        raise UserError(f"--milestones {cfg.milestones} lie beyond the {cfg.epochs} epochs of training")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a file, not a folder")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")


def _check_resolution_ramp(cfg: TrainConfig) -> None:
    """--res-start against the data: a square ramp that ends at the training side, never past it."""
    if cfg.dataset in REID_DATASETS:
        raise UserError(f"--res-start: {cfg.dataset} trains at one {cfg.image_size}x{cfg.image_size // 2} size "
                        "(progressive resizing makes square crops)")
    if cfg.loader == "synthetic":
        raise UserError("--loader synthetic has no progressive resizing (--res-start)")
    end_side, end_name = ((NATIVE_SIDES[cfg.dataset], f"{cfg.dataset}'s native side") if cfg.dataset in NATIVE_SIDES
                          else (cfg.image_size, "--image-size"))
    if cfg.res_start > end_side:
        raise UserError(f"--res-start {cfg.res_start} is above {end_name} {end_side}, where the ramp ends")


def _check_value(value: Any, meta: dict) -> str | None:
    """Why a value breaks its declaration, or None."""
    choices = meta["choices"]
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    for key, holds, words in (("ge", value.__ge__, "at least"), ("gt", value.__gt__, "greater than"),
                              ("le", value.__le__, "at most"), ("lt", value.__lt__, "less than")):
        if meta[key] is not None and not holds(meta[key]):
            return f"must be {words} {meta[key]:g}, got {value:g}"
    return None


# Settings a dataset or backend never reads: giving one explicitly gets a warning, never silence.
def ignored_settings(cfg: TrainConfig) -> dict[str, str]:
    """{setting name: why it has no effect} for this configuration."""
    ignored: dict[str, str] = {}
    small = cfg.dataset in SMALL_DATASETS
    if small:
        why = f"{cfg.dataset} is held in memory at its own resolution"
        for name in ("image_size", "val_resize", "val_size", "val_labels", "data_validation", "train_beton",
                     "val_beton"):
            ignored[name] = why
    if cfg.method == "baseline":
        ignored["fork_at"] = "--method baseline has no branches"
    if not cfg.arch.startswith("wrn"):
        ignored["dropout"] = f"{cfg.arch} has no dropout layers (only the wide ResNets do)"
    if cfg.method not in ("dks", "dhm"):
        why = f"--method {cfg.method} has no mimicking terms"
        for name in ("alpha", "alpha_ramp", "alpha_ramp_epochs", "temperature", "temperature_ramp",
                     "temperature_ramp_epochs", "temperature_start", "direction", "eps"):
            ignored[name] = why
    if cfg.method != "dhm":
        ignored["branch_prob"] = ignored["branch_sample_per"] = f"--method {cfg.method} keeps every branch on"
    if cfg.method == "baseline":
        ignored["aux_weight"] = "--method baseline trains the main head only"
    if cfg.eval_only:
        ignored["init_weights"] = "--eval-only evaluates --weights"
    else:
        ignored["weights"] = "only --eval-only reads it; to start training from weights, use --init-weights"
    if cfg.res_start is None:
        for name in ("res_ramp_start", "res_ramp_end", "res_step", "res_batch_scale"):
            ignored[name] = "no --res-start: the training resolution is constant"
    if cfg.dataset in REID_DATASETS:
        for name in ("val_resize", "data_validation", "train_beton", "val_beton", "train_subset"):
            ignored[name] = f"{cfg.dataset} is decoded once at --image-size and held in memory"
    if not (cfg.init_weights and cfg.arch in REID_ARCHS):
        ignored["freeze_trunk_epochs"] = "only a re-ID network started from --init-weights has a trunk to freeze"
    if cfg.optimizer != "sgd":
        ignored["momentum"] = ignored["nesterov"] = f"--optimizer {cfg.optimizer} has no SGD momentum"
    if cfg.lr_schedule != "multistep":
        ignored["milestones"] = ignored["gamma"] = f"--lr-schedule {cfg.lr_schedule} has no steps"
    return ignored


def warnings_for(cfg: TrainConfig, given: set[str]) -> list[str]:
    """One line per explicitly given setting that this configuration ignores."""
    ignored = ignored_settings(cfg)
    return [f"warning: {flag_name(name)} has no effect: {ignored[name]}" for name in sorted(given & set(ignored))]
