"""Overhead of ``--measure-gns``: seconds the noise-scale probes add per evaluation of a convergence trial.

Per batch size, digits-mlp convergence trials run to the target with and without the noise-scale tracker
(default :class:`~bsprof.engine.noise_scale.GnsSettings`: 4 probes of max(B, 256) examples in 8 micro-batches
at evaluations spaced by a factor 1.25 in steps, and at the target), alternating for ``ROUNDS`` rounds, the
order flipping every round, on one torch thread. Recorded in ``extra_info`` (medians over rounds, and every
round's figures):

- ``gns_s_per_measurement``: probe seconds per measured evaluation;
- ``gns_s_per_evaluation``: probe seconds spread over all of the trial's evaluations;
- ``eval_s_per_evaluation``: the evaluation's own seconds, for scale; ``train_step_s``: one training step;
- ``overhead_vs_trial``: probe seconds / (training + evaluation seconds) of the trial with the tracker;
- ``wall_ratio``: wall time of the trial with the tracker / without.

The probe seconds are kept out of ``train_time_s`` and ``time_to_target_s`` (the trial stores them as
``gns_time_s``). The assertion is not a timing: the tracker must leave training untouched, so steps to target
and the final validation metric are identical with and without it, every round.

Run: ``python -m pytest benchmarks/test_gns_overhead.py --benchmark-only``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest
import torch

from bsprof.engine.convergence import ConvergenceSettings, run_convergence_trial
from bsprof.engine.lr import scaled_lr
from bsprof.engine.noise_scale import GnsSettings
from bsprof.engine.trial import EngineSettings, TrialSpec
from bsprof.workloads.digits import DigitsMLP

ROUNDS = 5
SEED = 0


def _trial(batch_size: int, gns: bool) -> tuple[dict[str, Any], float]:
    workload = DigitsMLP()
    spec = TrialSpec(workload.name, "convergence", batch_size, SEED, scaled_lr(workload, batch_size, "linear"))
    conv = ConvergenceSettings(gns=GnsSettings() if gns else None)
    t0 = time.perf_counter()
    result = run_convergence_trial(workload, spec, EngineSettings(device=torch.device("cpu")), conv)
    wall_s = time.perf_counter() - t0
    assert result.status == "ok", result.error
    return dict(result.metrics), wall_s


def _compare(batch_size: int) -> dict[str, Any]:
    rounds: list[dict[str, float]] = []
    for r in range(ROUNDS):
        out: dict[bool, tuple[dict[str, Any], float]] = {}
        for gns in (False, True) if r % 2 == 0 else (True, False):
            out[gns] = _trial(batch_size, gns)
        (plain, plain_wall), (probed, probed_wall) = out[False], out[True]
        assert probed["steps_to_target"] == plain["steps_to_target"]  # the probes leave training untouched
        assert probed["final_val_metric"] == plain["final_val_metric"]
        gns_s = float(probed["gns_time_s"])
        rounds.append(
            {
                "gns_s_per_measurement": gns_s / probed["gns_measurements"],
                "gns_s_per_evaluation": gns_s / probed["evaluations"],
                "eval_s_per_evaluation": probed["eval_time_s"] / probed["evaluations"],
                "train_step_s": probed["train_time_s"] / probed["steps_run"],
                "overhead_vs_trial": gns_s / (probed["train_time_s"] + probed["eval_time_s"]),
                "wall_ratio": probed_wall / plain_wall,
                "measurements": probed["gns_measurements"],
                "evaluations": probed["evaluations"],
                "b_simple_at_target": probed["gns_b_simple"],
            }
        )
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {"batch_size": batch_size, "rounds": ROUNDS, "torch_threads": torch.get_num_threads(), **summary,
            "per_round": rounds}  # fmt: skip


@pytest.mark.parametrize("batch_size", [8, 256], ids=["digits-mlp-B8", "digits-mlp-B256"])
def test_gns_overhead(benchmark: Any, torch_threads: int, batch_size: int) -> None:
    out = benchmark.pedantic(_compare, args=(batch_size,), rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    assert out["measurements"] >= 2 and out["b_simple_at_target"] is not None
