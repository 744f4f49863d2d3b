"""Predicted (noise scale) beside measured (fitted) critical batch size, on controlled trial frames."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bsprof.analysis import fit_steps_model
from bsprof.noise_analysis import CAVEATS, critical_batches, noise_scale_table, steps_prediction_table

SIZES = [8, 16, 32, 64, 128, 256]
B_NOISE = 100.0
S_MIN = 10.0


def frames(gns: list[float] | None, reached: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Trials following S = S_min(1 + B_noise/B) exactly; ``gns`` values go to the first trials' metrics."""
    rows = []
    values = iter(gns or [])
    for b in SIZES:
        for seed in range(2):
            v = next(values, None)
            rows.append(
                {
                    "workload": "w", "device": "cpu", "kind": "convergence", "status": "ok", "batch_size": b,
                    "seed": seed, "reached_target": reached, "steps_to_target": S_MIN * (1 + B_NOISE / b),
                    "gns_b_simple": v, "gns_b_simple_low": None if v is None else 0.8 * v,
                    "gns_b_simple_high": None if v is None else "inf" if v > 1000 else 1.25 * v, "gns_time_s": 0.5,
                    "gns_grad_sq": None if v is None else 2.0, "gns_trace_cov": None if v is None else 2.0 * v,
                }
            )  # fmt: skip
    trials = pd.DataFrame(rows)
    conv = pd.DataFrame({"workload": "w", "device": "cpu", "batch_size": SIZES,
                         "steps_to_target": [S_MIN * (1 + B_NOISE / b) for b in SIZES]})  # fmt: skip
    tp = pd.DataFrame({"workload": "w", "device": "cpu", "batch_size": SIZES,
                       "step_time_s": [1.0, 1.0, 1.0, 2.0, 4.0, 8.0]})  # fmt: skip
    return trials, conv, tp


def fits(conv: pd.DataFrame) -> dict:
    return {("w", "cpu"): fit_steps_model(conv["batch_size"], conv["steps_to_target"])}


def test_prediction_beside_fit_with_ratio_and_interval():
    trials, conv, tp = frames([90.0, 110.0] * 6)
    (cb,) = critical_batches(trials, fits(conv), conv, tp)
    assert cb.measured == pytest.approx(B_NOISE, rel=1e-4) and cb.measured_constrained
    assert cb.predicted == pytest.approx(100.0) and cb.predicted_trials == 12 and cb.at_target
    assert 90.0 <= cb.predicted_low <= cb.predicted <= cb.predicted_high <= 110.0
    assert cb.ratio == pytest.approx(1.0, rel=1e-4) and cb.ratio_low < 1 < cb.ratio_high
    assert cb.confidence == "high"
    # S_min from the smallest batch size's steps: 10 (1 + 100/8) / (1 + 100/8) = 10.
    assert cb.prediction.s_min == pytest.approx(S_MIN)
    # (1 + 100/B)·t: 8 -> 13.5, 16 -> 7.25, 32 -> 4.125, 64 -> 5.125: saturation at 32 wins.
    assert cb.fastest_batch_size == 32
    table = steps_prediction_table([cb], conv, tp)
    assert list(table["batch_size"]) == SIZES
    assert table["predicted_steps"].to_numpy() == pytest.approx(table["measured_steps"].to_numpy(), rel=1e-6)
    assert (table["predicted_low"] <= table["predicted_steps"]).all() and not table["relative"].any()


def test_no_noise_scale_gives_the_fit_alone_and_no_fit_gives_the_prediction_alone():
    trials, conv, tp = frames(None)
    (cb,) = critical_batches(trials.drop(columns=["gns_b_simple"]), fits(conv), conv, tp)
    assert cb.predicted is None and cb.ratio is None and cb.prediction is None and cb.measured is not None
    assert steps_prediction_table([cb], conv, tp).empty
    trials, conv, tp = frames([300.0])  # one trial measured: its own interval
    (cb,) = critical_batches(trials, {("w", "cpu"): None}, conv.iloc[0:0], tp)
    assert (cb.predicted, cb.predicted_low, cb.predicted_high) == (300.0, 240.0, 375.0)
    assert cb.measured is None and cb.ratio is None and cb.prediction.s_min is None
    assert steps_prediction_table([cb], conv.iloc[0:0], tp)["relative"].all()


def test_early_only_estimates_are_low_confidence_and_unbounded_intervals_stay_unbounded():
    trials, conv, tp = frames([2000.0], reached=False)
    (cb,) = critical_batches(trials, fits(conv), conv, tp)
    assert not cb.at_target and cb.confidence == "low"
    assert cb.predicted_high == math.inf and cb.ratio_high == math.inf
    assert len(CAVEATS) == 3 and any("Hessian" in c for c in CAVEATS)


def test_noise_scale_table_per_batch_size():
    trials, _, _ = frames([10.0, 30.0, 50.0])
    table = noise_scale_table(trials)
    assert list(table["batch_size"]) == [8, 16]
    row = table.iloc[0]
    assert (row["trials"], row["reached"], row["b_simple"], row["gns_time_s"]) == (2, 2, 20.0, 0.5)
    assert noise_scale_table(trials.drop(columns=["gns_b_simple"])).empty


def test_prediction_pools_components_not_ratios():
    trials, conv, tp = frames([10.0, 30.0])
    trials.loc[0, ["gns_grad_sq", "gns_trace_cov"]] = [1.0, 10.0]  # B_simple 10
    trials.loc[1, ["gns_grad_sq", "gns_trace_cov"]] = [3.0, 90.0]  # B_simple 30
    (cb,) = critical_batches(trials, fits(conv), conv, tp)
    assert cb.predicted == pytest.approx(25.0)  # (10 + 90) / (1 + 3), not the median ratio 20
    assert 10.0 <= cb.predicted_low <= 25.0 <= cb.predicted_high <= 30.0
