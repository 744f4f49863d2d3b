"""Analysis on small hand-made DataFrames (no training): medians, CIs, failures, regimes, the fit, Pareto."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bsprof.analysis import (
    MAXIMAL_SLOPE,
    PERFECT_SLOPE,
    convergence_table,
    fit_steps_model,
    median_to_target,
    regime_of,
    throughput_table,
)
from bsprof.analyze import analyze, gap_trend, lr_tuning_table, pareto_front


def conv_rows(spec: dict[int, list[float | None]], *, workload: str = "w", phase: str = "main") -> list[dict]:
    """Convergence rows: {batch: [steps per seed, None = missed target]}."""
    rows = []
    for b, steps in spec.items():
        for seed, s in enumerate(steps):
            rows.append({
                "workload": workload, "device": "cpu", "kind": "convergence", "batch_size": b, "seed": seed,
                "lr": 0.1, "phase": phase, "status": "ok" if s is not None else "budget_exhausted",
                "steps_to_target": s, "samples_to_target": None if s is None else s * b,
                "time_to_target_s": None if s is None else s * 0.001, "final_train_metric": 0.99,
                "final_val_metric": 0.96, "epochs_to_target": None, "bracket_steps": None if s is None else s - 1,
                "target_fallbacks": 1,
            })  # fmt: skip
    return rows


def tp_rows(spec: dict[int, list[float]], workload: str = "w") -> list[dict]:
    rows = []
    for b, rates in spec.items():
        for r, sps in enumerate(rates):
            rows.append({
                "workload": workload, "device": "cpu", "kind": "throughput", "batch_size": b, "seed": 0, "lr": 0.1,
                "repeat": r, "phase": "main", "status": "ok", "samples_per_s": sps, "step_time_s": b / sps,
                "step_time_iqr_s": 0.0, "peak_mem_bytes": 1000 * b,
            })  # fmt: skip
    return rows


def test_medians_and_fraction_reached():
    t = convergence_table(pd.DataFrame(conv_rows({8: [100, 120, 110], 16: [60, 50, 55]})))
    assert list(t["batch_size"]) == [8, 16]
    assert t.loc[0, "steps_to_target"] == 110 and t.loc[1, "steps_to_target"] == 55
    assert t.loc[0, "samples_to_target"] == 880
    assert (t["reached_fraction"] == 1.0).all()
    assert t.loc[0, "steps_to_target_ci_low"] <= 110 <= t.loc[0, "steps_to_target_ci_high"]
    assert t.loc[0, "steps_to_target_ci_low"] >= 100 and t.loc[0, "steps_to_target_ci_high"] <= 120
    assert t.loc[0, "generalization_gap"] == pytest.approx(0.03)
    assert t.loc[0, "bracket_rel_width"] == pytest.approx(1 / 100)


def test_missed_target_counts_as_infinitely_slow():
    t = convergence_table(pd.DataFrame(conv_rows({8: [100, None, 110], 16: [None, None, 40]})))
    row8, row16 = t.iloc[0], t.iloc[1]
    assert row8["steps_to_target"] == 110  # median of 100, 110, inf
    assert row8["reached_fraction"] == pytest.approx(2 / 3)
    assert math.isinf(row16["steps_to_target"])  # most seeds failed: no finite median
    assert "budget_exhausted: 2" in row16["statuses"]


def test_every_seed_failed_batch_size_has_no_finite_median_and_no_regime():
    t = convergence_table(pd.DataFrame(conv_rows({8: [100, 90, 95], 16: [50, 55, 52], 32: [None, None, None]})))
    last = t.iloc[-1]
    assert math.isinf(last["steps_to_target"]) and last["reached"] == 0
    assert math.isnan(last["scaling_efficiency"])
    assert math.isnan(last["final_val_metric"])


def test_missing_seeds_are_tolerated():
    t = convergence_table(pd.DataFrame(conv_rows({8: [100, 110, 90], 16: [50]})))
    assert t.loc[1, "seeds"] == 1 and t.loc[1, "steps_to_target"] == 50
    assert t.loc[1, "steps_to_target_ci_low"] == 50 == t.loc[1, "steps_to_target_ci_high"]


def test_single_batch_size_sweep():
    trials = pd.DataFrame(conv_rows({64: [30, 32, 31]}) + tp_rows({64: [1000.0, 1100.0]}))
    t = convergence_table(trials)
    assert len(t) == 1 and t.loc[0, "scaling_efficiency"] == 1.0
    assert t.loc[0, "regime"] is None  # one point says nothing about scaling
    assert fit_steps_model([64], [31]) is None
    rec = analyze(trials).recommendations[0]
    assert rec.fastest_wallclock == 64 and rec.fewest_samples == 64 and rec.fit is None


def test_scaling_efficiency_and_measured_regimes():
    # steps halve (perfect), then fall by 25% per doubling (diminishing), then stay flat (maximal)
    t = convergence_table(pd.DataFrame(conv_rows({8: [400] * 3, 16: [200] * 3, 32: [150] * 3, 64: [148] * 3})))
    assert list(t["scaling_efficiency"].round(3)) == [1.0, 1.0, round(400 * 8 / (150 * 32), 3),
                                                      round(400 * 8 / (148 * 64), 3)]  # fmt: skip
    # with four points that don't follow S_min(1 + B_noise/B) closely the regime may come from the fit or slope
    assert t.loc[1, "local_slope"] == pytest.approx(1.0)
    assert t.loc[3, "local_slope"] < MAXIMAL_SLOPE
    assert regime_of(1.0) == "perfect scaling"
    assert regime_of(PERFECT_SLOPE - 0.01) == "diminishing returns"
    assert regime_of(MAXIMAL_SLOPE - 0.01) == "maximal data parallelism"


def test_regimes_from_fit_follow_the_model():
    bs = [2**k for k in range(3, 13)]
    steps = [50 * (1 + 200 / b) for b in bs]
    t = convergence_table(pd.DataFrame(conv_rows({b: [s] * 3 for b, s in zip(bs, steps)})))
    assert set(t["regime_source"]) == {"fit"}
    by_b = dict(zip(t["batch_size"], t["regime"]))
    assert by_b[8] == "perfect scaling"  # slope 200/208
    assert by_b[256] == "diminishing returns"
    assert by_b[4096] == "maximal data parallelism"  # slope 200/4296


def test_tuning_trials_are_not_reported():
    rows = conv_rows({8: [10, 10, 10]}, phase="tune") + conv_rows({8: [100, 100, 100]}, phase="final")
    t = convergence_table(pd.DataFrame(rows))
    assert t.loc[0, "steps_to_target"] == 100


@pytest.mark.parametrize("seed", range(50))
def test_fit_recovers_known_parameters_from_noisy_medians(seed):
    """Medians from S_min=50, B_noise=200 with uniform ±5% noise on 20 half-octave batch sizes (8..5793)."""
    rng = np.random.default_rng(seed)
    bs = np.array([2 ** (k / 2) for k in range(6, 26)])
    steps = 50 * (1 + 200 / bs) * (1 + rng.uniform(-0.05, 0.05, len(bs)))
    fit = fit_steps_model(bs, steps)
    assert fit is not None and fit.constrained
    assert fit.s_min == pytest.approx(50, rel=0.05)
    assert fit.b_noise == pytest.approx(200, rel=0.05)
    assert fit.b_crit == pytest.approx(fit.b_noise)
    assert fit.e_min == pytest.approx(fit.s_min * fit.b_noise)


def test_fit_is_flagged_when_data_show_one_regime():
    bs = [8, 16, 32, 64]
    fit = fit_steps_model(bs, [100.0, 100.0, 100.0, 100.0])  # flat: B_noise -> 0, outside the range
    assert fit is not None and not fit.constrained and fit.reason


def test_throughput_table_medians_and_efficiency():
    t = throughput_table(pd.DataFrame(tp_rows({8: [100.0, 120.0, 110.0], 16: [200.0, 240.0, 220.0]})))
    assert list(t["samples_per_s"]) == [110.0, 220.0]
    assert t.loc[1, "speedup"] == pytest.approx(2.0) and t.loc[1, "scaling_efficiency"] == pytest.approx(1.0)


def test_tradeoff_wallclock_is_steps_times_step_time_and_recommendations():
    trials = pd.DataFrame(
        conv_rows({8: [100] * 3, 16: [60] * 3, 32: [50] * 3})
        + tp_rows({8: [800.0], 16: [1600.0], 32: [1600.0]})  # step times 10 ms, 10 ms, 20 ms
    )
    a = analyze(trials, "fixed")
    t = a.tradeoff
    assert list(t["wallclock_to_target_s"].round(6)) == [1.0, 0.6, 1.0]
    rec = a.recommendations[0]
    assert rec.fastest_wallclock == 16 and rec.fewest_samples == 8
    assert rec.least_energy is None  # no energy measured
    assert any("fixed" in w for w in rec.warnings)


def test_pareto_front():
    df = pd.DataFrame({"t": [1.0, 2.0, 3.0, 1.5, math.inf], "s": [5.0, 3.0, 1.0, 6.0, 0.5]})
    assert list(pareto_front(df, "t", "s")) == [True, True, True, False, False]


# --- one definition of "a missed target counts as infinity" (issue 10.2) ---------------------------------------


@pytest.mark.parametrize(
    ("values", "reached", "median"),
    [
        ([10, 20, 30], None, 20.0),
        ([10, None, 30], None, 30.0),  # one of three missed: the median is the slower reached seed
        ([10, None, None], None, math.inf),  # two of three missed: the median seed missed
        ([10, 20, float("nan"), None], None, math.inf),  # half missed
        ([10, 20, 30], [True, False, True], 30.0),  # a value stored for a seed that did not reach: ignored
        ([], None, math.nan),
        (pd.array([5, pd.NA, 7], dtype="Int64"), None, 7.0),
    ],
)
def test_median_to_target(values, reached, median):
    got = median_to_target(values, reached)
    assert (math.isnan(got) and math.isnan(median)) or got == median


def test_the_convergence_table_and_lr_tuning_use_it():
    t = convergence_table(pd.DataFrame(conv_rows({8: [100, None, 110], 16: [None, None, 40]})))
    assert list(t["steps_to_target"]) == [median_to_target([100, None, 110]), math.inf]
    rows = conv_rows({8: [100, None, 110]}, phase="tune") + [
        {**r, "lr": 0.2} for r in conv_rows({8: [None, None, 90]}, phase="tune")
    ] + [{**r, "lr": 0.1, "seed": 10 + r["seed"]} for r in conv_rows({8: [95]}, phase="final")]  # fmt: skip
    lr = lr_tuning_table(pd.DataFrame(rows))
    assert list(lr["lr"]) == [0.1, 0.2]
    assert list(lr["steps_to_target"]) == [110.0, math.inf]
    assert list(lr["chosen"]) == [True, False] and list(lr["best"]) == [True, False]
    assert not lr["best_on_edge"].any()  # a 2-LR grid has no inside


def test_sweep_and_benchmark_results_call_the_same_median(monkeypatch):
    """engine.sweep.choose_lr and the benchmark suite's extra_info go through analysis.median_to_target."""
    from bsprof import analysis
    from bsprof.benchmark_results import convergence_extra_info
    from bsprof.engine.sweep import choose_lr
    from bsprof.engine.trial import TrialResult, TrialSpec

    calls = []
    real = analysis.median_to_target
    monkeypatch.setattr(analysis, "median_to_target", lambda *a, **k: calls.append(a) or real(*a, **k))
    rows = [{"kind": "convergence", "phase": "tune", "batch_size": 8, "lr": lr, "steps_to_target": s,
             "status": "ok" if s else "budget_exhausted"}
            for lr, s in ((0.1, 50), (0.1, None), (0.1, 60), (0.2, 40), (0.2, 45), (0.4, None), (0.4, 10))]  # fmt: skip
    assert choose_lr(rows, 8) == 0.2  # 0.4's median seed missed (inf), 0.1's median is 60
    assert len(calls) == 3
    results = [
        TrialResult(TrialSpec("w", "convergence", 8, seed, 0.1), status, "cpu", "cpu", metrics)
        for seed, (status, metrics) in enumerate(
            [
                ("ok", {"steps_to_target": 30, "reached_target": True}),
                ("budget_exhausted", {}),
                ("budget_exhausted", {}),
            ]
        )
    ]
    info = convergence_extra_info(results, target=0.9)
    assert info["steps_to_target_median"] is None and len(calls) == 6  # steps, samples, seconds


