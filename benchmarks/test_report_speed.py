"""Benchmark: the HTML report of a 1,000-trial store renders in under 10 s and stays under 5 MB.

The store is synthetic (written through ``Store.add_trial`` with ``TrialResult`` objects, no training): two
runs, ten batch sizes, ten seeds, throughput repeats, LR tuning, learning curves of 100 points per trial.
Run with ``python -m pytest benchmarks --benchmark-only``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from bsprof.engine.trial import TrialResult, TrialSpec
from bsprof.report import write_report
from bsprof.report.page import javascript_bundle
from bsprof.store import Store

MAX_SECONDS = 10.0
MAX_BYTES = 5 * 2**20
BATCH_SIZES = tuple(2**k for k in range(1, 11))  # 2 .. 1024
SEEDS = 10
CURVE_POINTS = 100


def _throughput(workload: str, b: int, seed: int, repeat: int, speed: float) -> TrialResult:
    sps = speed * 4000 * b / (1 + b / 200) * (1 + 0.03 * math.sin(seed + repeat))
    metrics = {
        "samples_per_s": sps,
        "step_time_s": b / sps,
        "step_time_iqr_s": 0.05 * b / sps,
        "peak_mem_bytes": int(4e7 + 3e6 * b),
        "gpu_util_pct": None,
        "power_w": None,
        "energy_j": None,
    }
    spec = TrialSpec(workload, "throughput", b, seed, 0.01 * b / 8, repeat=repeat)
    return TrialResult(spec, "ok", "cpu", "bench CPU", metrics, {"gpu_util_pct": "cpu"}, duration_s=1.0)


def _convergence(workload: str, b: int, seed: int, lr_mult: float, phase: str) -> TrialResult:
    steps = max(2, round(12 * (1 + 300 / b) * (1 + 0.3 * abs(math.log2(lr_mult))) * (1 + 0.04 * (seed % 5 - 2))))
    status = "budget_exhausted" if lr_mult > 1.5 and b >= 512 else "ok"
    last = steps if status == "ok" else 3 * steps
    curve = [
        {
            "step": s,
            "samples": s * b,
            "train_s": s * b * 2.5e-5,
            "val_metric": 0.1 + 0.85 * (1 - math.exp(-3 * s / steps)),
            "train_loss": 2.3 * math.exp(-s / steps),
            "weight_distance": math.log1p(s),
            "grad_norm": 1.0,
            "lr": 0.01,
        }
        for s in sorted({max(1, round(last * (i + 1) / CURVE_POINTS)) for i in range(CURVE_POINTS)})
    ]
    ok = status == "ok"
    metrics = {
        "reached_target": ok,
        "target": 0.9,
        "steps_to_target": steps if ok else None,
        "samples_to_target": steps * b if ok else None,
        "epochs_to_target": steps * b / 1400 if ok else None,
        "time_to_target_s": steps * b * 2.5e-5 if ok else None,
        "bracket_steps": steps - 1 if ok else None,
        "final_train_metric": 0.93,
        "final_val_metric": 0.905,
        "target_fallbacks": 0,
    }
    spec = TrialSpec(workload, "convergence", b, seed, 0.01 * b / 8 * lr_mult, phase=phase)
    return TrialResult(spec, status, "cpu", "bench CPU", metrics, curve=curve, duration_s=1.0)


def build_store(path: Path) -> int:
    """Two runs: one with 2 throughput repeats, 3-LR tuning and final re-runs (600 trials), one with 2 repeats
    and 2 seeds' worth of plain convergence trials per seed slot (400 trials). Returns the trial count."""
    n = 0
    with Store(path, create=True) as st:
        env = {"device": "cpu", "device_name": "bench CPU", "torch_version": "2.13.0"}
        for amp, tune in (("off", True), ("bf16", False)):
            cfg = {
                "engine": {"device": "cpu", "amp": amp, "compile": False},
                "lr_rule": "linear",
                "tune_lr": 3 if tune else 0,
            }
            run = st.open_run("bench-workload", cfg, env, fresh=True)
            for b in BATCH_SIZES:
                for seed in range(SEEDS):
                    for r in range(2):
                        n += st.add_trial(
                            run.run_id, _throughput("bench-workload", b, seed, r, 1.5 if amp == "bf16" else 1)
                        )
                    if tune:
                        for mult in (0.5, 1.0, 2.0):
                            n += st.add_trial(run.run_id, _convergence("bench-workload", b, seed, mult, "tune"))
                        n += st.add_trial(run.run_id, _convergence("bench-workload", b, 1000 + seed, 1.0, "final"))
                    else:
                        n += st.add_trial(run.run_id, _convergence("bench-workload", b, seed, 1.0, "main"))
                        n += st.add_trial(run.run_id, _convergence("bench-workload", b, 100 + seed, 1.0, "main"))
    return n


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report-bench") / "big.db"
    assert build_store(path) == 1000
    return path


def test_report_of_1000_trials(benchmark, big_store: Path, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    javascript_bundle()  # once per process (and cached on disk); timed apart from the rendering
    bundle_s = time.perf_counter() - t0
    with Store(big_store) as st:
        run_ids = [r.run_id for r in st.runs()]
    out = tmp_path / "index.html"

    info = benchmark.pedantic(write_report, args=(big_store, out, run_ids), rounds=3, iterations=1)

    size = out.stat().st_size
    benchmark.extra_info.update(trials=1000, page_bytes=size, charts=info.charts, bundle_first_call_s=bundle_s)
    assert info.charts >= 9
    assert size < MAX_BYTES, f"page is {size / 2**20:.2f} MiB, over {MAX_BYTES / 2**20:.0f} MiB"
    assert benchmark.stats.stats.max < MAX_SECONDS, f"slowest render {benchmark.stats.stats.max:.1f} s"
