"""The four re-ID recipes train on the generated Market/Duke-style set and evaluate with --eval-only; the
frozen-trunk warm-up of a pretrained trunk; bad input is one line and exit code 2. Tiny: 32x16 inputs,
one step (one epoch of the generated set at the recipes' batch of 32)."""

import json
import shutil

import pytest
import torch
import torchvision

from dhm_fast import checkpoint
from dhm_fast.cli import main
from pipelines.reid_sample import write_reid_sample

TINY = ["--max-steps", "1", "--image-size", "32", "--device", "cpu", "--amp", "none"]


def train(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def check_epoch_record(out_dir, heads: tuple[str, ...]) -> None:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "epoch"][-1]["val"]
    assert tuple(val["heads"]) == heads and val["queries"] == 12 and val["valid_queries"] == 12
    assert all(0 <= h[m] <= 100 for h in val["heads"].values() for m in ("mAP", "rank1", "rank5", "rank10"))
    assert (out_dir / "curves.png").stat().st_size > 0


@pytest.mark.parametrize(("recipe", "method"), [("market1501-mobilenetv2", "dhm"), ("dukemtmc-mobilenetv2", "dsl"),
                                                 ("dukemtmc-resnet50", "baseline"), ("market1501-resnet50", "dhm")])
def test_a_recipe_trains_on_the_generated_set_and_evaluates(recipe, method, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = train(["--recipe", recipe, "--method", method, "--quick", "--out", str(out), *TINY], capsys)
    assert code == 0
    heads = ("main",) if method == "baseline" else ("main", "aux1", "aux2")
    check_epoch_record(out, heads)
    assert "best main-head mAP" in stdout
    assert ("no --init-weights: the reid_resnet50 trunk trains from scratch" in stdout) == recipe.endswith("resnet50")
    code, stdout, _ = train(["--recipe", recipe, "--method", method, "--quick", "--out", str(out), "--eval-only",
                             "--weights", str(out / "best.pt"), *TINY], capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())["final"]["heads"]["main"]
    assert f"main  mAP {summary['mAP']:6.2f}%  rank-1 {summary['rank1']:6.2f}%" in stdout  # the same network


def test_a_pretrained_trunk_stays_frozen_during_the_warm_up(tmp_path, capsys):
    weights = torchvision.models.resnet50().state_dict()  # stands in for torchvision's ImageNet file
    torch.save(weights, tmp_path / "resnet50.pth")
    out = tmp_path / "run"
    code, stdout, _ = train(["--recipe", "market1501-resnet50", "--method", "baseline", "--quick", "--out", str(out),
                             "--init-weights", str(tmp_path / "resnet50.pth"), *TINY], capsys)
    assert code == 0 and "init weights: missing (random init): head (5 tensors)" in stdout
    check_epoch_record(out, ("main",))
    trained = checkpoint.load(out / "last.pt")["model"]
    trunk = [k for k in weights if not k.startswith("fc.")]
    assert all(torch.equal(trained[k], weights[k]) for k in trunk)  # weights and BatchNorm statistics alike
    assert not torch.equal(trained["head.bn.running_mean"], torch.zeros(2048))  # the new head did learn


@pytest.fixture
def market(tmp_path):
    return write_reid_sample(tmp_path / "market")


def test_bad_input_is_one_line_and_exit_code_2(market, tmp_path, capsys):
    base = ["--recipe", "market1501-mobilenetv2", "--data-dir", str(market), "--out", str(tmp_path / "run"), *TINY]
    broken = market / "query" / "0007_c1s1_999999_00.jpg"
    broken.write_bytes(b"not a jpeg")
    code, _, err = train([*base, "--strict-data"], capsys)
    assert code == 2 and err.startswith(f"error: bad image {broken}: cannot decode") and err.count("\n") == 1
    shutil.rmtree(market / "bounding_box_train")
    code, _, err = train(base, capsys)
    assert code == 2 and err == f"error: market1501 folder {market} has no bounding_box_train/ folder\n"
    code, _, err = train([*base, "--arch", "resnet50"], capsys)
    assert code == 2 and "--arch resnet50 and --data market1501 do not go together" in err
    code, _, err = train(["--recipe", "fashion-mnist-resnet20", "--quick", *TINY], capsys)
    assert code == 2 and err == "error: --quick generates re-ID data; --data fashion-mnist has no generator\n"
