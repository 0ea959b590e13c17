"""The trainer on a generated ImageNet-like folder (flat val/, devkit ground truth): a run resumed in the
middle of the resolution ramp continues it bitwise, and the budget recipes load and train."""

from __future__ import annotations

import tomllib
from importlib import resources

import pytest
from imagenet_folder import write_tiny_imagenet
from test_train import assert_identical, read_log, run_cli, without_timing

from dhm_fast import checkpoint
from dhm_fast.config import build_config, recipe_names
from dhm_fast.resolution import schedule_for

BUDGETS = [n for n in recipe_names() if "-budget" in n]
TINY = ["--data", "imagenet", "--loader", "torchvision", "--num-workers", "0", "--batch-size", "4", "--amp", "none",
        "--no-channels-last", "--deterministic"]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_tiny_imagenet(tmp_path_factory.mktemp("tiny-in"), form="devkit", train_per_class=4)


@pytest.mark.parametrize("batch_scale", [False, True])
def test_a_run_resumed_in_the_middle_of_the_ramp_continues_it_bitwise(imagenet, tmp_path, capsys, batch_scale):
    # 12 images, 3 steps an epoch; sides 16, 24, 32; stopped one step into epoch 2 (side 24). With batch
    # scaling the steps stay the same but sides 24 and 32 accumulate 4 micro-batches of 1 (4 x 24^2 <= 16^2 x 4).
    common = TINY + ["--data-dir", str(imagenet.root), "--arch", "resnet20", "--epochs", "3", "--lr", "0.05",
                     *(["--res-batch-scale"] if batch_scale else []),
                     "--res-start", "16", "--image-size", "32", "--res-ramp-start", "0", "--res-ramp-end", "2",
                     "--res-step", "8", "--val-size", "40", "--val-resize", "48", "--log-every-steps", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run_cli(common + ["--out", str(whole)], capsys)[0] == 0
    assert [r["resolution"] for r in read_log(whole, "epoch")] == [16, 24, 32]
    accum = [r["batch"]["grad_accum"] for r in read_log(whole, "epoch")]
    assert accum == ([1, 4, 4] if batch_scale else [1, 1, 1])
    assert run_cli(common + ["--out", str(parts), "--max-steps", "4"], capsys)[0] == 0
    code, stdout, _ = run_cli(common + ["--out", str(parts)], capsys)
    assert code == 0 and "step 4" in stdout
    assert_identical(without_timing(read_log(whole)), without_timing(read_log(parts)), "log")
    a, b = checkpoint.load(whole / "last.pt"), checkpoint.load(parts / "last.pt")
    for key in a.keys() - {"config"}:
        assert_identical(without_timing(a[key]), without_timing(b[key]), key)


def test_budget_recipes_are_ours_and_follow_the_fast_imagenet_practice():
    assert len(BUDGETS) == 8 and {n.split("-budget")[0] for n in BUDGETS} == {"imagenet-resnet50",
                                                                              "imagenet-resnet152"}
    for name in BUDGETS:
        text = (resources.files("dhm_fast") / "recipes" / f"{name}.toml").read_text()
        assert text.startswith("# OURS, NOT THE PAPER'S"), name
        cfg = build_config(name, {})
        sides = schedule_for(cfg, cfg.image_size).sides(cfg.epochs)
        assert sides[0] == 160 and sides[-1] == 192 and sides == sorted(sides), name
        assert (cfg.val_size, cfg.label_smoothing, cfg.decay_norm_bias, cfg.method) == (224, 0.1, False, "dhm")
        assert cfg.alpha_ramp == "linear" and 0 < cfg.warmup_epochs < max(cfg.milestones) < cfg.epochs
        assert cfg.epochs == int(name.split("budget")[1])
    for paper in ("imagenet-resnet50", "imagenet-resnet152"):  # the paper's recipes are untouched
        values = tomllib.loads((resources.files("dhm_fast") / "recipes" / f"{paper}.toml").read_text())
        assert values["epochs"] == 90 and values["image_size"] == 224 and "res_start" not in values


@pytest.mark.parametrize("method", ["dhm", "baseline"])
def test_a_budget_recipe_trains_on_the_generated_folder(imagenet, tmp_path, capsys, method):
    """imagenet-resnet50-budget16 as given (label smoothing, no decay on norms, alpha ramp, warm-up), on
    tiny sides and two epochs so that the ramp and a validation at the test side are both crossed."""
    out = tmp_path / "run"
    args = ["--recipe", "imagenet-resnet50-budget16", "--method", method, "--data-dir", str(imagenet.root),
            *TINY, "--epochs", "2", "--res-start", "16", "--image-size", "24", "--res-ramp-start", "0",
            "--res-ramp-end", "1", "--res-step", "8", "--val-size", "32", "--val-resize", "40", "--milestones", "1.5",
            "--max-steps", "4",
            "--out", str(out)]
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0, stdout
    assert [r["resolution"] for r in read_log(out, "epoch")] == [16]
    saved = checkpoint.load(out / "last.pt")
    assert saved["progress"]["step"] == 4 and saved["config"]["label_smoothing"] == 0.1
