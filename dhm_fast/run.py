"""One training (or evaluation) run: build the pieces from a config, loop epochs, checkpoint, log.

Outputs in `cfg.out`: last.pt (resumable), best.pt (best main-head val top-1), log.jsonl (a record
per epoch), curves.png (per-head curves), config.json, summary.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from dhm_fast import checkpoint
from dhm_fast.config import TrainConfig
from dhm_fast.engine import NonFiniteLoss, Progress, StepParts, evaluate, train_one_epoch
from dhm_fast.errors import UserError
from dhm_fast.metrics import TrainMeter
from dhm_fast.models import create_model
from dhm_fast.optim import build_optimizer
from dhm_fast.plots import plot_curves
from dhm_fast.sampling import BranchSampler
from dhm_fast.schedules import LRSchedule, Ramp, ramp_epochs
from pipelines import LoaderConfig, create_loaders

CHECKPOINT_FORMAT = "dhm_fast/1"
IDENTITY_KEYS = ("arch", "method", "dataset")  # a checkpoint must agree on these to be resumed


def log(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available here")
    return device


def make_autocast(amp: str, device: torch.device):
    """A factory of autocast contexts, and whether fp16 needs a GradScaler."""
    if amp == "none":
        return contextlib.nullcontext, False
    if amp == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return partial(torch.autocast, device_type=device.type, dtype=dtype), amp == "fp16"


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def loader_config(cfg: TrainConfig, device: torch.device) -> LoaderConfig:
    return LoaderConfig(
        backend=cfg.loader, dataset=cfg.dataset, data_dir=cfg.data_dir, train_beton=cfg.train_beton,
        val_beton=cfg.val_beton, batch_size=cfg.batch_size, device=str(device), channels_last=cfg.channels_last,
        seed=cfg.seed, num_workers=cfg.num_workers, image_size=cfg.image_size, val_resize=cfg.val_resize,
        scale_aug=cfg.method not in cfg.no_scale_aug_methods, train_subset=cfg.train_subset,
        strict_data=cfg.strict_data, validation=cfg.data_validation,
    )


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int, device: torch.device):
    kwargs = {"dropout": cfg.dropout} if cfg.dropout else {}
    try:
        model = create_model(cfg.arch, num_classes, method=cfg.method, in_channels=in_channels, **kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class Run:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.autocast, needs_scaler = make_autocast(cfg.amp, self.device)
        seed_everything(cfg.seed, cfg.deterministic)
        self.train_loader, self.val_loader = create_loaders(loader_config(cfg, self.device))
        log(f"data: {cfg.dataset} via the {self.train_loader.name} loader "
            f"({getattr(self.train_loader, 'reason', '')}); {self.train_loader.num_samples} train / "
            f"{self.val_loader.num_samples} val samples")
        self.num_classes = self.train_loader.num_classes
        self.model = build_model(cfg, self.num_classes, self.train_loader.in_channels, self.device)
        self.head_names = self.model.head_names
        self.num_heads = self.model.num_heads
        self.net = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if needs_scaler else None
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {cfg.batch_size} exceeds the {self.train_loader.num_samples} "
                            "training samples: no full batch per epoch")
        self.parts = StepParts(
            model=self.net, optimizer=self.optimizer, scaler=self.scaler, autocast=self.autocast,
            lr=LRSchedule(cfg.lr, cfg.lr_schedule, tuple(cfg.milestones), cfg.gamma, cfg.warmup_epochs,
                          cfg.epochs),
            alpha=Ramp(cfg.alpha, cfg.alpha_ramp, ramp_epochs(cfg.alpha_ramp_epochs, cfg.epochs)),
            temperature=Ramp(cfg.temperature, cfg.temperature_ramp,
                             ramp_epochs(cfg.temperature_ramp_epochs, cfg.epochs), cfg.temperature_start),
            sampler=BranchSampler(self.num_heads, cfg.branch_prob, cfg.branch_sample_per, cfg.seed),
            loss_kwargs=dict(method=cfg.method, direction=cfg.direction, eps=cfg.eps,
                             label_smoothing=cfg.label_smoothing, reference=cfg.reference_loss),
        )
        self.progress = Progress()
        self.meter = TrainMeter(self.num_heads, self.device)

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": dataclasses.asdict(self.progress),
            "meter": self.meter.state_dict(),
            "rng": checkpoint.rng_state(),
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
        }

    def save(self) -> None:
        checkpoint.save_atomic(self.state(), self.out / checkpoint.LAST)

    def resume(self, path: Path) -> None:
        ckpt = checkpoint.load(path, map_location=self.device)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a dhm_fast training checkpoint (use --weights for bare weights)")
        saved = ckpt["config"]
        for key in IDENTITY_KEYS:
            if saved.get(key) != getattr(self.cfg, key):
                raise UserError(
                    f"checkpoint {path} was trained with --{key} {saved.get(key)}, not "
                    f"{getattr(self.cfg, key)}; pass the same settings or another --out"
                )
        checkpoint.load_model_weights(self.model, ckpt["model"], str(path), f"{self.cfg.arch} ({self.cfg.method})")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress(**ckpt["progress"])
        self.meter.load_state_dict(ckpt["meter"])
        checkpoint.set_rng_state(ckpt["rng"])
        log(f"resumed from {path} at epoch {self.progress.epoch + 1}, step {self.progress.step}")

    def resume_path(self) -> Path | None:
        if self.cfg.resume and self.cfg.resume != "auto":
            return Path(self.cfg.resume)
        last = self.out / checkpoint.LAST
        return last if last.is_file() else None

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.resume_path()
        if path is not None:
            self.resume(path)
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log(f"training {cfg.arch} with {cfg.method} for {cfg.epochs} epochs on {self.device} "
            f"({self.steps_per_epoch} steps/epoch, batch {cfg.batch_size}, amp {cfg.amp}); outputs in {self.out}")
        try:
            while self.progress.epoch < cfg.epochs:
                if not self.train_epoch():
                    log(f"stopped at --max-steps {cfg.max_steps}; resume with the same --out to continue")
                    return self.finish(stopped_early=True)
        except NonFiniteLoss as e:
            raise UserError(
                f"{e}; training stopped, the last good checkpoint is {self.out / checkpoint.LAST}"
            ) from None
        return self.finish()

    def train_epoch(self) -> bool:
        cfg, p = self.cfg, self.progress
        start_batch = p.step - p.epoch * self.steps_per_epoch
        _set_epoch(self.train_loader, p.epoch, start_batch)
        bar = tqdm(self.train_loader, total=self.steps_per_epoch, initial=start_batch, file=sys.stdout,
                   desc=f"epoch {p.epoch + 1}/{cfg.epochs}", mininterval=2.0, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()

        def on_log(info: dict) -> None:
            bar.set_postfix(loss=f"{info['loss']:.3f}", lr=f"{info['lr']:.4f}", img_s=f"{info['img_per_s']:.0f}")

        finished = train_one_epoch(
            self.parts, bar, p, self.meter, steps_per_epoch=self.steps_per_epoch, max_steps=cfg.max_steps,
            log_every=cfg.log_every_steps, on_log=on_log, checkpoint_every=cfg.save_every_steps,
            on_checkpoint=self.save,
        )
        bar.close()
        if not finished:
            self.save()
            return False
        train_time = time.perf_counter() - t0
        val = evaluate(self.net, self.val_loader, self.num_heads, self.autocast, self.device,
                       head_names=self.head_names)
        epoch_progress = p.epoch + 1
        record = {
            "epoch": p.epoch, "step": p.step, "lr": self.parts.lr.lr(epoch_progress - 1e-9),
            "alpha": self.parts.alpha.at(epoch_progress - 1e-9),
            "temperature": self.parts.temperature.at(epoch_progress - 1e-9),
            "train": self.meter.summary(self.head_names), "val": val,
            "train_seconds": train_time, "train_img_per_s": self.meter.samples / max(train_time, 1e-9),
        }
        top1 = val["heads"]["main"]["top1"]
        if top1 > p.best_top1:
            p.best_top1, p.best_epoch = top1, p.epoch
            checkpoint.save_atomic({"model": self.model.state_dict(), "config": cfg.to_dict(),
                                    "num_classes": self.num_classes, "epoch": p.epoch, "top1": top1},
                                   self.out / checkpoint.BEST)
        p.history.append(record)
        p.epoch += 1
        self.meter = TrainMeter(self.num_heads, self.device)
        self.save()
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        plot_curves(p.history, self.out / "curves.png", f"{cfg.arch} / {cfg.method} / {cfg.dataset}")
        _report_skipped(self.train_loader, self.val_loader)
        heads = "  ".join(f"{n} {h['top1']:.2f}%" for n, h in val["heads"].items())
        log(f"epoch {p.epoch}/{cfg.epochs}: train loss {record['train']['loss']:.4f}, "
            f"{record['train_img_per_s']:.0f} img/s; val top-1 {heads}")
        return True

    def finish(self, stopped_early: bool = False) -> dict:
        p = self.progress
        summary = {
            "stopped_early": stopped_early, "epochs_done": p.epoch, "steps": p.step,
            "best_epoch": p.best_epoch + 1 if p.best_epoch >= 0 else None,
            "best_main_top1": p.best_top1 if p.best_epoch >= 0 else None,
            "final": p.history[-1]["val"] if p.history else None,
            "outputs": {k: str(self.out / v) for k, v in
                        (("last", checkpoint.LAST), ("best", checkpoint.BEST), ("log", "log.jsonl"),
                         ("curves", "curves.png"))},
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def _report_skipped(*loaders) -> None:
    """Corrupt files never stop a run, but they are never silent either."""
    for loader in loaders:
        skipped = getattr(loader, "skipped", None) or []
        if skipped:
            log(f"{loader.name}: {len(skipped)} unreadable file(s) skipped so far, e.g. "
                + "; ".join(f"{path} ({why})" for path, why in skipped[:5]))


def _set_epoch(loader, epoch: int, start_batch: int) -> None:
    """Every backend reshuffles per epoch; the in-memory one can also start mid-epoch cheaply."""
    try:
        loader.set_epoch(epoch, start_batch=start_batch)
    except TypeError:
        loader.set_epoch(epoch)
        if start_batch:
            raise UserError(f"the {loader.name} loader cannot resume mid-epoch; resume from an epoch-end "
                            "checkpoint (leave --save-every-steps at 0)") from None


def evaluate_weights(cfg: TrainConfig) -> dict:
    """--eval-only: per-head accuracy of a checkpoint (ours or the authors' release naming)."""
    device = resolve_device(cfg.device)
    autocast, _ = make_autocast(cfg.amp, device)
    seed_everything(cfg.seed, cfg.deterministic)
    _, val_loader = create_loaders(loader_config(cfg, device))
    state = checkpoint.model_state(checkpoint.load(cfg.weights, map_location=device))
    if any("_head1" in k or "_head2" in k for k in state):
        from dhm_fast.export import from_release

        state = from_release(state, cfg.arch)
    model = build_model(cfg, val_loader.num_classes, val_loader.in_channels, device)
    if model.num_heads == 1:  # evaluating the inference network: branch weights are not needed
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    checkpoint.load_model_weights(model, state, cfg.weights, f"{cfg.arch} ({cfg.method})")
    return evaluate(model, val_loader, model.num_heads, autocast, device, head_names=model.head_names)
