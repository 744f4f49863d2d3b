"""What else the host was doing during a trial, and whether that makes the trial's figures untrustworthy.

Every telemetry poll (the sampler process's, at the monitor's rate: nothing is read per training step) carries
cumulative counters of the host (:func:`read_host_counters`): CPU seconds of all cores spent busy
(user, nice, system, irq, softirq from ``/proc/stat``), all of them, stolen by the hypervisor (``steal``), the
runnable tasks (``procs_running``), and the CPU seconds of the training process and of the sampler itself.
:func:`assess_host_load` reduces a window's polls into a :class:`HostLoad` and marks it *busy* when:

* **other processes' CPU use** leaves fewer free cores than the trial's threads need: the cores busy with
  other processes (host busy time minus the trainer's and the sampler's, over wall time) exceed
  ``cpu_count - threads + OTHER_CPU_SLACK_CORES``;
* **the run queue** (mean runnable tasks, the sampler's own read not counted) exceeds
  ``cpu_count + RUN_QUEUE_SLACK``: threads wait for a core;
* **steal time** (virtual machines) is above :data:`STEAL_PCT_MAX` percent of the CPU time;
* **other processes use the trial's GPU** (NVML's compute processes other than the trainer).

The trainer's own CPU use against wall time x threads (``own_cpu_cores``) is recorded beside them: a value
far below its threads while the host is busy is what contention looks like from inside.
Everything here is pure apart from :func:`read_host_counters` (Linux ``/proc``; ``None`` elsewhere).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from bsprof.engine.result import TrialResult

__all__ = [
    "BUSY_ROUND_SHARE_MAX",
    "HOST_KEYS",
    "OTHER_CPU_SLACK_CORES",
    "RUN_QUEUE_SLACK",
    "STEAL_PCT_MAX",
    "HostLoad",
    "HostWindow",
    "QuietMeasurement",
    "assess_host_load",
    "measure_on_quiet_host",
    "read_host_counters",
    "remeasure_busy",
]

OTHER_CPU_SLACK_CORES = 0.5
"""Cores' worth of other processes' CPU use tolerated beyond the cores the trial's threads leave free."""

RUN_QUEUE_SLACK = 0.5
"""Runnable tasks tolerated beyond the core count (mean over the window's polls)."""

STEAL_PCT_MAX = 10.0
"""Steal time (percent of all CPU time) above which a virtual machine's trial is busy."""

HOST_KEYS = ("sys_busy_s", "sys_total_s", "sys_steal_s", "procs_running", "own_cpu_s", "sampler_cpu_s")
"""Keys :func:`read_host_counters` adds to a poll (cumulative seconds, and the instantaneous run queue)."""

BUSY_ROUND_SHARE_MAX = 0.25
"""Share of a :class:`HostWindow`'s rounds that may be busy before the whole measurement counts as busy: a verdict
taken as a median over rounds survives a few disturbed rounds, not a quarter of them."""

_T = TypeVar("_T")

_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def read_host_counters(stat_path: str = "/proc/stat") -> dict[str, float] | None:
    """The host's cumulative CPU counters (seconds over all cores) and its runnable tasks, or ``None``
    where ``/proc/stat`` cannot be read (not Linux).

    The ``sampler_cpu_s`` key is this (the reading) process's own CPU seconds; the caller adds ``own_cpu_s``
    (the trainer's).
    """
    try:
        with open(stat_path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:9]]
            v += [0] * (8 - len(v))
            user, nice, system, _idle, _iowait, irq, softirq, steal = v
            out["sys_busy_s"] = (user + nice + system + irq + softirq) * _TICK_S
            out["sys_steal_s"] = steal * _TICK_S
            out["sys_total_s"] = sum(v) * _TICK_S
        elif line.startswith("procs_running "):
            out["procs_running"] = float(line.split()[1])
    t = os.times()
    out["sampler_cpu_s"] = t.user + t.system
    return out if "sys_busy_s" in out else None


