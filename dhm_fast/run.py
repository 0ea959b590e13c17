"""One training (or evaluation) run: build the pieces from a config, loop epochs, checkpoint, log.

Outputs in `cfg.out`: last.pt (resumable), best.pt (best main-head val top-1; re-ID: mAP), log.jsonl (a
training record per log interval and a record per epoch, see dhm_fast/logbook.py), curves.png (per-head curves),
config.json, summary.json, and TensorBoard event files with --tensorboard.

Under torchrun every process runs this same code on its shard of the data (docs/distributed.md): metrics
are summed over processes before they are logged, and only rank 0 writes files or draws progress bars.
Checkpoint writes are collective (every process calls `save`), so all processes agree on what is saved.

SIGTERM, SIGUSR1 or SIGINT during training stops the run after the current optimizer step, with a
checkpoint (dhm_fast/preemption.py); a file that cannot be written (a full disk) is one line naming it
and the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import dhm_fast.reid_eval as reid
from dhm_fast import checkpoint, determinism, distributed, precision, preemption, resolution, telemetry
from dhm_fast.config import TrainConfig, flag_name
from dhm_fast.engine import NonFiniteLoss, Progress, evaluate, step_parts, train_one_epoch
from dhm_fast.errors import UserError, WriteError
from dhm_fast.global_batch import micro_batch
from dhm_fast.init_weights import load_init_weights, model_names, read_weights
from dhm_fast.logbook import Logbook
from dhm_fast.metrics import TrainMeter
from dhm_fast.models import create_model
from dhm_fast.models.backbones import branch_summary
from dhm_fast.optim import build_optimizer
from dhm_fast.provenance import provenance
from dhm_fast.sampling import BranchSampler
from pipelines import LoaderConfig, create_loaders

CHECKPOINT_FORMAT = "dhm_fast/1"
IDENTITY_KEYS = ("arch", "method", "dataset", "fork_at")  # a checkpoint must agree on these to be resumed


def log(msg: str) -> None:
    if distributed.is_main():
        tqdm.write(msg, file=sys.stdout)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def loader_config(cfg: TrainConfig, device: torch.device, world: distributed.World | None = None,
                  batch_size: int | None = None) -> LoaderConfig:
    """This process's loaders: its shard (rank of world) and its micro-batch (default: --batch-size)."""
    world = world or distributed.World()
    return LoaderConfig(
        backend=cfg.loader, dataset=cfg.dataset, data_dir=reid.data_dir(cfg), train_beton=cfg.train_beton,
        val_beton=cfg.val_beton, batch_size=batch_size or cfg.batch_size, device=str(device),
        channels_last=bool(cfg.channels_last), rank=world.rank, world_size=world.world_size,
        seed=cfg.seed, num_workers=cfg.num_workers, image_size=cfg.image_size, val_resize=cfg.val_resize,
        val_size=cfg.val_size, val_labels=cfg.val_labels,
        scale_aug=cfg.method not in cfg.no_scale_aug_methods, train_subset=cfg.train_subset,
        strict_data=cfg.strict_data, validation=cfg.data_validation,
    )


def compile_limits(num_heads: int, shapes: int = 1) -> None:
    """Room for `shapes` compiled graphs per branch pattern (each active set is a guard; a resolution
    schedule adds one, see dhm_fast/resolution.py) plus evaluation's."""
    patterns = 2 ** (num_heads - 1)  # the main head is always on
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, patterns * shapes + 2)


