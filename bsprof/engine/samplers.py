"""What a monitor polls: the host sampler, the GPU sampler protocol and its null object.

Samplers return plain dicts of SI values (bytes, watts, percent). The host sampler reads a process's
resident set size (bytes), CPU percent and the system's used memory, and the host's CPU counters
(:func:`~bsprof.engine.host_load.read_host_counters`: what else the host is doing). GPU samplers implement
:class:`GpuSampler` (the NVML one lives in :mod:`bsprof.engine.nvml`); :class:`NullGpu` stands in (with its
reason) when there is no GPU to read.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Protocol

from bsprof.engine.host_load import read_host_counters

__all__ = ["GpuSampler", "HostSampler", "NullGpu", "poll"]


class GpuSampler(Protocol):
    """Reads one GPU. ``reason`` is ``None`` when it can measure, else why it cannot.

    A sampler may also have ``field_reasons`` (field -> why it is missing in some or all polls); the
    monitor reads it with ``getattr``.
    """

    reason: str | None

    def sample(self) -> dict[str, float | None]:
        """Instantaneous readings in SI units (keys such as ``gpu_util_pct``, ``power_w``)."""
        ...


@dataclass
class NullGpu:
    """The GPU sampler for hosts or trials without a readable GPU.

    Args:
        reason: Why GPU fields are empty, e.g. ``"trial ran on cpu"``.
    """

    reason: str | None = "no GPU"

    def sample(self) -> dict[str, float | None]:
        return {}


class HostSampler:
    """A process's resident memory (bytes) and CPU use (percent of one core), and the system's used
    memory (bytes).

    CPU use is user + system seconds over wall seconds since the last poll (kernel clock-tick resolution):
    from ``os.times()`` for this process, from psutil's ``cpu_times()`` for another one (the sampler
    process reads the training process this way). RSS comes from psutil, and the system's used memory
    (psutil, which parses ``/proc/meminfo``) at most every ``sys_mem_period_s`` seconds. The exact peak
    RSS (:meth:`reset_peak_rss`, :meth:`peak_rss_bytes`) is always this process's own.

    Args:
        sys_mem_period_s: Seconds between readings of the system's used memory.
        pid: The process to read; ``None`` for this one.
    """

    def __init__(self, *, sys_mem_period_s: float = 1.0, pid: int | None = None) -> None:
        import psutil

        self._psutil = psutil
        self._pid = pid
        self._process = psutil.Process(pid)
        self._sys_mem_period_s = sys_mem_period_s
        self._sys_mem_at = -math.inf
        self._cpu_s, self._wall_s = self._times()

    def _times(self) -> tuple[float, float]:
        if self._pid is None or self._pid == os.getpid():
            t = os.times()
            return t.user + t.system, time.perf_counter()
        c = self._process.cpu_times()
        return c.user + c.system, time.perf_counter()

    def reset(self) -> None:
        """Start the next CPU-use interval now, and read the system's memory at the next poll."""
        self._cpu_s, self._wall_s = self._times()
        self._sys_mem_at = -math.inf

    def rss_bytes(self) -> int:
        return int(self._process.memory_info().rss)

    def reset_peak_rss(self) -> bool:
        """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0: ``/proc/self/clear_refs``).

        Returns:
            Whether :meth:`peak_rss_bytes` now measures the peak from this moment on.
        """
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
        except OSError:
            return False
        return self.peak_rss_bytes() is not None

    @staticmethod
    def peak_rss_bytes() -> int | None:
        """The kernel's RSS high-water mark (``VmHWM``, bytes) where ``/proc`` has it, else ``None``."""
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None

    def sample(self) -> dict[str, float | None]:
        cpu_s, wall_s = self._times()
        elapsed = wall_s - self._wall_s
        row: dict[str, float | None] = {
            "rss_bytes": float(self.rss_bytes()),
            "cpu_pct": 100.0 * (cpu_s - self._cpu_s) / elapsed if elapsed > 0 else None,
        }
        self._cpu_s, self._wall_s = cpu_s, wall_s
        if wall_s - self._sys_mem_at >= self._sys_mem_period_s:
            self._sys_mem_at = wall_s
            row["sys_mem_used_bytes"] = float(self._psutil.virtual_memory().used)
        return row

    def counters(self) -> dict[str, float]:
        """The host's CPU counters (:func:`~bsprof.engine.host_load.read_host_counters`) with the read process's
        cumulative CPU seconds as ``own_cpu_s``; empty where ``/proc/stat`` cannot be read."""
        counters = read_host_counters()
        if counters is None:
            return {}
        if self._pid is None or self._pid == os.getpid():
            counters["sampler_cpu_s"] = 0.0  # polled from this process: its CPU time is in own_cpu_s
        counters["own_cpu_s"] = self._times()[0]
        return counters


def poll(host: HostSampler, gpu: GpuSampler | None, t0: float, errors: dict[str, str]) -> dict[str, float | None]:
    """One row of readings: ``t_s`` (seconds since ``t0`` on ``time.perf_counter``), the host's, the GPU's, and
    the host's CPU counters (:mod:`bsprof.engine.host_load`).

    A GPU sampler that raises leaves the row host-only and records why under ``errors["gpu"]`` (first
    failure kept): a failing sampler must not stop the polls or the trial.

    Args:
        host: The host sampler.
        gpu: The GPU sampler, or ``None`` to poll the host only.
        t0: The window's start (``time.perf_counter()`` seconds).
        errors: Where a GPU sampler failure is recorded.
    """
    row: dict[str, float | None] = {"t_s": time.perf_counter() - t0}
    row.update(host.sample())
    if gpu is not None:
        try:
            row.update(gpu.sample())
        except Exception as e:  # noqa: BLE001 - recorded in errors, the row stays host-only
            errors.setdefault("gpu", f"GPU sampler failed during the run: {type(e).__name__}: {e}")
    row.update(host.counters())  # after the GPU: its readings stay closest to t_s
    return row
