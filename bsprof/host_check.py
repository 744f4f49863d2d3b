"""``bsprof check``: the host's state before a sweep, and what to change so that its figures can be trusted.

:func:`read_host_state` samples the host over a short interval with the same counters the trials record
(:mod:`bsprof.engine.host_load`), lists the processes using the most CPU, reads the CPU frequency governor
(``/sys/devices/system/cpu/cpu*/cpufreq/scaling_governor``) and, per CUDA GPU, NVML's persistence mode, SM
clock against its maximum, the clock-event ("throttle") reasons and the other compute processes.
:func:`advice` turns that into one line per thing to change; the CLI prints both.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from typing import Any

from bsprof.engine.host_load import HostLoad, assess_host_load, read_host_counters

__all__ = ["GpuState", "HostState", "advice", "read_host_state"]


@dataclass(frozen=True)
class GpuState:
    """One GPU as NVML sees it (``None`` fields: not readable, see ``reason``).

    Attributes:
        index: torch's CUDA index.
        name: Device name.
        persistence_mode: Whether the driver stays loaded between processes.
        sm_clock_hz: Current SM clock (Hz).
        max_sm_clock_hz: Maximum SM clock (Hz).
        throttle_reasons: Names of the clock-event reasons set now.
        other_processes: Compute processes on the GPU other than this one.
        reason: Why the GPU could not be read (``None`` when it could).
    """

    index: int
    name: str = ""
    persistence_mode: bool | None = None
    sm_clock_hz: float | None = None
    max_sm_clock_hz: float | None = None
    throttle_reasons: tuple[str, ...] = ()
    other_processes: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class HostState:
    """The host over a short sampling interval.

    Attributes:
        load: What other processes did meanwhile, judged for a trial with ``threads`` threads.
        load_avg_1m: The kernel's 1-minute load average.
        top_processes: (pid, name, CPU percent of one core) of the busiest other processes.
        governors: CPU frequency governors in use (empty where the kernel exposes none).
        gpus: One per CUDA GPU.
    """

    load: HostLoad | None
    load_avg_1m: float | None
    top_processes: tuple[tuple[int, str, float], ...]
    governors: tuple[str, ...]
    gpus: tuple[GpuState, ...]


def _governors() -> tuple[str, ...]:
    found = set()
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor"):
        try:
            with open(path, encoding="ascii") as f:
                found.add(f.read().strip())
        except OSError:
            continue
    return tuple(sorted(found))


def _gpu_state(index: int, nvml: Any | None) -> GpuState:
    from bsprof.engine.nvml import NVML_CLOCK_SM, open_nvml_gpu, throttle_reason_names
    from bsprof.engine.nvml_devices import NvmlError, call

    gpu = open_nvml_gpu(index, nvml=nvml)
    if gpu.reason is not None:
        return GpuState(index, reason=gpu.reason)
    try:
        row = gpu.sample()

        def read(fn: str, *args: Any) -> Any:
            f = getattr(gpu.nvml, fn, None)
            if f is None:
                return None
            try:
                return call(f, gpu.handle, *args)
            except NvmlError:
                return None

        persistence = read("nvmlDeviceGetPersistenceMode")
        max_clock = read("nvmlDeviceGetMaxClockInfo", NVML_CLOCK_SM)
        mask = row.get("throttle_reasons")
        others = row.get("gpu_other_processes")
        return GpuState(
            index,
            name=gpu.name,
            persistence_mode=None if persistence is None else bool(persistence),
            sm_clock_hz=row.get("sm_clock_hz"),
            max_sm_clock_hz=None if max_clock is None else float(max_clock) * 1e6,
            throttle_reasons=tuple(throttle_reason_names(int(mask)) if mask is not None else ()),
            other_processes=None if others is None else int(others),
        )
    finally:
        gpu.close()


def read_host_state(
    *, interval_s: float = 1.0, threads: int = 1, gpu_count: int | None = None, nvml: Any | None = None
) -> HostState:
    """Sample the host for ``interval_s`` seconds.

    Args:
        interval_s: Sampling interval (seconds).
        threads: The threads a trial would use (torch's intra-op threads on the CPU).
        gpu_count: CUDA GPUs to read; ``None`` asks torch.
        nvml: The NVML library (tests pass a fake); ``None`` imports ``pynvml``.
    """
    import psutil

    me = os.getpid()
    procs = []
    for p in psutil.process_iter(["pid", "name"]):
        if p.info["pid"] != me:
            try:
                p.cpu_percent(None)
                procs.append(p)
            except psutil.Error:
                continue
    rows = []
    t0 = time.perf_counter()
    for _ in range(5):
        row = read_host_counters()
        if row is not None:
            t = os.times()
            rows.append({**row, "t_s": time.perf_counter() - t0, "own_cpu_s": t.user + t.system, "sampler_cpu_s": 0.0})
        time.sleep(interval_s / 4)
    top = []
    for p in procs:
        try:
            top.append((p.info["pid"], str(p.info["name"]), float(p.cpu_percent(None))))
        except psutil.Error:
            continue
    top.sort(key=lambda x: -x[2])
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        load_avg: float | None = os.getloadavg()[0]
    except OSError:
        load_avg = None
    return HostState(
        load=assess_host_load(rows, cpu_count=os.cpu_count() or 1, threads=threads),
        load_avg_1m=load_avg,
        top_processes=tuple(x for x in top[:5] if x[2] >= 5.0),
        governors=_governors(),
        gpus=tuple(_gpu_state(i, nvml) for i in range(gpu_count)),
    )


def advice(state: HostState) -> list[str]:
    """What to change before a sweep, one line each (empty: nothing)."""
    out = []
    load = state.load
    if load is not None and load.busy:
        out.append(f"the host is busy ({'; '.join(load.busy_reasons)}): stop other jobs or measure elsewhere")
    if state.top_processes:
        names = ", ".join(f"{n} (pid {pid}, {pct:.0f}%)" for pid, n, pct in state.top_processes[:3])
        out.append(f"other processes using CPU: {names}")
    if load is not None and load.threads > 1 and (load.other_cpu_cores or 0) > 0.5:
        free = max(1, int(load.cpu_count - (load.other_cpu_cores or 0)))
        out.append(f"use --threads {free} (the cores free now; bsprof's CPU default is 1): {load.threads} threads "
                   "wait on each other at every parallel region while another process holds a core")  # fmt: skip
    slow_governors = [g for g in state.governors if g != "performance"]
    if slow_governors:
        out.append(f"CPU frequency governor {'/'.join(slow_governors)}: `sudo cpupower frequency-set -g performance` "
                   "(pyperf system tune does the same)")  # fmt: skip
    for g in state.gpus:
        if g.reason is not None:
            continue
        if g.persistence_mode is False:
            out.append(f"GPU {g.index}: persistence mode off: `sudo nvidia-smi -i {g.index} -pm 1`")
        if g.throttle_reasons and set(g.throttle_reasons) - {"gpu_idle"}:
            out.append(f"GPU {g.index}: clocks held back now ({', '.join(g.throttle_reasons)}): check cooling and "
                       "power limits, or lock clocks (`nvidia-smi -lgc`)")  # fmt: skip
        if g.other_processes:
            out.append(f"GPU {g.index}: {g.other_processes} other process(es) use it: the trials will be marked busy")
    return out
