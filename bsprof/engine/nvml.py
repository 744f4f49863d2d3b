"""The NVIDIA GPU sampler: NVML readings of the GPU a trial runs on, converted to SI units once, here.

Layering follows Zeus (``zeus/device/gpu/nvidia.py``): this module is the vendor layer. It talks to an
object with the ``pynvml`` function names (:class:`NvmlLibrary`; the real ``pynvml`` module, or a fake in
tests), turns every NVML error into a typed exception (:func:`nvml_error`), and hands the monitor plain
dicts of SI values:

=====================  ==========================================  ==========================
key                    NVML call                                   vendor unit -> SI
=====================  ==========================================  ==========================
``gpu_util_pct``       ``nvmlDeviceGetUtilizationRates().gpu``     percent
``mem_util_pct``       ``nvmlDeviceGetUtilizationRates().memory``  percent (memory controller)
``mem_used_bytes``     ``nvmlDeviceGetMemoryInfo().used``          bytes
``power_w``            ``nvmlDeviceGetPowerUsage``                 mW -> W
``sm_clock_hz``        ``nvmlDeviceGetClockInfo(NVML_CLOCK_SM)``   MHz -> Hz
``temperature_c``      ``nvmlDeviceGetTemperature(GPU)``           degrees Celsius
``throttle_reasons``   ``nvmlDeviceGetCurrentClocksEventReasons``  bit mask (see THROTTLE_REASONS)
                       (``...ThrottleReasons`` before R535)
``energy_counter_j``   ``nvmlDeviceGetTotalEnergyConsumption``     mJ -> J, since the sampler opened
``gpu_other_processes`` ``nvmlDeviceGetComputeRunningProcesses``  count of other PIDs
=====================  ==========================================  ==========================

The energy counter (Volta and newer) is read in integer millijoules and accumulated as deltas, so a counter
that wraps around (:data:`ENERGY_COUNTER_MODULUS_MJ`) or a missed reading does not lose energy; the
monitor takes the window's energy as the difference of two accumulated readings. A field the GPU does not
support is read once, then left out with its reason in :attr:`NvmlGpu.field_reasons`; an error in the
middle of a run (GPU lost, timeout) makes that poll's value missing and is recorded the same way, without
stopping the sweep.

Which GPU: torch's device index counts the devices *visible* to CUDA, NVML's counts all of them. The
sampler takes the GPU's UUID from torch when it can (exact whatever ``CUDA_DEVICE_ORDER`` says), else maps
the index through ``CUDA_VISIBLE_DEVICES`` (integers, ``GPU-`` UUID prefixes or ``MIG-`` UUIDs), see
:func:`resolve_handle`. A MIG slice is found by its ``MIG-`` UUID; the whole GPU's handle is never used for
a slice (its readings would include the other slices).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bsprof.engine.nvml_devices import (
    NVML_ERROR_FUNCTION_NOT_FOUND,
    NvmlError,
    NvmlGpuLost,
    NvmlLibrary,
    NvmlLibraryNotFound,
    NvmlNoPermission,
    NvmlNotFound,
    NvmlNotSupported,
    call,
    nvml_error,
    parse_visible_devices,
    resolve_handle,
    text,
    torch_device_uuid,
)
from bsprof.engine.samplers import NullGpu

__all__ = [
    "ENERGY_COUNTER_MODULUS_MJ",
    "THROTTLE_CALLS",
    "THROTTLE_REASONS",
    "NvmlError",
    "NvmlGpu",
    "NvmlGpuLost",
    "NvmlLibrary",
    "NvmlLibraryNotFound",
    "NvmlNoPermission",
    "NvmlNotFound",
    "NvmlNotSupported",
    "driver_version",
    "gpu_telemetry_reason",
    "nvml_error",
    "open_nvml_gpu",
    "parse_visible_devices",
    "resolve_handle",
    "throttle_reason_names",
    "torch_device_uuid",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'bsprof[gpu]' (nvidia-ml-py)"

ENERGY_COUNTER_MODULUS_MJ = 2**64
"""The total-energy counter is an unsigned 64-bit count of millijoules; a smaller reading than the last
one means it wrapped around this modulus."""

NVML_CLOCK_SM = 1
NVML_TEMPERATURE_GPU = 0

THROTTLE_CALLS = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
"""The clock-event reason calls, newest first (the first needs an R535+ driver)."""

THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
"""NVML clock-event ("throttle") reason bits (``nvmlClocksEventReason*``) and their names."""


def throttle_reason_names(mask: int | None) -> list[str]:
    """Names of the bits set in an NVML throttle-reason mask (``[]`` for 0 or ``None``)."""
    if not mask:
        return []
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    if unknown:
        names.append(f"other(0x{unknown:x})")
    return names


# The sampler -----------------------------------------------------------------------------------------


@dataclass
class NvmlGpu:
    """Samples one GPU through NVML (a :class:`~bsprof.engine.samplers.GpuSampler`).

    Build it with :func:`open_nvml_gpu`. Readings are SI (see the module table). Fields the GPU cannot
    give are missing from :meth:`sample`'s dict, with the reason in :attr:`field_reasons`.

    Attributes:
        nvml: The NVML library (initialised).
        handle: The device handle.
        name: Device name from NVML.
        reason: Always ``None``: this sampler measures.
        field_reasons: Why a field is missing or was missing in some polls (field -> reason).
        errors: Count of failed reads (transient errors included).
        spec: How :func:`open_nvml_gpu` reopens this GPU in a sampler process (``None``: it cannot, the
            library object was passed in directly).
    """

    nvml: Any
    handle: Any
    name: str = ""
    reason: str | None = None
    field_reasons: dict[str, str] = field(default_factory=dict)
    errors: int = 0
    spec: tuple[str, dict[str, Any]] | None = None
    _unsupported: set[str] = field(default_factory=set, init=False, repr=False)
    _energy_last_mj: int | None = field(default=None, init=False, repr=False)
    _throttle_calls: tuple[str, ...] = field(default=THROTTLE_CALLS, init=False, repr=False)
    _energy_total_mj: int = field(default=0, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    def _read(self, key: str, fn: Callable[[], Any]) -> Any:
        if key in self._unsupported:
            return None
        try:
            return fn()
        except NvmlError as e:
            self.errors += 1
            if isinstance(e, (NvmlNotSupported, NvmlNoPermission)):
                self._unsupported.add(key)
                self.field_reasons[key] = f"NVML: {type(e).__name__}: {e}"
            else:
                self.field_reasons.setdefault(key, f"NVML error during the run (some polls missing): {e}")
            return None

    def _util(self) -> Any:
        return call(self.nvml.nvmlDeviceGetUtilizationRates, self.handle)

    def _throttle(self) -> int:
        """The clock-event reason mask: ``nvmlDeviceGetCurrentClocksEventReasons`` (R535+ drivers), else the
        older ``nvmlDeviceGetCurrentClocksThrottleReasons``. pynvml defines both and raises
        FUNCTION_NOT_FOUND (:class:`NvmlNotSupported`, code 13) for the one the driver lacks; an older pynvml
        may not define the newer name at all. The call that worked is remembered."""
        last: NvmlError = NvmlNotSupported("no clock-event reasons in this pynvml")
        for name in self._throttle_calls:
            fn = getattr(self.nvml, name, None)
            if fn is None:
                continue
            try:
                mask = int(call(fn, self.handle))
            except NvmlNotSupported as e:
                if e.code != NVML_ERROR_FUNCTION_NOT_FOUND:
                    raise
                last = e
                continue
            self._throttle_calls = (name,)
            return mask
        raise last

    def _energy_j(self) -> float:
        """Energy since the sampler opened (J), from the counter's deltas (wrap-around handled)."""
        raw = int(call(self.nvml.nvmlDeviceGetTotalEnergyConsumption, self.handle))
        if self._energy_last_mj is not None:
            self._energy_total_mj += (raw - self._energy_last_mj) % ENERGY_COUNTER_MODULUS_MJ
        self._energy_last_mj = raw
        return self._energy_total_mj / 1000.0

    def sample(self) -> dict[str, float | None]:
        """One poll of every supported field, SI units."""
        row: dict[str, float | None] = {}
        util = self._read("gpu_util_pct", self._util)
        if util is None and "gpu_util_pct" in self._unsupported:
            self._unsupported.add("mem_util_pct")
            self.field_reasons.setdefault("mem_util_pct", self.field_reasons["gpu_util_pct"])
        if util is not None:
            row["gpu_util_pct"] = float(util.gpu)
            row["mem_util_pct"] = float(util.memory)
        mem = self._read("mem_used_bytes", lambda: call(self.nvml.nvmlDeviceGetMemoryInfo, self.handle))
        if mem is not None:
            row["mem_used_bytes"] = float(mem.used)
        power_mw = self._read("power_w", lambda: call(self.nvml.nvmlDeviceGetPowerUsage, self.handle))
        if power_mw is not None:
            row["power_w"] = power_mw / 1000.0
        clock_mhz = self._read(
            "sm_clock_hz", lambda: call(self.nvml.nvmlDeviceGetClockInfo, self.handle, NVML_CLOCK_SM)
        )
        if clock_mhz is not None:
            row["sm_clock_hz"] = clock_mhz * 1e6
        temp = self._read(
            "temperature_c", lambda: call(self.nvml.nvmlDeviceGetTemperature, self.handle, NVML_TEMPERATURE_GPU)
        )
        if temp is not None:
            row["temperature_c"] = float(temp)
        mask = self._read("throttle_reasons", self._throttle)
        if mask is not None:
            row["throttle_reasons"] = float(mask)
        energy = self._read("energy_counter_j", self._energy_j)
        if energy is not None:
            row["energy_counter_j"] = energy
        others = self._read("gpu_other_processes", self._other_processes)
        if others is not None:
            row["gpu_other_processes"] = float(others)
        return row

    def _other_processes(self) -> int:
        """Compute processes on this GPU other than the trainer (``nvmlDeviceGetComputeRunningProcesses``: a
        list of process infos with ``pid`` and ``usedGpuMemory``). The trainer is this process, or, read from
        the sampler process, its parent. Inside a container NVML may report host PIDs: then the trainer itself
        counts as another process (README, "Noisy hosts")."""
        procs = call(self.nvml.nvmlDeviceGetComputeRunningProcesses, self.handle)
        ours = {os.getpid(), os.getppid()}
        return sum(1 for p in procs if int(p.pid) not in ours)

    def child_spec(self) -> tuple[str, dict[str, Any]] | None:
        """``("bsprof.engine.nvml:open_nvml_gpu", kwargs)`` to open the same GPU in a sampler process
        (:func:`bsprof.engine.sampler_process.child_spec`), or ``None`` when it cannot be reopened there."""
        return self.spec

    def close(self) -> None:
        """Release this sampler's NVML initialisation (NVML counts ``nvmlInit`` calls)."""
        if not self._closed:
            self._closed = True
            try:
                self.nvml.nvmlShutdown()
            except Exception as e:  # noqa: BLE001 - shutting down a failed library is not worth a crash
                log.debug("nvmlShutdown failed: %s", e)


