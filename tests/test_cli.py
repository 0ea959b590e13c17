"""The command line is generated from the settings' declarations, and refuses bad values up front.

Every refusal is one line on stderr and exit code 2, given before any data folder is read (the tests
pass a data folder that does not exist: an error about it would mean the value was checked too late).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dhm_fast import config
from dhm_fast.cli import build_parser, main
from dhm_fast.config import TrainConfig, build_config, recipe_names, warnings_for
from dhm_fast.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
NO_DATA = ["--data-dir", "/nonexistent/dhm-fast-data", "--out", "/tmp/unused-dhm-fast-run"]

# The flags train.py offered before they were generated from the declarations; renames are documented
# in docs/changes.md (--no-decay-norm-bias keeps its meaning, its pair is now --decay-norm-bias).
FLAGS_BEFORE = """--recipe --list-recipes --arch --method --data --data-dir --loader --train-beton --val-beton
--data-validation --train-subset --num-workers --strict-data --no-strict-data --image-size --val-resize --dropout
--epochs --batch-size --grad-accum --scale-lr --no-scale-lr --lr --momentum --nesterov --no-nesterov --weight-decay
--no-decay-norm-bias --lr-schedule --milestones --gamma --warmup-epochs --alpha --alpha-ramp --alpha-ramp-epochs
--temperature --temperature-ramp --temperature-ramp-epochs --temperature-start --direction --eps --label-smoothing
--aux-weight --branch-prob --branch-sample-per --reference-loss --no-reference-loss --device --amp --channels-last
--no-channels-last --compile --no-compile --deterministic --no-deterministic --seed --out --resume
--save-every-steps --log-every-steps --max-steps --eval-only --weights --sync-bn --no-sync-bn --dist-timeout""".split()


def flags_offered() -> set[str]:
    return {s for action in build_parser()._actions for s in action.option_strings}


def refusal(args: list[str], capsys) -> str:
    """The one stderr line of a refused command (fails unless exit code 2 and exactly one line)."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--momentum", "2"], r"--momentum must be less than 1, got 2"),
    (["--momentum", "-0.1"], r"--momentum must be at least 0"),
    (["--weight-decay", "-1"], r"--weight-decay must be at least 0, got -1"),
    (["--alpha", "-1"], r"--alpha must be at least 0, got -1"),
    (["--gamma", "-1"], r"--gamma must be greater than 0, got -1"),
    (["--warmup-epochs", "-1"], r"--warmup-epochs must be at least 0, got -1"),
    (["--num-workers", "-1"], r"--num-workers must be at least 0, got -1"),
    (["--train-subset", "0"], r"--train-subset must be at least 1, got 0"),
    (["--train-subset", "-5"], r"--train-subset must be at least 1, got -5"),
    (["--save-every-steps", "-1"], r"--save-every-steps must be at least 0, got -1"),
    (["--max-steps", "-1"], r"--max-steps must be at least 1, got -1"),
    (["--temperature-ramp", "linear", "--temperature-start", "0"], r"--temperature-start must be greater than 0"),
    (["--image-size", "0"], r"--image-size must be at least 16, got 0"),
    (["--val-resize", "-1"], r"--val-resize must be at least 16, got -1"),
    (["--lr", "nan"], r"--lr must be a finite number, got nan"),
    (["--aux-weight", "inf"], r"--aux-weight must be a finite number"),
    (["--label-smoothing", "1"], r"--label-smoothing must be less than 1"),
    (["--branch-prob", "1.5"], r"--branch-prob must be at most 1"),
    (["--milestones", "1,-2"], r"--milestones must be at least 0, got -2"),
    (["--milestones", "5", "--epochs", "3"], r"--milestones \[5.0\] lie beyond the 3 epochs"),
    (["--log-every-steps", "0"], r"--log-every-steps must be at least 1"),
    (["--dist-timeout", "0"], r"--dist-timeout must be greater than 0"),
    (["--train-beton", "a.beton"], r"give both --train-beton and --val-beton"),
    (["--data", "imagenet", "--image-size", "256", "--val-resize", "224"], r"--val-resize 224 is smaller"),
    (["--data", "imagenet", "--image-size", "192", "--val-size", "288"], r"--val-resize 256 is smaller than the "
                                                                         r"--val-size 288 crop"),
    (["--val-size", "8"], r"--val-size must be at least 16, got 8"),
    (["--res-start", "4"], r"--res-start must be at least 8, got 4"),
    (["--res-step", "0"], r"--res-step must be at least 1, got 0"),
    (["--res-ramp-start", "-1"], r"--res-ramp-start must be at least 0, got -1"),
    (["--res-start", "16", "--res-ramp-start", "3", "--res-ramp-end", "2"], r"--res-ramp-end 2 is before "
                                                                             r"--res-ramp-start 3"),
    (["--data", "imagenet", "--res-start", "256", "--image-size", "192"], r"--res-start 256 is above --image-size "
                                                                          r"192, where the ramp ends"),
    (["--loader", "synthetic", "--res-start", "16"], r"--loader synthetic has no progressive resizing"),
    (["--data", "cifar10", "--res-start", "40"], r"--res-start 40 is above cifar10's native side 32, where "),
    (["--data", "fashion-mnist", "--res-start", "32"], r"--res-start 32 is above fashion-mnist's native side 28"),
    (["--data", "market1501", "--arch", "reid_resnet50", "--image-size", "256", "--res-start", "128"],
     r"--res-start: market1501 trains at one 256x128 size \(progressive resizing makes square crops\)"),
    (["--no-no-decay-norm-bias"], r"unrecognized arguments: --no-no-decay-norm-bias"),
    (["--lr-schedule", "poly"], r"argument --lr-schedule: invalid choice: 'poly'"),
])
def test_an_invalid_value_is_one_line_and_exit_2_before_any_data_is_read(args, message, capsys):
    line = refusal(args + NO_DATA, capsys)
    assert re.search(message, line), line
    assert "nonexistent" not in line


