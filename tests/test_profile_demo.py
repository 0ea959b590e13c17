"""benchmarks/profile_demo.py: the demo's phases timed through the trainer's own set-up (a smoke run)."""

from __future__ import annotations

import json

from small_data import write_fashion_mnist

from benchmarks import profile_demo


def test_a_short_run_times_every_phase(tmp_path, capsys):
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=300)
    argv = ["--data-dir", str(data), "--steps", "2", "--threads", "1", "--out", str(tmp_path / "out")]
    assert profile_demo.main(argv) == 0
    result = json.loads((tmp_path / "out" / "demo_profile.json").read_text())
    assert result["steps"] == 2 and result["recipe"] == "fashion-mnist-resnet20"
    assert set(result["warmup"]["seconds"]) == set(profile_demo.PHASES)
    assert "first 2 steps" in capsys.readouterr().out
