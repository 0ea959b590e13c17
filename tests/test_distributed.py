"""Multi-process training for real: torchrun and plain processes, gloo on the CPU, Fashion-MNIST slices.

The worker side lives in tests/dist_worker.py. Every multi-process run here uses 2 processes with one
thread each (the CI machine has 2 cores).
"""

from __future__ import annotations

import gzip
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dhm_fast import checkpoint, distributed, logbook
from dhm_fast.cli import main
from dhm_fast.config import build_config
from dhm_fast.errors import UserError
from dhm_fast.global_batch import micro_batch, scale_lr
from dhm_fast.sampling import BranchSampler
from pipelines.small_datasets import FASHION_FILES, _read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")
ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")

N_TRAIN, N_VAL = 256, 301  # an odd validation set: the two shards differ by one sample
COMMON = ["--loader", "memory", "--amp", "none", "--no-channels-last", "--batch-size", "32", "--lr", "0.02",
          "--lr-schedule", "constant", "--log-every-steps", "4", "--dist-timeout", "30", "--deterministic"]
RUN = ["--epochs", "3", "--branch-prob", "0.5"]  # 24 steps
STEPS = 3 * N_TRAIN // 32


def write_fashion_slice(dst: Path, n_train: int, n_val: int) -> Path:
    """The first images of each split of the real Fashion-MNIST, as the same four IDX .gz files."""
    dst.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_val)):
        for name, ndim in zip(FASHION_FILES[split], (3, 1), strict=True):
            data = _read_idx(FASHION / name, ndim)[:n]
            header = struct.pack(">I", 0x0800 + ndim) + struct.pack(f">{ndim}I", *data.shape)
            with gzip.open(dst / name, "wb", compresslevel=1) as f:
                f.write(header + data.tobytes())
    return dst


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    if not FASHION.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist not installed")
    return str(write_fashion_slice(tmp_path_factory.mktemp("fashion"), N_TRAIN, N_VAL))


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    out.update(OMP_NUM_THREADS="1", DHM_FAST_TEST_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    return out


def torchrun_cmd(*args: str, nproc: int = 2, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", "--monitor-interval=0.5", *args]


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(), timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_log(out: Path) -> list[dict]:
    return logbook.read_log(out)  # the per-epoch records


# --- a real 2-process run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
    """3 epochs of ResNet-20 + DHM, branches on with probability 0.5, on 2 processes via torchrun."""
    tmp = tmp_path_factory.mktemp("ddp")
    out, record = tmp / "run", tmp / "record"
    args = [*COMMON, "--data-dir", data_dir, *RUN, "--out", str(out)]
    result = run(torchrun_cmd(str(WORKER), "train", str(record), "--", *args))
    ranks = [torch.load(record / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return out, ranks, result.stdout, args


@needs_fashion
@pytest.mark.slow
def test_replicas_stay_bitwise_identical_and_the_loss_decreases(two_process_run):
    out, ranks, stdout, _ = two_process_run
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and ranks[0]["world_size"] == 2
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    saved = checkpoint.load(out / "last.pt")
    assert all(torch.equal(a[k], saved["model"][k]) for k in a)
    assert saved["progress"]["step"] == STEPS
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2]  # rank 0 alone writes: one record per epoch
    # The main head runs every step; the total loss sums over whichever branches the sampler drew.
    main_ce = [r["train"]["heads"]["main"]["ce"] for r in log]
    assert main_ce[2] < main_ce[1] < main_ce[0] and main_ce[2] < 0.85 * main_ce[0], main_ce
    assert log[-1]["val"]["heads"]["main"]["top1"] > 25  # chance: 10%
    assert stdout.count("epoch 1/3: train loss") == 1
    assert log[0]["batch"] == {"global": 32, "per_process": 16, "micro": 16, "grad_accum": 1, "processes": 2}


@needs_fashion
@pytest.mark.slow
def test_every_training_sample_is_used_once_per_epoch_across_processes(two_process_run):
    out, ranks, _, _ = two_process_run
    for epoch in range(3):
        shards = [[i for e, idx in r["samples"] if e == epoch for i in idx] for r in ranks]
        assert len(shards[0]) == len(shards[1]) == N_TRAIN // 2
        assert sorted(shards[0] + shards[1]) == list(range(N_TRAIN))
    assert [r["train"]["samples"] for r in read_log(out)] == [N_TRAIN] * 3  # reduced over processes


@needs_fashion
@pytest.mark.slow
def test_reduced_validation_equals_a_single_process_evaluation(two_process_run, data_dir):
    from dhm_fast.run import evaluate_weights

    out, _, _, args = two_process_run
    logged = read_log(out)[-1]["val"]
    assert logged["samples"] == N_VAL  # every validation sample once
    cfg = build_config(None, {"eval_only": True, "weights": str(out / "last.pt"), "data_dir": data_dir,
                              "loader": "memory", "amp": "none", "channels_last": False, "batch_size": 50})
    single = evaluate_weights(cfg)
    assert single["samples"] == N_VAL
    for head, h in single["heads"].items():
        assert logged["heads"][head]["top1"] == h["top1"] and logged["heads"][head]["top5"] == h["top5"]
        assert logged["heads"][head]["ce"] == pytest.approx(h["ce"], rel=1e-5)


@needs_fashion
@pytest.mark.slow
def test_branch_sampling_draws_the_same_active_set_on_every_process(two_process_run):
    _, ranks, _, _ = two_process_run
    steps = STEPS
    a, b = ranks[0]["actives"], ranks[1]["actives"]
    assert a == b and [s for s, _ in a] == list(range(steps))
    sampler = BranchSampler(3, 0.5, "step", seed=0)
    assert all(flags == sampler.active(s // (steps // 3), s) for s, flags in a)
    patterns = {flags for _, flags in a}
    assert (True, True, True) in patterns and len(patterns) >= 3  # branches really were skipped


# --- gradient accumulation == more processes -------------------------------------------------------

@pytest.mark.slow
def test_accumulation_gives_the_gradients_of_more_processes(tmp_path):
    """Global batch 16: 1 process x 2 micro-batches, 2 processes x 1, 1 process x 1 (no norm layers)."""
    run([sys.executable, str(WORKER), "accum", str(tmp_path / "1x2.pt"), "2"])
    run([sys.executable, str(WORKER), "accum", str(tmp_path / "1x1.pt"), "1"])
    run(torchrun_cmd(str(WORKER), "accum", str(tmp_path / "2x1.pt"), "1"))
    one_by_two, two_by_one, whole = (torch.load(tmp_path / f"{n}.pt") for n in ("1x2", "2x1", "1x1"))
    # Branch sampling skipped a branch in the last step: its parameters got no gradient (not a zero one)
    # under DDP either, so momentum and weight decay left them alone, as in a single process.
    assert one_by_two["actives"][-1] == (True, True, False)
    for ref in (two_by_one, whole):
        for k, v in one_by_two["grads"].items():
            assert (v is None) == (ref["grads"][k] is None), k
            if v is not None:
                torch.testing.assert_close(v, ref["grads"][k], rtol=1e-5, atol=1e-7)
        for k, v in one_by_two["weights"].items():
            torch.testing.assert_close(v, ref["weights"][k], rtol=1e-5, atol=1e-7)
    assert one_by_two["grads"]["aux2.weight"] is None and one_by_two["grads"]["aux1.0.weight"] is not None
    assert one_by_two["grads"]["main.weight"].abs().sum() > 0


# --- faults ----------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_checkpoint(path: Path, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        assert all(p.poll() is None for p in procs), "a process ended before the first checkpoint"
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


FAULT_RUN = [*RUN, "--save-every-steps", "3"]  # the run above, with a checkpoint every 3 steps


def assert_same_as_uninterrupted(out: Path, reference: Path) -> None:
    """A crashed-and-resumed run ends bitwise where the uninterrupted one did, with one record per epoch."""
    a, b = checkpoint.load(out / "last.pt"), checkpoint.load(reference / "last.pt")
    assert a["progress"]["step"] == STEPS
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    log, ref_log = read_log(out), read_log(reference)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert [r["train"]["samples"] for r in log] == [N_TRAIN] * 3  # the resumed epoch's sums are not doubled
    assert [r["val"] for r in log] == [r["val"] for r in ref_log]
    assert [r["train"]["heads"]["main"]["top1"] for r in log] == [r["train"]["heads"]["main"]["top1"]
                                                                   for r in ref_log]


def fail_one_of_two(args: list[str], out: Path, tmp_path: Path, sig: int) -> tuple[int, float, str]:
    """Start 2 processes as torchrun would, but without its agent (the survivor must act alone); after
    the first checkpoint send `sig` to rank 1. Returns rank 0's exit code, its time to exit, its output."""
    port = str(free_port())
    procs, logs = [], []
    for rank in range(2):
        logs.append(open(tmp_path / f"rank{rank}.txt", "w+"))  # noqa: SIM115
        procs.append(subprocess.Popen(args, cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT, env=env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port)))
    try:
        wait_for_checkpoint(out / "last.pt", procs)
        procs[1].send_signal(sig)
        failed_at = time.monotonic()
        code = procs[0].wait(timeout=120)
        waited = time.monotonic() - failed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    return code, waited, (tmp_path / "rank0.txt").read_text()


def assert_mid_run_checkpoint(out: Path) -> int:
    step = checkpoint.load(out / "last.pt")["progress"]["step"]  # loads: intact
    assert step % 3 == 0 and 3 <= step < STEPS
    return step


@needs_fashion
@pytest.mark.slow
def test_a_killed_process_stops_its_peer_and_a_relaunch_resumes(data_dir, tmp_path, two_process_run):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), *COMMON, "--data-dir", data_dir, *FAULT_RUN,
            "--out", str(out)]
    code, waited, survivor = fail_one_of_two(args, out, tmp_path, signal.SIGKILL)
    assert code != 0 and waited < 60, (code, waited, survivor[-2000:])
    assert "peer process died" in survivor, survivor[-2000:]
    step = assert_mid_run_checkpoint(out)
    result = run(torchrun_cmd(*args[1:]))  # the same command under torchrun picks up last.pt
    assert f"resumed from {out / 'last.pt'}" in result.stdout and f"step {step}" in result.stdout
    assert_same_as_uninterrupted(out, two_process_run[0])


@needs_fashion
@pytest.mark.slow
def test_a_hung_process_makes_its_peer_time_out(data_dir, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), *COMMON, "--data-dir", data_dir, *FAULT_RUN,
            "--out", str(out), "--dist-timeout", "15"]  # the last --dist-timeout wins
    code, waited, survivor = fail_one_of_two(args, out, tmp_path, signal.SIGSTOP)  # alive, silent
    assert code != 0 and 10 < waited < 60, (code, waited, survivor[-2000:])
    assert "peer process died, hung or became unreachable" in survivor, survivor[-2000:]
    assert_mid_run_checkpoint(out)


@needs_fashion
@pytest.mark.slow
def test_torchrun_restarts_the_group_which_resumes_by_itself(data_dir, tmp_path, two_process_run):
    out = tmp_path / "run"
    cmd = torchrun_cmd(str(ROOT / "train.py"), *COMMON, "--data-dir", data_dir, *FAULT_RUN, "--out", str(out),
                       restarts=1)
    with open(tmp_path / "torchrun.txt", "w+") as log:
        agent = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env())
        try:
            wait_for_checkpoint(out / "last.pt", [agent])
            workers = children(agent.pid)
            assert len(workers) == 2, workers
            os.kill(workers[1], signal.SIGKILL)
            code = agent.wait(timeout=240)
        finally:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
        log.seek(0)
        text = log.read()
    assert code == 0, text[-3000:]
    assert "resumed from" in text
    assert_same_as_uninterrupted(out, two_process_run[0])


