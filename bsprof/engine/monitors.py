"""Background samplers around a trial's measured window (in the manner of Zeus's measurement windows).

A :class:`Monitor` polls its samplers from a daemon thread at ``hz`` while a :meth:`Monitor.window` is
open, and on exit reduces the series into a :class:`Telemetry`. Samplers return plain dicts of SI values
(bytes, watts, percent). What a sampler cannot measure stays ``None`` in the telemetry, with a reason in
:attr:`Telemetry.reasons`: missing is never zero.

The host sampler reads the process's resident set size (bytes) and CPU percent through psutil. GPU
samplers implement :class:`GpuSampler`; :class:`NullGpu` stands in (with its reason) when there is no
GPU to read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["GpuSampler", "HostSampler", "Monitor", "NullGpu", "Telemetry"]


class GpuSampler(Protocol):
    """Reads one GPU. ``reason`` is ``None`` when it can measure, else why it cannot."""

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
    """This process's resident memory (bytes) and CPU use (percent of one core) through psutil."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self._process.cpu_percent(None)  # prime the counter

    def rss_bytes(self) -> int:
        return int(self._process.memory_info().rss)

    def sample(self) -> dict[str, float | None]:
        return {"rss_bytes": float(self.rss_bytes()), "cpu_pct": self._process.cpu_percent(None)}


@dataclass(frozen=True)
class Telemetry:
    """Reduced readings of one window.

    Attributes:
        duration_s: Window length (seconds).
        samples: Number of polls in the window.
        rss_baseline_bytes: Process RSS when the window opened (bytes).
        rss_peak_bytes: Highest sampled RSS, including the readings at open and close (bytes).
        cpu_pct_mean: Mean process CPU use (percent of one core), or ``None``.
        gpu: Reduced GPU readings (``None`` values where not measured).
        reasons: Why a field is ``None`` (field name -> reason).
        series: The raw polls: dicts with ``t_s`` (seconds since open) and the sampler keys.
    """

    duration_s: float
    samples: int
    rss_baseline_bytes: int
    rss_peak_bytes: int
    cpu_pct_mean: float | None
    gpu: dict[str, float | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    series: tuple[dict[str, float | None], ...] = ()

    @property
    def rss_growth_bytes(self) -> int:
        """Peak RSS above the baseline (bytes); a lower bound of the trial's host memory, since memory
        that the allocator kept from earlier trials is reused without growing RSS."""
        return max(0, self.rss_peak_bytes - self.rss_baseline_bytes)


GPU_FIELDS = ("gpu_util_pct", "power_w", "energy_j")


class Monitor:
    """Polls a host sampler and a GPU sampler at ``hz`` while a window is open.

    Args:
        gpu: The GPU sampler (a :class:`NullGpu` with its reason where there is none).
        hz: Polls per second.
    """

    def __init__(self, gpu: GpuSampler | None = None, *, hz: float = 20.0) -> None:
        if hz <= 0:
            raise ValueError("hz must be > 0")
        self.gpu: GpuSampler = gpu if gpu is not None else NullGpu()
        self.hz = hz
        self.host = HostSampler()

    def _poll(self, t0: float) -> dict[str, float | None]:
        row: dict[str, float | None] = {"t_s": time.perf_counter() - t0}
        row.update(self.host.sample())
        if self.gpu.reason is None:
            row.update(self.gpu.sample())
        return row

    @contextlib.contextmanager
    def window(self) -> Iterator[list[Telemetry]]:
        """Sample while the ``with`` body runs; the yielded list holds the :class:`Telemetry` afterwards.

        The thread is stopped and the result computed even when the body raises.
        """
        out: list[Telemetry] = []
        rows: list[dict[str, float | None]] = []
        stop = threading.Event()
        t0 = time.perf_counter()
        baseline = self.host.rss_bytes()
        rows.append(self._poll(t0))

        def run() -> None:
            while not stop.wait(1.0 / self.hz):
                rows.append(self._poll(t0))

        thread = threading.Thread(target=run, name="bsprof-monitor", daemon=True)
        thread.start()
        try:
            yield out
        finally:
            stop.set()
            thread.join()
            rows.append(self._poll(t0))
            out.append(self._reduce(rows, baseline, time.perf_counter() - t0))

    def _reduce(self, rows: list[dict[str, float | None]], baseline: int, duration_s: float) -> Telemetry:
        rss = [int(r["rss_bytes"]) for r in rows if r.get("rss_bytes") is not None]  # type: ignore[arg-type]
        cpu = [float(r["cpu_pct"]) for r in rows[1:] if r.get("cpu_pct") is not None]  # type: ignore[arg-type]
        reasons: dict[str, str] = {}
        gpu: dict[str, float | None] = {}
        if self.gpu.reason is not None:
            for name in GPU_FIELDS:
                gpu[name] = None
                reasons[name] = self.gpu.reason
        return Telemetry(
            duration_s=duration_s,
            samples=len(rows),
            rss_baseline_bytes=baseline,
            rss_peak_bytes=max([*rss, baseline]),
            cpu_pct_mean=sum(cpu) / len(cpu) if cpu else None,
            gpu=gpu,
            reasons=reasons,
            series=tuple(rows),
        )
