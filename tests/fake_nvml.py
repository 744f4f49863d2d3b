"""A fake NVML library (the ``pynvml`` function names) whose readings are series the test controls.

Every reading is drawn from a per-device source: a constant, a list served in order (the last value
repeats), or a callable of the fake's clock. Every value served is logged, so a test can compare what a
monitor stored with what the "GPU" reported. Errors are injected per function and call number.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NOT_SUPPORTED = 3
NO_PERMISSION = 4
LIBRARY_NOT_FOUND = 12
GPU_IS_LOST = 15


class FakeNVMLError(Exception):
    """Shaped like ``pynvml.NVMLError``: the return code is in ``.value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {NOT_SUPPORTED: "Not Supported", LIBRARY_NOT_FOUND: "NVML Shared Library Not Found"}.get(
            self.value, f"fake NVML error {self.value}"
        )


Source = Any  # a constant, a list (served in order, last repeats), or a callable of elapsed seconds


@dataclass
class FakeDevice:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    gpu_util: Source = 50
    mem_util: Source = 20
    mem_used_bytes: Source = 1 << 30
    power_mw: Source = 200_000
    sm_clock_mhz: Source = 1410
    temperature_c: Source = 60
    throttle: Source = 0
    energy_mj: Source | None = 0
    """``None``: the GPU has no total-energy counter (NOT_SUPPORTED)."""
    errors: dict[str, Callable[[int], int | None]] = field(default_factory=dict)
    """function name -> (call number -> NVML error code to raise, or None)."""
    served: dict[str, list[tuple[float, Any]]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


class FakeNvml:
    """The fake library. ``devices`` are in NVML index order; handles are the indices."""

    NVMLError = FakeNVMLError

    def __init__(self, devices: list[FakeDevice], *, init_error: int | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.inits = 0
        self.shutdowns = 0
        self.t0 = time.perf_counter()

    # lifecycle
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    # devices
    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.devices):
            raise FakeNVMLError(2)  # INVALID_ARGUMENT
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for i, d in enumerate(self.devices):
            if d.uuid == uuid:
                return i
        raise FakeNVMLError(6)  # NOT_FOUND

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self.devices[handle].uuid

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.devices[handle].name

    # readings
    def _serve(self, handle: int, fn: str, source: Source) -> Any:
        d = self.devices[handle]
        n = d.calls.get(fn, 0)
        d.calls[fn] = n + 1
        code = d.errors[fn](n) if fn in d.errors else None
        if code is not None:
            raise FakeNVMLError(code)
        if source is None:
            raise FakeNVMLError(NOT_SUPPORTED)
        t = time.perf_counter() - self.t0
        if callable(source):
            value = source(t)
        elif isinstance(source, list):
            value = source[min(n, len(source) - 1)]
        else:
            value = source
        if value is None:
            raise FakeNVMLError(NOT_SUPPORTED)
        d.served.setdefault(fn, []).append((time.perf_counter(), value))
        return value

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        d = self.devices[handle]
        gpu = self._serve(handle, "util", d.gpu_util)
        return SimpleNamespace(gpu=gpu, memory=self._serve(handle, "mem_util", d.mem_util))

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        used = self._serve(handle, "memory", self.devices[handle].mem_used_bytes)
        return SimpleNamespace(used=used, total=80 << 30, free=(80 << 30) - used)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._serve(handle, "power", self.devices[handle].power_mw)

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        return self._serve(handle, "clock", self.devices[handle].sm_clock_mhz)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._serve(handle, "temperature", self.devices[handle].temperature_c)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return self._serve(handle, "throttle", self.devices[handle].throttle)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return self._serve(handle, "energy", self.devices[handle].energy_mj)


def uuid(i: int) -> str:
    return f"GPU-{i:x}{i:x}{i:x}{i:x}0000-1111-2222-3333-44445555666{i}"


def fake_gpus(n: int = 1, **kwargs: Any) -> FakeNvml:
    """A fake with ``n`` identical devices built from ``kwargs``."""
    return FakeNvml([FakeDevice(uuid=uuid(i), **kwargs) for i in range(n)])


# Module-level factories: a sampler process rebuilds these by name
# (``open_nvml_gpu(..., nvml_factory="fake_nvml:steady_gpu")``), which in-memory fakes cannot be.


def steady_gpu() -> FakeNvml:
    """One device: 50% utilization, 200 W, and an energy counter that counts 200 J per second exactly."""
    return FakeNvml([FakeDevice(uuid=uuid(0), energy_mj=lambda t: int(t * 200_000))])


def no_energy_counter_gpu() -> FakeNvml:
    """One device without a total-energy counter."""
    return FakeNvml([FakeDevice(uuid=uuid(0), energy_mj=None)])


def crashing_gpu() -> FakeNvml:
    """One device whose third power reading kills the (sampler) process outright."""
    import os

    def power(t: float) -> int:
        if t >= 0 and power.calls >= 2:  # type: ignore[attr-defined]
            os._exit(3)
        power.calls += 1  # type: ignore[attr-defined]
        return 200_000

    power.calls = 0  # type: ignore[attr-defined]
    return FakeNvml([FakeDevice(uuid=uuid(0), power_mw=power)])
