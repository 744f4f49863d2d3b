"""The NVML device layer: typed NVML errors, the library protocol, and which NVML device torch's
``cuda:<index>`` is (``CUDA_VISIBLE_DEVICES`` and MIG slices).

Split from :mod:`bsprof.engine.nvml` (the sampler), which re-exports these names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "NVML_ERROR_FUNCTION_NOT_FOUND",
    "NvmlError",
    "NvmlGpuLost",
    "NvmlLibrary",
    "NvmlLibraryNotFound",
    "NvmlNoPermission",
    "NvmlNotFound",
    "NvmlNotSupported",
    "call",
    "nvml_error",
    "parse_visible_devices",
    "resolve_handle",
    "text",
    "torch_device_uuid",
]

log = logging.getLogger(__name__)

NVML_ERROR_FUNCTION_NOT_FOUND = 13
"""The driver lacks the called function (pynvml's ``NVMLError_FunctionNotFound``)."""


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
    message = str(exc) or type(exc).__name__
    return kind(message, code)


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with any exception turned into the typed :class:`NvmlError` (:func:`nvml_error`)."""
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
    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...
    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int: ...
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...


def text(value: Any) -> str:
    """An NVML string (``bytes`` from older pynvml versions) as ``str``."""
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
        # torch prints a bare UUID; NVML names a whole GPU "GPU-<uuid>" and a MIG slice "MIG-<uuid>".
        names = [uuid] if uuid.upper().startswith(("GPU-", "MIG-")) else [f"GPU-{uuid}", f"MIG-{uuid}"]
        for name in names:
            try:
                return call(nvml.nvmlDeviceGetHandleByUUID, name)
            except NvmlError as e:
                log.debug("NVML does not know torch's UUID %s (%s)", name, e)
    entries = parse_visible_devices(visible_devices)
    if entries is None:
        return _whole_gpu(nvml, call(nvml.nvmlDeviceGetHandleByIndex, torch_index), torch_index)
    if torch_index >= len(entries):
        raise NvmlNotFound(
            f"cuda:{torch_index} is not among the {len(entries)} device(s) of CUDA_VISIBLE_DEVICES={visible_devices!r}"
        )
    entry = entries[torch_index]
    if entry.isdigit():
        return _whole_gpu(nvml, call(nvml.nvmlDeviceGetHandleByIndex, int(entry)), torch_index)
    if entry.upper().startswith("MIG-"):
        return call(nvml.nvmlDeviceGetHandleByUUID, entry)
    # CUDA accepts any unique prefix of a GPU UUID; NVML wants the whole UUID, so match by prefix.
    prefix = entry.lower()
    matches = []
    for i in range(int(call(nvml.nvmlDeviceGetCount))):
        handle = call(nvml.nvmlDeviceGetHandleByIndex, i)
        if text(call(nvml.nvmlDeviceGetUUID, handle)).lower().startswith(prefix):
            matches.append(handle)
    if len(matches) != 1:
        what = "no device" if not matches else f"{len(matches)} devices"
        raise NvmlNotFound(f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {what}")
    return _whole_gpu(nvml, matches[0], torch_index)


NVML_DEVICE_MIG_ENABLE = 1


def _whole_gpu(nvml: NvmlLibrary, handle: Any, torch_index: int) -> Any:
    """``handle`` if it is a GPU out of MIG mode. On a GPU in MIG mode, CUDA's devices are its MIG slices,
    found by UUID only: a whole-GPU handle would read the other slices' work and power too.

    Raises:
        NvmlNotFound: The GPU is in MIG mode.
    """
    get_mig_mode = getattr(nvml, "nvmlDeviceGetMigMode", None)
    if get_mig_mode is None:  # a pynvml older than MIG (before 11.0): no MIG either
        return handle
    try:
        mode = call(get_mig_mode, handle)
    except NvmlError:  # NOT_SUPPORTED (pre-Ampere GPUs): no MIG
        return handle
    if int(mode[0]) == NVML_DEVICE_MIG_ENABLE:
        raise NvmlNotFound(
            f"cuda:{torch_index} is a MIG slice of a GPU in MIG mode and NVML could not match its UUID; "
            "set CUDA_VISIBLE_DEVICES=MIG-<uuid> (nvidia-smi -L)"
        )
    return handle


def torch_device_uuid(torch_index: int) -> str | None:
    """The UUID torch reports for ``cuda:<torch_index>`` (``None`` if this torch does not expose it)."""
    try:
        import torch

        value = getattr(torch.cuda.get_device_properties(torch_index), "uuid", None)
    except Exception:  # noqa: BLE001 - no UUID means: fall back to the index mapping
        return None
    return str(value) if value else None