@dataclass(frozen=True)
class HostLoad:
    """What the host did during one trial.

    Attributes:
        cpu_count: Logical CPUs of the host.
        threads: CPU threads the trial needed (torch's intra-op threads on the CPU, 1 for a GPU trial).
        wall_s: Seconds between the window's first and last host readings.
        other_cpu_cores: Cores busy with other processes (mean over the window), ``None`` if not readable.
        run_queue_mean: Mean runnable tasks at the polls, the sampler's own read not counted.
        steal_pct: Percent of the CPU time stolen by the hypervisor.
        own_cpu_cores: The trainer's CPU seconds per wall second.
        gpu_other_processes: Most other processes seen on the trial's GPU (``None``: not read).
        busy_reasons: Why the trial counts as measured on a busy host (empty: it does not).
    """

    cpu_count: int
    threads: int
    wall_s: float
    other_cpu_cores: float | None = None
    run_queue_mean: float | None = None
    steal_pct: float | None = None
    own_cpu_cores: float | None = None
    gpu_other_processes: int | None = None
    busy_reasons: tuple[str, ...] = ()

    @property
    def busy(self) -> bool:
        """Whether the trial was measured on a busy host."""
        return bool(self.busy_reasons)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        out["busy_reasons"] = list(self.busy_reasons)
        return out

    @classmethod
    def from_json(cls, data: Any) -> HostLoad | None:
        """Read :meth:`to_json`'s object; ``None`` for anything else."""
        if not isinstance(data, dict) or not isinstance(data.get("cpu_count"), int):
            return None

        def num(key: str) -> float | None:
            v = data.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        gpu = data.get("gpu_other_processes")
        reasons = data.get("busy_reasons")
        return cls(
            cpu_count=data["cpu_count"],
            threads=int(num("threads") or 1),
            wall_s=num("wall_s") or 0.0,
            other_cpu_cores=num("other_cpu_cores"),
            run_queue_mean=num("run_queue_mean"),
            steal_pct=num("steal_pct"),
            own_cpu_cores=num("own_cpu_cores"),
            gpu_other_processes=gpu if isinstance(gpu, int) else None,
            busy_reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
        )

    def metrics(self) -> dict[str, float | int | bool | None]:
        """The export columns of this load (``host_busy`` and the readings behind it)."""
        return {
            "host_busy": self.busy,
            "host_other_cpu_cores": self.other_cpu_cores,
            "host_run_queue": self.run_queue_mean,
            "host_steal_pct": self.steal_pct,
            "host_own_cpu_cores": self.own_cpu_cores,
            "gpu_other_processes": self.gpu_other_processes,
        }


