"""Sweeps through ``--executor ray`` on a local Ray instance (bsprof/engine/ray_executor.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ref

from bsprof.engine.result import TrialResult, TrialSpec
from bsprof.engine.sweep import LocalExecutor, SweepConfig, run_sweep
from bsprof.engine.trial import EngineSettings
from bsprof.store import Store
from bsprof.workload import Workload, load_workload

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'bsprof[ray]')")

from bsprof.engine.ray_executor import MAX_RETRIES, RayExecutor  # noqa: E402

SETTINGS = EngineSettings(device=torch.device("cpu"))

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module


@pytest.fixture(scope="module")
def local_ray() -> Any:
    """One local Ray instance of 2 CPUs for the module (starting one costs seconds)."""
    ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny() -> Workload:
    return load_workload(ref("tiny.py"))


class Runner:
    """A picklable fake trial runner: ``ok`` with the batch size as throughput, except where told to die.

    Args:
        die_at: Batch size whose worker process dies (``os._exit``) mid-trial.
        marker: When set, the worker dies only while this file does not exist yet (it creates it first), so
            the retry succeeds; when ``None`` it dies on every attempt.
    """

    def __init__(self, die_at: int | None = None, marker: str | None = None) -> None:
        self.die_at = die_at
        self.marker = marker

    def __call__(self, workload: Workload, spec: TrialSpec, settings: EngineSettings) -> TrialResult:
        if spec.batch_size == self.die_at and (self.marker is None or not os.path.exists(self.marker)):
            if self.marker is not None:
                Path(self.marker).touch()
            os._exit(1)  # the worker process dies mid-trial, as when killed
        return TrialResult(
            spec=spec,
            status="ok",
            device="cpu",
            metrics={"samples_per_s": float(spec.batch_size), "pid": os.getpid()},
            started_at=time.time(),
        )


def _sweep(store_path: Path, workload: Workload, executor: Any, runner: Runner) -> dict[tuple, str]:
    config = SweepConfig(workload_ref=ref("tiny.py"), batch_sizes=(2, 4, 8), kinds=("throughput",), seeds=2)
    with Store(store_path, create=True) as store:
        outcome = run_sweep(
            config, workload, SETTINGS, store, runners={"throughput": runner}, prime=False, executor=executor
        )
        rows = store.trial_rows([outcome.run.run_id])
    keys = [(r["kind"], r["batch_size"], r["seed"], r["repeat"]) for r in rows]
    assert len(keys) == len(set(keys)), "one stored row per trial"
    return {(r["kind"], r["batch_size"], r["seed"], r["repeat"]): (r["status"], r.get("error")) for r in rows}


def test_ray_stores_the_same_trials_as_local_and_runs_them_in_workers(
    local_ray: Any, tiny: Workload, tmp_path: Path
) -> None:
    local = _sweep(tmp_path / "local.db", tiny, LocalExecutor(), Runner())
    executor = RayExecutor(ref("tiny.py"), threads=1)
    remote = _sweep(tmp_path / "ray.db", tiny, executor, Runner())
    assert remote == local
    assert set(local.values()) == {("ok", None)}
    assert "at most 2 trials in flight" in executor.plan(SETTINGS)
    with Store(tmp_path / "ray.db") as store:
        pids = {r["pid"] for r in store.trial_rows()}
    assert os.getpid() not in pids  # the trials ran in Ray workers, the driver stored them


def test_a_worker_killed_once_is_retried_and_loses_nothing(local_ray: Any, tiny: Workload, tmp_path: Path) -> None:
    assert MAX_RETRIES == 1
    runner = Runner(die_at=4, marker=str(tmp_path / "died-once"))
    stored = _sweep(tmp_path / "s.db", tiny, RayExecutor(ref("tiny.py"), threads=1), runner)
    assert (tmp_path / "died-once").exists()  # the kill happened
    assert set(stored.values()) == {("ok", None)}
    assert len(stored) == 6


def test_a_worker_that_dies_again_takes_only_its_trial(local_ray: Any, tiny: Workload, tmp_path: Path) -> None:
    stored = _sweep(tmp_path / "s.db", tiny, RayExecutor(ref("tiny.py"), threads=1), Runner(die_at=4))
    failed = {k: v for k, v in stored.items() if v[0] != "ok"}
    assert set(failed) == {("throughput", 4, 0, 0), ("throughput", 4, 1, 0)}
    assert all(v[0] == "error" and "ray: " in v[1] and "retry" in v[1] for v in failed.values())
    assert len(stored) - len(failed) == 4  # every other trial stored ok


def test_resources_one_gpu_each_on_cuda_threads_for_cpu_throughput(local_ray: Any) -> None:
    executor = RayExecutor("digits-mlp", threads=2)
    cuda = EngineSettings(device=torch.device("cuda", 0))
    thr = TrialSpec("digits-mlp", "throughput", 64, 0, 0.1)
    conv = TrialSpec("digits-mlp", "convergence", 64, 0, 0.1)
    assert executor.resources(thr, cuda) == {"num_gpus": 1, "num_cpus": 1}
    assert executor.resources(thr, SETTINGS) == {"num_cpus": 2}
    assert executor.resources(conv, SETTINGS) == {"num_cpus": 1}
