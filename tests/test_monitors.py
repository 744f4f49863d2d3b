"""Monitor windows and GPU reductions: literal series, a fake NVML behind the real monitor, and a whole
throughput trial whose stored GPU metrics must match the injected series within 1%."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fake_nvml import GPU_IS_LOST, FakeNvml, fake_gpus

from bsprof.engine.monitors import Monitor, WindowOpen
from bsprof.engine.nvml import ENERGY_COUNTER_MODULUS_MJ, open_nvml_gpu
from bsprof.engine.sampler_process import SamplerProcess
from bsprof.engine.samplers import NullGpu
from bsprof.engine.telemetry import GPU_FIELDS, Telemetry, downsample_rows, measured_gpu_metrics, reduce_gpu
from bsprof.engine.timing import TimingSettings
from bsprof.engine.trial import EngineSettings, TrialSpec, run_throughput_trial
from bsprof.store import Store
from bsprof.workloads.digits import DigitsMLP

# pure reductions ------------------------------------------------------------------------------------


def test_reduce_gpu_on_literal_rows() -> None:
    rows = [
        {"t_s": 0.0, "gpu_util_pct": 10.0, "mem_util_pct": 5.0, "mem_used_bytes": 100.0, "power_w": 100.0,
         "energy_counter_j": 0.0, "throttle_reasons": 0.0, "temperature_c": 50.0, "sm_clock_hz": 1e9},
        {"t_s": 0.5, "gpu_util_pct": 90.0, "mem_util_pct": 15.0, "mem_used_bytes": 300.0, "power_w": 300.0,
         "energy_counter_j": 100.0, "throttle_reasons": 4.0, "temperature_c": 70.0, "sm_clock_hz": 2e9},
        {"t_s": 1.0, "gpu_util_pct": 50.0, "mem_util_pct": 10.0, "mem_used_bytes": 200.0, "power_w": 200.0,
         "energy_counter_j": 250.0, "throttle_reasons": 64.0, "temperature_c": 60.0, "sm_clock_hz": 1.5e9},
        {"t_s": 1.5, "rss_bytes": 1.0},  # a host-only poll (the GPU read failed): skipped
    ]  # fmt: skip
    gpu, reasons = reduce_gpu(rows)
    assert set(gpu) == set(GPU_FIELDS)
    assert gpu["gpu_util_pct"] == pytest.approx(50.0)
    assert gpu["gpu_util_p95_pct"] == pytest.approx(np.percentile([10, 90, 50], 95))
    assert gpu["mem_util_pct"] == pytest.approx(10.0)
    assert gpu["mem_used_max_bytes"] == 300.0
    assert gpu["power_w"] == pytest.approx(200.0)
    assert gpu["sm_clock_hz"] == pytest.approx(1.5e9)
    assert gpu["temperature_max_c"] == 70.0
    assert gpu["throttle_reasons"] == 4 | 64
    assert (gpu["energy_j"], gpu["energy_source"]) == (250.0, "energy_counter")
    assert reasons == {}


def test_energy_falls_back_to_integrated_power_and_says_so() -> None:
    rows = [{"t_s": 0.0, "power_w": 100.0}, {"t_s": 1.0, "power_w": 200.0}, {"t_s": 3.0, "power_w": 300.0}]
    gpu, reasons = reduce_gpu(rows, field_reasons={"energy_counter_j": "NVML: NvmlNotSupported: Not Supported"})
    assert gpu["energy_source"] == "integrated_power"
    assert gpu["energy_j"] == pytest.approx(150.0 + 500.0)  # trapezoids
    assert gpu["gpu_util_pct"] is None and "gpu_util_pct" in reasons


def test_no_energy_reading_is_none_with_a_reason() -> None:
    gpu, reasons = reduce_gpu([{"t_s": 0.0, "gpu_util_pct": 40.0}], field_reasons={"power_w": "NVML: no permission"})
    assert gpu["energy_j"] is None and gpu["energy_source"] is None
    assert "fewer than two" in reasons["energy_j"] and "no permission" in reasons["energy_j"]
    assert gpu["power_w"] is None and reasons["power_w"] == "NVML: no permission"


def test_null_gpu_makes_every_field_none_with_its_reason() -> None:
    gpu, reasons = reduce_gpu([{"t_s": 0.0}], reason="trial ran on cpu, not a GPU")
    assert all(gpu[k] is None for k in GPU_FIELDS)
    assert set(reasons) == set(GPU_FIELDS) and set(reasons.values()) == {"trial ran on cpu, not a GPU"}


def test_measured_metrics_use_the_tail_that_covers_the_timed_steps() -> None:
    # set-up and warm-up for 5 s at 0% and 100 W, then 5 s of timed steps at 100% and 300 W
    rows = [
        {
            "t_s": float(t),
            "gpu_util_pct": 0.0 if t < 5 else 100.0,
            "power_w": 100.0 if t < 5 else 300.0,
            "energy_counter_j": 100.0 * min(t, 5) + 300.0 * max(0, t - 5),
        }
        for t in range(11)
    ]
    tel = Telemetry(duration_s=10.0, samples=11, rss_baseline_bytes=0, rss_peak_bytes=0, cpu_pct_mean=None,
                    series=tuple(rows))  # fmt: skip
    m, reasons = measured_gpu_metrics(tel, measured_s=5.0, samples=1000)
    assert m["gpu_util_pct"] == 100.0 and m["power_w"] == 300.0
    assert m["energy_j"] == pytest.approx(1500.0)
    assert m["energy_per_sample_j"] == pytest.approx(1.5)
    assert "gpu_window" not in reasons
    # timed steps shorter than one poll: the whole window is used, and the reason says so
    m, reasons = measured_gpu_metrics(tel, measured_s=0.5, samples=10)
    assert m["gpu_util_pct"] == pytest.approx(600 / 11)
    assert "set-up and warm-up" in reasons["gpu_window"]


def test_measured_metrics_of_a_null_gpu() -> None:
    tel = Telemetry(1.0, 2, 0, 0, None, series=({"t_s": 0.0}, {"t_s": 1.0}), gpu_reason="trial ran on cpu, not a GPU")
    m, reasons = measured_gpu_metrics(tel, measured_s=1.0, samples=10)
    assert m["energy_per_sample_j"] is None and m["gpu_util_pct"] is None
    assert reasons["energy_per_sample_j"] == "trial ran on cpu, not a GPU"


def test_downsample_keeps_first_last_and_at_most_max_rows() -> None:
    rows = [{"t_s": float(i)} for i in range(5001)]
    out = downsample_rows(rows, 2000)
    assert len(out) == 2000 and out[0] is rows[0] and out[-1] is rows[-1]
    assert all(a["t_s"] < b["t_s"] for a, b in itertools.pairwise(out))
    assert downsample_rows(rows[:10], 2000) == rows[:10]


# the real monitor with a fake NVML ------------------------------------------------------------------


def test_monitor_window_matches_the_injected_series() -> None:
    util = [13, 97, 55, 71, 2, 88, 40, 64, 100, 29] * 20
    power_mw = [150_000, 310_000, 225_000, 280_000, 190_000] * 40
    watts = 250.0
    fake = fake_gpus(
        gpu_util=util, mem_util=[10, 30] * 100, power_mw=power_mw, energy_mj=lambda t: 7_000 + int(watts * t * 1000)
    )
    gpu = open_nvml_gpu(0, nvml=fake, visible_devices=None)
    monitor = Monitor(gpu, hz=100)
    with monitor.window() as window:
        time.sleep(0.3)
    tel = window.telemetry
    served = fake.devices[0].served
    u = [v for _, v in served["util"]]
    p = [v / 1000 for _, v in served["power"]]
    e = served["energy"]
    assert tel.samples == len(u) >= 10
    assert tel.gpu["gpu_util_pct"] == pytest.approx(np.mean(u), rel=0.01)
    assert tel.gpu["gpu_util_p95_pct"] == pytest.approx(np.percentile(u, 95), rel=0.01)
    assert tel.gpu["mem_util_pct"] == pytest.approx(np.mean([v for _, v in served["mem_util"]]), rel=0.01)
    assert tel.gpu["power_w"] == pytest.approx(np.mean(p), rel=0.01)
    assert tel.gpu["energy_j"] == pytest.approx((e[-1][1] - e[0][1]) / 1000, rel=0.01)
    assert tel.gpu["energy_j"] == pytest.approx(watts * (e[-1][0] - e[0][0]), rel=0.01)
    assert tel.gpu["energy_source"] == "energy_counter"
    assert len(tel.series) == tel.samples and all("t_s" in r for r in tel.series)


def test_a_window_telemetry_exists_only_after_the_block() -> None:
    with Monitor(NullGpu("cpu"), mode="thread").window() as window:
        assert not window.closed
        with pytest.raises(WindowOpen, match="after its `with` block"):
            _ = window.telemetry
    assert window.closed and window.telemetry.samples >= 2 and window.telemetry.gpu_reason == "cpu"


def test_a_window_closes_when_its_block_raises() -> None:
    opened = []
    with pytest.raises(ValueError, match="boom"), Monitor(NullGpu("cpu"), mode="thread").window() as window:
        opened.append(window)
        raise ValueError("boom")
    assert opened[0].closed and opened[0].telemetry.samples >= 2


def test_a_sampler_that_raises_does_not_stop_the_window() -> None:
    class Broken:
        reason = None

        def sample(self) -> dict[str, float | None]:
            raise RuntimeError("driver went away")

    with Monitor(Broken(), hz=200).window() as window:  # type: ignore[arg-type]
        time.sleep(0.05)
    tel = window.telemetry
    assert tel.gpu["gpu_util_pct"] is None
    assert "driver went away" in tel.reasons["gpu_util_pct"]
    assert tel.samples >= 2 and all("rss_bytes" in r for r in tel.series)


def test_nvml_error_mid_window_keeps_the_other_polls() -> None:
    fake = fake_gpus(power_mw=300_000, energy_mj=lambda t: int(300.0 * t * 1000))
    fake.devices[0].errors["power"] = lambda n: GPU_IS_LOST if n % 3 == 1 else None
    with Monitor(open_nvml_gpu(0, nvml=fake, visible_devices=None), hz=200).window() as window:
        time.sleep(0.1)
    tel = window.telemetry
    assert tel.gpu["power_w"] == pytest.approx(300.0)
    assert "NVML error during the run" in tel.gpu_field_reasons["power_w"]
    assert tel.gpu["energy_source"] == "energy_counter"


# the sampler process (the default mode): fakes rebuilt in the child by name ---------------------------


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_process_mode_samples_the_parent_and_its_own_gpu() -> None:
    gpu = open_nvml_gpu(0, nvml_factory="fake_nvml:steady_gpu", visible_devices=None)
    with Monitor(gpu, hz=50) as monitor:
        assert monitor.mode == "process"
        with monitor.window() as window:
            before = os.times()
            _busy(0.4)
            after = os.times()
        tel = window.telemetry
        parent_cpu_s = (after.user + after.system) - (before.user + before.system)
        child = monitor.process.pid  # type: ignore[union-attr]
        assert child is not None and child != os.getpid()
        with monitor.window() as again:  # the same child serves the next window
            time.sleep(0.2)
        assert monitor.process.pid == child  # type: ignore[union-attr]
        process = monitor.process
    assert process is not None and not process.alive  # close() ended it
    assert tel.gpu_reason is None and tel.samples >= 10
    assert tel.gpu["gpu_util_pct"] == 50.0 and tel.gpu["power_w"] == 200.0
    assert tel.gpu["energy_source"] == "energy_counter"
    t = [float(r["t_s"]) for r in tel.series if "energy_counter_j" in r]  # type: ignore[arg-type]
    # t_s is taken just before the GPU is read; on a loaded host the read can come a few ms later.
    assert tel.gpu["energy_j"] == pytest.approx(200.0 * (t[-1] - t[0]), rel=0.05)
    # The parent's CPU, read from the child: the CPU seconds the polls add up to cover the parent's busy loop
    # (the child itself only sleeps between polls). Wall-clock percentages depend on the host's load.
    polled_cpu_s = math.fsum(
        float(b["cpu_pct"]) / 100 * (float(b["t_s"]) - float(a["t_s"]))  # type: ignore[arg-type]
        for a, b in itertools.pairwise(tel.series)
        if b.get("cpu_pct") is not None
    )
    assert tel.cpu_pct_mean is not None and parent_cpu_s > 0.05
    assert 0.8 * parent_cpu_s <= polled_cpu_s <= parent_cpu_s + 0.3
    assert tel.rss_baseline_bytes > 0 and all(r["rss_bytes"] for r in tel.series)
    assert again.telemetry.samples >= 5 and again.telemetry.gpu["power_w"] == 200.0


def test_a_crashing_sampler_process_does_not_fail_the_window() -> None:
    gpu = open_nvml_gpu(0, nvml_factory="fake_nvml:crashing_gpu", visible_devices=None)
    with Monitor(gpu, hz=100) as monitor:
        with monitor.window() as window:
            time.sleep(0.2)
        tel = window.telemetry
        assert tel.gpu_reason is not None and "sampler process" in tel.gpu_reason and "exit code 3" in tel.gpu_reason
        assert tel.gpu["power_w"] is None and "sampler process" in tel.reasons["power_w"]
        assert tel.samples == 2 and all(r["rss_bytes"] for r in tel.series)  # the window's own host polls
        assert tel.rss_peak_bytes >= tel.rss_baseline_bytes


def test_the_sampler_process_dies_with_its_parent() -> None:
    import psutil

    code = (
        "import os, sys, time\n"
        "from bsprof.engine.monitors import Monitor, NullGpu\n"
        "m = Monitor(NullGpu('cpu'), hz=20)\n"
        "with m.window():\n"
        "    print(m.process.pid, flush=True)\n"
        "    os._exit(0)\n"  # no clean-up: the child must notice by itself
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    child = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the sampler process outlived its parent"
        time.sleep(0.05)


def test_in_memory_fakes_fall_back_to_a_thread() -> None:
    gpu = open_nvml_gpu(0, nvml=fake_gpus(), visible_devices=None)
    assert Monitor(gpu).mode == "thread"
    assert Monitor(NullGpu("cpu")).mode == "process"
    assert Monitor(NullGpu("cpu"), mode="thread").mode == "thread"
    with pytest.raises(ValueError, match="sampler process"):
        Monitor(gpu, mode="process")
    with pytest.raises(ValueError, match="mode"):
        Monitor(gpu, mode="fork")


def test_trials_share_one_sampler_process() -> None:
    settings = EngineSettings(
        device=torch.device("cpu"),
        timing=TimingSettings(warmup_steps=2, warmup_s=0.0, min_time_s=0.3, min_steps=5, min_blocks=3),
        monitor_hz=50.0,
        gpu_sampler_factory=lambda d: open_nvml_gpu(0, nvml_factory="fake_nvml:steady_gpu", visible_devices=None),
    )
    with SamplerProcess() as sampler:
        settings = dataclasses.replace(settings, sampler_process=sampler)
        pids = []
        for seed in range(2):
            result = run_throughput_trial(DigitsMLP(), TrialSpec("digits-mlp", "throughput", 32, seed, 0.01), settings)
            assert result.status == "ok", result.error
            assert result.extra.monitor_mode == "process"
            assert result.metrics["power_w"] == 200.0
            assert result.step_times is not None
            assert result.metrics["energy_j"] == pytest.approx(200.0 * result.step_times.measured_s, rel=0.02)
            pids.append(sampler.pid)
        assert pids[0] is not None and pids[0] == pids[1] and sampler.alive
    assert not sampler.alive


# a whole throughput trial with the fake: what is stored matches what was injected ---------------------


@pytest.mark.parametrize(
    ("counter", "source"),
    [("counter", "energy_counter"), ("wrapping", "energy_counter"), (None, "integrated_power")],
)
def test_trial_stores_gpu_metrics_matching_the_injected_series(
    tmp_path: object, counter: str | None, source: str
) -> None:
    watts = 250.0
    start = {"counter": 123_456_789, "wrapping": ENERGY_COUNTER_MODULUS_MJ - 100, None: 0}[counter]

    def energy(t: float) -> int | None:
        return None if counter is None else (start + int(watts * t * 1000)) % ENERGY_COUNTER_MODULUS_MJ

    fakes: list[FakeNvml] = []

    def sampler(device: torch.device) -> object:
        fakes.append(fake_gpus(gpu_util=73, mem_util=41, power_mw=int(watts * 1000), energy_mj=energy))
        return open_nvml_gpu(0, nvml=fakes[-1], visible_devices=None)

    settings = EngineSettings(
        device=torch.device("cpu"),
        timing=TimingSettings(warmup_steps=2, warmup_s=0.0, min_time_s=0.4, min_steps=5, min_blocks=3),
        monitor_hz=50.0,
        gpu_sampler_factory=sampler,
    )
    spec = TrialSpec("digits-mlp", "throughput", 32, 0, 0.01)
    result = run_throughput_trial(DigitsMLP(), spec, settings)
    assert result.status == "ok", result.error
    m = result.metrics
    times = result.step_times
    assert times is not None
    assert m["gpu_util_pct"] == pytest.approx(73.0, rel=0.01)
    assert m["gpu_util_p95_pct"] == pytest.approx(73.0, rel=0.01)
    assert m["mem_util_pct"] == pytest.approx(41.0, rel=0.01)
    assert m["power_w"] == pytest.approx(watts, rel=0.01)
    assert m["energy_source"] == source
    assert m["energy_j"] == pytest.approx(watts * times.measured_s, rel=0.01)
    samples = times.measured_steps * spec.batch_size
    assert m["energy_per_sample_j"] == pytest.approx(m["energy_j"] / samples)
    assert fakes[0].shutdowns == 1  # the trial closed its sampler
    telemetry = result.extra.telemetry
    assert 2 <= len(telemetry) <= 2000 and telemetry[-1]["gpu_util_pct"] == 73.0

    with Store(tmp_path / "s.db", create=True) as store:  # type: ignore[operator]
        run = store.open_run("digits-mlp", {"x": 1}, {})
        store.add_trial(run.run_id, result)
        (row,) = store.trial_rows([run.run_id])
    for key in ("gpu_util_pct", "gpu_util_p95_pct", "mem_util_pct", "power_w", "energy_j", "energy_per_sample_j"):
        assert row[key] == pytest.approx(m[key])
    assert row["energy_source"] == source
    assert len(row["extra"]["telemetry"]) == len(telemetry)


def test_cpu_trial_gpu_fields_are_none_with_reasons() -> None:
    settings = EngineSettings(
        device=torch.device("cpu"),
        timing=TimingSettings(warmup_steps=1, warmup_s=0.0, min_time_s=0.0, min_steps=2, min_blocks=2),
    )
    result = run_throughput_trial(DigitsMLP(), TrialSpec("digits-mlp", "throughput", 16, 0, 0.01), settings)
    assert result.status == "ok", result.error
    for key in ("gpu_util_pct", "gpu_util_p95_pct", "mem_util_pct", "power_w", "energy_j", "energy_per_sample_j"):
        assert result.metrics[key] is None
        assert "cpu" in result.reasons[key]
    assert not any(isinstance(v, float) and math.isnan(v) for v in result.metrics.values() if v is not None)


def test_null_gpu_sampler_default() -> None:
    assert NullGpu().sample() == {}
