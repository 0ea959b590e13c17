"""The command line of train.py: flags on top of a recipe; bad input becomes one line and exit 2."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from dhm_fast.config import (
    CLI_FIELDS,
    DEFAULT_RECIPE,
    GROUPS,
    base_type,
    build_config,
    flag_name,
    load_recipe,
    recipe_names,
    recipe_origin,
    warnings_for,
)
from dhm_fast.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the whole usage first
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every flag generated from its declaration in dhm_fast/config.py (type, choices, help, default)."""
    p = OneLineParser(
        prog="train.py",
        description="Train a CNN with Dynamic Hierarchical Mimicking (DHM), deep supervision (dsl), DKS or "
        f"plain (baseline). With no flags: the '{DEFAULT_RECIPE}' recipe (ResNet-20 + DHM on Fashion-MNIST, "
        "a few minutes on 2 CPU cores). A flag overrides the recipe's value; the defaults shown apply "
        "where the recipe sets nothing.",
        argument_default=None,
    )
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    groups[GROUPS[0]].add_argument("--recipe", help=f"a paper row (e.g. imagenet-resnet152) or one of ours (default "
                                   f"{DEFAULT_RECIPE}); see --list-recipes")
    groups[GROUPS[0]].add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    for f in CLI_FIELDS:
        meta, kind = f.metadata, base_type(f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "" if default in (None, []) else f" (default: {_show(default)})"
        kwargs: dict = {"dest": f.name, "help": meta["help"] + shown}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is list:
            kwargs.update(type=_floats, metavar="N,N")
        else:
            kwargs["type"] = kind
            if meta["choices"]:
                kwargs.update(choices=meta["choices"], metavar="{" + ",".join(map(str, meta["choices"])) + "}")
        groups[meta["group"]].add_argument(flag_name(f.name), **kwargs)
    return p


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


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
            print(f"{name:32s} {recipe_origin(name):5s} {r['dataset']:14s} {r['arch']:20s} {r['epochs']:4d} epochs, "
                  f"batch {r['batch_size']}")
        return 0
    recipe = overrides.pop("recipe")
    try:
        cfg = build_config(recipe, overrides)
        for line in warnings_for(cfg, {k for k, v in overrides.items() if v is not None}):
            print(line, file=sys.stderr)
        return _run(cfg)
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

    if cfg.list_fork_points:
        from dhm_fast.models.backbones import fork_point_lines

        print("\n".join(fork_point_lines(cfg.list_fork_points)))
        return 0
    if cfg.eval_only:
        result = evaluate_weights(cfg)
        if world_from_env().is_main:
            _print_heads(result, f"evaluation of {cfg.weights}")
        return 0
    run = Run(cfg)
    summary = run.train()
    if summary["stopped_by"]:  # every process; the run has said where it stopped
        from dhm_fast.preemption import exit_code

        return exit_code(summary["stopped_by"])
    if not run.world.is_main:  # one report per job, from rank 0
        return 0
    if summary["final"] is not None:
        _print_heads(summary["final"], "test accuracy after the last epoch")
        metric, label = ("mAP", "mAP") if "best_main_mAP" in summary else ("top1", "top-1")
        print(f"best main-head {label}: {summary['best_main_' + metric]:.2f}% (epoch {summary['best_epoch']})")
    print("outputs: " + ", ".join(f"{k} {v}" for k, v in summary["outputs"].items()))
    return 0


def _print_heads(result: dict, title: str) -> None:
    print(f"{title} ({result['samples']} images):")
    for name, h in result["heads"].items():
        if "mAP" in h:  # person re-ID (dhm_fast/reid_eval.py)
            ranks = "  ".join(f"rank-{k} {h[f'rank{k}']:6.2f}%" for k in (1, 5, 10))
            print(f"  {name:5s} mAP {h['mAP']:6.2f}%  {ranks}")
        else:
            print(f"  {name:5s} top-1 {h['top1']:6.2f}%  top-5 {h['top5']:6.2f}%  loss {h['ce']:.4f}")
