"""GPU telemetry through NVML (package nvidia-ml-py, imported as pynvml), sampled in a thread.

A background thread reads utilisation, memory in use, power draw and the SM clock every `interval_s`,
tagging each sample with the label of what is running. The trainer takes the means since its previous
log record (`take`); a benchmark summarises by label (`summary`). Without a GPU or an NVIDIA driver
the sampler reports "not available" and returns nothing: telemetry never raises.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from typing import Any

FIELDS = ("gpu_util_pct", "memory_used_mib", "power_w", "sm_clock_mhz")


class GpuTelemetry:
    """Context manager: `with GpuTelemetry(0) as tel: tel.set_label("dhm"); ...; tel.summary("dhm")`."""

    def __init__(self, device_index: int = 0, interval_s: float = 0.1, uuid: str | None = None,
                 disabled_reason: str | None = None) -> None:
        self.device_index = device_index
        self.interval_s = interval_s
        self.uuid = uuid  # NVML's "GPU-..." id; preferred, since NVML ignores CUDA_VISIBLE_DEVICES
        self.available = False
        self.disabled_reason = disabled_reason  # set: never touch NVML (e.g. a CPU run)
        self.reason = "not started"
        self.device_name: str | None = None
        self.samples: list[dict[str, Any]] = []
        self._label: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._handle: Any = None

    def start(self) -> bool:
        """Initialise NVML and start sampling; False (with `reason` set) when NVML is unusable."""
        if self.disabled_reason:
            self.reason = f"not available ({self.disabled_reason})"
            return False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            handle = None
            if self.uuid:
                with contextlib.suppress(Exception):  # an unknown UUID: fall back to the index
                    handle = pynvml.nvmlDeviceGetHandleByUUID(self.uuid)
            self._handle = handle or pynvml.nvmlDeviceGetHandleByIndex(self.device_index)
            name = pynvml.nvmlDeviceGetName(self._handle)
        except Exception as err:  # no library, no driver, no permission: all mean "no telemetry"
            self.reason = f"not available ({type(err).__name__}: {err})"
            self.stop()
            return False
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        self.available, self.reason = True, "nvml"
        self._thread = threading.Thread(target=self._run, name="gpu-telemetry", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None

    def __enter__(self) -> GpuTelemetry:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_label(self, label: str | None) -> None:
        """Tag the samples taken from now on (None: untagged, e.g. between timed blocks)."""
        self._label = label

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sample = self.sample_once()
            with self._lock:
                self.samples.append(sample)

    def sample_once(self) -> dict[str, Any]:
        """One reading; a field the GPU cannot report (e.g. power on some boards) is left out."""
        nv, h = self._nvml, self._handle
        sample: dict[str, Any] = {"t": time.perf_counter(), "label": self._label}
        readers = {
            "gpu_util_pct": lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu,
            "memory_used_mib": lambda: nv.nvmlDeviceGetMemoryInfo(h).used / 2**20,
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "sm_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
        }
        for key, read in readers.items():
            with contextlib.suppress(Exception):
                sample[key] = float(read())
        return sample

    def take(self) -> dict[str, float]:
        """Mean of every field over the samples since the previous call ({} when there are none). The
        samples are consumed, so a long run holds only one interval's."""
        with self._lock:
            rows, self.samples = self.samples, []
        return {key: s["mean"] for key, s in _field_stats(rows).items() if s is not None}

    def summary(self, label: str | None = None) -> dict[str, Any]:
        """Mean and max of every field over the samples with `label` (all samples when None)."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        rows = [s for s in self.samples if label is None or s["label"] == label]
        return {"available": True, "device": self.device_name, "samples": len(rows), **_field_stats(rows)}


def _field_stats(rows: list[dict[str, Any]]) -> dict[str, dict[str, float] | None]:
    """Per field: the mean and max over the samples that hold it (None when none does)."""
    out: dict[str, dict[str, float] | None] = {}
    for key in FIELDS:
        values = [s[key] for s in rows if key in s]
        out[key] = {"mean": statistics.fmean(values), "max": max(values)} if values else None
    return out


def for_device(device: Any, interval_s: float = 0.1) -> GpuTelemetry:
    """A sampler for a torch device: the matching NVML GPU for CUDA, an unavailable one otherwise
    (NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, so the GPU is found by its UUID)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return GpuTelemetry(interval_s=interval_s, disabled_reason=f"{device.type} is not a CUDA GPU")
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return GpuTelemetry(index, interval_s, uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
