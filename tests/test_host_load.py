"""Busy-host detection, re-measure, stability verdicts and the gate's refusal, with controlled inputs only:
fake host counters, a fake NVML, a sleeping workload whose slow rounds are injected. No wall-clock asserts."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from fake_nvml import FakeDevice, FakeNvml, uuid
from helpers import ref

from bsprof.engine.host_load import HostLoad, assess_host_load, read_host_counters, remeasure_busy
from bsprof.engine.nvml import open_nvml_gpu
from bsprof.engine.result import ProfileInfo, TrialExtra
from bsprof.engine.sweep import SweepConfig, run_sweep
from bsprof.engine.timing import StepTimes
from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec
from bsprof.stability import DRIFT_REL_MAX, SPREAD_REL_MAX, stability_table, verdict
from bsprof.store import Store
from bsprof.workload import load_workload


def _rows(
    *, wall_s: float = 10.0, other_cores: float = 0.0, own_cores: float = 1.0, queue: float = 2.0, steal: float = 0.0
) -> list[dict[str, Any]]:
    """Two polls of a 2-core host ``wall_s`` apart: others busy ``other_cores``, the trainer ``own_cores``."""
    busy = (other_cores + own_cores) * wall_s
    first = {"t_s": 0.0, "sys_busy_s": 100.0, "sys_total_s": 1000.0, "sys_steal_s": 5.0, "own_cpu_s": 3.0,
             "sampler_cpu_s": 1.0, "procs_running": queue + 1}  # fmt: skip
    last = {"t_s": wall_s, "sys_busy_s": 100.0 + busy, "sys_total_s": 1000.0 + 2 * wall_s,
            "sys_steal_s": 5.0 + steal * 2 * wall_s, "own_cpu_s": 3.0 + own_cores * wall_s, "sampler_cpu_s": 1.0,
            "procs_running": queue + 1}  # fmt: skip
    return [first, last]


def test_a_quiet_host_is_not_busy() -> None:
    load = assess_host_load(_rows(other_cores=0.1), cpu_count=2, threads=1)
    assert load is not None and not load.busy
    assert load.other_cpu_cores == pytest.approx(0.1)
    assert load.own_cpu_cores == pytest.approx(1.0)


def test_one_spinning_process_is_harmless_to_one_thread_and_flags_two() -> None:
    rows = _rows(other_cores=1.0, queue=2.0)
    assert not assess_host_load(rows, cpu_count=2, threads=1).busy  # type: ignore[union-attr]
    two = assess_host_load(_rows(other_cores=1.0, own_cores=0.6, queue=3.0), cpu_count=2, threads=2)
    assert two is not None and two.busy
    assert any("other processes used 1.0 of 2 cores" in r for r in two.busy_reasons)
    assert any("runnable tasks" in r for r in two.busy_reasons)


def test_steal_time_and_gpu_neighbours_flag() -> None:
    assert "stolen" in assess_host_load(_rows(steal=0.2), cpu_count=2, threads=1).busy_reasons[0]  # type: ignore[union-attr]
    gpu = assess_host_load(_rows(), cpu_count=2, threads=1, gpu_other_processes=2)
    assert gpu is not None and gpu.busy_reasons == ("2 other process(es) on the GPU",)


def test_without_counters_there_is_no_verdict() -> None:
    assert assess_host_load([{"t_s": 0.0}, {"t_s": 1.0}], cpu_count=2, threads=1) is None
    assert read_host_counters("/nonexistent/stat") is None


def test_host_load_round_trips_through_the_store_json() -> None:
    load = assess_host_load(_rows(other_cores=1.9), cpu_count=2, threads=1)
    extra = TrialExtra(host_load=load, remeasures=2)
    back = TrialExtra.from_json(extra.to_json())
    assert back.host_load == load and back.remeasures == 2 and back.host_load.busy  # type: ignore[union-attr]
    assert HostLoad.from_json({"cpu_count": "x"}) is None


def test_the_real_proc_stat_is_read_where_there_is_one() -> None:
    counters = read_host_counters()
    if counters is None:
        pytest.skip("no /proc/stat")
    assert counters["sys_total_s"] >= counters["sys_busy_s"] > 0
    assert counters["procs_running"] >= 1


# --- NVML: other processes on the trial's GPU ---------------------------------------------------------------


def test_nvml_counts_other_compute_processes_not_the_trainer() -> None:
    import os

    dev = FakeDevice(uuid(0), compute_pids=[os.getpid(), 4242, 4343])
    gpu = open_nvml_gpu(0, nvml=FakeNvml([dev]))
    assert gpu.sample()["gpu_other_processes"] == 2
    alone = open_nvml_gpu(0, nvml=FakeNvml([FakeDevice(uuid(0), compute_pids=[os.getpid()])]))
    assert alone.sample()["gpu_other_processes"] == 0


# --- re-measure ----------------------------------------------------------------------------------------------


def _result(sps: float, busy: bool) -> TrialResult:
    load = assess_host_load(_rows(other_cores=1.9 if busy else 0.0), cpu_count=2, threads=1)
    spec = TrialSpec("w", "throughput", 8, 0, 0.1)
    return TrialResult(spec, "ok", "cpu", metrics={"samples_per_s": sps}, extra=TrialExtra(host_load=load))


def test_remeasure_stops_at_the_first_quiet_measurement() -> None:
    queue = [_result(100.0, True), _result(900.0, False), _result(1.0, False)]
    kept = remeasure_busy(lambda: queue.pop(0), attempts=5)
    assert kept.metrics["samples_per_s"] == 900.0 and kept.extra.remeasures == 1 and kept.metrics["remeasures"] == 1
    assert len(queue) == 1


def test_remeasure_keeps_the_fastest_busy_one_still_marked_when_the_budget_runs_out() -> None:
    queue = [_result(100.0, True), _result(300.0, True), _result(200.0, True), _result(999.0, False)]
    kept = remeasure_busy(lambda: queue.pop(0), attempts=2)
    assert kept.metrics["samples_per_s"] == 300.0 and kept.extra.host_load.busy  # type: ignore[union-attr]
    assert kept.extra.remeasures == 2 and len(queue) == 1


def test_a_sweep_remeasures_busy_throughput_trials(tmp_path: Path) -> None:
    calls: list[TrialSpec] = []

    def runner(workload: Any, spec: TrialSpec, settings: Any) -> TrialResult:
        calls.append(spec)
        busy = spec.batch_size == 8 and len([c for c in calls if c.batch_size == 8]) == 1  # first B=8 only
        r = _result(1000.0, busy)
        return TrialResult(spec, "ok", "cpu", metrics=r.metrics, extra=r.extra, started_at=time.time())

    config = SweepConfig("tiny", (8, 16), kinds=("throughput",), seeds=1, repeats=1, remeasure_busy=2)
    with Store(tmp_path / "s.db", create=True) as store:
        out = run_sweep(
            config, load_workload(ref("tiny.py")), EngineSettings(torch.device("cpu")), store,
            runners={"throughput": runner}, prime=False,
        )  # fmt: skip
    assert [c.batch_size for c in calls] == [8, 8, 16]
    assert [r.extra.remeasures for r in out.results] == [1, 0]


def test_a_profiled_trial_measured_again_is_profiled_once_and_keeps_its_profile(tmp_path: Path) -> None:
    """Re-measures time the step again; they must not run the profiler pass again (one trace per trial)."""
    profiled: list[bool] = []

    def runner(workload: Any, spec: TrialSpec, settings: EngineSettings) -> TrialResult:
        profiled.append(settings.profile)
        r = _result(1000.0 + len(profiled), busy=len(profiled) < 3)
        info = ProfileInfo(trace_dir=str(tmp_path / "t"), trace_files=("a.json",)) if settings.profile else None
        return TrialResult(spec, "ok", "cpu", metrics=r.metrics, extra=replace(r.extra, profile=info))

    config = SweepConfig("tiny", (8,), kinds=("throughput",), seeds=1, repeats=1, remeasure_busy=2)
    with Store(tmp_path / "s.db", create=True) as store:
        out = run_sweep(
            config, load_workload(ref("tiny.py")), EngineSettings(torch.device("cpu"), profile=True), store,
            runners={"throughput": runner}, prime=False,
        )  # fmt: skip
    assert profiled == [True, False, False]
    (kept,) = out.results
    assert kept.extra.remeasures == 2 and kept.extra.profile is not None
    assert kept.extra.profile.trace_files == ("a.json",)


# --- stability verdicts --------------------------------------------------------------------------------------


def test_verdicts_of_controlled_series() -> None:
    assert verdict([1000.0, 1010.0, 990.0], [0.02] * 3, [])[0] == "stable"
    assert verdict([1000.0], [0.02], [])[0] == "single"
    v, spread, *_ = verdict([1000.0, 1000.0, 600.0], [0.02] * 3, [])  # one slow round
    assert v == "unstable" and spread is not None and spread > SPREAD_REL_MAX
    v, _, drift, _, why = verdict([1000.0, 1000.0, 950.0, 850.0], [0.02] * 4, [])  # later rounds slower
    assert v == "unstable" and drift is not None and drift < -DRIFT_REL_MAX and "drift" in why
    assert verdict([1000.0, 1000.0], [0.5, 0.5], [])[0] == "unstable"  # noisy blocks within the trials
    assert verdict([1000.0, 1000.0], [0.02] * 2, ["others 1.9 cores"])[0] == "busy"


class SleepStep:
    """A "training step" that sleeps ``step_s``, ``slow`` times longer in the injected slow rounds."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s

    def times(self, round_: int, slow_rounds: set[int], slow: float) -> StepTimes:
        """Measure 4 blocks of 5 steps with a fake clock: the sleep's length is what the clock advances by."""
        factor = slow if round_ in slow_rounds else 1.0
        return StepTimes(tuple(5 * self.step_s * factor for _ in range(4)), 5, 8)


