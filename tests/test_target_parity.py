"""One target rule: the same evaluation sequence gives the same steps-, samples- and time-to-target, bracket,
fallbacks and stopping step through a native convergence trial and through a script trial (the tracker in
the child, then the parent's reading of its events).

The native side is the real convergence loop on digits-mlp with only its validation metric and its clock
scripted; the script side replays the same evaluations (same steps, samples, training seconds, metric)
through :class:`~bsprof.tracker.Tracker` on a fake clock and :func:`~bsprof.engine.script_result.interpret`.
"""

from __future__ import annotations

import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bsprof.engine import convergence
from bsprof.engine.convergence import ConvergenceSettings, run_convergence_trial
from bsprof.engine.result import ScriptInfo, TrialResult, TrialSpec
from bsprof.engine.script_job import ScriptJob
from bsprof.engine.script_protocol import TrialOrder, read_events
from bsprof.engine.script_result import ChildWindow, interpret
from bsprof.engine.target import TargetWatch, meets_target
from bsprof.engine.telemetry import Telemetry
from bsprof.engine.trial import EngineSettings
from bsprof.tracker import Tracker
from bsprof.workloads.digits import DigitsMLP

CPU = EngineSettings(device=torch.device("cpu"))
B = 16
F32_095 = float(np.float32(0.95))  # 0.949999988: what a float32 accuracy of exactly 0.95 reads as in float64

# (id, target, higher_is_better, patience, continue_after_target, metric per evaluation,
#  expected: index of the evaluation where the target counts as reached (None: never), expected fallbacks)
CASES = [
    ("first-crossing", 0.9, True, 1, False, [0.3, 0.6, 0.95, 0.97], 2, 0),
    ("exactly-at-target", 0.9, True, 1, False, [0.5, 0.8, 0.9, 0.95], 2, 0),
    ("float32-of-target", 0.95, True, 1, False, [0.5, F32_095, 0.99], 1, 0),
    ("just-below-tolerance", 0.95, True, 1, False, [0.5, 0.95 - 2e-6, 0.9], None, 0),
    ("patience-3-broken-streak", 0.9, True, 3, False, [0.5, 0.91, 0.92, 0.85, 0.93, 0.9, 0.95, 0.5], 4, 1),
    ("patience-outlasts-budget", 0.9, True, 3, False, [0.5, 0.91, 0.92], None, 0),
    ("lower-is-better", 0.3, False, 2, False, [2.0, 1.5, 0.3, 0.31, 0.29, 0.3, 0.1], 4, 1),
    ("lower-never-reached", 0.3, False, 1, False, [2.0, 0.35, 0.31, 0.300001], None, 0),
    ("continue-after-target", 0.9, True, 1, True, [0.5, 0.95, 0.85, 0.96, 0.7, 0.91], 1, 2),
]
TARGET_KEYS = (
    "reached_target",
    "steps_to_target",
    "samples_to_target",
    "time_to_target_s",
    "bracket_steps",
    "target_fallbacks",
    "steps_run",
    "evaluations",
)


def _native(
    monkeypatch: pytest.MonkeyPatch, metrics: list[float], target: float, higher: bool, conv: ConvergenceSettings
) -> TrialResult:
    """A real convergence trial whose validation metric is ``metrics`` in order, on a dyadic fake clock
    (training segments of 0.125-0.625 s, summed exactly in float64)."""
    values = iter(metrics)
    val_data: list[Any] = []

    def scripted_evaluate(model: Any, workload: Any, data: Any, device: Any = None) -> float:
        if not val_data:
            val_data.append(data)  # the loop's first evaluation is on the validation data
        return next(values) if data is val_data[0] else 0.5  # the final train metric plays no part

    ticks = iter(range(10**6))
    now = [0.0]

    def clock() -> float:
        now[0] += (1, 2, 4, 3, 5)[next(ticks) % 5] / 8
        return now[0]

    monkeypatch.setattr(convergence, "evaluate", scripted_evaluate)
    monkeypatch.setattr(convergence, "time", types.SimpleNamespace(time=time.time, perf_counter=clock))
    w = DigitsMLP()
    w.higher_is_better = higher
    spec = TrialSpec(w.name, "convergence", B, 0, 0.02)
    return run_convergence_trial(w, spec, CPU, conv)


