"""The one timer: block sizing and stopping rules on a fake clock, statistics on literal arrays, and one
real-clock check against a workload whose step cost is known."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ref

from bsprof.engine.timing import StepTimes, TimingSettings, time_steps
from bsprof.engine.trial import EngineSettings, TrialSpec, run_throughput_trial
from bsprof.workload import load_workload

DT = 0.125  # seconds per fake step; a binary fraction, so sums of clock readings are exact


class FakeDevice:
    """A fake clock that advances only when a step runs, and a counting sync; keeps an event log."""

    def __init__(self, dt: float = DT) -> None:
        self.dt = dt
        self.now = 0.0
        self.events: list[str] = []

    def step(self) -> None:
        self.now += self.dt
        self.events.append("step")

    def sync(self) -> None:
        self.events.append("sync")

    def clock(self) -> float:
        self.events.append("clock")
        return self.now

    def count(self, name: str) -> int:
        return self.events.count(name)

    def run(self, settings: TimingSettings, batch_size: int = 8) -> StepTimes:
        return time_steps(self.step, batch_size=batch_size, settings=settings, sync=self.sync, clock=self.clock)


def test_timing_block_size_grows_to_block_min_s() -> None:
    dev = FakeDevice()
    s = TimingSettings(warmup_steps=2, warmup_s=1.0, min_time_s=10.0, min_steps=20, block_min_s=0.5, min_blocks=7)
    times = dev.run(s)
    # warm-up runs until 1.0 s have passed: 8 steps of 0.125 s; calibration then times blocks of 1, 2 and 4
    # steps (4 x 0.125 s reaches block_min_s), which count as warm-up too
    assert times.warmup_steps == 8 + 1 + 2 + 4
    # blocks of ceil(0.5 / 0.125) = 4 steps, until 10 s are measured: 20 blocks
    assert times.steps_per_block == 4
    assert times.block_times_s == (0.5,) * 20
    assert times.measured_steps == 80
    assert times.measured_s == 10.0
    assert times.median_s == DT
    assert dev.count("step") == 15 + 80


def test_timing_warmup_steps_honoured_when_warmup_time_is_short() -> None:
    dev = FakeDevice()
    times = dev.run(TimingSettings(warmup_steps=5, warmup_s=0.0, min_time_s=0.0, min_steps=1, min_blocks=1))
    assert times.warmup_steps == 5 + 1  # and one calibration step
    assert len(times.block_times_s) == 1


def test_timing_min_steps_honoured_beyond_min_time() -> None:
    dev = FakeDevice()
    s = TimingSettings(warmup_steps=2, warmup_s=1.0, min_time_s=10.0, min_steps=200, block_min_s=0.5, min_blocks=7)
    times = dev.run(s)
    assert times.steps_per_block == 4
    assert times.measured_steps == 200  # 50 blocks, although 10 s were reached after 20
    assert len(times.block_times_s) == 50


def test_timing_min_blocks_honoured_and_blocks_shrink_to_fit_min_time() -> None:
    dev = FakeDevice()
    # block_min_s asks for 4-step blocks, but 7 blocks must fit in min_time_s = 0.5 s: blocks of one step.
    s = TimingSettings(warmup_steps=2, warmup_s=0.0, min_time_s=0.5, min_steps=1, block_min_s=0.5, min_blocks=7)
    times = dev.run(s)
    assert times.steps_per_block == 1
    assert len(times.block_times_s) == 7  # min_time (4 blocks) and min_steps (1) were met earlier
    assert times.measured_s == 7 * DT


def test_timing_max_time_s_caps_the_measurement() -> None:
    dev = FakeDevice()
    s = TimingSettings(
        warmup_steps=2, warmup_s=1.0, min_time_s=1.0, min_steps=10_000, block_min_s=0.5, min_blocks=1, max_time_s=5.0
    )
    times = dev.run(s)
    assert times.measured_s == 5.0
    assert times.measured_steps == 40


def test_timing_sync_before_every_clock_read_after_steps() -> None:
    dev = FakeDevice()
    s = TimingSettings(warmup_steps=3, warmup_s=0.5, min_time_s=2.0, min_steps=5, block_min_s=0.25, min_blocks=3)
    times = dev.run(s)
    last_work = None
    for i, event in enumerate(dev.events):
        if event in ("step", "sync"):
            last_work = event
        elif event == "clock":
            assert last_work in (None, "sync"), f"clock read #{i} follows a step with no sync in between"
    # The timed phase syncs once per block, not once per step.
    first_timed_step = [i for i, e in enumerate(dev.events) if e == "step"][times.warmup_steps]
    timed = dev.events[first_timed_step:]
    assert timed.count("step") == times.measured_steps
    assert timed.count("sync") == len(times.block_times_s)
    assert times.steps_per_block > 1


def test_timing_zero_warmup_still_calibrates_one_block() -> None:
    dev = FakeDevice()
    times = dev.run(TimingSettings(warmup_steps=0, warmup_s=0.0, min_time_s=0.5, min_steps=1, min_blocks=2))
    assert times.warmup_steps == 1  # one calibration step: it already lasts longer than block_min_s
    assert times.steps_per_block == 1
    assert times.measured_s >= 0.5


class SlowFirstStep(FakeDevice):
    """0.5 ms steps, except the first, which takes 2 s (compilation, autotuning, first allocations)."""

    def __init__(self) -> None:
        super().__init__(dt=0.0005)

    def step(self) -> None:
        self.now += 2.0 if self.count("step") == 0 else self.dt
        self.events.append("step")


def test_timing_block_is_sized_after_a_slow_first_step() -> None:
    dev = SlowFirstStep()
    times = dev.run(TimingSettings())  # defaults: 5 warm-up steps, blocks of >= 20 ms
    assert times.steps_per_block >= 20  # a block sized from the warm-up mean (0.4 s per step) would hold 1
    assert times.steps_per_block == 40  # ceil(20 ms / 0.5 ms)
    assert times.median_s == pytest.approx(0.0005)
    assert dev.count("step") == times.warmup_steps + times.measured_steps


def test_timing_reset_runs_before_every_block_outside_the_timed_region() -> None:
    dev = FakeDevice()
    resets: list[float] = []

    def reset() -> None:
        dev.now += 10.0  # a slow restore: must not be timed
        resets.append(dev.now)
        dev.events.append("reset")

    s = TimingSettings(warmup_steps=2, warmup_s=0.0, min_time_s=2.0, min_steps=5, block_min_s=0.25, min_blocks=3)
    times = time_steps(dev.step, batch_size=8, settings=s, sync=dev.sync, clock=dev.clock, reset=reset)
    assert times.steps_per_block == 2
    assert set(times.block_times_s) == {0.25}  # no reset time inside any block
    calibration_blocks = 2  # 1 step (0.125 s), then 2 steps (0.25 s)
    assert len(resets) == calibration_blocks + len(times.block_times_s)
    # every block starts with a reset, a sync and then the clock read that opens it
    for i, e in enumerate(dev.events):
        if e == "reset":
            assert dev.events[i + 1 : i + 3] == ["sync", "clock"]


@pytest.mark.parametrize(
    ("blocks", "drift"),
    [
        ((1.0,) * 8, 0.0),
        ((1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5), 0.5),  # last quarter 1.5 vs first quarter 1.0
        ((2.0, 2.0, 1.0, 1.0, 1.0, 1.0), -0.5),
    ],
)
def test_steptimes_drift_on_literal_arrays(blocks: tuple[float, ...], drift: float) -> None:
    t = StepTimes(blocks, steps_per_block=1, batch_size=8)
    assert t.drift_rel == pytest.approx(drift)
    assert t.drifted == (abs(drift) > 0.10)


def test_steptimes_drift_needs_four_blocks() -> None:
    t = StepTimes((1.0, 1.0, 2.0), steps_per_block=1, batch_size=8)
    assert t.drift_rel is None
    assert not t.drifted


@pytest.mark.parametrize(
    "kwargs",
    [{"min_steps": 0}, {"min_blocks": 0}, {"warmup_steps": -1}, {"min_time_s": -1.0}, {"warmup_s": -0.1}],
)
def test_timing_settings_reject_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TimingSettings(**kwargs)  # type: ignore[arg-type]


def test_steptimes_stats_on_literal_odd_array() -> None:
    t = StepTimes((0.1, 0.2, 0.3, 0.4, 0.5), steps_per_block=2, batch_size=32, warmup_steps=3)
    assert t.step_times_s == pytest.approx((0.05, 0.1, 0.15, 0.2, 0.25))
    assert t.median_s == pytest.approx(0.15)
    assert t.iqr_s == pytest.approx(0.1)  # inclusive quartiles 0.1 and 0.2
    assert t.rel_iqr == pytest.approx(0.1 / 0.15)
    assert t.samples_per_s == pytest.approx(32 / 0.15)
    assert t.measured_steps == 10
    assert t.measured_s == pytest.approx(1.5)


def test_steptimes_stats_on_literal_even_array_with_outlier() -> None:
    t = StepTimes((1.0, 2.0, 3.0, 100.0), steps_per_block=1, batch_size=4)
    assert t.median_s == pytest.approx(2.5)  # the outlier does not move the median much
    assert t.iqr_s == pytest.approx(27.25 - 1.75)  # inclusive quartiles: 1 + 0.75*1 and 3 + 0.25*97
    assert t.samples_per_s == pytest.approx(4 / 2.5)


def test_steptimes_single_block_has_zero_spread() -> None:
    t = StepTimes((0.4,), steps_per_block=4, batch_size=10)
    assert t.median_s == pytest.approx(0.1)
    assert t.iqr_s == 0.0
    assert t.rel_iqr == 0.0
    assert t.samples_per_s == pytest.approx(100.0)


def test_steptimes_zero_time_does_not_divide_by_zero() -> None:
    t = StepTimes((0.0, 0.0), steps_per_block=1, batch_size=8)
    assert math.isnan(t.rel_iqr)
    assert math.isinf(t.samples_per_s)


# The one real-clock test: a step that sleeps a + b*B seconds must be measured within 5% of that.
@pytest.mark.parametrize("batch_size", [1, 64, 256, 512])
def test_timing_correctness_real_clock_sleep_workload(batch_size: int) -> None:
    workload = load_workload(ref("slow.py", "linear"))
    expected_s = workload.a + workload.b * batch_size  # type: ignore[attr-defined]
    settings = EngineSettings(
        device=torch.device("cpu"),
        timing=TimingSettings(warmup_steps=1, warmup_s=0.0, min_time_s=0.3, min_steps=5, min_blocks=5),
    )
    result = run_throughput_trial(workload, TrialSpec(workload.name, "throughput", batch_size, 0, 0.01), settings)
    assert result.status == "ok", result.error
    median = result.metrics["step_time_s"]
    assert isinstance(median, float)
    assert abs(median - expected_s) / expected_s < 0.05, f"B={batch_size}: {median:.6f} s vs {expected_s:.6f} s"
    assert result.metrics["samples_per_s"] == pytest.approx(batch_size / median)
