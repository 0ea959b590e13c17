"""GPU telemetry (dhm_fast.telemetry) without a GPU: no NVML library, a failing driver, no pynvml,
a CPU device, and the sampling arithmetic against a fake NVML."""

from __future__ import annotations

import sys
import types

import pytest

from dhm_fast import telemetry


def _unavailable(tel: telemetry.GpuTelemetry) -> None:
    assert tel.start() is False
    assert tel.available is False and tel.reason.startswith("not available")
    assert tel.summary() == {"available": False, "reason": tel.reason}
    tel.set_label("x")
    tel.stop()  # no thread to stop: must not raise


def test_telemetry_without_the_nvml_library(monkeypatch):
    pynvml = pytest.importorskip("pynvml")

    def raise_missing():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", raise_missing)
    tel = telemetry.GpuTelemetry()
    _unavailable(tel)
    assert "NVMLError" in tel.reason


def test_telemetry_when_nvml_init_raises_anything(monkeypatch):
    pynvml = pytest.importorskip("pynvml")
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: (_ for _ in ()).throw(RuntimeError("driver gone")))
    tel = telemetry.GpuTelemetry()
    _unavailable(tel)
    assert "driver gone" in tel.reason


def test_telemetry_without_pynvml_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with telemetry.GpuTelemetry() as tel:
        assert tel.available is False and "pynvml" in tel.reason


def test_telemetry_on_a_cpu_run_never_touches_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    tel = telemetry.for_device("cpu")
    _unavailable(tel)
    assert "cpu" in tel.reason


def fake_nvml(power_fails: bool) -> types.SimpleNamespace:
    state = {"util": 0}

    def util(handle):
        state["util"] += 10
        return types.SimpleNamespace(gpu=state["util"])

    def power(handle):
        if power_fails:
            raise RuntimeError("not supported")
        return 250_000  # milliwatts

    return types.SimpleNamespace(
        NVML_CLOCK_SM=1, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetHandleByUUID=lambda u: (_ for _ in ()).throw(RuntimeError("unknown uuid")),
        nvmlDeviceGetName=lambda h: b"Fake GPU", nvmlDeviceGetUtilizationRates=util,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30),
        nvmlDeviceGetPowerUsage=power, nvmlDeviceGetClockInfo=lambda h, kind: 1980,
    )


@pytest.mark.parametrize("power_fails", [False, True])
def test_telemetry_sampling_with_a_fake_nvml(monkeypatch, power_fails):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(power_fails))
    tel = telemetry.GpuTelemetry(0, interval_s=3600, uuid="GPU-x")  # the UUID fails: falls back to index
    assert tel.start() is True and tel.device_name == "Fake GPU"
    try:
        tel.set_label("dhm")
        tel.samples.append(tel.sample_once())
        tel.samples.append(tel.sample_once())
        tel.set_label("baseline")
        tel.samples.append(tel.sample_once())
    finally:
        tel.stop()
    s = tel.summary("dhm")
    assert s["available"] is True and s["samples"] == 2
    assert s["gpu_util_pct"] == {"mean": 15.0, "max": 20.0}
    assert s["memory_used_mib"] == {"mean": 3072.0, "max": 3072.0}
    assert s["sm_clock_mhz"]["mean"] == 1980.0
    assert (s["power_w"] is None) if power_fails else (s["power_w"]["mean"] == 250.0)
    assert tel.summary()["samples"] == 3 and tel.summary("baseline")["gpu_util_pct"]["max"] == 30.0


def test_take_returns_the_means_since_the_previous_take(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(power_fails=False))
    tel = telemetry.GpuTelemetry(0, interval_s=3600)
    assert tel.start() is True
    try:
        assert tel.take() == {}  # nothing sampled yet
        tel.samples += [tel.sample_once(), tel.sample_once()]  # utilisation 10, 20
        first = tel.take()
        tel.samples.append(tel.sample_once())  # 30
        second = tel.take()
    finally:
        tel.stop()
    assert first == {"gpu_util_pct": 15.0, "memory_used_mib": 3072.0, "power_w": 250.0, "sm_clock_mhz": 1980.0}
    assert second["gpu_util_pct"] == 30.0 and tel.samples == []


def test_take_without_nvml_is_empty(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    tel = telemetry.GpuTelemetry()
    assert tel.start() is False
    assert tel.take() == {}
    tel.stop()