def test_out_naming_an_existing_file_is_refused(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    line = refusal(["--out", str(target), "--data-dir", "/nonexistent/x"], capsys)
    assert line == f"error: --out {target} is a file, not a folder"


def test_a_file_where_a_folder_is_meant_and_back_is_named_so(tmp_path, capsys):
    afile = tmp_path / "a-file"
    afile.write_text("not a folder")
    arch = {"market1501": ["--arch", "reid_resnet50"]}
    cases = [(["--data", data, "--data-dir", str(afile), *arch.get(data, [])],
              f"error: --data-dir {afile} is a file, not a dataset folder")
             for data in ("imagenet", "fashion-mnist", "cifar10", "market1501")]
    cases += [
        (["--init-weights", str(tmp_path)], f"error: --init-weights {tmp_path} is a folder, not a weights file"),
        (["--eval-only", "--weights", str(tmp_path)], f"error: weights file {tmp_path} is a folder, not a file"),
    ]
    for args, message in cases:
        assert refusal(args + ["--out", str(tmp_path / "run")], capsys) == message


def test_refusals_also_hold_for_a_real_process():
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--momentum", "2", *NO_DATA],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --momentum must be less than 1, got 2", result.stderr


def test_help_is_generated_and_offers_every_earlier_flag(capsys):
    offered = flags_offered()
    assert set(FLAGS_BEFORE) <= offered, sorted(set(FLAGS_BEFORE) - offered)
    assert {"--decay-norm-bias", "--tensorboard"} <= offered and "--no-no-decay-norm-bias" not in offered
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    # each declared setting's help text and default reach --help
    assert "SGD momentum (default: 0.9)" in text
    assert "{both,top-down,bottom-up}" in text


def test_every_declared_setting_has_a_flag_or_a_reason_not_to():
    offered = flags_offered()
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["cli"]:
            assert config.flag_name(f.name) in offered, f.name
        assert f.metadata["help"] or not f.metadata["cli"], f"{f.name} has no help text"


def test_decay_norm_bias_flags_read_right():
    args = build_parser().parse_args(["--no-decay-norm-bias"])
    assert build_config(None, vars(args) | {"list_recipes": None, "recipe": None}).decay_norm_bias is False
    assert build_config(None, {}).decay_norm_bias is True


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_passes_validation(name):
    cfg = build_config(name, {})
    assert cfg.recipe == name and cfg.arch and cfg.epochs >= 1


def _recipe_folder(tmp_path, monkeypatch, text: str) -> None:
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "mine.toml").write_text(text)
    monkeypatch.setattr(config.resources, "files", lambda package: tmp_path)


@pytest.mark.parametrize("text, message", [
    ('arch = "resnet20"\nbogus_key = 1\n', "recipe 'mine' has unknown settings: bogus_key"),
    ('momentum = "high"\n', "recipe 'mine': momentum must be a float, got 'high'"),
    ('epochs = 2.5\n', "recipe 'mine': epochs must be a int, got 2.5"),
    ('method = "kd"\n', "--method must be one of baseline, dsl, dks, dhm, got 'kd'"),
    ('momentum = 1.5\n', "--momentum must be less than 1, got 1.5"),
    ('out = "elsewhere"\n', "recipe 'mine' has unknown settings: out"),
])
def test_recipes_are_checked_against_the_same_declarations(tmp_path, monkeypatch, text, message):
    _recipe_folder(tmp_path, monkeypatch, text)
    with pytest.raises(UserError) as err:
        build_config("mine", {})
    assert str(err.value) == message


def test_a_recipe_integer_is_a_valid_float(tmp_path, monkeypatch):
    _recipe_folder(tmp_path, monkeypatch, "lr = 1\nmilestones = [1, 2]\n")
    cfg = build_config("mine", {})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.milestones == [1.0, 2.0]


def test_flags_a_configuration_ignores_are_named_in_one_warning_line_each():
    cfg = build_config(None, {"dropout": 0.3, "image_size": 64, "method": "dsl", "alpha": 0.5})
    lines = warnings_for(cfg, {"dropout", "image_size", "alpha", "lr"})
    assert lines == [
        "warning: --alpha has no effect: --method dsl has no mimicking terms",
        "warning: --dropout has no effect: resnet20 has no dropout layers (only the wide ResNets do)",
        "warning: --image-size has no effect: fashion-mnist is held in memory at its own resolution",
    ]
    assert warnings_for(build_config(None, {"res_step": 16}), {"res_step"}) == [
        "warning: --res-step has no effect: no --res-start: the training resolution is constant"]
    # a setting that the configuration uses gets no warning, and neither does one left at its default
    assert warnings_for(build_config(None, {"arch": "wrn_16_8", "dropout": 0.3}), {"dropout"}) == []


def test_the_cli_prints_the_warnings_before_it_reads_any_data(capsys):
    code = main(["--dropout", "0.3", *NO_DATA])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[0].startswith("warning: --dropout has no effect") and "nonexistent" in err[1]


def test_a_refused_pickle_is_one_line_on_the_command_line(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--eval-only", "--weights", str(path), *NO_DATA],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: refusing to load {path}: it holds Python objects"), lines
