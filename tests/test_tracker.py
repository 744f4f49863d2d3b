"""The tracker inside a user's script: a no-op outside bsprof, the one timer's block discipline on a fake clock,
the engine's target rule, and events a killed child cannot garble."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from test_timing import FakeDevice as Fake  # a clock that advances per step; a log of steps, syncs, reads

from bsprof.engine.script_protocol import ENV_VAR, TrialOrder, read_events
from bsprof.engine.target import TargetWatch
from bsprof.engine.timing import BlockTimer, StepTimes, TimingSettings, time_steps
from bsprof.tracker import NullTracker, Tracker, track


def test_track_outside_bsprof_is_a_null_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    tracker = track()
    assert isinstance(tracker, NullTracker) and not tracker.active
    tracker.step(samples=8, loss=1.0)
    tracker.evaluate(metric=0.5)
    assert tracker.should_stop() is False


def test_importing_and_calling_track_outside_bsprof_imports_nothing_heavy() -> None:
    code = "import sys, bsprof; t = bsprof.track(); t.step(); print([m for m in ('torch',) if m in sys.modules])"
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"  # torch (and numpy) stay unimported


def _timer_beside_time_steps(s: TimingSettings) -> tuple[Fake, StepTimes, Fake, BlockTimer]:
    """``time_steps`` run on one fake device, and a fresh :class:`BlockTimer` on another, both with ``s``."""
    ref = Fake()
    expected = time_steps(ref.step, batch_size=8, settings=s, sync=ref.sync, clock=ref.clock)
    dev = Fake()
    return ref, expected, dev, BlockTimer(batch_size=8, settings=s, sync=dev.sync, clock=dev.clock)


def test_block_timer_times_the_blocks_time_steps_times_and_syncs_only_at_boundaries() -> None:
    s = TimingSettings(warmup_steps=2, warmup_s=1.0, min_time_s=10.0, min_steps=20, block_min_s=0.5, min_blocks=7)
    _, expected, dev, timer = _timer_beside_time_steps(s)
    steps = 0
    while not timer.step_done():
        dev.step()
        steps += 1
        assert steps < 10_000
    times = timer.result()
    assert times is not None
    # 8 warm-up steps (1 s), calibration blocks of 1, 2 and 4 steps (4 x 0.125 s = block_min_s), then 20 blocks
    assert expected.warmup_steps == 15 and expected.steps_per_block == 4 and expected.block_times_s == (0.5,) * 20
    assert times.block_times_s == expected.block_times_s
    assert times.steps_per_block == expected.steps_per_block
    assert times.warmup_steps == expected.warmup_steps + 1  # the first step only starts the clock
    first_timed = [i for i, e in enumerate(dev.events) if e == "step"][times.warmup_steps]
    timed = dev.events[first_timed:]
    assert timed.count("sync") == len(times.block_times_s)  # one sync per block, none per step
    last = None
    for e in dev.events:
        if e == "clock":
            assert last == "sync"
        last = e if e != "clock" else last
    assert timer.step_done() is True  # further steps are free and change nothing
    assert timer.result() == times


def test_block_timer_warmup_reads_the_clock_a_few_times_and_ends_where_time_steps_does() -> None:
    s = TimingSettings(warmup_steps=2, warmup_s=10.0, min_time_s=2.0, min_steps=4, block_min_s=0.25, min_blocks=2)
    ref, expected, dev, timer = _timer_beside_time_steps(s)
    while not timer.step_done():
        dev.step()
    times = timer.result()
    assert times is not None and times.block_times_s == expected.block_times_s
    assert times.warmup_steps == expected.warmup_steps + 1  # the same 80 warm-up steps (10 s of 0.125 s steps)
    assert times.warmup_steps - 3 == 1 + 80  # less the calibration's blocks of 1 and 2 steps
    step_81 = [i for i, e in enumerate(dev.events) if e == "step"][80]  # the first step of calibration
    # the start, after warmup_steps, then after half the steps left at each read (41, 60, 70, 75, 77, 78, 79, 80)
    assert dev.events[:step_81].count("clock") == 10
    ref_step_80 = [i for i, e in enumerate(ref.events) if e == "step"][79]
    assert ref.events[:ref_step_80].count("clock") > 70  # time_steps: a read per step


def test_block_timer_result_is_none_before_the_first_block() -> None:
    timer = BlockTimer(batch_size=4, settings=TimingSettings(warmup_steps=3, warmup_s=0.0), clock=Fake().clock)
    timer.step_done()
    assert timer.result() is None


def test_target_watch_patience_bracket_and_fallbacks() -> None:
    watch = TargetWatch(0.9, patience=2)
    rows = [{"step": s, "val_metric": m} for s, m in [(5, 0.5), (10, 0.91), (15, 0.85), (20, 0.92), (25, 0.95)]]
    reached = [watch.observe(r) for r in rows]
    assert reached == [False, False, False, False, True]
    assert watch.reached is rows[3]  # the first of the two consecutive evaluations at or above target
    assert rows[3]["bracket_step"] == 15
    assert watch.fallbacks == 1
    lower = TargetWatch(0.1, higher_is_better=False)
    assert lower.observe({"step": 1, "val_metric": 0.05})


def _order(tmp_path: Path, **kw: object) -> TrialOrder:
    base = {"report": str(tmp_path / "events.jsonl"), "workload": "w", "kind": "convergence", "batch_size": 4}
    base.update(seed=0, lr=0.1, target=0.5)
    base.update(kw)
    return TrialOrder(**base)  # type: ignore[arg-type]


def test_tracker_convergence_excludes_evaluation_time_and_stops_at_target(tmp_path: Path) -> None:
    dev = Fake(dt=1.0)
    tracker = Tracker(_order(tmp_path, patience=1), clock=dev.clock, sync=dev.sync, install_hooks=False)
    for step in range(1, 5):
        dev.step()  # one second of training
        tracker.step(samples=4)
        dev.now += 10.0  # ten seconds of evaluation
        tracker.evaluate(metric=step / 4)
        if tracker.should_stop():
            break
    tracker.close()
    events = read_events(tmp_path / "events.jsonl")
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["train_s"] for e in evals] == [1.0, 2.0]  # evaluation seconds excluded
    assert [e["samples"] for e in evals] == [4, 8]
    assert tracker.eval_s == 20.0
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert events[-1]["steps"] == 2


def test_tracker_convergence_reads_the_clock_every_few_steps_and_keeps_training_seconds(tmp_path: Path) -> None:
    unit = 2.0**-10  # ~1 ms: ~20 steps in the ~20 ms between the tracker's clock reads; binary, so sums are exact
    dev = Fake(dt=unit)
    order = _order(tmp_path, target=2.0, max_steps=200)  # a target never reached
    tracker = Tracker(order, clock=dev.clock, sync=dev.sync, install_hooks=False)
    dev.events.clear()  # the tracker's own start read
    evaluations = [10, 20, 30, 37, 52, 61, 130]  # a period of 10 steps at first, then off it
    trained, expected, step = 0.0, [], 0
    while not tracker.should_stop():
        step += 1
        # warm-up (4, then 2 units a step), and the first step after an evaluation 4 units (its caches cold)
        dev.dt = unit * (4 if step <= 3 or step - 1 in evaluations else 2 if step <= 6 else 1)
        dev.step()
        trained += dev.dt
        tracker.step(samples=4, loss=1.0)
        if step in evaluations:
            dev.now += 1.0  # a second of evaluation
            tracker.evaluate(metric=0.5)
            expected.append(trained)
    tracker.close()
    assert step == 200 and tracker.steps == 200 and tracker.samples == 4 * 200  # stopped at max_steps exactly
    evals = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "eval"]
    assert [e["step"] for e in evals] == evaluations
    # training seconds: the steps' own, evaluation excluded; exact at the period's evaluations (read there) and,
    # the steady pace between the last two reads leaving the slow first steps out, at the others too
    assert [e["train_s"] for e in evals] == pytest.approx(expected, abs=1e-12)
    assert tracker.eval_s == pytest.approx(len(evaluations) * 1.0, abs=1e-12)
    read_at, n = [], 0  # the steps after which step() read the clock (an evaluation's two reads follow a sync)
    for i, e in enumerate(dev.events):
        n += e == "step"
        if e == "clock" and dev.events[i - 1] not in ("sync", "clock"):
            read_at.append(n)
    assert read_at[:10] == list(range(1, 11))  # every step until the first evaluation
    assert {20, 30, 44, 200} <= set(read_at)  # where the next is due (37 -> 44, a period after 30), max_steps
    assert {131, 132, 134, 138, 146} <= set(read_at)  # 1, 2, 4, 8, 16 steps after an evaluation
    assert len(read_at) < 200 / 3  # not one read per step


def test_read_events_ignores_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"event": "start"}\n{"event": "eval", "step": 1}\n{"event": "ev')
    assert [e["event"] for e in read_events(path)] == ["start", "eval"]


def test_trial_order_round_trip_and_rejects_foreign_values() -> None:
    order = TrialOrder(report="/r", workload="w", kind="throughput", batch_size=8, seed=1, lr=0.1)
    assert TrialOrder.from_env(order.to_env()) == order
    with pytest.raises(ValueError, match="not a bsprof trial order"):
        TrialOrder.from_env('{"x": 1}')


def _without_tracker(source: str) -> str:
    """The example as it was before the bsprof lines were added."""
    source = source.replace("import bsprof\n", "")
    source = re.sub(r"\n *tracker = bsprof\.track\(\)  # bsprof", "", source)
    source = re.sub(r"\n *tracker\.step\(.*\)  # bsprof", "", source)
    source = re.sub(r"\n *tracker\.evaluate\(.*\)  # bsprof", "", source)
    source = re.sub(r"\n *if tracker\.should_stop\(\):.*\n *return", "", source)
    assert "tracker." not in source and "bsprof.track" not in source
    return source


@pytest.mark.slow
def test_example_run_directly_behaves_exactly_as_without_the_tracker(tmp_path: Path) -> None:
    example = REPO / "examples" / "train_digits.py"
    plain = tmp_path / "train_digits_plain.py"
    plain.write_text(_without_tracker(example.read_text()))
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR} | {"OMP_NUM_THREADS": "1"}
    args = ["--batch-size", "64", "--epochs", "3", "--seed", "3"]
    runs = [
        subprocess.run([sys.executable, str(p), *args], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
        for p in (example, plain)
    ]
    assert runs[0].returncode == runs[1].returncode == 0, runs[0].stderr + runs[1].stderr
    assert runs[0].stdout == runs[1].stdout  # the same losses and accuracies, epoch by epoch
    assert runs[0].stdout.count("epoch") == 3


def test_block_timer_interrupt_keeps_evaluations_out_of_the_blocks() -> None:
    s = TimingSettings(warmup_steps=1, warmup_s=1.0, min_time_s=1.0, min_steps=4, block_min_s=0.25, min_blocks=4)
    dev = Fake()
    timer = BlockTimer(batch_size=8, settings=s, sync=dev.sync, clock=dev.clock)
    for steps in range(1, 1000):
        dev.step()
        if timer.step_done():
            break
        if steps % 5 == 0:
            dev.now += 100.0  # an evaluation after the step, as a script runs one
            timer.interrupt()
    times = timer.result()
    assert times is not None and timer.interrupted_blocks > 0
    assert set(times.block_times_s) == {0.25}  # 2 steps of 0.125 s; no block holds an evaluation
    assert times.warmup_steps < 40  # the warm-up (untimed) was not restarted by the evaluations


@pytest.mark.parametrize(("world_size", "agrees"), [(None, False), ("1", False), ("2", True)])
def test_should_stop_agrees_across_ranks_only_when_there_are_ranks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world_size: str | None, agrees: bool
) -> None:
    import bsprof.tracker as tracker_module

    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    asked: list[bool] = []
    monkeypatch.setattr(tracker_module, "_agree", lambda flag: asked.append(flag) or True)  # a peer wants to stop
    tracker = Tracker(_order(tmp_path, patience=1), clock=Fake().clock, sync=lambda: None, install_hooks=False)
    assert tracker.should_stop() is agrees  # one process: its own flag, no call into torch.distributed per step
    assert asked == ([False] if agrees else [])
    tracker.close()


def _per_step(timer: BlockTimer, dev: Fake, evaluate_every: int = 0) -> int:
    """Drive ``timer`` one step_done() per step (an evaluation of 100 s every ``evaluate_every`` steps)."""
    for steps in range(1, 100_000):
        dev.step()
        if timer.step_done():
            return steps
        if evaluate_every and steps % evaluate_every == 0:
            dev.now += 100.0
            timer.interrupt()
    raise AssertionError("the window never completed")


def test_block_timer_takes_its_quiet_steps_at_once_with_the_same_clock_reads_and_blocks() -> None:
    s = TimingSettings(warmup_steps=6, warmup_s=1.0, min_time_s=10.0, min_steps=20, block_min_s=0.5, min_blocks=7)
    ref_dev = Fake()
    ref = BlockTimer(batch_size=8, settings=s, sync=ref_dev.sync, clock=ref_dev.clock)
    ref_steps = _per_step(ref, ref_dev)
    dev = Fake()
    timer = BlockTimer(batch_size=8, settings=s, sync=dev.sync, clock=dev.clock)
    steps, calls, done = 0, 0, False
    while not done:
        at_once = timer.quiet_steps() + 1
        for _ in range(at_once):
            dev.step()
        steps, calls = steps + at_once, calls + 1
        done = timer.step_done(at_once)
    assert steps == ref_steps and timer.result() == ref.result()
    assert dev.events == ref_dev.events  # the same steps, syncs and clock reads, in the same order
    assert calls < steps / 3  # most steps were counted by the caller
    assert timer.quiet_steps() > 10**15  # done: no step needs the clock any more


def test_block_timer_refuses_steps_that_would_cross_a_block_boundary() -> None:
    timer = BlockTimer(batch_size=8, settings=TimingSettings(warmup_steps=4, warmup_s=0.0), clock=Fake().clock)
    assert timer.quiet_steps() == 0  # the first step starts the clock
    timer.step_done()
    assert timer.quiet_steps() == 3
    with pytest.raises(ValueError, match="at most 4 may end"):
        timer.step_done(5)
    with pytest.raises(ValueError, match="at most 4"):
        timer.step_done(0)
    assert timer.step_done(4) is False and timer.quiet_steps() == 0  # warm-up met: calibration's 1-step block


def test_tracker_throughput_window_is_the_block_timers_with_evaluations_in_between(tmp_path: Path) -> None:
    s = TimingSettings(warmup_steps=3, warmup_s=1.0, min_time_s=2.0, min_steps=8, block_min_s=0.25, min_blocks=4)
    ref_dev = Fake()
    ref = BlockTimer(batch_size=4, settings=s, sync=ref_dev.sync, clock=ref_dev.clock)
    ref_steps = _per_step(ref, ref_dev, evaluate_every=7)
    dev = Fake()
    order = _order(tmp_path, kind="throughput", target=None, timing=s.__dict__)
    tracker = Tracker(order, clock=dev.clock, sync=dev.sync, install_hooks=False)
    dev.events.clear()  # the tracker's own start read
    steps = 0
    while not tracker.should_stop():
        dev.step()
        tracker.step(samples=4)
        steps += 1
        if steps % 7 == 0 and not tracker.should_stop():
            dev.now += 100.0
            tracker.evaluate(metric=0.5)
    tracker.close()
    assert steps == ref_steps and ref.interrupted_blocks > 0
    assert dev.events == ref_dev.events  # clock reads and syncs at the same steps as the per-step timer's
    window = [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == "throughput"]
    assert len(window) == 1 and window[0]["complete"] is True and window[0]["steps"] == steps
    times = ref.result()
    assert times is not None
    assert tuple(window[0]["block_times_s"]) == times.block_times_s and set(times.block_times_s) == {0.25}
    assert window[0]["warmup_steps"] == times.warmup_steps
    assert window[0]["interrupted_blocks"] == ref.interrupted_blocks
    assert tracker.steps == steps and tracker.samples == 4 * steps
