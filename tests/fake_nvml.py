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
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15


class FakeNVMLError(Exception):
    """Shaped like ``pynvml.NVMLError``: the return code is in ``.value``."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {
            NOT_SUPPORTED: "Not Supported",
            LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
            FUNCTION_NOT_FOUND: "Function Not Found",
        }.get(self.value, f"fake NVML error {self.value}")


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
    mig: list[FakeDevice] | None = None
    """MIG mode: ``None`` disabled, else the GPU instances (their handles are ``(gpu index, slice index)``).
    A MIG slice's ``name`` is like ``"NVIDIA A100-SXM4-80GB MIG 1g.10gb"``; NVML reads no utilization, power
    or energy for one (NOT_SUPPORTED): build slices with ``gpu_util=None, power_mw=None, energy_mj=None``."""
    persistence_mode: int = 1
    """``nvmlDeviceGetPersistenceMode``: 1 enabled, 0 disabled."""
    compute_pids: Source = field(default_factory=list)
    """PIDs of the compute processes on the GPU (a list; a callable of time for a changing set)."""
    errors: dict[str, Callable[[int], int | None]] = field(default_factory=dict)
    """function name -> (call number -> NVML error code to raise, or None)."""
    served: dict[str, list[tuple[float, Any]]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)


class FakeNvml:
    """The fake library. ``devices`` are in NVML index order; handles are the indices."""

    NVMLError = FakeNVMLError

    def __init__(
        self,
        devices: list[FakeDevice],
        *,
        init_error: int | None = None,
        driver_version: str = "550.54.15",
        driver_lacks: frozenset[str] = frozenset(),
    ) -> None:
        """Args:
        devices: The GPUs, in NVML index order.
        init_error: NVML error code ``nvmlInit`` raises (no library, no driver ...).
        driver_version: What ``nvmlSystemGetDriverVersion`` returns (pynvml decodes it to ``str``).
        driver_lacks: NVML functions this "driver" predates. pynvml (nvidia-ml-py 12.535+) defines every
            function in Python and looks the C symbol up on the first call: a missing one raises
            ``NVMLError_FunctionNotFound`` (code 13), e.g. ``nvmlDeviceGetCurrentClocksEventReasons`` on
            drivers before R535, where only ``nvmlDeviceGetCurrentClocksThrottleReasons`` exists.
        """
        self.devices = devices
        self.init_error = init_error
        self.driver_version = driver_version
        self.driver_lacks = driver_lacks
        self.missing_calls: list[str] = []  # calls of functions the driver lacks, in order
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

    def _symbol(self, name: str) -> None:
        """pynvml's ``_nvmlGetFunctionPointer``: FUNCTION_NOT_FOUND for a symbol the driver lacks."""
        if name in self.driver_lacks:
            self.missing_calls.append(name)
            raise FakeNVMLError(FUNCTION_NOT_FOUND)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._symbol("nvmlSystemGetDriverVersion")
        return self.driver_version

    # devices
    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.devices):
            raise FakeNVMLError(2)  # INVALID_ARGUMENT
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int | tuple[int, int]:
        for i, d in enumerate(self.devices):
            if d.uuid == uuid:
                return i
            for j, m in enumerate(d.mig or []):
                if m.uuid == uuid:
                    return (i, j)
        raise FakeNVMLError(6)  # NOT_FOUND

    def _device(self, handle: int | tuple[int, int]) -> FakeDevice:
        if isinstance(handle, tuple):
            return self.devices[handle[0]].mig[handle[1]]  # type: ignore[index]
        return self.devices[handle]

    def nvmlDeviceGetMigMode(self, handle: int | tuple[int, int]) -> list[int]:
        """[current, pending] (1 = enabled); NOT_SUPPORTED on a MIG slice's own handle, as NVML does."""
        if isinstance(handle, tuple):
            raise FakeNVMLError(NOT_SUPPORTED)
        enabled = int(self.devices[handle].mig is not None)
        return [enabled, enabled]

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._device(handle).uuid

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._device(handle).name

    # readings
    def _serve(self, handle: int, fn: str, source: Source) -> Any:
        d = self._device(handle)
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
        d = self._device(handle)
        gpu = self._serve(handle, "util", d.gpu_util)
        return SimpleNamespace(gpu=gpu, memory=self._serve(handle, "mem_util", d.mem_util))

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        used = self._serve(handle, "memory", self._device(handle).mem_used_bytes)
        return SimpleNamespace(used=used, total=80 << 30, free=(80 << 30) - used)

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._serve(handle, "power", self._device(handle).power_mw)

    def nvmlDeviceGetClockInfo(self, handle: int, clock: int) -> int:
        return self._serve(handle, "clock", self._device(handle).sm_clock_mhz)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._serve(handle, "temperature", self._device(handle).temperature_c)

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        self._symbol("nvmlDeviceGetCurrentClocksEventReasons")
        return self._serve(handle, "throttle", self._device(handle).throttle)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: int) -> int:
        """The pre-R535 name of the same reading (deprecated, still exported by newer drivers)."""
        self._symbol("nvmlDeviceGetCurrentClocksThrottleReasons")
        return self._serve(handle, "throttle", self._device(handle).throttle)

    def nvmlDeviceGetPersistenceMode(self, handle: int) -> int:
        return self._device(handle).persistence_mode

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        """Like pynvml's: process infos with ``pid`` and ``usedGpuMemory`` (``None`` when NVML cannot say)."""
        d = self._device(handle)
        pids = d.compute_pids(time.perf_counter() - self.t0) if callable(d.compute_pids) else d.compute_pids
        return [SimpleNamespace(pid=p, usedGpuMemory=None, gpuInstanceId=0xFFFFFFFF) for p in pids]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        return self._serve(handle, "energy", self._device(handle).energy_mj)


def uuid(i: int) -> str:
    return f"GPU-{i:x}{i:x}{i:x}{i:x}0000-1111-2222-3333-44445555666{i}"


def mig_uuid(i: int, j: int) -> str:
    return f"MIG-{i:x}{j:x}{i:x}{j:x}aaaa-bbbb-cccc-dddd-eeeeffff000{j}"


def fake_gpus(n: int = 1, *, driver_version: str = "550.54.15", **kwargs: Any) -> FakeNvml:
    """A fake with ``n`` identical devices built from ``kwargs``."""
    return FakeNvml([FakeDevice(uuid=uuid(i), **kwargs) for i in range(n)], driver_version=driver_version)


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