def _import_pynvml() -> Any:
    import pynvml

    return pynvml


def open_nvml_gpu(
    torch_index: int,
    *,
    nvml: NvmlLibrary | None = None,
    uuid: str | None = None,
    visible_devices: str | object | None = ...,
    nvml_factory: str | None = None,
) -> NvmlGpu | NullGpu:
    """An :class:`NvmlGpu` for torch's ``cuda:<torch_index>``, or a :class:`NullGpu` saying why not.

    Args:
        torch_index: torch's CUDA device index.
        nvml: The NVML library; ``None`` imports ``pynvml``.
        uuid: The device's UUID from torch, when known (preferred over the index mapping).
        visible_devices: ``CUDA_VISIBLE_DEVICES``; by default read from the environment.
        nvml_factory: ``"module:function"`` returning the NVML library, used instead of ``nvml`` (tests and
            benchmarks pass fakes this way so that a sampler process can rebuild them).

    Returns:
        The sampler. Never raises for a missing library, driver or device: the :class:`NullGpu`'s reason
        says which (e.g. ``"pynvml: NVML Shared Library Not Found"``).
    """
    reopenable = nvml is None
    if nvml_factory is not None:
        from bsprof.engine.sampler_process import resolve_factory

        nvml = resolve_factory(nvml_factory)()
        reopenable = True
    if nvml is None:
        try:
            nvml = _import_pynvml()
        except ImportError:
            return NullGpu(f"pynvml is not installed: {INSTALL_HINT}")
    if visible_devices is ...:
        visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    spec = None
    if reopenable:
        kwargs = {"torch_index": torch_index, "uuid": uuid, "visible_devices": visible_devices}
        if nvml_factory is not None:
            kwargs["nvml_factory"] = nvml_factory
        spec = ("bsprof.engine.nvml:open_nvml_gpu", kwargs)
    try:
        call(nvml.nvmlInit)
    except NvmlError as e:
        return NullGpu(f"pynvml: {e}")
    try:
        handle = resolve_handle(nvml, torch_index, uuid=uuid, visible_devices=visible_devices)  # type: ignore[arg-type]
        try:
            name = text(call(nvml.nvmlDeviceGetName, handle))
        except NvmlError:
            name = ""
    except NvmlError as e:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - already failing; report the first error
            pass
        return NullGpu(f"pynvml: no NVML device for cuda:{torch_index}: {type(e).__name__}: {e}")
    return NvmlGpu(nvml=nvml, handle=handle, name=name, spec=spec)


