"""Data-parallel trials on CPU with gloo and 2 processes (bsprof/engine/distributed.py)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from helpers import REPO, cli_command, cli_env

from bsprof.engine.distributed import DataParallel, context_from_env, merge_ranks
from bsprof.engine.result import TrialResult, TrialSpec
from bsprof.noise_scale import GradientNormSample

SPEC = TrialSpec("digits-mlp", "throughput", 64, 0, 0.1)


def test_context_from_env_reads_what_torchrun_sets() -> None:
    assert context_from_env({}) is None
    assert context_from_env({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}) == DataParallel(1, 2, 1)
    with pytest.raises(ValueError, match="multiple of the world size 2"):
        DataParallel(0, 2, 0).per_rank_batch(63)


def _rank(status: str = "ok", error: str | None = None, **per_rank: Any) -> dict[str, Any]:
    return {"status": status, "error": error, "per_rank": per_rank, "step_time_s": per_rank.pop("step", 0.01)}


def test_merge_ranks_stores_max_and_sum_per_rank_columns_world_and_per_rank_batch() -> None:
    result = TrialResult(SPEC, "ok", "cpu", metrics={"peak_mem_bytes": 100, "energy_j": 2.0, "samples_per_s": 5.0})
    ranks = [_rank(peak_mem_bytes=100, energy_j=2.0, step=0.010), _rank(peak_mem_bytes=300, energy_j=None, step=0.012)]
    merged = merge_ranks(result, ranks, DataParallel(0, 2, 0))
    assert merged.metrics["peak_mem_bytes"] == 300
    assert merged.metrics["peak_mem_bytes_sum"] == 400
    assert merged.metrics["energy_j"] == 2.0
    assert merged.metrics["energy_j_sum"] is None  # one rank unmeasured: no sum rather than a partial one
    assert merged.metrics["samples_per_s"] == 5.0  # global samples/s as rank 0 timed it
    assert merged.metrics["step_time_max_rank_s"] == 0.012
    assert (merged.metrics["world_size"], merged.metrics["per_rank_batch_size"]) == (2, 32)
    assert "peak_mem_reserved_bytes_sum" not in merged.metrics


def test_merge_ranks_takes_a_failing_rank_status() -> None:
    result = TrialResult(SPEC, "ok", "cpu", metrics={})
    merged = merge_ranks(result, [_rank(), _rank("oom", "CUDA out of memory")], DataParallel(0, 2, 0))
    assert merged.status == "oom"
    assert merged.error == "rank 1: CUDA out of memory"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, steps: int, out: str) -> None:
    """Train digits-mlp for ``steps`` steps at global batch 64 under DDP (2 ranks); rank 0 saves the weights."""
    import torch.distributed as dist

    from bsprof.engine.step import TrainingStep
    from bsprof.engine.trial import EngineSettings
    from bsprof.workload import load_workload

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = DataParallel(rank, 2, rank)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        settings = EngineSettings(device=torch.device("cpu"), data_parallel=world)
        spec = TrialSpec("digits-mlp", "convergence", 64, 0, 0.1)
        step = TrainingStep.for_trial(load_workload("digits-mlp"), spec, settings)
        for _ in range(steps):
            step()
        norms = step.gradient_norms()
        agreed = step.agree((float(rank),), (float(rank),))
        if rank == 0:
            state = {k: v.clone() for k, v in step.model.state_dict().items()}
            torch.save({"state": state, "norms": norms, "agreed": agreed, "samples": step.samples_done}, out)
        dist.barrier()  # leave together (see DataParallel.stop)
    finally:
        dist.destroy_process_group()


def test_ddp_step_matches_one_process_at_the_global_batch(tmp_path: Path) -> None:
    """Same data order (each rank a slice of the single-process batch) and averaged gradients: after 20 SGD
    steps the weights agree with one process at batch 64 up to float rounding of the all-reduce."""
    from bsprof.engine.step import TrainingStep
    from bsprof.engine.trial import EngineSettings
    from bsprof.workload import load_workload

    out = tmp_path / "ddp.pt"
    steps = 20
    # spawn, not fork: forking this process (with torch's and the test session's threads running) can deadlock
    # the child on a lock another thread held at the fork; it did, here, once under load.
    ctx = mp.start_processes(
        _ddp_worker, args=(_free_port(), steps, str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two DDP ranks did not finish within 240 s")
    got = torch.load(out)
    spec = TrialSpec("digits-mlp", "convergence", 64, 0, 0.1)
    one = TrainingStep.for_trial(load_workload("digits-mlp"), spec, EngineSettings(device=torch.device("cpu")))
    for _ in range(steps):
        one()
    for name, value in one.model.state_dict().items():
        torch.testing.assert_close(got["state"][name], value, rtol=1e-5, atol=1e-6)
    assert got["samples"] == steps * 64  # global samples
    assert got["agreed"] == ((0.5,), (1.0,))  # mean and max over the two ranks
    norms = got["norms"]
    assert (norms["dp_small_batch"], norms["dp_big_batch"], norms["dp_norm_steps"]) == (32, 64, steps)
    # Two independent half-batch gradients average to one with less noise: E|g_64|² < E|g_32|².
    assert 0 < norms["dp_big_sq_norm"] < norms["dp_small_sq_norm"]
    sample = GradientNormSample(32, 64, norms["dp_small_sq_norm"], norms["dp_big_sq_norm"])
    assert sample.big_batch_size == 64


def _trials(db: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT kind, batch_size, seed, status, metrics_json FROM trials").fetchall()
    out = {}
    for kind, b, seed, status, metrics in rows:
        assert (kind, b, seed) not in out, "one stored trial per key"
        out[(kind, b, seed)] = {"status": status, **json.loads(metrics)}
    return out


@pytest.mark.slow
def test_two_process_sweep_stores_one_trial_each_and_matches_one_process(tmp_path: Path) -> None:
    """``--nproc-per-node 2`` end to end: rank 0 alone writes; the store records global batch, per-rank batch
    and world size; steps-to-target equals the one-process sweep's at the same global batch, seed by seed.

    Tolerance: exact equality. With the same data order and a mean-reduced loss, DDP's averaged gradient is
    the one-process gradient up to float rounding in the all-reduce (checked to 1e-6 above); the learning
    curves agree to about 1e-6, far below the 1/360 granularity of the validation accuracy, so no evaluation
    can fall on the other side of the target. Across seeds, steps-to-target varies by tens of percent; a
    real data-parallel error (wrong averaging, duplicated or dropped samples) shifts the curves by that much.
    """
    common = ("-w", "digits-mlp", "-b", "64,256", "--seeds", "2", "--device", "cpu")
    fast = ("--min-time", "0.05", "--min-steps", "5", "--timing-warmup-steps", "2")
    dp_db, one_db = tmp_path / "dp.db", tmp_path / "one.db"
    for args in (
        (*fast, "--kind", "both", "--store", dp_db, "--nproc-per-node", "2"),
        ("--kind", "convergence", "--store", one_db),
    ):
        run = subprocess.run(
            cli_command("sweep", *common, *args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-2000:]
    with sqlite3.connect(dp_db) as c:
        assert c.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
    dp_trials, one_trials = _trials(dp_db), _trials(one_db)
    assert len(dp_trials) == 8  # 2 kinds x 2 batch sizes x 2 seeds, each stored once
    for (kind, b, _seed), t in dp_trials.items():
        assert t["status"] == "ok"
        assert (t["world_size"], t["per_rank_batch_size"]) == (2, b // 2)
        if kind == "throughput":
            assert t["samples_per_s"] > 0
            assert t["peak_mem_bytes_sum"] >= t["peak_mem_bytes"]
            assert 0.0 <= t["allreduce_share"] < 1.0
            assert t["step_time_no_allreduce_s"] > 0
    for b in (64, 256):
        for seed in (0, 1):
            assert (
                dp_trials[("convergence", b, seed)]["steps_to_target"]
                == one_trials[("convergence", b, seed)]["steps_to_target"]
            )
    with sqlite3.connect(dp_db) as c:
        curve = [json.loads(r[0]) for r in c.execute("SELECT row_json FROM curves")]
    sampled = [r for r in curve if r.get("dp_norm_steps")]
    assert sampled, "convergence curves carry the data-parallel gradient-norm samples"
    assert all(r["dp_big_batch"] == 2 * r["dp_small_batch"] for r in sampled)
    for b in (64, 256):
        assert dp_trials[("convergence", b, 0)]["dp_b_simple"] is not None  # the noise scale, from the same curve


def test_with_noise_scale_estimates_b_simple_from_the_curve_samples() -> None:
    """Exact: with |G_b|² = |G|² + tr(Σ)/b and |G_B|² = |G|² + tr(Σ)/B (no population correction),
    B_simple = tr(Σ)/|G|² comes back."""
    from bsprof.engine.distributed import with_noise_scale

    g2, tr = 2.0, 400.0
    rows = [
        {"step": s, "dp_norm_steps": 5, "dp_small_batch": 32, "dp_big_batch": 64}
        | {"dp_small_sq_norm": g2 + tr / 32, "dp_big_sq_norm": g2 + tr / 64}
        for s in (5, 10, 15)
    ]
    result = TrialResult(TrialSpec("w", "convergence", 64, 0, 0.1), "ok", "cpu", curve=[{"step": 1}, *rows])
    out = with_noise_scale(result)
    assert out.metrics["dp_b_simple"] == pytest.approx(tr / g2)
    assert with_noise_scale(TrialResult(SPEC, "ok", "cpu")).metrics == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("-b", "63", "--nproc-per-node", "2"), "not multiples of the world size 2"),
        (("-b", "63", "--nproc-per-node", "2", "--executor", "ray"), "not multiples of the world size 2"),
    ],
)
def test_bad_data_parallel_input_is_exit_2_before_launching(cli: Any, extra: tuple[str, ...], message: str) -> None:
    result = cli("sweep", "-w", "digits-mlp", "--device", "cpu", "--kind", "throughput", *extra)
    assert result.code == 2
    assert message in result.err


def test_executor_ray_under_torchrun_is_one_line_and_exit_2(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    result = cli("sweep", "-w", "digits-mlp", "--device", "cpu", "-b", "8", "--executor", "ray")
    assert result.code == 2
    assert "use --nproc-per-node N --executor ray" in result.err


def test_executor_ray_without_ray_is_one_line_and_exit_2(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # ``import ray`` now raises ImportError
    result = cli("sweep", "-w", "digits-mlp", "--device", "cpu", "-b", "8", "--executor", "ray")
    assert result.code == 2
    assert "pip install 'bsprof[ray]'" in result.err