def _delta(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    have = [r for r in rows if r.get(key) is not None]
    return float(have[-1][key]) - float(have[0][key]) if len(have) >= 2 else None


def assess_host_load(
    rows: Sequence[dict[str, Any]],
    *,
    cpu_count: int,
    threads: int,
    gpu_other_processes: int | None = None,
    reader_is_trial: bool = False,
) -> HostLoad | None:
    """The :class:`HostLoad` of a window's polls (rows with ``t_s`` and :data:`HOST_KEYS`), or ``None`` when
    fewer than two polls carry the host's counters.

    Args:
        rows: The window's polls, in order.
        cpu_count: Logical CPUs of the host.
        threads: CPU threads the trial needed.
        gpu_other_processes: Most other processes seen on the trial's GPU, ``None`` if not read.
        reader_is_trial: The process that read ``procs_running`` is the measurement itself (:class:`HostWindow`),
            not a sampler beside it: it counts as a runnable task instead of being left out.
    """
    timed = [r for r in rows if r.get("sys_total_s") is not None and r.get("t_s") is not None]
    if len(timed) < 2:
        return None
    wall_s = float(timed[-1]["t_s"]) - float(timed[0]["t_s"])
    total, busy, steal = (_delta(timed, k) for k in ("sys_total_s", "sys_busy_s", "sys_steal_s"))
    own, sampler = _delta(timed, "own_cpu_s"), _delta(timed, "sampler_cpu_s") or 0.0
    other = own_cores = steal_pct = None
    if wall_s > 0 and busy is not None and own is not None:
        other = max(0.0, (busy - own - sampler) / wall_s)
        own_cores = own / wall_s
    if total and steal is not None:
        steal_pct = 100.0 * steal / total
    reader = 0.0 if reader_is_trial else 1.0  # a sampler reading the counters is running then: leave it out
    queue = [float(r["procs_running"]) - reader for r in timed if r.get("procs_running") is not None]
    run_queue = sum(queue) / len(queue) if queue else None
    reasons = []
    free = cpu_count - threads + OTHER_CPU_SLACK_CORES
    if other is not None and other > free:
        reasons.append(f"other processes used {other:.1f} of {cpu_count} cores while the trial needed {threads}")
    if run_queue is not None and run_queue > cpu_count + RUN_QUEUE_SLACK:
        reasons.append(f"{run_queue:.1f} runnable tasks on {cpu_count} cores")
    if steal_pct is not None and steal_pct > STEAL_PCT_MAX:
        reasons.append(f"{steal_pct:.0f}% of CPU time stolen by the hypervisor")
    if gpu_other_processes:
        reasons.append(f"{gpu_other_processes} other process(es) on the GPU")
    return HostLoad(
        cpu_count=cpu_count,
        threads=threads,
        wall_s=wall_s,
        other_cpu_cores=other,
        run_queue_mean=run_queue,
        steal_pct=steal_pct,
        own_cpu_cores=own_cores,
        gpu_other_processes=gpu_other_processes,
        busy_reasons=tuple(reasons),
    )


def remeasure_busy(run: Callable[[], TrialResult], attempts: int) -> TrialResult:
    """``run()``, run again up to ``attempts`` more times while its result was measured on a busy host.

    Interference only adds time, so of several busy measurements the fastest (highest ``samples_per_s``) is
    kept; a measurement on a quiet host ends the loop and is kept. Either way the result records the number
    of re-measures (``extra.remeasures``) and stays marked busy when no quiet measurement came.
    """
    tries = [run()]
    while len(tries) <= attempts and _is_busy(tries[-1]):
        tries.append(run())
    if not _is_busy(tries[-1]):
        kept = tries[-1]
    else:
        kept = max(tries, key=lambda r: float(r.metrics.get("samples_per_s") or 0.0))
    if len(tries) == 1:
        return kept
    n = len(tries) - 1
    profile = kept.extra.profile or tries[0].extra.profile  # only the first measurement ran the profiler pass
    extra = replace(kept.extra, remeasures=n, profile=profile)
    return replace(kept, metrics={**kept.metrics, "remeasures": n}, extra=extra)


def _is_busy(result: TrialResult) -> bool:
    load = result.extra.host_load
    return result.status == "ok" and load is not None and load.busy


class HostWindow:
    """The host's counters read at the moments the caller picks (between its timed rounds), for measurements
    made outside the engine's trials (the benchmarks that assert a verdict): no thread and no process run beside
    the measurement, and nothing is read while a round is timed.

    This process reads the counters, so its own CPU time is the measurement's (``own_cpu_s``).

    Args:
        threads: CPU threads the measurement needs.
        cpu_count: Logical CPUs of the host (default: ``os.cpu_count()``).
        read: Reads the host's counters (:func:`read_host_counters`; tests pass fakes).
        clock: Seconds, monotonic.
    """

    def __init__(
        self,
        *,
        threads: int,
        cpu_count: int | None = None,
        read: Callable[[], dict[str, float] | None] = read_host_counters,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.threads = threads
        self.cpu_count = cpu_count or os.cpu_count() or 1
        self._read, self._clock = read, clock
        self._t0 = clock()
        self.rows: list[dict[str, float]] = []

    def mark(self) -> None:
        """Read the host's counters now: a round boundary (nothing is recorded where they cannot be read)."""
        counters = self._read()
        if counters is None:
            return
        own = counters.get("sampler_cpu_s", 0.0)
        self.rows.append({**counters, "own_cpu_s": own, "sampler_cpu_s": 0.0, "t_s": self._clock() - self._t0})

    def _assess(self, rows: Sequence[dict[str, Any]]) -> HostLoad | None:
        return assess_host_load(rows, cpu_count=self.cpu_count, threads=self.threads, reader_is_trial=True)

    def busy_reason(self) -> str | None:
        """Why the window counts as busy, or ``None``: when the whole window is busy (:func:`assess_host_load`),
        or when more than :data:`BUSY_ROUND_SHARE_MAX` of its rounds (between consecutive marks) are.
        ``None`` too when fewer than two marks could be read (nothing to judge by)."""
        whole = self._assess(self.rows)
        if whole is None:
            return None
        if whole.busy:
            return "; ".join(whole.busy_reasons)
        loads = [self._assess(self.rows[i : i + 2]) for i in range(len(self.rows) - 1)]
        rounds = [r for r in loads if r is not None and r.wall_s > 0]
        busy = [r for r in rounds if r.busy]
        if busy and len(busy) > BUSY_ROUND_SHARE_MAX * len(rounds):
            return f"{len(busy)} of {len(rounds)} rounds on a busy host, first: {busy[0].busy_reasons[0]}"
        return None


@dataclass(frozen=True)
class QuietMeasurement(Generic[_T]):
    """The outcome of :func:`measure_on_quiet_host`.

    Attributes:
        value: What the last attempt measured.
        busy_reason: Why the last attempt counts as measured on a busy host, ``None`` when it does not.
        attempts: Attempts made (1 = the first was quiet).
        busy_reasons: Why each busy attempt was busy, in order.
    """

    value: _T
    busy_reason: str | None
    attempts: int
    busy_reasons: tuple[str, ...] = ()


def measure_on_quiet_host(
    measure: Callable[[HostWindow], _T],
    *,
    attempts: int,
    threads: int,
    window: Callable[[], HostWindow] | None = None,
) -> QuietMeasurement[_T]:
    """``measure(window)`` in a fresh :class:`HostWindow`, again while the host was busy, at most ``attempts``
    times in all. The window is marked before and after; ``measure`` marks it between its rounds.

    Args:
        measure: Makes the measurement, calling ``window.mark()`` at its round boundaries.
        attempts: Most attempts (>= 1).
        threads: CPU threads the measurement needs.
        window: Makes the window (default: ``HostWindow(threads=threads)``; tests pass fakes).
    """
    make = window or (lambda: HostWindow(threads=threads))
    reasons: list[str] = []
    for attempt in range(1, max(1, attempts) + 1):
        w = make()
        w.mark()
        value = measure(w)
        w.mark()
        why = w.busy_reason()
        if why is None:
            return QuietMeasurement(value, None, attempt, tuple(reasons))
        reasons.append(why)
    return QuietMeasurement(value, reasons[-1], len(reasons), tuple(reasons))