def gpu_telemetry_reason(device: Any, *, nvml: NvmlLibrary | None = None) -> str | None:
    """Why GPU telemetry is empty for trials on ``device`` (a ``torch.device``); ``None`` when NVML can read it.

    For a CPU run it still probes NVML, so the reason says both what the trials ran on and whether a GPU
    could have been read, e.g. ``"trials run on cpu; pynvml: NVML Shared Library Not Found"``.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else 0
        probe = open_nvml_gpu(index, nvml=nvml, uuid=torch_device_uuid(index) if nvml is None else None)
    else:
        probe = open_nvml_gpu(0, nvml=nvml)
    nvml_reason = probe.reason
    if isinstance(probe, NvmlGpu):
        probe.close()
    if device.type != "cuda":
        return f"trials run on {device.type}; " + (nvml_reason or "NVML could read a GPU, but trials do not use one")
    return nvml_reason


def driver_version(*, nvml: NvmlLibrary | None = None) -> tuple[str | None, str | None]:
    """The NVIDIA driver's version (e.g. ``"550.54.15"``), or ``(None, reason)`` when NVML cannot say.

    Args:
        nvml: The NVML library; ``None`` imports ``pynvml``.
    """
    if nvml is None:
        try:
            nvml = _import_pynvml()
        except ImportError:
            return None, f"pynvml is not installed: {INSTALL_HINT}"
    try:
        call(nvml.nvmlInit)
    except NvmlError as e:
        return None, f"NVML unavailable: {type(e).__name__}: {e}"
    try:
        return text(call(nvml.nvmlSystemGetDriverVersion)), None
    except NvmlError as e:
        return None, f"NVML has no driver version: {type(e).__name__}: {e}"
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001 - the version is read; a failed shutdown is only logged
            log.debug("nvmlShutdown failed: %s", e)