def _script(tmp_path: Path, native_curve: list[dict[str, Any]], order: TrialOrder) -> TrialResult:
    """The same evaluations reported by a script through the tracker (stopping when it says so), then read
    by the parent as a script trial's events."""
    now = [0.0]
    tracker = Tracker(order, device="cpu", clock=lambda: now[0], sync=lambda: None, install_hooks=False)
    done_steps, prev_train_s = 0, 0.0
    for row in native_curve:
        while done_steps < row["step"]:
            done_steps += 1
            if done_steps == row["step"]:
                now[0] += row["train_s"] - prev_train_s  # this evaluation's training seconds end at its last step
            tracker.step(samples=B)
        prev_train_s = row["train_s"]
        now[0] += 100.0  # evaluation time, which must not count
        tracker.evaluate(metric=row["val_metric"], step=row["step"])
        if tracker.should_stop():
            break
    tracker.close()
    log = tmp_path / "output.log"
    log.write_text("")
    job = ScriptJob(name="s", command=("python", "train.py", "{batch_size}"), higher_is_better=order.higher_is_better)
    spec = TrialSpec("s", "convergence", B, 0, 0.02)
    info = ScriptInfo(command="python train.py 16", log=str(log), exit_code=0)
    window = ChildWindow(Telemetry(0.0, 0, 0, 0, None), 0.0, "thread", "no GPU")
    return interpret(job, spec, CPU, order, read_events(Path(order.report)), False, time.time(), info, window)


@pytest.mark.parametrize("eval_every", [1, 3])
@pytest.mark.parametrize(
    ("target", "higher", "patience", "cont", "metrics", "reached_at", "fallbacks"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_native_and_script_trials_agree_on_the_target(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    eval_every: int,
    target: float,
    higher: bool,
    patience: int,
    cont: bool,
    metrics: list[float],
    reached_at: int | None,
    fallbacks: int,
) -> None:
    budget = len(metrics) * eval_every
    conv = ConvergenceSettings(target=target, patience=patience, max_steps=budget, max_time_s=None,
                               eval_every=eval_every, continue_after_target=cont)  # fmt: skip
    native = _native(monkeypatch, metrics, target, higher, conv)
    assert native.status in ("ok", "budget_exhausted"), native.error
    stop = len(metrics) if reached_at is None or cont else reached_at + patience
    assert [r["val_metric"] for r in native.curve] == metrics[:stop]  # the loop saw the scripted sequence
    assert [r["step"] for r in native.curve] == [eval_every * (i + 1) for i in range(stop)]
    assert [r["samples"] for r in native.curve] == [B * r["step"] for r in native.curve]
    segments = np.diff([0.0] + [r["train_s"] for r in native.curve])
    assert (segments > 0).all() and (len(segments) < 3 or len(set(segments)) > 1)  # not steps in disguise

    order = TrialOrder(report=str(tmp_path / "events.jsonl"), workload="s", kind="convergence", batch_size=B,
                       seed=0, lr=0.02, target=target, patience=patience, higher_is_better=higher,
                       max_steps=budget, continue_after_target=cont)  # fmt: skip
    script = _script(tmp_path, native.curve, order)

    assert script.status == native.status
    assert {k: script.metrics[k] for k in TARGET_KEYS} == {k: native.metrics[k] for k in TARGET_KEYS}
    assert [r["bracket_step"] for r in script.curve] == [r["bracket_step"] for r in native.curve]
    # ...and both are right, not merely alike:
    m = native.metrics
    assert m["target_fallbacks"] == fallbacks
    if reached_at is None:
        assert native.status == "budget_exhausted" and not m["reached_target"] and m["steps_to_target"] is None
        assert script.reasons["steps_to_target"].startswith("target not reached")
    else:
        row = native.curve[reached_at]
        assert native.status == "ok" and m["reached_target"]
        assert (m["steps_to_target"], m["samples_to_target"]) == (eval_every * (reached_at + 1), B * row["step"])
        assert m["time_to_target_s"] == row["train_s"]
        assert m["bracket_steps"] == eval_every * reached_at
        assert m["steps_run"] == (budget if cont else eval_every * (reached_at + patience))


def test_meets_target_tolerance_is_relative_and_directional() -> None:
    assert meets_target(F32_095, 0.95) and not meets_target(0.95 - 2e-6, 0.95)
    assert meets_target(0.95 + 0.9e-6, 0.95, higher_is_better=False)
    assert not meets_target(0.95 + 2e-6, 0.95, higher_is_better=False)
    assert meets_target(-1.0 - 0.5e-6, -1.0)  # relative to |target|


def test_target_watch_takes_a_workloads_own_rule() -> None:
    watch = TargetWatch(10.0, rule=lambda value, target: abs(value - target) < 1)  # e.g. a band, overridden
    rows = [{"step": s, "samples": 4 * s, "train_s": s / 2, "val_metric": v} for s, v in [(1, 5.0), (2, 10.5), (3, 12)]]
    assert [watch.observe(r) for r in rows] == [False, True, True]
    assert watch.to_target() == {"reached_target": True, "steps_to_target": 2, "samples_to_target": 8,
                                 "time_to_target_s": 1.0, "bracket_steps": 1, "target_fallbacks": 1}  # fmt: skip
