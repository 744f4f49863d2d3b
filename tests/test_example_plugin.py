"""The README's example plug-in loads by path and runs both trial kinds."""

from __future__ import annotations

from pathlib import Path

import torch

from bsprof.engine.convergence import ConvergenceSettings, run_convergence_trial
from bsprof.engine.timing import TimingSettings
from bsprof.engine.trial import EngineSettings, TrialSpec, run_throughput_trial
from bsprof.workload import load_workload

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_regression.py"


def test_example_plugin_runs():
    w = load_workload(f"{EXAMPLE}:factory")
    assert w.name == "tiny-regression" and w.metric_name == "r2"
    settings = EngineSettings(device=torch.device("cpu"), timing=TimingSettings(min_time_s=0.05, min_steps=5))
    tp = run_throughput_trial(w, TrialSpec(w.name, "throughput", 32, 0, 0.02), settings)
    assert tp.status == "ok" and tp.metrics["samples_per_s"] > 0
    conv = run_convergence_trial(w, TrialSpec(w.name, "convergence", 32, 0, 0.02), settings, ConvergenceSettings())
    assert conv.status == "ok" and conv.metrics["final_val_metric"] >= 0.9
