"""Convergence trials on the real digits-mlp workload (each well under a second) and the eval schedule."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from bsprof.engine.convergence import ConvergenceSettings, EvalSchedule, run_convergence_trial
from bsprof.engine.lr import scaled_lr
from bsprof.engine.sweep import FINAL_SEED_OFFSET, SweepConfig, lr_grid, run_sweep
from bsprof.engine.trial import EngineSettings, TrialSpec
from bsprof.store import Store
from bsprof.workloads.digits import DigitsMLP

CPU = EngineSettings(device=torch.device("cpu"))


def trial(b: int, seed: int = 0, lr: float | None = None, **conv):
    w = DigitsMLP()
    spec = TrialSpec(w.name, "convergence", b, seed, lr if lr is not None else scaled_lr(w, b, "linear"))
    return run_convergence_trial(w, spec, CPU, ConvergenceSettings(**conv))


@pytest.mark.parametrize("resolution", [0.05, 0.1])
def test_eval_schedule_keeps_relative_bracket_within_resolution(resolution):
    sched = EvalSchedule(resolution)
    s, evals = 0, []
    while s < 100_000:
        s = sched.next_after(s)
        evals.append(s)
    assert evals[: int(1 / resolution)] == list(range(1, int(1 / resolution) + 1))  # every step at first
    for prev, cur in itertools.pairwise(evals):
        assert cur - prev == 1 or (cur - prev) / cur <= resolution + 1e-12  # exact, or within the bound
    assert len(evals) < 20 + math.log(100_000) / math.log(1 / (1 - resolution)) + 5  # geometric, not linear


def test_fixed_eval_period():
    sched = EvalSchedule(every=7)
    assert [sched.next_after(s) for s in (0, 7, 14)] == [7, 14, 21]


def test_reaches_target_and_records_bracket_and_curve():
    r = trial(64)
    m = r.metrics
    assert r.status == "ok" and m["reached_target"]
    s, br = m["steps_to_target"], m["bracket_steps"]
    assert s > 0 and (s - br == 1 or (s - br) / s <= 0.05)
    assert m["samples_to_target"] == s * 64
    assert m["epochs_to_target"] == pytest.approx(s * 64 / 1437)
    assert m["final_val_metric"] >= 0.95 and m["final_train_metric"] is not None
    assert m["eval_time_s"] > 0 and m["time_to_target_s"] > 0
    row = r.curve[-1]
    assert row["step"] == s and row["val_metric"] >= 0.95
    assert {"train_loss", "weight_distance", "grad_norm", "train_s", "samples", "lr"} <= set(row)
    distances = [c["weight_distance"] for c in r.curve]
    assert distances[0] > 0 and distances[-1] > distances[0]  # weights move away from initialisation


def test_same_seed_same_device_same_steps_to_target():
    a, b = trial(32, seed=1), trial(32, seed=1)
    assert a.metrics["steps_to_target"] == b.metrics["steps_to_target"]
    assert [c["val_metric"] for c in a.curve] == [c["val_metric"] for c in b.curve]


def test_too_high_lr_is_diverged_quickly():
    t0 = time.perf_counter()
    r = trial(64, lr=50.0)
    assert r.status == "diverged"
    assert r.metrics["steps_run"] <= 10
    assert "loss" in r.error
    assert time.perf_counter() - t0 < 30  # generous: the trial stops within a few steps, never hangs


def test_budget_exhausted_when_target_unreachable():
    r = trial(64, target=1.01, max_steps=40)
    assert r.status == "budget_exhausted" and not r.metrics["reached_target"]
    assert r.metrics["steps_to_target"] is None and r.metrics["steps_run"] == 40
    assert "steps_to_target" in r.reasons


def test_max_epochs_budget():
    r = trial(256, target=1.01, max_epochs=2.0)
    assert r.status == "budget_exhausted"
    assert r.metrics["steps_run"] == math.ceil(2.0 * 1437 / 256)


def test_continue_after_target_trains_to_budget_and_keeps_first_crossing():
    first = trial(128)
    cont = trial(128, continue_after_target=True, max_steps=200)
    assert cont.status == "ok" and cont.metrics["steps_run"] == 200
    assert cont.metrics["steps_to_target"] == first.metrics["steps_to_target"]
    assert cont.curve[-1]["step"] == 200


def test_patience_requires_consecutive_evaluations():
    once = trial(16, seed=0)
    sustained = trial(16, seed=0, patience=3)
    assert sustained.status == "ok"
    assert sustained.metrics["steps_to_target"] >= once.metrics["steps_to_target"]
    curve = sustained.curve
    i = next(i for i, c in enumerate(curve) if c["step"] == sustained.metrics["steps_to_target"])
    assert all(c["val_metric"] >= 0.95 for c in curve[i : i + 3])


def test_warmup_ramps_the_learning_rate():
    r = trial(64, warmup_steps=10, target=1.01, max_steps=12)
    lrs = [c["lr"] for c in r.curve]
    full = scaled_lr(DigitsMLP(), 64, "linear")
    assert lrs[0] == pytest.approx(full / 10)
    assert lrs[4] == pytest.approx(full * 5 / 10)
    assert lrs[-1] == pytest.approx(full)


def test_tune_lr_chooses_per_batch_size_and_reruns_on_fresh_seeds(tmp_path):
    config = SweepConfig("digits-mlp", (32, 128), kinds=("convergence",), seeds=2, tune_lr=3)
    with Store(tmp_path / "s.db", create=True) as store:
        out = run_sweep(config, DigitsMLP(), CPU, store, prime=False)
        rows = store.trial_rows()
    tune = [r for r in rows if r["phase"] == "tune"]
    final = [r for r in rows if r["phase"] == "final"]
    assert len(tune) == 2 * 3 * 2  # batch sizes x LRs x seeds
    assert {r["lr"] for r in tune if r["batch_size"] == 32} == set(lr_grid(scaled_lr(DigitsMLP(), 32, "linear"), 3))
    assert len(final) == 2 * 2 and {r["seed"] for r in final} == {FINAL_SEED_OFFSET, FINAL_SEED_OFFSET + 1}
    for b in (32, 128):
        assert {r["lr"] for r in final if r["batch_size"] == b} == {out.chosen_lr[b]}


def test_sweep_with_too_high_lr_records_diverged_and_goes_on(tmp_path):
    class Hot(DigitsMLP):
        base_lr = 5.0  # x linear scaling: far too high at every batch size above 8
        max_lr = None

    config = SweepConfig("hot", (8, 64, 256), kinds=("convergence",), seeds=1)
    with Store(tmp_path / "s.db", create=True) as store:
        out = run_sweep(config, Hot(), CPU, store, prime=False)
    statuses = [r.status for r in out.results]
    assert len(statuses) == 3 and statuses.count("diverged") >= 2
