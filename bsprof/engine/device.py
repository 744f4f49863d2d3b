"""Device selection, synchronisation and mixed precision, resolved once per trial."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from bsprof.errors import BadInput

__all__ = ["AMP_MODES", "autocast_context", "device_name", "resolve_device", "synchronizer"]

AMP_MODES = ("off", "bf16", "fp16")


def resolve_device(spec: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a usable device.

    Raises:
        BadInput: The device is unknown or not available here.
    """
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise BadInput(f"device {spec!r} asked for, but CUDA is not available here (use --device cpu or auto)")
        index_text = spec.partition(":")[2] or str(torch.cuda.current_device())
        if not index_text.isdigit():
            raise BadInput(f"bad device {spec!r}: expected cuda:N with N an integer")
        index = int(index_text)
        if index >= torch.cuda.device_count():
            raise BadInput(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) visible")
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
