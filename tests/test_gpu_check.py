"""benchmarks.gpu_check where no GPU is needed: arguments, the clean skip without a GPU, the report, the
per-part time limit, the kill-and-resume harness with a stand-in trainer, and that the commands it runs
use flags the benchmarks and the trainer still have."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import Context, Part, PartFailed

ROOT = Path(__file__).resolve().parents[1]


def has_gpu(ctx):  # noqa: ARG001 - a stand-in probe
    return {"status": "passed", "cuda": True, "summary": "a pretend GPU"}


def test_bad_part_name_is_one_line_and_exit_2(capsys):
    assert gpu_check.main(["--parts", "setup,warp_drive"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "warp_drive" in err and "cuda_tests" in err


def test_list_names_every_part_in_order(capsys):
    assert gpu_check.main(["--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == [p.name for p in gpu_check.PARTS]
    assert [p.name for p in gpu_check.select_parts("throughput, setup")] == ["setup", "throughput"]


def test_without_a_gpu_every_part_is_skipped_and_the_exit_status_is_0(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ran_on_gpu"] is False and report["device"]["cuda"] is False
    assert list(report["parts"]) == [p.name for p in gpu_check.PARTS]
    assert all(r == {"status": "skipped", "summary": "no CUDA GPU"} for r in report["parts"].values())
    rows = proc.stdout.splitlines()
    for p in gpu_check.PARTS:
        assert any(row.startswith(p.name) and row.endswith("skipped (no CUDA GPU)") for row in rows)
    assert f"{len(gpu_check.PARTS)} skipped" in rows[0]


def test_the_table_shows_each_outcome_in_one_row():
    report = {"device": {"summary": "NVIDIA H100, compute capability 9.0"}, "parts": {
        "setup": {"status": "passed", "summary": "built kernels._C for sm_90 in 80 s", "seconds": 80.4},
        "cuda_tests": {"status": "failed", "summary": "pytest exit 1: 2 failed, 30 passed", "seconds": 41.0},
        "loss_bench": {"status": "measured", "summary": "fused op float32: 2900 GB/s", "seconds": 20.2},
        "throughput": {"status": "skipped", "summary": "the 450 s budget is spent"},
    }}
    lines = gpu_check.format_table(report).splitlines()
    assert lines[0] == ("GPU acceptance check (NVIDIA H100, compute capability 9.0): "
                        "1 passed, 1 measured, 1 failed, 1 skipped")
    assert lines[2].split() == ["setup", "80", "s", "passed", "(built", "kernels._C", "for", "sm_90", "in", "80",
                                "s)"]
    assert lines[3].endswith("failed (pytest exit 1: 2 failed, 30 passed)") and " 41 s " in lines[3]
    assert lines[4].endswith("measured (fused op float32: 2900 GB/s)")
    assert lines[5].split()[:2] == ["throughput", "-"] and lines[5].endswith("skipped (the 450 s budget is spent)")
    assert len(lines) == 6


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_part_past_its_limit_is_killed_with_what_it_started(tmp_path):
    pid_file = tmp_path / "pid"

    def hangs(ctx):
        child = subprocess.Popen(["sleep", "300"])
        pid_file.write_text(str(child.pid))
        time.sleep(300)

    result = gpu_check.run_limited(hangs, Context(tmp_path, {}), limit_s=2.0)
    assert result["status"] == "failed" and "timed out after 2 s" in result["summary"]
    pid = int(pid_file.read_text())
    for _ in range(100):  # the orphan is reaped by init a moment after the kill
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)


def test_every_part_runs_whatever_the_others_did(tmp_path):
    def raises(ctx):
        raise ValueError("bad\nthing")

    def fails(ctx):
        raise PartFailed("2 cases outside tolerance")

    def dies(ctx):
        os._exit(3)

    def passes(ctx):
        assert ctx.device["cuda"] and ctx.out == tmp_path
        return {"status": "passed", "summary": "fine", "figure": 1.5}

    parts = [Part("hangs", lambda ctx: time.sleep(60), 1.0, ""), Part("raises", raises, 30, ""),
             Part("fails", fails, 30, ""), Part("dies", dies, 30, ""),
             Part("passes", passes, 30, "")]
    report = gpu_check.run_check(parts, tmp_path, probe_fn=has_gpu)
    got = {name: (r["status"], r["summary"]) for name, r in report["parts"].items()}
    assert got == {"hangs": ("failed", "timed out after 1 s (its time limit)"),
                   "raises": ("failed", "ValueError: bad thing"),
                   "fails": ("failed", "2 cases outside tolerance"),
                   "dies": ("failed", "its process died (exit code 3)"),
                   "passes": ("passed", "fine")}
    assert report["parts"]["passes"]["figure"] == 1.5 and report["parts"]["passes"]["limit_s"] == 30
    assert report["ran_on_gpu"] is True


def test_the_total_budget_and_a_failed_probe_skip_parts(tmp_path):
    never = [Part("a", lambda ctx: pytest.fail("must not run"), 30, "")]
    spent = gpu_check.run_check(never, tmp_path, probe_fn=has_gpu, total_limit_s=gpu_check.MIN_PART_S - 1)
    assert spent["parts"]["a"]["status"] == "skipped" and "budget is spent" in spent["parts"]["a"]["summary"]

    def broken_probe(ctx):
        raise ImportError("no torch")

    failed = gpu_check.run_check(never, tmp_path, probe_fn=broken_probe)
    assert failed["parts"]["a"] == {"status": "skipped",
                                    "summary": "the device probe failed: ImportError: no torch"}


FAKE_TRAINER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    out, mode = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(exist_ok=True)
    if (out / "last.pt").exists():
        if mode != "no-resume":
            print(f"resumed from {out / 'last.pt'} at epoch 1, step 20", flush=True)
        (out / "summary.json").write_text(json.dumps({"stopped_early": False, "epochs_done": 2, "steps": 80,
            "final": {"heads": {"main": {"top1": 91.5}}}}))
        sys.exit(0)
    if mode == "quick":
        sys.exit(0)
    (out / "last.pt").write_text("checkpoint")
    time.sleep(300)
""")


