"""The command line of train.py: flags on top of a recipe; bad input becomes one line and exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from dhm_fast.config import AMP_CHOICES, DATASETS, DEFAULT_RECIPE, build_config, load_recipe, recipe_names
from dhm_fast.errors import UserError
from dhm_fast.losses import DIRECTIONS, METHODS
from dhm_fast.models import MODEL_NAMES
from dhm_fast.sampling import PER_CHOICES
from dhm_fast.schedules import LR_SCHEDULES, RAMP_SHAPES

LOADERS = ("auto", "torchvision", "dali", "ffcv", "memory", "synthetic")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the whole usage first
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="train.py",
        description="Train a CNN with Dynamic Hierarchical Mimicking (DHM), deep supervision (dsl), DKS or "
        f"plain (baseline). With no flags: the '{DEFAULT_RECIPE}' recipe (ResNet-20 + DHM on Fashion-MNIST, "
        "about 5 minutes on 2 CPU cores). A flag overrides the recipe's value.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=None,
    )
    bool_flag = argparse.BooleanOptionalAction
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", help=f"a paper row, e.g. imagenet-resnet152 (default {DEFAULT_RECIPE}); "
                   "see --list-recipes")
    g.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    g.add_argument("--arch", choices=MODEL_NAMES, metavar="ARCH", help=f"network: {', '.join(MODEL_NAMES)}")
    g.add_argument("--method", choices=METHODS, help="baseline: main head only; dsl: CE on every head; "
                   "dks: CE + all-pairs KL; dhm: CE + pairwise KL with direction and branch sampling")
    g.add_argument("--data", dest="dataset", choices=DATASETS, help="dataset")
    g.add_argument("--data-dir", help="dataset folder (Fashion-MNIST: the four IDX .gz files, default "
                   "/usr/share/datasets/fashion-mnist; CIFAR: the python release; ImageNet: train/ and val/)")
    g.add_argument("--loader", choices=LOADERS, help="data backend; auto picks the fastest available")
    g.add_argument("--train-beton", help="FFCV training file (python -m pipelines.ffcv_convert writes it)")
    g.add_argument("--val-beton", help="FFCV validation file")
    g.add_argument("--data-validation", choices=("header", "full"), help="image-folder check before training: "
                   "header (fast) or full (decode every file once)")
    g.add_argument("--train-subset", type=int, help="train on the first N training images only")
    g.add_argument("--num-workers", type=int, help="loader worker processes / threads")
    g.add_argument("--strict-data", action=bool_flag, help="fail on the first corrupt image instead of skipping it")
    g.add_argument("--image-size", type=int, help="train/val crop size for ImageNet-style data")
    g.add_argument("--val-resize", type=int, help="shorter side before the validation centre crop")
    g.add_argument("--dropout", type=float, help="dropout in wide-ResNet blocks")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="epochs to train")
    g.add_argument("--batch-size", type=int, help="GLOBAL batch: samples per optimizer step over every "
                   "process and micro-batch (each process runs batch / (processes x --grad-accum))")
    g.add_argument("--grad-accum", type=int, help="micro-batches accumulated per optimizer step (same global "
                   "batch on fewer GPUs)")
    g.add_argument("--scale-lr", action=bool_flag, help="linear scaling rule: the recipe's lr x global "
                   "batch / recipe batch, with warm-up for larger batches (an explicit --lr is used as "
                   "given)")
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument("--momentum", type=float, help="SGD momentum")
    g.add_argument("--nesterov", action=bool_flag, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay")
    g.add_argument("--no-decay-norm-bias", action=bool_flag, help="exempt norm weights and biases from decay")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="learning-rate schedule")
    g.add_argument("--milestones", type=_floats, help="multistep: epochs where lr is multiplied by gamma, "
                   "e.g. 30,60")
    g.add_argument("--gamma", type=float, help="multistep factor")
    g.add_argument("--warmup-epochs", type=float, help="linear lr warm-up length in epochs")

    g = p.add_argument_group("the DHM objective")
    g.add_argument("--alpha", type=float, help="weight of the mimicking (KL) terms")
    g.add_argument("--alpha-ramp", choices=RAMP_SHAPES, help="ramp alpha up from 0 (linear/cosine) or not")
    g.add_argument("--alpha-ramp-epochs", type=float, help="ramp length: epochs, or a fraction of training if < 1")
    g.add_argument("--temperature", type=float, help="softmax temperature T of the KL terms (scaled by T^2)")
    g.add_argument("--temperature-ramp", choices=RAMP_SHAPES, help="ramp T from --temperature-start")
    g.add_argument("--temperature-ramp-epochs", type=float, help="temperature ramp length")
    g.add_argument("--temperature-start", type=float, help="temperature at the start of its ramp")
    g.add_argument("--direction", choices=DIRECTIONS, help="which heads mimic which: both, top-down "
                   "(shallower heads learn from deeper ones), bottom-up (the reverse)")
    g.add_argument("--eps", type=float, help="smoothing of both distributions in the KL (the release: 1e-8)")
    g.add_argument("--label-smoothing", type=float, help="label smoothing of the cross-entropy terms")
    g.add_argument("--aux-weight", type=float, help="weight of every auxiliary head's cross-entropy "
                   "(lambda_h, h > 0; the paper: 1)")
    g.add_argument("--branch-prob", type=float, help="probability that each branch is active (1 = always)")
    g.add_argument("--branch-sample-per", choices=PER_CHOICES, help="draw the active branches per step or epoch")
    g.add_argument("--reference-loss", action=bool_flag, help="use the plain-PyTorch loss, not the fused op")

    g = p.add_argument_group("machinery")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--amp", choices=AMP_CHOICES, help="autocast: bf16 (CPU or GPU), fp16 (GPU, with a "
                   "GradScaler) or none")
    g.add_argument("--channels-last", action=bool_flag, help="channels-last memory format")
    g.add_argument("--compile", action=bool_flag, help="torch.compile the model")
    g.add_argument("--deterministic", action=bool_flag, help="deterministic algorithms (bitwise-reproducible "
                   "runs and resumes on the CPU)")
    g.add_argument("--seed", type=int, help="random seed")
    g.add_argument("--out", help="output folder (checkpoints, logs, curves); re-running into it resumes")
    g.add_argument("--resume", help="checkpoint to resume from (default: <out>/last.pt when present)")
    g.add_argument("--save-every-steps", type=int, help="also checkpoint every N steps (0: epoch ends only)")
    g.add_argument("--log-every-steps", type=int, help="progress-bar refresh interval in steps")
    g.add_argument("--max-steps", type=int, help="stop after N steps in total (smoke runs); resumable")
    g.add_argument("--eval-only", action="store_true", default=None, help="evaluate --weights and exit")
    g.add_argument("--weights", help="weights to evaluate: a dhm_fast checkpoint, a state dict, or the "
                   "authors' released checkpoint")

    g = p.add_argument_group("multi-process (launch with torchrun; see docs/distributed.md)")
    g.add_argument("--sync-bn", action=bool_flag, help="SyncBatchNorm: batch statistics over every process "
                   "(CUDA only)")
    g.add_argument("--dist-timeout", type=float, help="seconds a collective waits for a peer before the job "
                   "fails (a dead or hung process then stops the others)")
    return p


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = vars(args)
    if overrides.pop("list_recipes"):
        for name in recipe_names():
            r = load_recipe(name)
            print(f"{name:32s} {r['dataset']:14s} {r['arch']:20s} {r['epochs']:4d} epochs, batch {r['batch_size']}")
        return 0
    recipe = overrides.pop("recipe")
    try:
        return _run(build_config(recipe, overrides))
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError, ValueError) as e:
        if os.environ.get("DHM_FAST_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from dhm_fast.distributed import is_dist_error

        if not is_dist_error(e) or os.environ.get("DHM_FAST_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: a peer process died, hung or became unreachable ({first[:300]}); the last good "
              "checkpoint is last.pt in --out: re-run the same command to resume", file=sys.stderr)
        return 1


def _run(cfg) -> int:
    from dhm_fast.distributed import world_from_env
    from dhm_fast.run import Run, evaluate_weights

    if cfg.eval_only:
        result = evaluate_weights(cfg)
        if world_from_env().is_main:
            _print_heads(result, f"evaluation of {cfg.weights}")
        return 0
    run = Run(cfg)
    summary = run.train()
    if not run.world.is_main:  # one report per job, from rank 0
        return 0
    if summary["final"] is not None:
        _print_heads(summary["final"], "test accuracy after the last epoch")
        print(f"best main-head top-1: {summary['best_main_top1']:.2f}% (epoch {summary['best_epoch']})")
    print("outputs: " + ", ".join(f"{k} {v}" for k, v in summary["outputs"].items()))
    return 0


def _print_heads(result: dict, title: str) -> None:
    print(f"{title} ({result['samples']} images):")
    for name, h in result["heads"].items():
        print(f"  {name:5s} top-1 {h['top1']:6.2f}%  top-5 {h['top5']:6.2f}%  loss {h['ce']:.4f}")