def build_model(cfg: TrainConfig, num_classes: int, in_channels: int, device: torch.device):
    kwargs = {"dropout": cfg.dropout} if cfg.dropout else {}
    if cfg.fork_at and cfg.method != "baseline":
        kwargs["fork_at"] = cfg.fork_at.split(",")
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
        self.out = Path(cfg.out)
        determinism.prepare(cfg.deterministic)  # before CUDA starts
        self.world, self.device = distributed.init(cfg.device, cfg.dist_timeout)
        if cfg.sync_bn:
            distributed.check_sync_bn(self.device)  # before any data is loaded
        # --batch-size is global: each process runs micro-batches of batch / (world x grad_accum).
        self.micro_batch = micro_batch(cfg.batch_size, self.world.world_size, cfg.grad_accum)
        speed = precision.choose(cfg.amp, cfg.channels_last, self.device, cfg.deterministic)
        self.cfg = cfg = dataclasses.replace(cfg, amp=speed.amp, channels_last=speed.channels_last)
        for note in speed.notes:
            log(note)
        precision.apply(speed)
        self.autocast = precision.autocast_factory(speed, self.device)
        seed_everything(cfg.seed, cfg.deterministic)
        init_state = read_weights(cfg.init_weights) if cfg.init_weights else None  # a bad file fails before data
        self.train_loader, self.val_loader = create_loaders(
            loader_config(cfg, self.device, self.world, self.micro_batch))
        log(f"data: {cfg.dataset} via the {self.train_loader.name} loader "
            f"({self.train_loader.reason}); {self.train_loader.num_samples} train / "
            f"{self.val_loader.num_samples} val samples per process")
        self.num_classes = self.train_loader.num_classes
        self.resolution = resolution.schedule_for(cfg, self.train_loader.resolution)
        model = build_model(cfg, self.num_classes, self.train_loader.in_channels, self.device)
        if init_state is not None:  # a resumed checkpoint later overrides these
            for line in load_init_weights(model, init_state).lines():
                log(line)
        for line in branch_summary(model, self.train_loader.resolution):
            log(line)  # the generic branches' cost next to the trunk's
        if cfg.sync_bn:
            model = distributed.convert_sync_bn(model, self.device)
        self.model = model  # the bare network: what checkpoints hold
        self.head_names = self.model.head_names
        self.num_heads = self.model.num_heads
        self.headline = reid.HEADLINE if reid.is_reid(cfg) else "top1"  # the main-head metric that picks best.pt
        self.freeze_epochs, note = reid.freeze_epochs(cfg)
        if note:
            log(note)
        sampler = BranchSampler(self.num_heads, cfg.branch_prob, cfg.branch_sample_per, cfg.seed)
        unused = not sampler.always_all or self.freeze_epochs > 0  # skipped branches, a frozen trunk
        self.net = distributed.wrap_ddp(self.model, self.device, find_unused_parameters=unused)
        self.eval_net = self.model  # outside DDP: evaluation needs no collective per batch
        if cfg.compile:
            # The DDP-wrapped module is compiled, so Dynamo's DDP optimizer splits the graph at bucket
            # boundaries and gradient all-reduce overlaps the backward pass.
            compile_limits(self.num_heads, resolution.compile_shapes(self.resolution, cfg.epochs, cfg.res_batch_scale))
            alone = self.net is self.model
            self.net = torch.compile(self.net)
            self.eval_net = self.net if alone else torch.compile(self.model)
        if self.world.rank > 0:  # own dropout draws per process; rank 0 keeps the single-process stream
            torch.manual_seed(_rank_seed(cfg.seed, self.world.rank))
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if speed.needs_scaler else None
        self.steps_per_epoch = len(self.train_loader) // cfg.grad_accum  # optimizer steps
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {cfg.batch_size} (global) exceeds the training samples: "
                            f"{self.train_loader.num_samples} per process, {self.micro_batch} per "
                            f"micro-batch x {cfg.grad_accum} per step; no full step per epoch")
        self.parts = step_parts(cfg, self.net, self.optimizer, self.scaler, self.autocast, sampler)
        backend = self.parts.loss.backend(self.device)
        log(f"loss: the {backend.name} backend ({backend.reason})")
        self.progress = Progress()
        self.meter = TrainMeter(self.num_heads, self.device)
        self.interval_base: dict | None = None  # the reduced meter at the last training record
        self.telemetry = telemetry.for_device(self.device, interval_s=1.0)  # NVML; inert without a GPU
        self.telemetry.start()
        self.provenance = provenance()  # version, git commit and command line, for the model card (export)
        self.stop = preemption.StopRequest()
        self.stopped_by: int | None = None  # the signal every process agreed to stop on
        self.good: tuple[Path, int] | None = None  # the last checkpoint known written, and its step

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self, meter: TrainMeter | None = None, rng_ranks: list | None = None,
              meter_ranks: list | None = None) -> dict:
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": dataclasses.asdict(self.progress),
            "meter": (meter or self.meter).state_dict(),
            "interval_base": self.interval_base,
            "rng": checkpoint.rng_state(),
            "config": self.cfg.to_dict(),
            "num_classes": self.num_classes,
            "world_size": self.world.world_size,
            "provenance": self.provenance,
        }
        if rng_ranks is not None and len(rng_ranks) > 1:
            state["rng_ranks"] = rng_ranks  # every process's own stream (dropout), for an exact resume
        if meter_ranks is not None and len(meter_ranks) > 1:
            state["meter_ranks"] = meter_ranks  # every process's own sums: the same float additions on resume
        return state

    def save(self) -> None:
        """Write last.pt. Every process calls this (it holds collectives); only rank 0 writes.

        The saved meter holds the sums over all processes, and `meter_ranks` each process's own: resumed by
        as many processes, each takes its own back (the sums then add up exactly as without the stop);
        by another number, rank 0 carries the total. BatchNorm buffers are rank 0's everywhere. The
        closing barrier means no process runs past a step before its checkpoint is on disk.
        """
        distributed.broadcast_buffers(self.model)
        meter = distributed.reduce_train_meter(self.meter)
        _check_finite(meter, self.progress.step)  # the same verdict on every process: never save NaNs
        own = distributed.gather_objects((checkpoint.rng_state(), _on_cpu(self.meter.state_dict())))
        if self.world.is_main:
            state = self.state(meter, [rng for rng, _ in own], [sums for _, sums in own])
            checkpoint.save_atomic(state, self.out / checkpoint.LAST)
        distributed.barrier()
        self.good = (self.out / checkpoint.LAST, self.progress.step)

    def resume(self, path: Path) -> None:
        # Loaded on the CPU whatever the training device: the RNG states must reach torch.set_rng_state
        # as CPU tensors; weights, optimizer and meter state are copied to the device as they load.
        ckpt = checkpoint.load(path, map_location="cpu")
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"{path} is not a dhm_fast training checkpoint (use --weights for bare weights)")
        saved = ckpt["config"]
        for key in IDENTITY_KEYS:
            if saved.get(key) != getattr(self.cfg, key):
                raise UserError(
                    f"checkpoint {path} was trained with {flag_name(key)} {saved.get(key)}, not "
                    f"{getattr(self.cfg, key)}; pass the same settings or another --out"
                )
        checkpoint.load_model_weights(self.model, ckpt["model"], str(path), f"{self.cfg.arch} ({self.cfg.method})")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.progress = Progress(**ckpt["progress"])
        self.interval_base = ckpt.get("interval_base")
        meter_ranks = ckpt.get("meter_ranks")
        if meter_ranks is not None and len(meter_ranks) == self.world.world_size:
            self.meter.load_state_dict(meter_ranks[self.world.rank])  # each process's own sums, exactly
        elif self.world.is_main:  # the saved meter is the sum over every process of the saving run
            self.meter.load_state_dict(ckpt["meter"])
        rng_ranks = ckpt.get("rng_ranks")
        if rng_ranks is not None and len(rng_ranks) == self.world.world_size:
            checkpoint.set_rng_state(rng_ranks[self.world.rank])
        elif self.world.is_main:
            checkpoint.set_rng_state(ckpt["rng"])
        else:  # saved by another number of processes: a fresh stream of its own, from (seed, rank, step)
            torch.manual_seed(_rank_seed(self.cfg.seed, self.world.rank, self.progress.step))
        self.good = (path, self.progress.step)
        log(f"resumed from {path} at epoch {self.progress.epoch + 1}, step {self.progress.step}")

    def resume_path(self) -> Path | None:
        """The checkpoint to resume from, as rank 0 sees it (every process must take the same decision)."""
        if self.cfg.resume and self.cfg.resume != "auto":
            path: Path | None = Path(self.cfg.resume)
        else:
            last = self.out / checkpoint.LAST
            path = last if last.is_file() else None
        path = distributed.gather_objects(path)[0]
        if path is not None and not path.is_file():
            raise UserError(f"process {self.world.rank} cannot see {path}, which rank 0 resumes from: "
                            "--out must be on a filesystem every node shares")
        return path

    # --- the loop ------------------------------------------------------------------------------

    def batch_info(self, grad_accum: int | None = None) -> dict:
        w, accum = self.world.world_size, grad_accum or self.cfg.grad_accum  # an epoch's, with --res-batch-scale
        return {"global": self.cfg.batch_size, "per_process": self.cfg.batch_size // w,
                "micro": self.cfg.batch_size // w // accum, "grad_accum": accum, "processes": w}

    def train(self) -> dict:
        """Train to the end, to --max-steps or to a stop signal (then `stopped_by` names it in the summary)."""
        try:
            with self.stop.installed():
                return self._train()
        except WriteError as e:
            raise UserError(f"{e}; {self.still_good()}") from None

    def _train(self) -> dict:
        cfg = self.cfg
        if self.world.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise WriteError(self.out, e) from None
            for stale in self.out.glob(".*.tmp"):  # a write cut short by a kill; its target is intact
                stale.unlink(missing_ok=True)
        path = self.resume_path()
        if path is not None:
            self.resume(path)
        if self.world.is_main:
            checkpoint.write_json(self.out / "config.json", cfg.to_dict())
            self.logbook = Logbook(self.out, f"{cfg.arch} / {cfg.method} / {cfg.dataset}", cfg.tensorboard,
                                   resume_step=self.progress.step)
            self.logbook.rewrite(self.progress.history)  # drops records written after the last checkpoint
        b = self.batch_info()
        where = (f"{b['processes']} processes ({self.world.backend}), " if self.world.distributed else "")
        log(f"training {cfg.arch} with {cfg.method} for {cfg.epochs} epochs on {where}{self.device} "
            f"({self.steps_per_epoch} steps/epoch, amp {cfg.amp}); outputs in {self.out}")
        recipe = (f" (recipe: {cfg.reference_lr:g} at batch {cfg.reference_batch_size})"
                  if cfg.reference_lr is not None else "")
        log(f"batch: global {b['global']} = {b['processes']} process(es) x {b['per_process']} per process "
            f"({b['grad_accum']} micro-batch(es) of {b['micro']}); lr {cfg.lr:g}{recipe}, "
            f"warm-up {cfg.warmup_epochs:g} epochs")
        try:
            while self.progress.epoch < cfg.epochs:
                if not self.train_epoch():
                    if self.stopped_by is not None:
                        return self.stopped()
                    log(f"stopped at --max-steps {cfg.max_steps}; resume with the same --out to continue")
                    return self.finish(stopped_early=True)
                if self.progress.epoch < cfg.epochs and self.should_stop(synced=True):
                    return self.stopped()  # the signal came during the epoch's last steps or its evaluation
        except NonFiniteLoss as e:
            raise UserError(
                f"{e}; training stopped, the last good checkpoint is {self.out / checkpoint.LAST}"
            ) from None
        return self.finish()

    # --- stopping on a signal --------------------------------------------------------------------

    def should_stop(self, synced: bool) -> bool:
        """Whether a stop signal came, with the same answer on every process after the same step.

        A single process reads its note after any step (a Python attribute: no device sync). Processes
        compare notes only where they have just synchronised anyway (a log record, a checkpoint, an
        epoch's end), so the stop lands within --log-every-steps steps and no step waits for a peer.
        """
        if self.world.distributed:
            if not synced:
                return False
            noted = [s for s in distributed.gather_objects(self.stop.signum) if s is not None]
        else:
            noted = [] if self.stop.signum is None else [self.stop.signum]
        if noted:
            self.stopped_by = noted[0]
        return bool(noted)

    def stopped(self) -> dict:
        """Checkpoint where every process stopped (unless that step's checkpoint is written), say so."""
        p, last = self.progress, self.out / checkpoint.LAST
        if self.good != (last, p.step):
            self.save()
        signum = self.stopped_by
        log(f"stopped by {preemption.name(signum)} after step {p.step} (epoch {p.epoch + 1}, step "
            f"{p.step - p.epoch * self.steps_per_epoch} of {self.steps_per_epoch}); checkpoint {last}; re-run "
            f"the same command to resume (exit code {preemption.exit_code(signum)})")
        return self.finish(stopped_early=True)

    def still_good(self) -> str:
        if self.good is None:
            return "no checkpoint has been written yet"
        return f"the last good checkpoint is {self.good[0]} (step {self.good[1]})"

    def schedules_at(self, position: float) -> dict:
        """lr, alpha and temperature at a point of training, in epochs."""
        return {"lr": self.parts.lr.lr(position), "alpha": self.parts.alpha.at(position),
                "temperature": self.parts.temperature.at(position)}

    def log_interval(self, info: dict) -> None:
        """A training record over the steps since the last one: reduced over processes, kept and written."""
        reduced = distributed.reduce_train_meter(self.meter).state_dict()
        now = _on_cpu(reduced)  # one copy
        train = _meter_delta(now, self.interval_base).summary(self.head_names)
        self.interval_base = now
        step = info["step"]
        record = {"kind": "interval", "epoch": self.progress.epoch, "step": step,
                  "epoch_progress": step / self.steps_per_epoch,
                  **self.schedules_at((step - 1) / self.steps_per_epoch), "train": train,  # the last step's
                  "img_per_s": info["img_per_s"] * self.world.world_size,
                  "img_per_s_per_process": info["img_per_s"]}
        gpus = distributed.gather_objects(self.telemetry.take())  # utilisation, memory, power, clocks
        if any(gpus):
            record["gpus"] = gpus
        self.progress.history.append(record)
        if self.world.is_main:
            self.logbook.append(record)

    def train_epoch(self) -> bool:
        cfg, p = self.cfg, self.progress
        start_step = p.step - p.epoch * self.steps_per_epoch
        if self.freeze_epochs:  # re-ID warm-up: only the new layers learn (dhm_fast/models/reid_nets.py)
            self.model.freeze_trunk(p.epoch < self.freeze_epochs)
        side = resolution.apply(self.train_loader, self.resolution, p.epoch)
        accum = resolution.apply_batch(self.train_loader, cfg, side, cfg.batch_size // self.world.world_size)
        start_batch = start_step * accum  # the loader counts micro-batches
        self.train_loader.set_epoch(p.epoch, start_batch)
        bar = tqdm(self.train_loader, total=self.steps_per_epoch * accum, initial=start_batch,
                   file=sys.stdout, desc=f"epoch {p.epoch + 1}/{cfg.epochs}", mininterval=2.0, leave=False,
                   dynamic_ncols=True, disable=not self.world.is_main)
        t0 = time.perf_counter()

        def on_log(info: dict) -> None:
            self.log_interval(info)
            last = p.history[-1]
            bar.set_postfix(loss=f"{last['train']['loss']:.3f}", lr=f"{last['lr']:.4f}",
                            img_s=f"{last['img_per_s']:.0f}")

        finished = train_one_epoch(
            self.parts, bar, p, self.meter, steps_per_epoch=self.steps_per_epoch, max_steps=cfg.max_steps,
            log_every=cfg.log_every_steps, on_log=on_log, checkpoint_every=cfg.save_every_steps,
            on_checkpoint=self.save, grad_accum=accum, should_stop=self.should_stop,
        )
        bar.close()
        if not finished:
            self.save()
            return False
        train_time = time.perf_counter() - t0
        distributed.broadcast_buffers(self.model)  # every process evaluates rank 0's BatchNorm statistics
        if reid.is_reid(cfg):
            val = reid.evaluate_reid(self.eval_net, self.val_loader, self.autocast, self.head_names)
        else:
            val = evaluate(self.eval_net, self.val_loader, self.num_heads, self.autocast, self.device,
                           reduce=distributed.all_reduce_sum, head_names=self.head_names)
        meter = distributed.reduce_train_meter(self.meter)  # over every process
        _check_finite(meter, p.step)
        record = {
            # the schedules where the epoch ends (just before a milestone at its end takes effect)
            "kind": "epoch", "epoch": p.epoch, "step": p.step, **self.schedules_at(p.epoch + 1 - 1e-9),
            "train": meter.summary(self.head_names), "val": val,
            "train_seconds": train_time, "train_img_per_s": meter.samples / max(train_time, 1e-9),
            "batch": self.batch_info(accum), **({"resolution": side} if side else {}),
        }
        score = val["heads"]["main"][self.headline]  # the same on every process, so is the decision
        if score > p.best_top1:
            p.best_top1, p.best_epoch = score, p.epoch
            if self.world.is_main:
                checkpoint.save_atomic({"model": self.model.state_dict(), "config": cfg.to_dict(),
                                        "num_classes": self.num_classes, "epoch": p.epoch, self.headline: score,
                                        "provenance": self.provenance},
                                       self.out / checkpoint.BEST)
        p.history.append(record)
        p.epoch += 1
        self.meter, self.interval_base = TrainMeter(self.num_heads, self.device), None
        self.save()
        if self.world.is_main:
            self.logbook.append(record)
            self.logbook.rewrite(p.history)
            _report_skipped(self.train_loader, self.val_loader)
        heads = reid.describe(val) if reid.is_reid(cfg) else "top-1 " + "  ".join(
            f"{n} {h['top1']:.2f}%" for n, h in val["heads"].items())
        log(f"epoch {p.epoch}/{cfg.epochs}: train loss {record['train']['loss']:.4f}, "
            f"{record['train_img_per_s']:.0f} img/s; val {heads}")
        return True

    def finish(self, stopped_early: bool = False) -> dict:
        p = self.progress
        epochs = [r for r in p.history if r["kind"] == "epoch"]
        summary = {
            "stopped_early": stopped_early, "epochs_done": p.epoch, "steps": p.step,
            "best_epoch": p.best_epoch + 1 if p.best_epoch >= 0 else None,
            f"best_main_{self.headline}": p.best_top1 if p.best_epoch >= 0 else None,
            "final": epochs[-1]["val"] if epochs else None,
            "batch": self.batch_info(),
            "stopped_by": preemption.name(self.stopped_by) if self.stopped_by is not None else None,
            "outputs": {k: str(self.out / v) for k, v in  # those written: no best.pt before an evaluation
                        (("last", checkpoint.LAST), ("best", checkpoint.BEST), ("log", "log.jsonl"),
                         ("curves", "curves.png")) if (self.out / v).is_file()},
        }
        self.telemetry.stop()
        if self.world.is_main:
            checkpoint.write_json(self.out / "summary.json", summary)
            self.logbook.close()
        distributed.barrier()
        distributed.destroy()
        return summary


def _on_cpu(state: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _meter_delta(now: dict, base: dict | None) -> TrainMeter:
    """The sums a meter gathered since `base` (two CPU state dicts of one meter; None: since its start)."""
    meter = TrainMeter(len(now["head_samples"]), torch.device("cpu"))
    if base is None:
        meter.load_state_dict(now)
        return meter

    def minus(a, b):
        if isinstance(a, torch.Tensor):
            return a - b
        return [minus(x, y) for x, y in zip(a, b, strict=True)] if isinstance(a, list) else a - b

    meter.load_state_dict({k: minus(v, base[k]) for k, v in now.items() if k != "num_heads"})
    return meter


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) & 0x7FFF_FFFF_FFFF_FFFF


def _check_finite(meter: TrainMeter, step: int) -> None:
    """Stop (on every process alike) when any process's loss went non-finite since the last check."""
    if not torch.isfinite(meter.loss_sum).item():
        raise NonFiniteLoss(step)


def _report_skipped(*loaders) -> None:
    """Corrupt files never stop a run, but they are never silent either."""
    for loader in loaders:
        if loader.skipped:
            log(f"{loader.name}: {len(loader.skipped)} unreadable file(s) skipped so far, e.g. "
                + "; ".join(f"{path} ({why})" for path, why in loader.skipped[:5]))


def evaluate_weights(cfg: TrainConfig) -> dict:
    """--eval-only: per-head accuracy of a checkpoint (ours or the authors' release naming).

    Under torchrun each process evaluates its shard of the validation set and the counts are summed.
    """
    state = read_weights(cfg.weights)  # safetensors or a weights-only torch file; a bad one fails before the data
    determinism.prepare(cfg.deterministic)  # before CUDA starts
    world, device = distributed.init(cfg.device, cfg.dist_timeout)
    speed = precision.choose(cfg.amp, cfg.channels_last, device, cfg.deterministic)
    cfg = dataclasses.replace(cfg, amp=speed.amp, channels_last=speed.channels_last)
    precision.apply(speed)
    autocast = precision.autocast_factory(speed, device)
    seed_everything(cfg.seed, cfg.deterministic)
    _, val_loader = create_loaders(loader_config(cfg, device, world))
    if any("_head1" in k or "_head2" in k for k in state):
        from dhm_fast.export import from_release

        state = from_release(state, cfg.arch)
    if not any(k.startswith(("aux1.", "aux2.")) for k in state):  # an exported network: its main head only
        cfg = dataclasses.replace(cfg, method="baseline")
    model = build_model(cfg, val_loader.num_classes, val_loader.in_channels, device)
    state = model_names(model, state)  # exported tv:/timm: weights carry the stock names
    if model.num_heads == 1:  # evaluating the inference network: branch weights are not needed
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    checkpoint.load_model_weights(model, state, cfg.weights, f"{cfg.arch} ({cfg.method})")
    if reid.is_reid(cfg):
        result = reid.evaluate_reid(model, val_loader, autocast, model.head_names)
    else:
        result = evaluate(model, val_loader, model.num_heads, autocast, device, reduce=distributed.all_reduce_sum,
                          head_names=model.head_names)
    distributed.destroy()
    return result
