"""A sweep with the noise scale measured: summary lines, the report's section and charts, end to end."""

from __future__ import annotations

import torch

from bsprof.console import print_summary
from bsprof.engine.convergence import ConvergenceSettings
from bsprof.engine.noise_scale import GnsSettings
from bsprof.engine.sweep import SweepConfig, run_sweep
from bsprof.engine.trial import EngineSettings
from bsprof.report import write_report
from bsprof.store import Store
from bsprof.workloads.digits import DigitsMLP


def test_sweep_with_gns_summary_and_report(tmp_path, capsys):
    config = SweepConfig(
        workload_ref="digits-mlp", batch_sizes=(64, 256, 1024), kinds=("convergence",), seeds=1,
        convergence=ConvergenceSettings(gns=GnsSettings(probes=2)),
    )  # fmt: skip
    with Store(tmp_path / "s.db", create=True) as store:
        outcome = run_sweep(config, DigitsMLP(), EngineSettings(device=torch.device("cpu")), store, prime=False)
        assert all(r.status == "ok" and r.metrics["gns_b_simple"] for r in outcome.results)
        print_summary(store, [outcome.run.run_id], width=200)
        out = capsys.readouterr().out
        assert "noise scale (McCandlish et al. 2018): B_simple at the target" in out
        assert "predicted vs measured B_crit" in out and "ratio" in out
        info = write_report(store, tmp_path / "r.html", [outcome.run.run_id])
    html = (tmp_path / "r.html").read_text()
    assert "5b. Gradient noise scale" in html and "chart-noise-scale-over-training" in html
    assert "chart-noise-scale-steps" in html and "well conditioned" in html
    assert info.charts >= 2
