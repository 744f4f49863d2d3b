"""Background samplers around a trial's measured window (in the manner of Zeus's measurement windows).

A :class:`Monitor` polls its samplers from a daemon thread at ``hz`` while a :meth:`Monitor.window` is
open, and on exit reduces the series into a :class:`Telemetry`. Samplers return plain dicts of SI values
(bytes, watts, percent). What a sampler cannot measure stays ``None`` in the telemetry, with a reason in
:attr:`Telemetry.reasons`: missing is never zero.

The host sampler reads the process's resident set size (bytes), CPU percent and the system's used memory.
GPU samplers implement :class:`GpuSampler` (the NVML one lives in :mod:`bsprof.engine.nvml`);
:class:`NullGpu` stands in (with its reason) when there is no GPU to read.

GPU reductions (:func:`reduce_gpu`), over all polls of a window or the tail that covers the timed steps
(:func:`measured_gpu_metrics`):

* ``gpu_util_pct`` / ``gpu_util_p95_pct``: mean and 95th percentile (linear interpolation) of utilization;
* ``mem_util_pct``: mean memory-controller utilization; ``mem_used_max_bytes``: most device memory in use;
* ``power_w``: mean power draw; ``sm_clock_hz``: mean SM clock; ``temperature_max_c``;
  ``throttle_reasons``: OR of the clock-event reason masks seen;
* ``energy_j`` with ``energy_source``: ``"energy_counter"`` when the GPU has a total-energy counter (the
  difference of the first and last readings, counted in integer mJ by the sampler so wrap-around is
  harmless), else ``"integrated_power"`` (trapezoids over the power polls, less accurate: NVML power is
  itself an average over up to a second on some GPUs).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "GPU_FIELDS",
    "GpuSampler",
    "HostSampler",
    "Monitor",
    "NullGpu",
    "Telemetry",
    "downsample_rows",
    "measured_gpu_metrics",
    "reduce_gpu",
]

log = logging.getLogger(__name__)


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
    """This process's resident memory (bytes) and CPU use (percent of one core), and the system's used
    memory (bytes).

    A poll must be cheap, since it runs beside the training loop: CPU use comes from ``os.times()`` (one
    system call; process user + system seconds over wall seconds since the last poll, at the kernel's
    clock-tick resolution), RSS from psutil, and the system's used memory (psutil, which parses
    ``/proc/meminfo``) at most every ``sys_mem_period_s`` seconds.

    Args:
        sys_mem_period_s: Seconds between readings of the system's used memory.
    """

    def __init__(self, *, sys_mem_period_s: float = 1.0) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()
        self._sys_mem_period_s = sys_mem_period_s
        self._sys_mem_at = -math.inf
        self._cpu_s, self._wall_s = self._times()

    @staticmethod
    def _times() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.perf_counter()

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


@dataclass(frozen=True)
class Telemetry:
    """Reduced readings of one window.

    Attributes:
        duration_s: Window length (seconds).
        samples: Number of polls in the window.
        rss_baseline_bytes: Process RSS when the window opened (bytes).
        rss_peak_bytes: Peak RSS in the window (bytes): the kernel's exact high-water mark where Linux offers
            it (``rss_peak_source == "VmHWM"``), else the highest sampled RSS (``"sampled"``).
        cpu_pct_mean: Mean process CPU use (percent of one core), or ``None``.
        gpu: GPU readings reduced over the whole window (:data:`GPU_FIELDS`; ``None`` where not measured).
        reasons: Why a field is ``None`` (field name -> reason).
        series: The raw polls: dicts with ``t_s`` (seconds since open) and the sampler keys.
        gpu_reason: Why the GPU could not be read at all (``None`` when it could).
        gpu_field_reasons: Why single GPU fields were missing in some or all polls.
    """

    duration_s: float
    samples: int
    rss_baseline_bytes: int
    rss_peak_bytes: int
    cpu_pct_mean: float | None
    gpu: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    series: tuple[dict[str, float | None], ...] = ()
    gpu_reason: str | None = None
    gpu_field_reasons: dict[str, str] = field(default_factory=dict)
    rss_peak_source: str = "sampled"

    @property
    def rss_growth_bytes(self) -> int:
        """Peak RSS above the baseline (bytes); a lower bound of the trial's host memory, since memory
        that the allocator kept from earlier trials is reused without growing RSS."""
        return max(0, self.rss_peak_bytes - self.rss_baseline_bytes)


GPU_FIELDS = (
    "gpu_util_pct",
    "gpu_util_p95_pct",
    "mem_util_pct",
    "mem_used_max_bytes",
    "power_w",
    "sm_clock_hz",
    "temperature_max_c",
    "throttle_reasons",
    "energy_j",
    "energy_source",
)
"""Keys of the reduced GPU readings (:func:`reduce_gpu`)."""

_MEAN_FIELDS = ("gpu_util_pct", "mem_util_pct", "power_w", "sm_clock_hz")


def _values(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def _p95(values: list[float]) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def _energy(rows: Sequence[dict[str, Any]]) -> tuple[float | None, float | None, str | None, str | None]:
    """(energy J, span s it covers, source, reason if None)."""
    counter = [(float(r["t_s"]), float(r["energy_counter_j"])) for r in rows if r.get("energy_counter_j") is not None]
    if len(counter) >= 2:
        (t0, e0), (t1, e1) = counter[0], counter[-1]
        return e1 - e0, t1 - t0, "energy_counter", None
    power = [(float(r["t_s"]), float(r["power_w"])) for r in rows if r.get("power_w") is not None]
    if len(power) >= 2:
        joules = math.fsum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in itertools.pairwise(power))
        return joules, power[-1][0] - power[0][0], "integrated_power", None
    return None, None, None, "fewer than two energy-counter or power readings in the window"


def reduce_gpu(
    rows: Sequence[dict[str, Any]], *, reason: str | None = None, field_reasons: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Reduce GPU polls into :data:`GPU_FIELDS` (a pure function over the rows).

    Args:
        rows: Polls with ``t_s`` and the GPU sampler's keys (``gpu_util_pct``, ``power_w``,
            ``energy_counter_j`` ...); missing keys or ``None`` values are skipped.
        reason: Why the GPU could not be read at all; every field is then ``None`` with this reason.
        field_reasons: Why single fields were missing, from the sampler.

    Returns:
        (values, reasons): values has every key of :data:`GPU_FIELDS`, ``None`` where not measured, and
        reasons says why for each ``None``.
    """
    if reason is not None:
        return dict.fromkeys(GPU_FIELDS), dict.fromkeys(GPU_FIELDS, reason)
    field_reasons = field_reasons or {}
    out: dict[str, Any] = {}
    reasons: dict[str, str] = {}

    def missing(key: str, source: str) -> None:
        out[key] = None
        reasons[key] = field_reasons.get(source, f"no {source} readings in the window")

    for key in _MEAN_FIELDS:
        vals = _values(rows, key)
        if vals:
            out[key] = math.fsum(vals) / len(vals)
        else:
            missing(key, key)
    util = _values(rows, "gpu_util_pct")
    if util:
        out["gpu_util_p95_pct"] = _p95(util)
    else:
        missing("gpu_util_p95_pct", "gpu_util_pct")
    for key, source in (("mem_used_max_bytes", "mem_used_bytes"), ("temperature_max_c", "temperature_c")):
        vals = _values(rows, source)
        if vals:
            out[key] = max(vals)
        else:
            missing(key, source)
    masks = _values(rows, "throttle_reasons")
    if masks:
        mask = 0
        for m in masks:
            mask |= int(m)
        out["throttle_reasons"] = mask
    else:
        missing("throttle_reasons", "throttle_reasons")
    joules, _span, source_name, why = _energy(rows)
    out["energy_j"] = joules
    out["energy_source"] = source_name
    if joules is None:
        detail = field_reasons.get("energy_counter_j") or field_reasons.get("power_w")
        reasons["energy_j"] = reasons["energy_source"] = f"{why}" + (f" ({detail})" if detail else "")
    return {k: out[k] for k in GPU_FIELDS}, reasons