@pytest.mark.parametrize("mode", ["ok", "no-resume", "quick"])
def test_kill_and_resume_harness_with_a_stand_in_trainer(tmp_path, mode):
    script = tmp_path / "trainer.py"
    script.write_text(FAKE_TRAINER)
    out, log = tmp_path / "run", tmp_path / "train.log"
    cmd = [sys.executable, str(script), str(out), mode]
    if mode == "ok":
        result = gpu_check.kill_and_resume(cmd, out, log)
        assert result["resumed_at_step"] == 20 and result["steps"] == 80
        assert result["summary"] == ("killed after its first checkpoint, resumed at step 20, finished 2 epochs "
                                     "(80 steps), val top-1 91.50%")
        return
    with pytest.raises(PartFailed, match="did not resume" if mode == "no-resume" else "before it could be killed"):
        gpu_check.kill_and_resume(cmd, out, log)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU these commands would run for real")
def test_the_commands_parse_and_stop_only_for_the_missing_gpu(capsys, tmp_path):
    """Each command gpu_check runs, run here: its flags must parse; it may only stop for want of a GPU."""
    from benchmarks import bench_loss, throughput
    from dhm_fast import cli

    commands = [(throughput.main, [*gpu_check.THROUGHPUT_ARGS, "--device", "cuda", "--out", str(tmp_path)]),
                (bench_loss.main, gpu_check.loss_bench_args("bfloat16", tmp_path)),
                (cli.main, gpu_check.train_args(tmp_path / "train")),
                (cli.main, gpu_check.backbone_args(tmp_path / "backbone"))]
    for main, argv in commands:
        try:
            status = main(argv)
        except SystemExit as stop:
            status = stop.code
        err = capsys.readouterr().err + (status if isinstance(status, str) else "")
        assert status not in (0, None) and "usage:" not in err and "no GPU" in err.replace("no CUDA GPU", "no GPU")


def test_benchmark_summaries():
    loss = {"float32": {"rows": [{"H": 3, "B": 256, "K": 1000, "fused_bytes_per_s": 2.0e12,
                                  "fused_bandwidth_fraction": 0.42},
                                 {"H": 3, "B": 128, "K": 100, "fused_bytes_per_s": 5.0e11}]},
            "bfloat16": {"rows": [{"H": 3, "B": 128, "K": 100}]}}
    assert gpu_check.summarise_loss_bench(loss) == ("fused op float32: 2000 GB/s = 42% of peak at H,B,K=3,256,1000; "
                                                    "bfloat16: no fused timing")
    rows = [{"name": "baseline", "img_per_s": {"median": 2500.0}},
            {"name": "dhm", "img_per_s": {"median": 2000.0}, "time_ratio": {"median": 1.25}, "flop_ratio": 1.2,
             "time_over_flop_ratio": 1.25 / 1.2}]
    data = {"methods": rows, "targets": {"dhm_time_over_flop_ratio": {"target": 1.1}}}
    assert gpu_check.summarise_throughput(data) == ("DHM/baseline step time 1.25x vs FLOPs 1.20x (time/FLOP 1.04, "
                                                    "target <= 1.10); baseline 2500 img/s, DHM 2000 img/s")
