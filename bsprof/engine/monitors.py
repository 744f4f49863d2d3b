"""Background samplers around a trial's measured window (in the manner of Zeus's measurement windows).

A :class:`Monitor` polls its samplers from a sampler process (or a daemon thread) at ``hz`` while a
:meth:`Monitor.window` is open, and on exit reduces the series into a :class:`Telemetry`. Samplers return
plain dicts of SI values (bytes, watts, percent). What a sampler cannot measure stays ``None`` in the
telemetry, with a reason in :attr:`Telemetry.reasons`: missing is never zero.

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
import functools
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
    "MODES",
    "ChildSpec",
    "GpuSampler",
    "HostSampler",
    "Monitor",
    "NullGpu",
    "SamplerProcess",
    "SamplerUnavailable",
    "Telemetry",
    "child_spec",
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


MODES = ("auto", "process", "thread")
"""How a :class:`Monitor` polls: in a sampler process, in a thread, or ``auto`` (a process whenever the GPU
sampler can be rebuilt in one, see :func:`child_spec`)."""

ChildSpec = tuple[str, dict[str, Any]]
"""``("package.module:factory", kwargs)``: how a sampler process rebuilds a GPU sampler (the factory
returns a :class:`GpuSampler`; the kwargs must pickle)."""


def child_spec(gpu: GpuSampler) -> ChildSpec | None:
    """How to rebuild ``gpu`` in a sampler process, or ``None`` when it cannot be (then threads poll it).

    A :class:`NullGpu` needs nothing rebuilt; another sampler says how through a ``child_spec()`` method
    returning a :data:`ChildSpec` (or ``None``).
    """
    if gpu.reason is not None:
        return ("", {})
    method = getattr(gpu, "child_spec", None)
    return method() if callable(method) else None


def _resolve(target: str) -> Any:
    import importlib

    module, _, name = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


class SamplerUnavailable(RuntimeError):
    """The sampler process could not start, died, or did not answer."""


def _child_poll(host: HostSampler, gpu: Any, t0: float, errors: dict[str, str]) -> dict[str, float | None]:
    row: dict[str, float | None] = {"t_s": time.perf_counter() - t0}
    row.update(host.sample())
    if gpu is not None:
        try:
            row.update(gpu.sample())
        except Exception as e:  # noqa: BLE001 - a failing sampler must not stop the polls
            errors.setdefault("gpu", f"GPU sampler failed during the run: {type(e).__name__}: {e}")
    return row


def _sampler_main(conn: Any, parent_pid: int) -> None:
    """The sampler process: waits for a window, polls the parent's host readings and its own GPU sampler
    at the window's rate until told to stop, then sends the rows back. Exits when the parent goes."""
    host = HostSampler(pid=parent_pid)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] != "start":
            return
        _, t0, period_s, spec = msg
        gpu: Any = NullGpu(None)
        gpu_reason: str | None = None
        try:
            gpu = _resolve(spec[0])(**spec[1]) if spec[0] else NullGpu("no GPU")
            gpu_reason = gpu.reason
        except Exception as e:  # noqa: BLE001 - reported back, the window still samples the host
            gpu, gpu_reason = NullGpu(None), f"sampler process could not open the GPU sampler: {type(e).__name__}: {e}"
        errors: dict[str, str] = {}
        poll = functools.partial(_child_poll, host, None if gpu_reason else gpu, t0, errors)
        host.reset()
        rows = [poll()]
        try:
            conn.send(("started",))
            next_at = time.perf_counter() + period_s
            while not conn.poll(max(0.0, next_at - time.perf_counter())):
                rows.append(poll())
                next_at = max(next_at + period_s, time.perf_counter())
            stop = conn.recv()
        except (EOFError, OSError):
            return
        finally:
            close = getattr(gpu, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()
        if stop[0] != "stop":
            return
        rows.append(poll())
        field_reasons = dict(getattr(gpu, "field_reasons", None) or {})
        try:
            conn.send(("rows", rows, gpu_reason, field_reasons, errors))
        except (EOFError, OSError):
            return


def _start_without_main(proc: Any) -> None:
    """Start a spawned process without re-running the parent's ``__main__`` in it.

    The sampler needs nothing from ``__main__`` (its code lives here), and a user's script without an
    ``if __name__ == "__main__":`` guard would otherwise run again in the child, sweep and all.
    """
    import multiprocessing.spawn as mp_spawn

    original = mp_spawn.get_preparation_data

    def preparation_data(name: str) -> dict[str, Any]:
        data = original(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    mp_spawn.get_preparation_data = preparation_data  # type: ignore[assignment]
    try:
        proc.start()
    finally:
        mp_spawn.get_preparation_data = original  # type: ignore[assignment]


class SamplerProcess:
    """A sampler process (multiprocessing ``spawn``: no fork of a process with torch's threads), started on
    first use and reused by every window until :meth:`close`.

    Share one across the trials of a sweep (``EngineSettings.sampler_process``) so that the child's start
    (0.1-0.5 s) is paid once. It is a daemon: it dies with this process, and exits by itself when the
    pipe to this process closes.

    Args:
        start_timeout_s: Seconds to wait for the child to start and answer the first window.
        reply_timeout_s: Seconds to wait for the rows when a window closes.
    """

    def __init__(self, *, start_timeout_s: float = 60.0, reply_timeout_s: float = 30.0) -> None:
        self.start_timeout_s = start_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self._proc: Any = None
        self._conn: Any = None
        self._open = False

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _ensure(self) -> None:
        if self.alive:
            return
        self._discard()
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_sampler_main, args=(child, os.getpid()), name="bsprof-sampler", daemon=True)
        _start_without_main(proc)
        child.close()
        self._proc, self._conn = proc, parent

    def _wait(self, timeout_s: float) -> Any:
        try:
            if not self._conn.poll(timeout_s):
                raise SamplerUnavailable(f"the sampler process did not answer within {timeout_s:g} s")
            return self._conn.recv()
        except (EOFError, OSError) as e:
            raise SamplerUnavailable(self._death()) from e

    def _death(self) -> str:
        if self._proc is not None:
            self._proc.join(timeout=1.0)
        code = self._proc.exitcode if self._proc is not None else None
        return f"the sampler process died (exit code {code})"

    def start_window(self, t0: float, period_s: float, spec: ChildSpec) -> None:
        """Start polling (after the first poll has been taken)."""
        if self._open:
            raise RuntimeError("a sampler process serves one window at a time")
        try:
            self._ensure()
            self._conn.send(("start", t0, period_s, spec))
            reply = self._wait(self.start_timeout_s)
        except (SamplerUnavailable, OSError) as e:
            self._discard()
            raise SamplerUnavailable(str(e)) from e
        if reply[0] != "started":
            self._discard()
            raise SamplerUnavailable(f"unexpected answer from the sampler process: {reply[0]!r}")
        self._open = True

    def stop_window(self) -> tuple[list[dict[str, float | None]], str | None, dict[str, str], dict[str, str]]:
        """Stop polling; (rows, GPU reason, GPU field reasons, sampler errors) of the window."""
        if not self._open:
            raise RuntimeError("no window is open")
        self._open = False
        try:
            self._conn.send(("stop",))
            reply = self._wait(self.reply_timeout_s)
        except (SamplerUnavailable, OSError) as e:
            message = str(e) if isinstance(e, SamplerUnavailable) else self._death()
            self._discard()
            raise SamplerUnavailable(message) from e
        _, rows, gpu_reason, field_reasons, errors = reply
        return rows, gpu_reason, field_reasons, errors

    def _discard(self) -> None:
        self._open = False
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._proc is not None:
            self._proc.join(timeout=1.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=1.0)
        self._proc = self._conn = None

    def close(self) -> None:
        """End the child (it exits when its pipe closes)."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("exit",))
        self._discard()

    def __enter__(self) -> SamplerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Monitor:
    """Polls a host sampler and a GPU sampler at ``hz`` while a window is open.

    By default the polls run in a separate sampler process (:class:`SamplerProcess`), which reads this
    process's RSS and CPU through psutil and opens its own GPU sampler (rebuilt from the sampler's
    :func:`child_spec`): the training loop then pays nothing per poll. Polling from a thread instead costs
    the training loop a hand-over of Python's GIL per poll (measured: 0.25-0.9 ms beside a 0.2 ms CPU step,
    so 1-2% of throughput at 20 Hz); that is the fallback for samplers that cannot be rebuilt in another
    process (e.g. tests' in-memory fakes). If the sampler process fails, the window still ends: GPU fields
    are empty with the reason, and the host readings come from the window's first and last polls here.

    When there is no GPU to read, the host alone is polled at ``host_only_hz`` (default 2 Hz): the peak RSS
    does not depend on polling where the kernel keeps a high-water mark (Linux ``VmHWM``, reset when a
    window opens).

    Args:
        gpu: The GPU sampler (a :class:`NullGpu` with its reason where there is none).
        hz: Polls per second while a GPU is read.
        host_only_hz: Polls per second when no GPU is read (at most ``hz``).
        mode: ``auto`` (a process when :func:`child_spec` can rebuild ``gpu``, else a thread), ``process``
            or ``thread``.
        process: The sampler process to use (shared, not closed by this monitor); ``None`` starts one on
            the first window and closes it in :meth:`close`.
    """

    def __init__(
        self,
        gpu: GpuSampler | None = None,
        *,
        hz: float = 20.0,
        host_only_hz: float = 2.0,
        mode: str = "auto",
        process: SamplerProcess | None = None,
    ) -> None:
        if hz <= 0 or host_only_hz <= 0:
            raise ValueError("hz and host_only_hz must be > 0")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.gpu: GpuSampler = gpu if gpu is not None else NullGpu()
        self.hz = hz if self.gpu.reason is None else min(hz, host_only_hz)
        self.host = HostSampler()
        self._gpu_errors: dict[str, str] = {}
        self._spec = child_spec(self.gpu) if mode != "thread" else None
        if mode == "process" and self._spec is None:
            raise ValueError(f"{type(self.gpu).__name__} cannot be rebuilt in a sampler process (no child_spec)")
        self.mode = "process" if self._spec is not None else "thread"
        self._process = process
        self._owns_process = process is None

    def close(self) -> None:
        """Stop this monitor's own sampler process (a shared one is left to its owner)."""
        if self._owns_process and self._process is not None:
            self._process.close()
            self._process = None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

        The sampling stops and the result is computed even when the body raises.
        """
        if self.mode == "process":
            with self._process_window() as out:
                yield out
            return
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

    @contextlib.contextmanager
    def _process_window(self) -> Iterator[list[Telemetry]]:
        assert self._spec is not None
        out: list[Telemetry] = []
        if self._process is None:
            self._process = SamplerProcess()
        t0 = time.perf_counter()
        baseline = self.host.rss_bytes()
        exact_peak = self.host.reset_peak_rss()
        self.host.reset()
        first = self._host_row(t0)
        failure: str | None = None
        try:
            self._process.start_window(t0, 1.0 / self.hz, self._spec)
        except SamplerUnavailable as e:
            failure = str(e)
            log.warning("telemetry sampler process unavailable: %s", e)
        try:
            yield out
        finally:
            result = None
            if failure is None:
                try:
                    result = self._process.stop_window()
                except SamplerUnavailable as e:
                    failure = str(e)
                    log.warning("telemetry sampler process failed: %s", e)
            duration = time.perf_counter() - t0
            peak = self.host.peak_rss_bytes() if exact_peak else None
            if result is not None:
                rows, gpu_reason, field_reasons, errors = result
                if self.gpu.reason is not None:
                    gpu_reason = self.gpu.reason
            else:
                rows = [first, self._host_row(t0)]
                gpu_reason = self.gpu.reason or f"sampler process failed: {failure}"
                field_reasons, errors = {}, {}
            self._gpu_errors = errors
            out.append(self._reduce(rows, baseline, duration, peak, gpu_reason=gpu_reason, field_reasons=field_reasons))

    def _host_row(self, t0: float) -> dict[str, float | None]:
        row: dict[str, float | None] = {"t_s": time.perf_counter() - t0}
        row.update(self.host.sample())
        return row

    def _reduce(
        self,
        rows: list[dict[str, float | None]],
        baseline: int,
        duration_s: float,
        exact_peak: int | None = None,
        *,
        gpu_reason: str | object | None = ...,
        field_reasons: dict[str, str] | None = None,
    ) -> Telemetry:
        rss = [int(r["rss_bytes"]) for r in rows if r.get("rss_bytes") is not None]  # type: ignore[arg-type]
        cpu = [float(r["cpu_pct"]) for r in rows[1:] if r.get("cpu_pct") is not None]  # type: ignore[arg-type]
        reason = self.gpu.reason if gpu_reason is ... else gpu_reason
        if field_reasons is None:
            field_reasons = dict(getattr(self.gpu, "field_reasons", None) or {})
        if "gpu" in self._gpu_errors:
            field_reasons = {k: self._gpu_errors["gpu"] for k in _SAMPLER_KEYS} | field_reasons
        gpu, reasons = reduce_gpu(rows, reason=reason, field_reasons=field_reasons)  # type: ignore[arg-type]
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
            gpu_reason=reason,  # type: ignore[arg-type]
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