def measured_gpu_metrics(
    telemetry: Telemetry, *, measured_s: float, samples: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """GPU metrics of a throughput trial's timed steps, from the tail of its telemetry window.

    The window opens before the model is built and closes right after the last timed block, so the polls
    of the last ``measured_s`` seconds cover the timed steps. When fewer than two GPU polls fall there
    (a window shorter than two sampling periods), the whole window is used instead, and said so.

    Args:
        telemetry: The trial's window.
        measured_s: Seconds of timed steps (warm-up excluded).
        samples: Training samples in the timed steps.

    Returns:
        (metrics, reasons): :data:`GPU_FIELDS` plus ``energy_per_sample_j``. ``energy_j`` is the energy of
        the timed steps: the window's average power (from the energy counter where there is one, else the
        integrated power) times ``measured_s``.
    """
    if telemetry.gpu_reason is not None:
        keys = (*GPU_FIELDS, "energy_per_sample_j")
        return dict.fromkeys(keys), dict.fromkeys(keys, telemetry.gpu_reason)
    start = telemetry.duration_s - measured_s
    tail = [r for r in telemetry.series if r.get("t_s") is not None and float(r["t_s"]) >= start]
    gpu_rows = [r for r in tail if any(k in r for k in ("gpu_util_pct", "power_w", "energy_counter_j"))]
    rows: Sequence[dict[str, Any]] = tail
    note = None
    if len(gpu_rows) < 2:
        rows = telemetry.series
        note = "timed steps shorter than two polls: GPU readings cover set-up and warm-up too"
    metrics, reasons = reduce_gpu(rows, field_reasons=telemetry.gpu_field_reasons)
    _joules, span_s, _source, _why = _energy(rows)
    if metrics["energy_j"] is not None and span_s and span_s > 0:
        metrics["energy_j"] = metrics["energy_j"] / span_s * measured_s
        metrics["energy_per_sample_j"] = metrics["energy_j"] / samples if samples > 0 else None
        if samples <= 0:
            reasons["energy_per_sample_j"] = "no timed samples"
    else:
        metrics["energy_j"] = None
        metrics["energy_source"] = None
        metrics["energy_per_sample_j"] = None
        why = reasons.get("energy_j") or "energy readings span no time"
        reasons["energy_j"] = reasons["energy_source"] = reasons["energy_per_sample_j"] = why
    if note:
        reasons["gpu_window"] = note
    return metrics, reasons


def downsample_rows(rows: Sequence[dict[str, Any]], max_rows: int = 2000) -> list[dict[str, Any]]:
    """At most ``max_rows`` evenly spaced rows, first and last kept (all of them if there are fewer)."""
    n = len(rows)
    if n <= max_rows:
        return list(rows)
    if max_rows < 2:
        return list(rows[-max_rows:]) if max_rows else []
    step = (n - 1) / (max_rows - 1)
    return [rows[round(i * step)] for i in range(max_rows)]


class Monitor:
    """Polls a host sampler and a GPU sampler at ``hz`` while a window is open.

    Every poll costs the training loop a hand-over of Python's GIL (measured here: 0.25-0.9 ms per poll
    beside a 0.2 ms CPU step, so 1-2% of throughput at 20 Hz), whatever the sampler reads. When there is no
    GPU to read, the host alone is polled at ``host_only_hz`` (default 2 Hz): the peak RSS does not depend
    on polling where the kernel keeps a high-water mark (Linux ``VmHWM``, reset when a window opens).

    Args:
        gpu: The GPU sampler (a :class:`NullGpu` with its reason where there is none).
        hz: Polls per second while a GPU is read.
        host_only_hz: Polls per second when no GPU is read (at most ``hz``).
    """

    def __init__(self, gpu: GpuSampler | None = None, *, hz: float = 20.0, host_only_hz: float = 2.0) -> None:
        if hz <= 0 or host_only_hz <= 0:
            raise ValueError("hz and host_only_hz must be > 0")
        self.gpu: GpuSampler = gpu if gpu is not None else NullGpu()
        self.hz = hz if self.gpu.reason is None else min(hz, host_only_hz)
        self.host = HostSampler()
        self._gpu_errors: dict[str, str] = {}

    def _poll(self, t0: float) -> dict[str, float | None]:
        row: dict[str, float | None] = {"t_s": time.perf_counter() - t0}
        row.update(self.host.sample())
        if self.gpu.reason is None:
            try:
                row.update(self.gpu.sample())
            except Exception as e:  # noqa: BLE001 - a failing sampler must not kill the trial or the thread
                self._gpu_errors.setdefault("gpu", f"GPU sampler failed during the run: {type(e).__name__}: {e}")
        return row

    @contextlib.contextmanager
    def window(self) -> Iterator[list[Telemetry]]:
        """Sample while the ``with`` body runs; the yielded list holds the :class:`Telemetry` afterwards.

        The thread is stopped and the result computed even when the body raises.
        """
        out: list[Telemetry] = []
        rows: list[dict[str, float | None]] = []
        self._gpu_errors = {}
        stop = threading.Event()
        t0 = time.perf_counter()
        baseline = self.host.rss_bytes()
        exact_peak = self.host.reset_peak_rss()
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
            peak = self.host.peak_rss_bytes() if exact_peak else None
            out.append(self._reduce(rows, baseline, time.perf_counter() - t0, peak))

    def _reduce(
        self, rows: list[dict[str, float | None]], baseline: int, duration_s: float, exact_peak: int | None = None
    ) -> Telemetry:
        rss = [int(r["rss_bytes"]) for r in rows if r.get("rss_bytes") is not None]  # type: ignore[arg-type]
        cpu = [float(r["cpu_pct"]) for r in rows[1:] if r.get("cpu_pct") is not None]  # type: ignore[arg-type]
        field_reasons = dict(getattr(self.gpu, "field_reasons", None) or {})
        if "gpu" in self._gpu_errors:
            field_reasons = {k: self._gpu_errors["gpu"] for k in _SAMPLER_KEYS} | field_reasons
        gpu, reasons = reduce_gpu(rows, reason=self.gpu.reason, field_reasons=field_reasons)
        return Telemetry(
            duration_s=duration_s,
            samples=len(rows),
            rss_baseline_bytes=baseline,
            rss_peak_bytes=max([*rss, baseline] + ([exact_peak] if exact_peak is not None else [])),
            rss_peak_source="VmHWM" if exact_peak is not None else "sampled",
            cpu_pct_mean=sum(cpu) / len(cpu) if cpu else None,
            gpu=gpu,
            reasons=reasons,
            series=tuple(rows),
            gpu_reason=self.gpu.reason,
            gpu_field_reasons=field_reasons,
        )


_SAMPLER_KEYS = (
    "gpu_util_pct",
    "mem_util_pct",
    "mem_used_bytes",
    "power_w",
    "sm_clock_hz",
    "temperature_c",
    "throttle_reasons",
    "energy_counter_j",
)
