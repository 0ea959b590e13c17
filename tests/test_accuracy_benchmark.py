"""benchmarks/accuracy.py's bookkeeping (the training runs themselves are what the benchmark measures)."""

from __future__ import annotations

import json

from benchmarks import accuracy


def fake_run(folder, top1: float) -> None:
    """A finished run folder as train.py and the benchmark leave it (two epochs)."""
    folder.mkdir(parents=True)
    (folder / "bench_command.json").write_text(json.dumps({"command": ["train.py"], "benchmark": "bench"}))
    (folder / "summary.json").write_text(json.dumps({"stopped_early": False}))
    epoch = {"kind": "epoch", "val": {"heads": {"main": {"top1": top1}}}, "alpha": 1.0, "train": {"kl": {}},
             "train_seconds": 1.0}
    interval = {"kind": "interval", "train": {"loss": 1.0}}  # training records between epochs: not read
    (folder / "log.jsonl").write_text("\n".join(json.dumps(r) for r in (interval, epoch, interval, epoch)))


def test_results_keep_runs_whose_folders_are_gone_and_prefer_the_folders(tmp_path):
    args = accuracy.parse_args(["--variants", "baseline", "--seeds", "0,1", "--runs", str(tmp_path / "runs"),
                                "--results", str(tmp_path / "results")])
    fake_run(tmp_path / "runs" / args.name / "baseline" / "seed0", 80.0)
    fake_run(tmp_path / "runs" / args.name / "dsl" / "seed0", 70.0)
    accuracy.write_results(args, [], "cmd")
    # The run folders are lost (another machine); one run is retrained with another result.
    for variant in ("baseline", "dsl"):
        for f in (tmp_path / "runs" / args.name / variant / "seed0").iterdir():
            f.unlink()
        (tmp_path / "runs" / args.name / variant / "seed0").rmdir()
    fake_run(tmp_path / "runs" / args.name / "baseline" / "seed1", 90.0)
    fake_run(tmp_path / "runs" / args.name / "dsl" / "seed0", 75.0)
    accuracy.write_results(args, [], "cmd")

    payload = json.loads((tmp_path / "results" / f"accuracy-{args.name}.json").read_text())
    assert [r["epochs"] for r in payload["runs"]] == [2, 2, 2]  # epoch records only, not the interval ones
    table = payload["variants"]
    assert table["baseline"]["seeds"] == [0, 1] and table["baseline"]["main_top1"] == [80.0, 90.0]
    assert table["dsl"]["main_top1"] == [75.0]  # the folder's result replaces the recorded one
    assert table["baseline"]["mean"] == 85.0


def test_recorded_command_has_no_machine_paths_and_default_folders_are_in_the_repository():
    root = accuracy.ROOT
    argv = ["--runs", str(root / "runs" / "x"), "--seeds", "0,"]
    command = accuracy.command_line("benchmarks.accuracy", argv)
    assert command == "python -m benchmarks.accuracy --runs runs/x --seeds 0,"
    args = accuracy.parse_args(argv)
    assert args.folder(args.runs) == root / "runs" / "x"
    assert args.folder(args.results) == root / "benchmarks" / "results"


def test_recorded_runs_of_a_variant_no_longer_defined_are_kept_with_their_description(tmp_path):
    args = accuracy.parse_args(["--variants", "baseline", "--runs", str(tmp_path / "runs"),
                                "--results", str(tmp_path / "results")])
    fake_run(tmp_path / "runs" / args.name / "baseline" / "seed0", 80.0)
    accuracy.write_results(args, [], "cmd")
    path = tmp_path / "results" / f"accuracy-{args.name}.json"
    payload = json.loads(path.read_text())
    old = {**payload["runs"][0], "variant": "dhm-T4", "main_top1": 28.8}
    payload["runs"].append(old)
    payload["variants"]["dhm-T4"] = {**payload["variants"]["baseline"], "description": "DHM, T = 4", "flags": "-T4"}
    path.write_text(json.dumps(payload))
    fake_run(tmp_path / "runs" / args.name / "nameless" / "seed1", 30.0)  # a variant nothing describes: ignored
    accuracy.write_results(args, [], "cmd")

    payload = json.loads(path.read_text())
    assert list(payload["variants"]) == ["baseline", "dhm-T4"]
    kept = payload["variants"]["dhm-T4"]
    assert (kept["main_top1"], kept["description"], kept["flags"]) == ([28.8], "DHM, T = 4", "-T4")
    assert "| dhm-T4 | DHM, T = 4 | 1 | 28.80 |" in (tmp_path / "results" / f"accuracy-{args.name}.md").read_text()
