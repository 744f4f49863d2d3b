"""Provenance of a run: software versions, device, host and git commit (as pytest-benchmark and asv do)."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from typing import Any

import torch

__all__ = ["collect_environment"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to platform below
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _nvidia_driver() -> tuple[str | None, str | None]:
    """(driver version, reason it is unknown)."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - any NVML failure means: no driver to report
        return None, f"NVML unavailable: {type(e).__name__}: {e}"
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return (version.decode() if isinstance(version, bytes) else str(version)), None
    finally:
        pynvml.nvmlShutdown()


def collect_environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell whether two runs are comparable.

    Args:
        device: The device the run's trials use.
    """
    from bsprof import __version__
    from bsprof.store import SCHEMA_VERSION

    driver, driver_reason = _nvidia_driver()
    env: dict[str, Any] = {
        "bsprof_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nvidia_driver_version": driver,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "git_commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_memory_bytes"] = int(props.total_memory)
        env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    from bsprof.engine.nvml import gpu_telemetry_reason

    reason = gpu_telemetry_reason(device)
    env["gpu_telemetry"] = "nvml" if reason is None else None
    if reason is not None:
        env["gpu_telemetry_reason"] = reason  # why every GPU field of this run's trials is empty
    if driver_reason:
        env["nvidia_driver_reason"] = driver_reason
    return env