# --- measured against estimated time to target (issue 9.6) ------------------------------------------------------


def test_measured_time_to_target_beside_the_estimate_and_their_disagreement():
    # Convergence trials' own step time: 1 ms per step (time_to_target_s = steps * 0.001). Throughput: B=8 at
    # 8,000 samples/s (1 ms per step, agrees), B=16 at 4,000 samples/s (4 ms per step, 4x: disagrees).
    trials = pd.DataFrame(
        conv_rows({8: [100, 110, 120], 16: [60, 62, 64]}) + tp_rows({8: [8000.0] * 3, 16: [4000.0] * 3})
    )
    t = analyze(trials).tradeoff.set_index("batch_size")
    assert t.loc[8, "time_to_target_s"] == pytest.approx(0.11) and t.loc[8, "wallclock_to_target_s"] == pytest.approx(
        0.11
    )
    assert t.loc[16, "time_to_target_ratio"] == pytest.approx(0.25)
    assert list(t["time_estimate_disagrees"]) == [False, True]


def test_gap_trend_is_spearman_rho_of_the_gap():
    rows = []
    for b, train in ((8, 0.95), (16, 0.96), (32, 0.98), (64, 0.99)):
        rows += [{**r, "final_train_metric": train} for r in conv_rows({b: [100, 100, 100]})]
    g = gap_trend(convergence_table(pd.DataFrame(rows))).iloc[0]
    assert g["rho"] == pytest.approx(1.0) and g["trend"] == "grows"
    assert (g["min_gap_batch_size"], g["max_gap_batch_size"]) == (8, 64)


def test_within_trial_drift_is_counted_per_batch_size():
    rows = tp_rows({8: [800.0, 810.0], 16: [1600.0]})
    rows[0] |= {"step_time_drifted": True, "step_time_drift_rel": 0.42}
    rows[1] |= {"step_time_drifted": False, "step_time_drift_rel": -0.03}
    rows[2] |= {"step_time_drifted": False, "step_time_drift_rel": 0.01}
    t = throughput_table(pd.DataFrame(rows)).set_index("batch_size")
    assert t.loc[8, "drifted_trials"] == 1 and t.loc[8, "step_time_drift_rel"] == pytest.approx(0.42)
    assert t.loc[16, "drifted_trials"] == 0
    old = throughput_table(pd.DataFrame(tp_rows({8: [800.0]})))  # stores written before the engine flagged drift
    assert old.loc[0, "drifted_trials"] == 0 and math.isnan(old.loc[0, "step_time_drift_rel"])
