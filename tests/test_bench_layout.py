"""benchmarks/bench_layout.py (the measurement behind the CPU's channels-last default): a smoke run."""

from __future__ import annotations

import json

from benchmarks import bench_layout


def test_a_tiny_run_times_all_four_variants_and_writes_its_json(tmp_path, capsys):
    argv = ["--batch-size", "2", "--image-size", "8", "--warmup", "0", "--steps", "1", "--repeats", "1",
            "--threads", "1", "--out", str(tmp_path)]
    assert bench_layout.main(argv) == 0
    result = json.loads((tmp_path / "layout_bench.json").read_text())
    assert set(result["images_per_s"]) == {"fp32 nchw", "fp32 channels_last", "bf16 nchw", "bf16 channels_last"}
    assert set(result["channels_last_speedup"]) == {"fp32", "bf16"}
    assert "channels-last is" in capsys.readouterr().out


def test_an_unknown_precision_is_one_line_and_exit_2(tmp_path, capsys):
    assert bench_layout.main(["--precisions", "fp16", "--out", str(tmp_path)]) == 2
    assert "unknown fp16" in capsys.readouterr().err
