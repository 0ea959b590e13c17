"""What the GPU path does that can be proven on the CPU: the device chosen and set before any loader
exists, precision and layout defaults, and a resume whose host-side state never lands on the GPU.

torch.cuda is replaced by a stand-in that records calls, so the order of events is visible here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dhm_fast.run
from dhm_fast import checkpoint, distributed, precision
from dhm_fast.config import build_config
from dhm_fast.errors import UserError


class FakeCuda:
    """Just enough of torch.cuda for device selection; every call lands in `events`."""

    def __init__(self, monkeypatch, count: int, bf16: bool = True) -> None:
        self.events: list[str] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.events.append(f"set_device {torch.device(d)}"))


class LoadersReached(Exception):
    pass


def run_until_loaders(monkeypatch, fake: FakeCuda, args: dict) -> None:
    """Build a Run up to its first loader; the stand-in loader factory records when it was called."""
    def create_loaders(config):
        fake.events.append(f"create_loaders on {config.device}")
        raise LoadersReached

    monkeypatch.setattr(dhm_fast.run, "create_loaders", create_loaders)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: fake.events.append("init_pg"))
    monkeypatch.setattr(distributed, "_attempt_store", lambda timeout: None)
    with pytest.raises(LoadersReached):
        dhm_fast.run.Run(build_config(None, {"out": "/tmp/unused-dhm-gpu-path", **args}))


@pytest.mark.parametrize("env, device, count, expected", [
    ({}, "cuda:1", 2, "cuda:1"),  # one process on the second GPU
    ({}, "cuda", 2, "cuda:0"),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"}, "cuda", 4, "cuda:3"),  # torchrun
    ({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "5"}, "auto", 1, "cuda:0"),  # one GPU per task (SLURM)
])
def test_each_process_sets_its_gpu_before_any_loader_exists(monkeypatch, env, device, count, expected):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    fake = FakeCuda(monkeypatch, count)
    run_until_loaders(monkeypatch, fake, {"device": device})
    assert fake.events[0] == f"set_device {expected}", fake.events
    assert fake.events[-1] == f"create_loaders on {expected}"


def test_a_gpu_index_beyond_the_visible_ones_is_one_line(monkeypatch):
    FakeCuda(monkeypatch, 2)
    with pytest.raises(UserError, match="--device cuda:2: only 2 GPU"):
        distributed.process_device("cuda:2", distributed.World())


@pytest.mark.parametrize("bf16, deterministic, expected", [
    (True, False, ("bf16", True, True)),
    (False, False, ("fp16", True, True)),  # pre-Ampere: fp16 with a GradScaler
    (True, True, ("bf16", True, False)),  # --deterministic keeps TF32 off
])
def test_cuda_defaults_are_amp_channels_last_and_tf32(monkeypatch, bf16, deterministic, expected):
    FakeCuda(monkeypatch, 1, bf16=bf16)
    speed = precision.choose("auto", None, torch.device("cuda", 0), deterministic)
    assert (speed.amp, speed.channels_last, speed.tf32) == expected
    assert speed.needs_scaler == (expected[0] == "fp16")
    assert any(note.startswith(f"--amp auto -> {expected[0]}") for note in speed.notes)


@pytest.mark.parametrize("flags, amp, channels_last", [
    ("avx2 avx512f avx512_bf16", "bf16", True),  # native bf16 (Zen 4/5, Cooper Lake)
    ("avx2 avx512f amx_bf16 amx_tile", "bf16", True),  # AMX (Sapphire Rapids)
    ("avx2 avx512f", "none", True),  # AVX-512 without bf16 (Skylake-X): fp32, channels-last
    ("sse4_2 avx2 fma", "none", True),  # AVX2 only
    ("sse4_2 avx", "none", False),  # below AVX2: not measured, NCHW
    ("", "none", False),  # no flags known (not Linux, or not x86)
])
def test_cpu_defaults_follow_what_the_cpu_computes_natively(monkeypatch, flags, amp, channels_last):
    # bf16 only where native; channels-last measured faster from AVX2 up (docs/configuration.md)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags.split()))
    speed = precision.choose("auto", None, torch.device("cpu"), False)
    assert (speed.amp, speed.channels_last, speed.tf32) == (amp, channels_last, False)
    assert any(note.startswith(f"channels-last {'on' if channels_last else 'off'}") for note in speed.notes)


def test_cpu_flags_are_read_from_proc_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), None) \
        if cpuinfo.is_file() else None
    if line is None:
        pytest.skip("no x86 flags line in /proc/cpuinfo")
    assert precision.cpu_flags() == frozenset(line.partition(":")[2].split()) and len(precision.cpu_flags()) > 2
    assert not {"flags", ":"} & precision.cpu_flags()  # only the flag names


def test_explicit_settings_are_kept_and_fp16_on_the_cpu_is_refused():
    speed = precision.choose("bf16", True, torch.device("cpu"), False)
    assert (speed.amp, speed.channels_last, speed.notes) == ("bf16", True, [])
    with pytest.raises(UserError, match="--amp fp16 needs a CUDA device"):
        precision.choose("fp16", None, torch.device("cpu"), False)


def test_the_cuda_defaults_reach_the_run_and_its_log(monkeypatch, capsys):
    fake = FakeCuda(monkeypatch, 1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    captured = {}

    def create_loaders(config):
        captured["channels_last"] = config.channels_last
        raise LoadersReached

    monkeypatch.setattr(dhm_fast.run, "create_loaders", create_loaders)
    with pytest.raises(LoadersReached):
        dhm_fast.run.Run(build_config("imagenet-resnet50", {"out": "/tmp/unused-dhm-gpu-path"}))
    assert captured["channels_last"] is True and fake.events == ["set_device cuda:0"]
    out = capsys.readouterr().out
    assert "--amp auto -> bf16" in out and "TF32 matmuls/convolutions on" in out


def test_resume_restores_host_state_from_cpu_tensors_whatever_the_device(tmp_path, monkeypatch):
    """A checkpoint mapped onto the training device would hand torch.set_rng_state a device tensor
    (TypeError on a GPU). The meta device stands in for the GPU: nothing host-side may land there."""
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    cfg = build_config(None, {"out": str(tmp_path / "run"), "train_subset": 64, "max_steps": 1,
                              "batch_size": 32, "device": "cpu", "log_every_steps": 1})
    run = dhm_fast.run.Run(cfg)
    run.train()
    torch.manual_seed(1234)
    expected = torch.get_rng_state()
    saved = checkpoint.load(tmp_path / "run" / checkpoint.LAST)
    resumed = dhm_fast.run.Run(cfg)
    resumed.device = torch.device("meta")  # what map_location would have been on a GPU
    resumed.resume(tmp_path / "run" / checkpoint.LAST)
    assert torch.equal(torch.get_rng_state(), saved["rng"]["torch"])
    assert not torch.equal(torch.get_rng_state(), expected)
    assert resumed.progress.step == 1


class StandInTelemetry:
    """What an NVML sampler hands the trainer at each log interval."""

    def __init__(self) -> None:
        self.calls = 0

    def start(self) -> bool:
        return True

    def take(self) -> dict:
        self.calls += 1
        return {"gpu_util_pct": 90.0 + self.calls, "memory_used_mib": 1024.0}

    def stop(self) -> None:
        pass


def test_gpu_telemetry_lands_in_every_interval_record_and_nothing_without_it(tmp_path, monkeypatch):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    from dhm_fast import logbook, telemetry

    # 4 of the 6 steps of an epoch: two interval records, no evaluation
    args = {"train_subset": 192, "max_steps": 4, "batch_size": 32, "log_every_steps": 2, "device": "cpu"}
    dhm_fast.run.Run(build_config(None, {"out": str(tmp_path / "plain"), **args})).train()
    assert all("gpus" not in r for r in logbook.read_log(tmp_path / "plain", kind=None))  # the CPU: no NVML
    monkeypatch.setattr(telemetry, "for_device", lambda device, interval_s: StandInTelemetry())
    dhm_fast.run.Run(build_config(None, {"out": str(tmp_path / "gpu"), **args})).train()
    records = logbook.read_log(tmp_path / "gpu", kind="interval")
    assert [r["gpus"] for r in records] == [[{"gpu_util_pct": 91.0, "memory_used_mib": 1024.0}],
                                           [{"gpu_util_pct": 92.0, "memory_used_mib": 1024.0}]]
    assert all(r["img_per_s_per_process"] > 0 for r in records)
