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
``energy_counter_j``   ``nvmlDeviceGetTotalEnergyConsumption``     mJ -> J, since the sampler opened
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
:func:`resolve_handle`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bsprof.engine.samplers import NullGpu

__all__ = [
    "ENERGY_COUNTER_MODULUS_MJ",
    "THROTTLE_REASONS",
    "NvmlError",
    "NvmlGpu",
    "NvmlGpuLost",
    "NvmlLibrary",
    "NvmlLibraryNotFound",
    "NvmlNoPermission",
    "NvmlNotFound",
    "NvmlNotSupported",
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


# Typed errors ----------------------------------------------------------------------------------------


class NvmlError(Exception):
    """An NVML call failed.

    Attributes:
        code: NVML return code (``None`` if the failure had none, e.g. a missing function).
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class NvmlNotSupported(NvmlError):
    """This GPU or driver does not support the query (NOT_SUPPORTED, FUNCTION_NOT_FOUND)."""


class NvmlNoPermission(NvmlError):
    """The process may not make the query (NO_PERMISSION)."""


class NvmlNotFound(NvmlError):
    """No such device (NOT_FOUND, GPU_NOT_FOUND, or an index beyond the visible devices)."""


class NvmlGpuLost(NvmlError):
    """The GPU fell off the bus or needs a reset (GPU_IS_LOST, RESET_REQUIRED)."""


class NvmlLibraryNotFound(NvmlError):
    """No NVML library or driver here (LIBRARY_NOT_FOUND, DRIVER_NOT_LOADED, LIB_RM_VERSION_MISMATCH)."""


_ERROR_TYPES: dict[int, type[NvmlError]] = {
    3: NvmlNotSupported,  # NVML_ERROR_NOT_SUPPORTED
    4: NvmlNoPermission,  # NVML_ERROR_NO_PERMISSION
    6: NvmlNotFound,  # NVML_ERROR_NOT_FOUND
    9: NvmlLibraryNotFound,  # NVML_ERROR_DRIVER_NOT_LOADED
    12: NvmlLibraryNotFound,  # NVML_ERROR_LIBRARY_NOT_FOUND
    13: NvmlNotSupported,  # NVML_ERROR_FUNCTION_NOT_FOUND (driver older than the call)
    15: NvmlGpuLost,  # NVML_ERROR_GPU_IS_LOST
    16: NvmlGpuLost,  # NVML_ERROR_RESET_REQUIRED
    18: NvmlLibraryNotFound,  # NVML_ERROR_LIB_RM_VERSION_MISMATCH
    28: NvmlNotFound,  # NVML_ERROR_GPU_NOT_FOUND
}


def nvml_error(exc: BaseException) -> NvmlError:
    """The typed :class:`NvmlError` for an exception raised by an NVML call.

    ``pynvml.NVMLError`` carries the return code in ``.value``; a function missing from an old ``pynvml``
    (``AttributeError``) counts as not supported.
    """
    if isinstance(exc, NvmlError):
        return exc
    if isinstance(exc, AttributeError):
        return NvmlNotSupported(f"not in this pynvml: {exc}")
    code = getattr(exc, "value", None)
    code = code if isinstance(code, int) else None
    kind = _ERROR_TYPES.get(code, NvmlError) if code is not None else NvmlError
    text = str(exc) or type(exc).__name__
    return kind(text, code)


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as exc:  # translated into a typed NvmlError
        raise nvml_error(exc) from exc


# The protocol ----------------------------------------------------------------------------------------


class NvmlLibrary(Protocol):
    """The part of ``pynvml`` the sampler uses (tests pass a fake with these names)."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int: ...
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int: ...


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# Index mapping ---------------------------------------------------------------------------------------


def parse_visible_devices(value: str | None) -> list[str] | None:
    """The entries of ``CUDA_VISIBLE_DEVICES`` as CUDA reads them, or ``None`` when it is unset.

    CUDA stops at the first entry that is neither a non-negative integer nor a ``GPU-``/``MIG-`` UUID, so
    ``"0,2,-1,3"`` exposes devices 0 and 2 only, and ``""`` exposes none.
    """
    if value is None:
        return None
    out: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.isdigit() or entry.upper().startswith(("GPU-", "MIG-")):
            out.append(entry)
        else:
            break
    return out


def resolve_handle(
    nvml: NvmlLibrary, torch_index: int, *, uuid: str | None = None, visible_devices: str | None = None
) -> Any:
    """The NVML handle of the GPU torch calls ``cuda:<torch_index>``.

    Args:
        nvml: The NVML library.
        torch_index: torch's CUDA device index (counts visible devices only).
        uuid: The device's UUID as torch reports it (``GPU-...`` or bare hex); tried first when given.
        visible_devices: The value of ``CUDA_VISIBLE_DEVICES`` (``None``: unset, all devices visible).

    Raises:
        NvmlNotFound: No device matches.
        NvmlError: Another NVML failure.
    """
    if uuid:
        text = uuid if uuid.upper().startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        try:
            return _call(nvml.nvmlDeviceGetHandleByUUID, text)
        except NvmlError as e:
            log.debug("NVML does not know torch's UUID %s (%s); mapping the index instead", text, e)
    entries = parse_visible_devices(visible_devices)
    if entries is None:
        return _call(nvml.nvmlDeviceGetHandleByIndex, torch_index)
    if torch_index >= len(entries):
        raise NvmlNotFound(
            f"cuda:{torch_index} is not among the {len(entries)} device(s) of CUDA_VISIBLE_DEVICES={visible_devices!r}"
        )
    entry = entries[torch_index]
    if entry.isdigit():
        return _call(nvml.nvmlDeviceGetHandleByIndex, int(entry))
    if entry.upper().startswith("MIG-"):
        return _call(nvml.nvmlDeviceGetHandleByUUID, entry)
    # CUDA accepts any unique prefix of a GPU UUID; NVML wants the whole UUID, so match by prefix.
    prefix = entry.lower()
    matches = []
    for i in range(int(_call(nvml.nvmlDeviceGetCount))):
        handle = _call(nvml.nvmlDeviceGetHandleByIndex, i)
        if _text(_call(nvml.nvmlDeviceGetUUID, handle)).lower().startswith(prefix):
            matches.append(handle)
    if len(matches) != 1:
        what = "no device" if not matches else f"{len(matches)} devices"
        raise NvmlNotFound(f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {what}")
    return matches[0]


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
        return _call(self.nvml.nvmlDeviceGetUtilizationRates, self.handle)

    def _throttle(self) -> int:
        fn = getattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if fn is None:
            fn = getattr(self.nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        if fn is None:
            raise NvmlNotSupported("no clock-event reasons in this pynvml")
        return int(_call(fn, self.handle))

    def _energy_j(self) -> float:
        """Energy since the sampler opened (J), from the counter's deltas (wrap-around handled)."""
        raw = int(_call(self.nvml.nvmlDeviceGetTotalEnergyConsumption, self.handle))
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
        mem = self._read("mem_used_bytes", lambda: _call(self.nvml.nvmlDeviceGetMemoryInfo, self.handle))
        if mem is not None:
            row["mem_used_bytes"] = float(mem.used)
        power_mw = self._read("power_w", lambda: _call(self.nvml.nvmlDeviceGetPowerUsage, self.handle))
        if power_mw is not None:
            row["power_w"] = power_mw / 1000.0
        clock_mhz = self._read(
            "sm_clock_hz", lambda: _call(self.nvml.nvmlDeviceGetClockInfo, self.handle, NVML_CLOCK_SM)
        )
        if clock_mhz is not None:
            row["sm_clock_hz"] = clock_mhz * 1e6
        temp = self._read(
            "temperature_c", lambda: _call(self.nvml.nvmlDeviceGetTemperature, self.handle, NVML_TEMPERATURE_GPU)
        )
        if temp is not None:
            row["temperature_c"] = float(temp)
        mask = self._read("throttle_reasons", self._throttle)
        if mask is not None:
            row["throttle_reasons"] = float(mask)
        energy = self._read("energy_counter_j", self._energy_j)
        if energy is not None:
            row["energy_counter_j"] = energy
        return row

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
        _call(nvml.nvmlInit)
    except NvmlError as e:
        return NullGpu(f"pynvml: {e}")
    try:
        handle = resolve_handle(nvml, torch_index, uuid=uuid, visible_devices=visible_devices)  # type: ignore[arg-type]
        try:
            name = _text(_call(nvml.nvmlDeviceGetName, handle))
        except NvmlError:
            name = ""
    except NvmlError as e:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001 - already failing; report the first error
            pass
        return NullGpu(f"pynvml: no NVML device for cuda:{torch_index}: {type(e).__name__}: {e}")
    return NvmlGpu(nvml=nvml, handle=handle, name=name, spec=spec)


def torch_device_uuid(torch_index: int) -> str | None:
    """The UUID torch reports for ``cuda:<torch_index>`` (``None`` if this torch does not expose it)."""
    try:
        import torch

        value = getattr(torch.cuda.get_device_properties(torch_index), "uuid", None)
    except Exception:  # noqa: BLE001 - no UUID means: fall back to the index mapping
        return None
    return str(value) if value else None


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