def _trials(slow_rounds: set[int], busy_rounds: set[int] = frozenset(), slow: float = 3.0) -> pd.DataFrame:
    step = SleepStep(1e-3)
    rows = []
    for r in range(5):
        t = step.times(r, slow_rounds, slow)
        rows.append({"workload": "w", "device": "cpu", "batch_size": 8, "kind": "throughput", "status": "ok",
                     "repeat": r, "seed": 0, "samples_per_s": t.samples_per_s, "step_time_s": t.median_s,
                     "step_time_iqr_s": t.iqr_s, "host_busy": r in busy_rounds,
                     "host_other_cpu_cores": 1.8 if r in busy_rounds else 0.0, "host_run_queue": 2.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_stability_table_from_a_sleeping_workload_with_injected_slow_rounds() -> None:
    assert stability_table(_trials(set())).iloc[0]["verdict"] == "stable"
    slow = stability_table(_trials({3})).iloc[0]
    assert slow["verdict"] == "unstable" and "std" in slow["why"]
    busy = stability_table(_trials({3}, busy_rounds={3})).iloc[0]
    assert busy["verdict"] == "busy" and busy["busy_trials"] == 1 and "other processes 1.8 cores" in busy["why"]
    assert stability_table(pd.DataFrame()).empty


# --- the gate refuses busy results -------------------------------------------------------------------------


def _store(path: Path, busy: bool) -> Path:
    with Store(path, create=True) as st:
        run = st.open_run("w", {"x": 1}, {"hostname": "ci", "device_name": "cpu"})
        for seed in range(3):
            times = StepTimes(tuple(1e-2 * (1 + 0.01 * i) for i in range(10)), 10, 8)
            r = _result(times.samples_per_s, busy and seed == 1)
            spec = TrialSpec("w", "throughput", 8, seed, 0.1)
            metrics = {"step_time_s": times.median_s, "samples_per_s": times.samples_per_s}
            metrics.update(r.extra.host_load.metrics())  # type: ignore[union-attr]
            st.add_trial(run.run_id, TrialResult(spec, "ok", "cpu", "cpu", metrics, step_times=times, extra=r.extra))
    return path


def test_compare_refuses_a_busy_store_with_exit_3(tmp_path: Path, cli: Any) -> None:
    quiet, busy = _store(tmp_path / "a.db", False), _store(tmp_path / "b.db", True)
    assert cli("compare", quiet, _store(tmp_path / "c.db", False)).code == 0
    r = cli("compare", quiet, busy)
    assert r.code == 3, r.out + r.err
    assert "busy host" in r.err and "w-B8" in r.err
    assert cli("compare", quiet, busy, "--allow-busy").code == 0


def test_compare_refuses_busy_benchmark_json(tmp_path: Path, cli: Any) -> None:
    import json

    def write(name: str, busy: bool) -> Path:
        extra = {"device": "cpu", "device_name": "cpu", "host_busy": busy}
        if busy:
            extra["host_busy_reason"] = "other processes used 1.9 of 2 cores"
        bench = {"name": "t", "fullname": "b::t", "stats": {"median": 1e-3, "data": [1e-3] * 5}, "extra_info": extra}
        p = tmp_path / name
        p.write_text(json.dumps({"machine_info": {"node": "ci"}, "benchmarks": [bench]}))
        return p

    r = cli("compare", write("a.json", False), write("b.json", True))
    assert r.code == 3 and "other processes used 1.9 of 2 cores" in r.err


# --- bsprof check ----------------------------------------------------------------------------------------------


def test_check_advice_from_a_controlled_state() -> None:
    from bsprof.host_check import GpuState, HostState, advice

    load = assess_host_load(_rows(other_cores=1.0, own_cores=0.6, queue=3.0), cpu_count=2, threads=2)
    state = HostState(
        load=load,
        load_avg_1m=3.0,
        top_processes=((4242, "spinner", 99.0),),
        governors=("powersave",),
        gpus=(GpuState(0, "A100", persistence_mode=False, throttle_reasons=("hw_slowdown",), other_processes=1),),
    )
    text = "\n".join(advice(state))
    for expected in ("the host is busy", "spinner (pid 4242, 99%)", "--threads 1", "governor powersave",
                     "persistence mode off", "hw_slowdown", "1 other process(es)"):  # fmt: skip
        assert expected in text, text
    quiet = HostState(assess_host_load(_rows(), cpu_count=2, threads=1), 0.1, (), ("performance",), ())
    assert advice(quiet) == []


def test_check_reads_gpus_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from bsprof.host_check import read_host_state

    dev = FakeDevice(uuid(0), throttle=0x8, compute_pids=[os.getpid(), 99], persistence_mode=0)
    state = read_host_state(interval_s=0.01, gpu_count=1, nvml=FakeNvml([dev]))
    g = state.gpus[0]
    assert (g.persistence_mode, g.throttle_reasons, g.other_processes) == (False, ("hw_slowdown",), 1)
    assert g.sm_clock_hz == 1410e6


def test_check_command_prints_a_verdict(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import bsprof.host_check as hc

    busy = assess_host_load(_rows(other_cores=1.9), cpu_count=2, threads=1)
    monkeypatch.setattr(hc, "read_host_state", lambda **kw: hc.HostState(busy, 2.0, (), (), ()))
    r = cli("check")
    assert r.code == 3 and "verdict: busy" in r.out and "other processes 1.90 cores" in r.out
    quiet = assess_host_load(_rows(), cpu_count=2, threads=1)
    monkeypatch.setattr(hc, "read_host_state", lambda **kw: hc.HostState(quiet, 0.0, (), (), ()))
    assert cli("check").code == 0


def test_the_report_banner_names_busy_and_unstable_batch_sizes() -> None:
    from bsprof.report.page import stability_warnings

    table = stability_table(_trials({3}, busy_rounds={3})).assign(run="run-a")
    (line,) = stability_warnings(table)
    assert line.startswith("run-a: B=8 BUSY") and "bsprof check" in line
    assert stability_warnings(stability_table(_trials(set())).assign(run="run-a")) == []


# --- convergence trials record host load the throughput trial's way ---------------------------------------


def test_convergence_and_throughput_trials_record_host_load_alike() -> None:
    """Both trial kinds run in one telemetry window (``trial_window``) and record the same host-load fields."""
    from bsprof.engine.convergence import ConvergenceSettings, run_convergence_trial
    from bsprof.engine.timing import TimingSettings
    from bsprof.engine.trial import run_throughput_trial
    from bsprof.workloads.digits import DigitsMLP

    w = DigitsMLP()
    settings = EngineSettings(torch.device("cpu"), timing=TimingSettings(min_time_s=0.05))
    conv = run_convergence_trial(
        w, TrialSpec(w.name, "convergence", 64, 0, 0.1), settings, ConvergenceSettings(max_steps=30)
    )
    tp = run_throughput_trial(w, TrialSpec(w.name, "throughput", 64, 0, 0.1), settings)
    host_keys = set(HostLoad(cpu_count=2, threads=1, wall_s=1.0).metrics())
    for r in (conv, tp):
        load = r.extra.host_load
        assert load is not None and load.wall_s > 0 and load.cpu_count >= 1, r.spec.kind
        assert host_keys <= set(r.metrics) and r.metrics["host_busy"] == load.busy
        assert r.extra.to_json()["host_load"] == load.to_json()  # stored with the trial


def test_the_export_shows_a_busy_batch_size_busy(tmp_path: Path, cli: Any) -> None:
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(cli("export", "--store", _store(tmp_path / "b.db", True)).out)))
    assert {r["stability"] for r in rows} == {"busy"}
    assert "1/3 trial(s) measured on a busy host" in rows[0]["stability_why"]
    rows = list(csv.DictReader(io.StringIO(cli("export", "--store", _store(tmp_path / "q.db", False)).out)))
    assert {r["stability"] for r in rows} == {"stable"} and {r["stability_why"] for r in rows} == {""}
