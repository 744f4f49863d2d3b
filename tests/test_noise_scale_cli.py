"""The noise-scale doors: ``bsprof predict``, ``bsprof sweep --measure-gns``, summary and export."""

from __future__ import annotations

import pandas as pd
import pytest


@pytest.mark.usefixtures("fast_timing")
def test_predict_prints_the_prediction_and_what_it_cannot_know(cli, tmp_path):
    store = tmp_path / "p.db"
    r = cli("predict", "-b", "64,256", "--budget-time", "20", "--min-time", "0.001", "--min-steps", "2",
            "--store", store)  # fmt: skip
    assert r.code == 0, r.err
    assert "B_simple over the short run at B=64" in r.out
    assert "predicted B_crit ≈" in r.out and "predicted fastest wall-clock to target on this device: B=" in r.out
    assert "what this prediction cannot know" in r.out and "Hessian" in r.out
    frame = pd.read_csv(pd.io.common.StringIO(cli("export", "--store", store).out))
    assert sorted(frame["kind"]) == ["convergence", "throughput", "throughput"]
    conv = frame[frame["kind"] == "convergence"].iloc[0]
    assert conv["batch_size"] == 64 and conv["gns_b_simple"] > 0 and conv["gns_measurements"] >= 2
    # A measured sweep of the same workload afterwards: the summary puts the prediction beside its fit.
    s = cli("sweep", "-b", "64,256,1024", "--kind", "convergence", "--seeds", "1", "--store", store)
    assert s.code == 0, s.err
    assert "predicted vs measured B_crit" in s.out
    curves = pd.read_csv(pd.io.common.StringIO(cli("export", "--curves", "--store", store).out))
    assert {"run_id", "trial_id", "batch_size", "step", "val_metric", "b_simple", "b_simple_high"} <= set(curves)
    probed = curves[curves["b_simple"].notna()]
    assert len(probed) >= 2 and set(probed["batch_size"]) == {64}  # only the predict run measured it


def test_predict_bad_input_is_one_line_exit_2(cli, tmp_path):
    r = cli("predict", "--at-batch-size", "0", "--store", tmp_path / "p.db")
    assert r.code == 2 and len(r.err_lines) == 1
    r = cli("predict", "--budget-time", "-1", "--store", tmp_path / "p.db")
    assert r.code == 2 and len(r.err_lines) == 1