# --- flags, batch rules, single process ------------------------------------------------------------------

def test_sync_bn_on_the_cpu_is_one_clear_line(capsys, tmp_path):
    code = main(["--sync-bn", "--device", "cpu", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--sync-bn needs CUDA" in err


def test_the_global_batch_must_split_evenly(capsys, tmp_path):
    code = main(["--batch-size", "30", "--grad-accum", "4", "--device", "cpu", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--batch-size 30 (the global batch) does not split evenly over 1 process(es) x 4" in err


def test_micro_batch():
    assert micro_batch(256, 8, 1) == 32 and micro_batch(256, 2, 4) == 32 and micro_batch(7, 1, 1) == 7
    with pytest.raises(UserError, match="use a multiple of 6"):
        micro_batch(256, 3, 2)
    with pytest.raises(UserError, match="--grad-accum must be at least 1"):
        micro_batch(256, 1, 0)


@pytest.mark.parametrize(
    "batch, lr, warmup, scale, expect_lr, expect_warmup",
    [
        (256, None, None, True, 0.1, 0.0),  # the recipe's batch: the recipe's rate
        (1024, None, None, True, 0.4, 5.0),  # 4x the batch: 4x the rate, Goyal's 5-epoch warm-up
        (64, None, None, True, 0.025, 0.0),  # smaller: scaled down, no warm-up added
        (1024, None, 2.0, True, 0.4, 2.0),  # an explicit warm-up wins
        (1024, 0.3, None, True, 0.3, 0.0),  # an explicit lr is used as given
        (1024, None, None, False, 0.1, 0.0),  # --no-scale-lr
    ],
)
def test_linear_scaling_rule(batch, lr, warmup, scale, expect_lr, expect_warmup):
    s = scale_lr(recipe_lr=0.1, recipe_batch=256, batch=batch, epochs=90, recipe_warmup=0.0, enabled=scale,
                 explicit_lr=lr, explicit_warmup=warmup)
    assert s.lr == pytest.approx(expect_lr) and s.warmup_epochs == pytest.approx(expect_warmup)


def test_recipes_scale_with_the_global_batch():
    base = build_config("imagenet-resnet50", {})
    assert (base.batch_size, base.lr, base.reference_batch_size) == (256, 0.1, 256)
    big = build_config("imagenet-resnet50", {"batch_size": 2048})
    assert big.lr == pytest.approx(0.8) and big.warmup_epochs == pytest.approx(5.0)
    short = build_config(None, {"batch_size": 512, "epochs": 3})  # default recipe: batch 128, lr 0.1, warm-up 0.2
    assert short.lr == pytest.approx(0.4) and short.warmup_epochs == pytest.approx(0.3)
    assert build_config(None, {"batch_size": 512, "lr": 0.2}).lr == 0.2
    assert build_config(None, {"batch_size": 512, "scale_lr": False}).lr == 0.1


def test_world_from_env():
    assert distributed.world_from_env({}) == distributed.World(0, 0, 1)
    w = distributed.world_from_env({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"})
    assert (w.rank, w.local_rank, w.world_size, w.is_main, w.distributed) == (5, 1, 8, False, True)
    with pytest.raises(UserError, match="RANK=3, LOCAL_RANK=3, WORLD_SIZE=2"):
        distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="must be integers"):
        distributed.world_from_env({"RANK": "x", "WORLD_SIZE": "2"})


@needs_fashion
def test_a_single_process_needs_no_launcher_and_accumulates(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main([*COMMON, "--data-dir", data_dir, "--grad-accum", "2", "--max-steps", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert not torch.distributed.is_initialized()
    assert "global 32 = 1 process(es) x 32 per process (2 micro-batch(es) of 16)" in capsys.readouterr().out
    saved = checkpoint.load(out / "last.pt")
    assert saved["progress"]["step"] == 2 and saved["meter"]["samples"] == 64 and saved["world_size"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_compile_makes_one_graph_per_branch_pattern_also_around_ddp(data_dir, tmp_path, nproc):
    """--compile with DDP compiles the DDP-wrapped module: each branch pattern is compiled once per
    process (Dynamo's DDP optimizer may split it at bucket boundaries), never once per step."""
    record = tmp_path / "record"
    # 7 of the epoch's 8 steps: training graphs only (evaluation compiles graphs of its own)
    args = [*COMMON, "--data-dir", data_dir, "--epochs", "1", "--max-steps", "7", "--branch-prob", "0.5",
            "--compile", "--out", str(tmp_path / "run")]
    run(torchrun_cmd(str(WORKER), "compile", str(record), "--", *args, nproc=nproc))
    for rank in range(nproc):
        saved = torch.load(record / f"rank{rank}.pt", weights_only=True)
        assert saved["ddp"] == (nproc > 1)
        patterns = set(saved["steps"])
        assert len(saved["steps"]) == 7 and set(saved["compiles"]) == patterns
        assert len(patterns) >= 2 and len(patterns) < 7, saved  # several patterns, some drawn again
        per_pattern = {p: saved["compiles"].count(p) for p in patterns}
        graphs = per_pattern[saved["steps"][0]]  # DDP's optimizer may split a pattern's graph in buckets
        assert all(n == graphs for n in per_pattern.values()), per_pattern  # compiled once per pattern
        if nproc == 1:
            assert graphs == 1 and saved["frames"] == len(patterns), saved


@pytest.mark.parametrize(("message", "is_peer_failure"), [
    ("Application timeout caused pair closure", True),  # gloo, a hung peer during DDP's backward all-reduce
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500", True),
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 15000ms for recv "
     "operation to complete", True),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
    ("mat1 and mat2 shapes cannot be multiplied (4x512 and 256x10)", False),
])
def test_peer_failures_are_told_from_other_runtime_errors(message, is_peer_failure):
    assert distributed.is_dist_error(RuntimeError(message)) is is_peer_failure
    assert not distributed.is_dist_error(ValueError(message))
