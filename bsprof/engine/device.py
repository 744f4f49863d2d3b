"""Device selection, synchronisation, mixed precision and the float32 numerics switches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from bsprof.errors import BadInput

__all__ = [
    "AMP_MODES",
    "autocast_context",
    "device_name",
    "fp32_precision",
    "numerics_flags",
    "resolve_device",
    "synchronizer",
]

AMP_MODES = ("off", "bf16", "fp16")


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a usable device; a CUDA device also becomes the
    current one (``torch.cuda.set_device``), so that workload code that allocates on "the" CUDA device
    (``tensor.cuda()``, ``device="cuda"``) follows it.

    Raises:
        BadInput: The device is unknown or not available here.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index_text = spec.partition(":")[2]
        if spec != "cuda" and not index_text.isdigit():  # a malformed name first, whatever the host has
            raise BadInput(f"bad device {spec!r}: expected cuda:N with N an integer")
        if not torch.cuda.is_available():
            raise BadInput(f"device {spec!r} asked for, but CUDA is not available here (use --device cpu or auto)")
        index_text = index_text or str(torch.cuda.current_device())
        index = int(index_text)
        if index >= torch.cuda.device_count():
            raise BadInput(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    raise BadInput(f"unknown device {spec!r}: expected auto, cpu, cuda or cuda:N")


def device_name(device: torch.device) -> str:
    """Human-readable device name, e.g. ``"NVIDIA A100-SXM4-80GB"`` or ``"cpu"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for all queued work on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def autocast_context(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager[object]]:
    """A factory of autocast contexts for ``amp`` (``off`` returns ``nullcontext``)."""
    if amp not in AMP_MODES:
        raise BadInput(f"unknown --amp {amp!r}: expected one of {', '.join(AMP_MODES)}")
    if amp == "off":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


_PRECISION_SOURCES = {
    # op class -> (path under torch.backends of the new API's fp32_precision, of the legacy allow_tf32)
    "matmul": (("cuda", "matmul"), ("cuda", "matmul")),
    "conv": (("cudnn", "conv"), ("cudnn",)),
}


def _backend(path: tuple[str, ...]) -> Any:
    obj: Any = torch.backends
    for part in path:
        obj = getattr(obj, part)
    return obj


def fp32_precision(op_class: str) -> tuple[str | None, str | None]:
    """How float32 ``op_class`` ops (``"conv"`` or ``"matmul"``) run on CUDA: ``("tf32", None)``,
    ``("ieee", None)``, or ``(None, reason)`` when torch's flags cannot be read.

    The new API (``torch.backends.cuda.matmul.fp32_precision``, ``torch.backends.cudnn.conv.fp32_precision``,
    torch 2.9+) is read first; ``"none"`` there means nothing was set through it, and the legacy
    ``allow_tf32`` flag decides. Reading the legacy flag raises ``RuntimeError`` when the two APIs were mixed;
    that becomes the reason, never an exception.
    """
    new_path, legacy_path = _PRECISION_SOURCES[op_class]
    try:
        value = getattr(_backend(new_path), "fp32_precision", None)
    except (AttributeError, RuntimeError) as e:
        value = None
        new_error: str | None = f"{type(e).__name__}: {e}"
    else:
        new_error = None
    if value == "tf32":
        return "tf32", None
    if value == "ieee":
        return "ieee", None
    try:
        legacy = bool(_backend(legacy_path).allow_tf32)
    except (AttributeError, RuntimeError) as e:
        why = f"torch's {op_class} TF32 setting is unreadable: {type(e).__name__}: {e}"
        return None, (why + (f" (new API: {new_error})" if new_error else ""))[:300]
    return ("tf32" if legacy else "ieee"), None


def numerics_flags() -> dict[str, object]:
    """torch's switches that change float results and speed, as the run's environment records them.

    Keys: ``matmul_fp32_precision`` and ``conv_fp32_precision`` (``"tf32"``/``"ieee"``, :func:`fp32_precision`;
    ``None`` with a ``*_reason`` when unreadable), ``float32_matmul_precision``, ``cudnn_benchmark``,
    ``cudnn_deterministic`` and ``deterministic_algorithms``.
    """
    flags: dict[str, object] = {}
    for op_class in ("matmul", "conv"):
        value, why = fp32_precision(op_class)
        flags[f"{op_class}_fp32_precision"] = value
        if why is not None:
            flags[f"{op_class}_fp32_precision_reason"] = why
    readers = {
        "float32_matmul_precision": torch.get_float32_matmul_precision,
        "cudnn_benchmark": lambda: bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": lambda: bool(torch.backends.cudnn.deterministic),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled,
    }
    for key, read in readers.items():
        try:
            flags[key] = read()
        except (AttributeError, RuntimeError) as e:
            flags[key] = None
            flags[f"{key}_reason"] = f"{type(e).__name__}: {e}"[:300]
    return flags
