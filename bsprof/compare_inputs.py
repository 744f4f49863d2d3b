"""The inputs of ``bsprof compare``: a pytest-benchmark JSON file or a bsprof store, read into one :class:`Result`
(samples per benchmark and metric, statuses, peak memory and provenance). Every figure is validated on read
(:mod:`bsprof.benchmark_json`); :mod:`bsprof.compare` holds the statistics and the gate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bsprof.benchmark_json import finite_numbers
from bsprof.errors import BadInput

__all__ = ["ENVIRONMENT_KEYS", "MISSED", "Result", "Samples", "load_result"]

Samples = dict[tuple[str, str], list[float]]
"""(benchmark name, metric) -> values (lower is better)."""

MISSED = ("budget_exhausted", "diverged")
"""Trial statuses that mean "missed the target": judged through steps-to-target, not a failed benchmark."""

ENVIRONMENT_KEYS = ("torch_version", "cuda_version")
"""Provenance that must match (besides each benchmark's device) for step times to be comparable."""

_MACHINE_KEYS = ("node", "machine", "processor", "system", "python_version")


@dataclass(frozen=True)
class Result:
    """One input of a comparison, as read: samples, per-benchmark status and peak memory, and its provenance.

    Attributes:
        samples: Values per (benchmark, metric), lower is better.
        status: Per benchmark: ``ok`` when any of its trials (or the benchmark itself) measured, else the
            status its trials ended with (``oom``...).
        peak_mem_bytes: Largest peak memory per benchmark, where measured.
        machine: A summary of the host (compared for a warning only).
        devices: Device name per benchmark.
        environment: ``torch_version``, ``cuda_version`` (``None`` where unknown): compared strictly.
        threads: torch CPU threads, where recorded.
        config_hash: Hash of the run's configuration, where recorded.
        busy: Benchmarks measured on a busy host (name -> why), which the gate refuses to judge.
        mem_sources: How each benchmark's peak memory was measured (``cuda_allocator``, ``rss_vmhwm``,
            ``rss_sampled``), where recorded.
    """

    samples: Samples
    status: dict[str, str]
    peak_mem_bytes: dict[str, float]
    machine: dict[str, Any]
    devices: dict[str, str]
    environment: dict[str, str | None]
    threads: str | None = None
    config_hash: str | None = None
    busy: dict[str, str] = field(default_factory=dict)
    mem_sources: dict[str, str] = field(default_factory=dict)

    def remeasured(self, names: Iterable[str], rerun: Result) -> Result:
        """This result with the benchmarks ``names`` taken from ``rerun`` (their samples, status, peak memory,
        device and busy mark): what the gate judges after re-running them. Every name must be in ``rerun``."""
        names = set(names)

        def pick(mine: dict[Any, Any], theirs: dict[Any, Any], key: Callable[[Any], str] = str) -> dict[Any, Any]:
            return {k: v for k, v in mine.items() if key(k) not in names} | {
                k: v for k, v in theirs.items() if key(k) in names
            }

        return replace(
            self,
            samples=pick(self.samples, rerun.samples, key=lambda k: k[0]),
            status=pick(self.status, rerun.status),
            peak_mem_bytes=pick(self.peak_mem_bytes, rerun.peak_mem_bytes),
            devices=pick(self.devices, rerun.devices),
            busy=pick(self.busy, rerun.busy),
            mem_sources=pick(self.mem_sources, rerun.mem_sources),
        )


def _from_benchmark_json(path: Path) -> Result:
    from bsprof.benchmark_json import read_benchmark_json

    doc = read_benchmark_json(path)  # validates every figure: corrupt or non-finite input is BadInput
    samples: Samples = {}
    status: dict[str, str] = {}
    peak: dict[str, float] = {}
    devices: dict[str, str] = {}
    threads: set[str] = set()
    busy: dict[str, str] = {}
    mem_sources: dict[str, str] = {}
    for bench in doc.benchmarks:
        name, extra = bench.fullname, bench.extra_info
        status[name] = _status({str(extra.get("status") or "ok")})
        if extra.get("device_name") or extra.get("device"):
            devices[name] = str(extra.get("device_name") or extra.get("device"))
        if extra.get("peak_mem_bytes") is not None:
            peak[name] = float(extra["peak_mem_bytes"])
            if extra.get("peak_mem_source"):
                mem_sources[name] = str(extra["peak_mem_source"])
        if extra.get("threads") is not None:
            threads.add(str(int(extra["threads"])))
        if status[name] != "ok":
            continue
        if extra.get("host_busy") is True:
            busy[name] = str(extra.get("host_busy_reason") or "measured on a busy host")
        steps = extra.get("steps_to_target_per_seed")
        if steps:
            samples[(name, "steps_to_target")] = [math.inf if s is None else float(s) for s in steps]
            continue
        data = list(bench.data) or [float(t) for t in extra.get("step_times_s") or []]
        if not data and math.isfinite(bench.stats["median"]):
            data = [bench.stats["median"]]
        if not data:
            raise BadInput(f"{path}: {name}: no step times (stats.data, extra_info.step_times_s or stats.median)")
        samples[(name, "step_time_s")] = data
    machine = doc.machine_info
    cpu = machine.get("cpu") if isinstance(machine.get("cpu"), dict) else {}
    summary = {k: machine.get(k) for k in _MACHINE_KEYS} | {"cpu": cpu.get("brand_raw")}
    info = machine.get("bsprof") if isinstance(machine.get("bsprof"), dict) else {}
    env = {k: (str(info[k]) if info.get(k) is not None else None) for k in ENVIRONMENT_KEYS}
    if info.get("threads") is not None:
        threads.add(str(info["threads"]))
    cfg = info.get("config_hash")
    cfg_hash = str(cfg) if cfg else None
    return Result(samples, status, peak, summary, devices, env, _joined(threads), cfg_hash, busy, mem_sources)


def _status(statuses: set[str]) -> str:
    """A benchmark's status from its trials': ``ok`` when one measured or the rest only missed the target
    (judged by steps-to-target), else the failures (``oom``, ``error``)."""
    failed = statuses - {"ok", *MISSED}
    return ",".join(sorted(failed)) if failed and "ok" not in statuses else "ok"


def _joined(values: set[str]) -> str | None:
    return ",".join(sorted(values)) if values else None


def _from_store(path: Path) -> Result:
    from bsprof.store import Store

    samples: Samples = {}
    statuses: dict[str, set[str]] = {}
    peak: dict[str, float] = {}
    devices: dict[str, str] = {}
    busy: dict[str, str] = {}
    mem_sources: dict[str, str] = {}
    with Store(path) as store:
        run_ids = store.latest_run_ids()
        runs = [store.run(r) for r in run_ids]
        for row in store.trial_rows(run_ids):
            name = f"{row['workload']}-B{row['batch_size']}"
            devices[name] = str(row.get("device_name") or row.get("device"))
            statuses.setdefault(name, set()).add(str(row["status"]))
            if row["status"] != "ok":
                continue
            if row.get("peak_mem_bytes") is not None:
                peak[name] = max(peak.get(name, 0.0), float(row["peak_mem_bytes"]))
                if row.get("peak_mem_source"):
                    mem_sources[name] = str(row["peak_mem_source"])
            if row["kind"] == "throughput":
                if row.get("host_busy") is True or row.get("host_busy") == 1:
                    why = (row.get("extra") or {}).get("host_load", {}).get("busy_reasons") or ["busy host"]
                    busy.setdefault(name, "; ".join(why))
                st = row.get("step_times") or {}
                blocks, per_block = st.get("block_times_s"), st.get("steps_per_block")
                where = f"{path}: {name}: step times"
                values = (
                    [float(t) / per_block for t in finite_numbers(blocks, where)]  # type: ignore[operator]
                    if blocks and per_block
                    else [float(finite_numbers([row["step_time_s"]], where)[0])]  # type: ignore[arg-type]
                )
                samples.setdefault((name, "step_time_s"), []).extend(values)
        for row in store.trial_rows(run_ids):  # steps-to-target: a seed that missed counts as infinity
            if row["kind"] == "convergence" and row.get("phase", "main") in ("main", "final"):
                name = f"{row['workload']}-B{row['batch_size']}"
                steps = row.get("steps_to_target") if row["status"] == "ok" else None
                samples.setdefault((name, "steps_to_target"), []).append(math.inf if steps is None else float(steps))
    status = {n: _status(s) for n, s in statuses.items()}
    envs = [r.environment for r in runs]
    env = {k: _joined({str(e[k]) for e in envs if e.get(k) is not None}) for k in ENVIRONMENT_KEYS}
    threads = _joined({str(e["torch_num_threads"]) for e in envs if e.get("torch_num_threads") is not None})
    machine = {e.get("hostname"): e.get("device_name") for e in envs}
    cfg = _joined({r.config_hash for r in runs})
    return Result(samples, status, peak, machine, devices, env, threads, cfg, busy, mem_sources)


def load_result(path: str | Path) -> Result:
    """Read a pytest-benchmark JSON file or a bsprof store (its latest run per workload) for comparison.

    Raises:
        BadInput: A missing or unreadable file, one in neither format, or a figure that is not a finite number.
    """
    p = Path(path)
    if not p.exists():
        raise BadInput(f"not found: {p}")
    if not p.is_file():
        raise BadInput(f"not a file: {p}")
    with p.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"SQLite format 3"):
        return _from_store(p)
    return _from_benchmark_json(p)
