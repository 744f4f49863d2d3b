"""Provenance of a run: software versions, device, numerics flags, host and git commit (as pytest-benchmark and
asv do), and the part of it that identifies a run (:func:`run_identity`).

NVML (the driver version, whether GPU telemetry works) is read through :mod:`bsprof.engine.nvml` only.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from typing import Any

import torch

__all__ = ["IDENTITY_KEYS", "collect_environment", "run_identity"]

IDENTITY_KEYS = (
    "device_name",
    "torch_version",
    "cuda_version",
    "cudnn_version",
    "nvidia_driver_version",
    "numerics",
)
"""Environment entries that make two runs' results different measurements: a store reused on another device
model, torch, CUDA, cuDNN, driver or numerics flags starts a new run (see :func:`run_identity`)."""


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


def collect_environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell whether two runs are comparable.

    Args:
        device: The device the run's trials use.
    """
    from bsprof import __version__
    from bsprof.engine.device import numerics_flags
    from bsprof.engine.nvml import driver_version, gpu_telemetry_reason
    from bsprof.schema import SCHEMA_VERSION

    driver, driver_reason = driver_version()
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
        "numerics": numerics_flags(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_memory_bytes"] = int(props.total_memory)
        env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    reason = gpu_telemetry_reason(device)
    env["gpu_telemetry"] = "nvml" if reason is None else None
    if reason is not None:
        env["gpu_telemetry_reason"] = reason  # why every GPU field of this run's trials is empty
    if driver_reason:
        env["nvidia_driver_reason"] = driver_reason
    env["identity"] = run_identity(env)
    return env


def run_identity(env: dict[str, Any]) -> dict[str, Any]:
    """The entries of an environment record (:func:`collect_environment`) that identify a run:
    :data:`IDENTITY_KEYS`, without the reasons that accompany missing values.

    :meth:`bsprof.store.Store.open_run` hashes it with the configuration, so a sweep on another GPU model,
    torch, CUDA, cuDNN or driver version, or with other numerics flags, never resumes (or inherits the OOM
    floor of) a run measured elsewhere.
    """
    identity = {key: env.get(key) for key in IDENTITY_KEYS}
    numerics = identity.get("numerics")
    if isinstance(numerics, dict):
        identity["numerics"] = {k: v for k, v in numerics.items() if not k.endswith("_reason")}
    return identity
