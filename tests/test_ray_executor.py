"""Sweeps through ``--executor ray`` on a local Ray instance (bsprof/engine/ray_executor.py)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAST, FIXTURES, ref

from bsprof.engine.result import ScriptInfo, TrialExtra, TrialResult, TrialSpec
from bsprof.engine.script import ScriptJob, script_runners
from bsprof.engine.sweep import LocalExecutor, SweepConfig, run_sweep
from bsprof.engine.timing import TimingSettings
from bsprof.engine.trial import EngineSettings
from bsprof.errors import BadInput
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


# Script trials (``--cmd``) and data-parallel trials (``--nproc-per-node``) through the same executor.

SCRIPT = FIXTURES / "scripts" / "fault.py"
QUICK = TimingSettings(warmup_steps=2, warmup_s=0.0, min_time_s=0.02, min_steps=4, block_min_s=0.003, min_blocks=3)


def _script_sweep(tmp_path: Path, name: str, executor: Any, faults: str, sizes: tuple[int, ...]) -> dict[tuple, Any]:
    """A script sweep of ``fault.py`` (throughput, one seed) into ``<name>.db``: its rows by (kind, B, seed)."""
    cmd = f"{shlex.quote(sys.executable)} {SCRIPT} {{batch_size}} {{seed}} --faults {faults}"
    job = ScriptJob(
        name="fault", command=tuple(shlex.split(cmd)), target=0.5, trial_timeout_s=20.0, log_dir=str(tmp_path / name)
    )
    config = SweepConfig(workload_ref="fault.py", batch_sizes=sizes, kinds=("throughput",), seeds=1)
    settings = EngineSettings(device=torch.device("cpu"), timing=QUICK)
    with Store(tmp_path / f"{name}.db", create=True) as store:
        run_sweep(config, job, settings, store, runners=script_runners(job), prime=False, executor=executor)
        return {(r["kind"], r["batch_size"], r["seed"]): r for r in store.trial_rows()}


@pytest.mark.slow
def test_script_sweep_through_ray_stores_what_the_local_executor_stores(local_ray: Any, tmp_path: Path) -> None:
    """Each script trial's child runs inside a Ray task; crash, hang (timeout) and printed OOM end as locally,
    and the driver alone stores them."""
    faults = "8:crash,16:hang,32:oom_print"
    sizes = (4, 8, 16, 32)
    local = _script_sweep(tmp_path, "local", LocalExecutor(), faults, sizes)
    executor = RayExecutor(None, threads=1)
    remote = _script_sweep(tmp_path, "ray", executor, faults, sizes)
    statuses = {k: r["status"] for k, r in local.items()}
    assert statuses == {
        ("throughput", 4, 0): "ok",
        ("throughput", 8, 0): "error",
        ("throughput", 16, 0): "budget_exhausted",
        ("throughput", 32, 0): "oom",
    }
    assert {k: r["status"] for k, r in remote.items()} == statuses
    crash = remote[("throughput", 8, 0)]
    assert crash["extra"]["script_exit_code"] == 1
    assert "exit code 1" in crash["error"] and "boom at step 3" in crash["extra"]["script_log_tail"]
    assert "timed out after 20 s" in remote[("throughput", 16, 0)]["error"]
    assert remote[("throughput", 4, 0)]["samples_per_s"] > 0
    assert Path(remote[("throughput", 4, 0)]["extra"]["script_log"]).is_relative_to(tmp_path / "ray")
    assert "script trials (the command runs in the task)" in executor.plan(SETTINGS)


def test_a_script_trial_whose_worker_dies_is_retried_once(local_ray: Any, tmp_path: Path) -> None:
    """The first attempt's child kills its parent (the Ray worker) mid-trial and keeps running; Ray runs the
    trial again, the retry ends the stray child first, and the retry's child reports normally."""
    marker = tmp_path / "worker-killed"
    script = tmp_path / "kill_parent.py"
    script.write_text(
        "import os, signal, sys, time\n"
        f"marker = {str(marker)!r}\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').write(str(os.getpid()))\n"
        "    os.kill(os.getppid(), signal.SIGKILL)\n"
        "    time.sleep(120)\n"
        f"os.execv(sys.executable, [sys.executable, {str(SCRIPT)!r}, *sys.argv[1:]])\n"
    )
    cmd = f"{shlex.quote(sys.executable)} {script} {{batch_size}} {{seed}}"
    job = ScriptJob(name="k", command=tuple(shlex.split(cmd)), trial_timeout_s=60.0, log_dir=str(tmp_path / "logs"))
    config = SweepConfig(workload_ref="k", batch_sizes=(4, 8), kinds=("throughput",), seeds=1)
    settings = EngineSettings(device=torch.device("cpu"), timing=QUICK)
    with Store(tmp_path / "s.db", create=True) as store:
        executor = RayExecutor(None, threads=1)
        run_sweep(config, job, settings, store, runners=script_runners(job), prime=False, executor=executor)
        rows = store.trial_rows()
    assert marker.exists()  # the worker was killed once
    assert sorted((r["batch_size"], r["status"]) for r in rows) == [(4, "ok"), (8, "ok")]
    assert not _running(int(marker.read_text())), "the retry ended the child the dead worker left running"


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_data_parallel_trial_runs_its_ranks_in_one_ray_task(
    local_ray: Any, cli: Any, fast_timing: None, tmp_path: Path
) -> None:
    """``--nproc-per-node 2 --executor ray``: the task launches 2 gloo ranks; the driver stores one trial with
    world size 2, in a run named by the world size (not the one-process run)."""
    db = tmp_path / "dp.db"
    result = cli(
        "sweep", "-w", "digits-mlp", "-b", "64", "--seeds", "1", "--kind", "throughput", "--device", "cpu",
        "--nproc-per-node", "2", "--executor", "ray", "--store", db, *FAST,
    )  # fmt: skip
    assert result.code == 0, result.err[-2000:]
    assert "every trial runs 2 data-parallel ranks in one task and takes 2 CPUs" in result.err
    with Store(db) as store:
        rows = store.trial_rows()
        (run,) = store.runs()
    assert len(rows) == 1
    (row,) = rows
    assert (row["status"], row["world_size"], row["per_rank_batch_size"]) == ("ok", 2, 32)
    assert row["samples_per_s"] > 0
    assert run.config["engine"]["world_size"] == 2


def test_data_parallel_trials_ask_for_one_device_per_rank_and_fill_fewer_slots(local_ray: Any) -> None:
    """N ranks per trial: N GPUs on CUDA (never shared with another trial), N CPUs on CPU; the in-flight
    slots are the cluster's units divided by N, and the plan says so."""
    executor = RayExecutor("digits-mlp", nproc_per_node=2)
    cuda = EngineSettings(device=torch.device("cuda", 0))
    spec = TrialSpec("digits-mlp", "throughput", 64, 0, 0.1)
    assert executor.resources(spec, cuda) == {"num_gpus": 2, "num_cpus": 2}
    assert executor.resources(spec, SETTINGS) == {"num_cpus": 2}
    plan = executor.plan(SETTINGS)  # the local instance has 2 CPUs: one trial of 2 ranks at a time
    assert "2 data-parallel ranks in one task and takes 2 CPUs" in plan and "at most 1 trials in flight" in plan
    assert "takes 2 GPUs of its own" in executor.plan(cuda)
    with pytest.raises(BadInput, match="need a workload reference"):
        RayExecutor(None, nproc_per_node=2)


def test_a_script_log_from_another_node_is_written_where_the_driver_has_none(tmp_path: Path) -> None:
    """What a task on another node sends back (the log's end) and what the driver keeps of it."""
    from bsprof.engine.ray_executor import _Done, _keep_log, _log_to_send

    log = tmp_path / "worker" / "output.log"
    log.parent.mkdir()
    log.write_bytes(b"line 1\nline 2\n")
    extra = TrialExtra(source="script", script=ScriptInfo(command="python t.py", log=str(log)))
    result = TrialResult(spec=TrialSpec("t", "throughput", 8, 0, 0.1), status="ok", device="cpu", extra=extra)
    assert _log_to_send(result, remote=False) is None  # same node: the file is already where the store says
    sent = _log_to_send(result, remote=True)
    assert sent == b"line 1\nline 2\n"
    log.unlink()  # the driver's node has no such file
    _keep_log(_Done(result, sent))
    assert log.read_bytes() == sent
    log.write_bytes(b"shared filesystem copy\n")
    _keep_log(_Done(result, b"other"))
    assert log.read_bytes() == b"shared filesystem copy\n"  # an existing file is never overwritten


@pytest.mark.slow
def test_a_data_parallel_trial_whose_rank_dies_is_stored_as_error_with_its_exit_code(
    local_ray: Any, tmp_path: Path
) -> None:
    """A rank that dies ends its trial's launch; the task returns the trial as ``error`` naming the rank and
    its exit code, and the driver stores it once."""
    from bsprof.engine.distributed import DataParallel

    workload_ref = ref("tiny.py", "rank_1_dies")
    config = SweepConfig(workload_ref=workload_ref, batch_sizes=(8,), kinds=("throughput",), seeds=1)
    settings = EngineSettings(device=torch.device("cpu"), timing=QUICK, data_parallel=DataParallel(0, 2, 0))
    with Store(tmp_path / "s.db", create=True) as store:
        executor = RayExecutor(workload_ref, nproc_per_node=2)
        run_sweep(config, load_workload(workload_ref), settings, store, prime=False, executor=executor)
        rows = store.trial_rows()
    assert len(rows) == 1
    assert rows[0]["status"] == "error"
    assert "rank 1 failed (exit code 3)" in rows[0]["error"]


def test_cli_script_sweep_through_ray(local_ray: Any, cli: Any, fast_timing: None, tmp_path: Path) -> None:
    """``bsprof sweep --cmd ... --executor ray``: the plan is printed, the trial runs in a task, the driver
    stores it, and its log lies under the store's folder."""
    db = tmp_path / "s.db"
    command = f"{shlex.quote(sys.executable)} {SCRIPT} {{batch_size}} {{seed}}"
    result = cli(
        "sweep", "--cmd", command, "-b", "4", "--seeds", "1", "--kind", "throughput", "--executor", "ray",
        "--store", db, *FAST,
    )  # fmt: skip
    assert result.code == 0, result.err[-2000:]
    assert "script trials (the command runs in the task)" in result.err
    with Store(db) as store:
        (row,) = store.trial_rows()
    assert row["status"] == "ok" and row["samples_per_s"] > 0
    assert Path(row["extra"]["script_log"]).is_relative_to(tmp_path / "script-logs")


def test_a_stopped_sweep_cancels_its_trials_in_flight_and_ends_their_children(local_ray: Any, tmp_path: Path) -> None:
    """The sweep stops (Ctrl-C, an error: here the consumer closes the executor's iterator) while a script trial's
    child hangs without a timeout: its task is cancelled and the child, in its own session, is ended too."""
    mark = str(tmp_path / "starts.txt")
    cmd = f"{shlex.quote(sys.executable)} {SCRIPT} {{batch_size}} {{seed}} --faults 8:hang --count {mark}"
    job = ScriptJob(name="fault", command=tuple(shlex.split(cmd)), log_dir=str(tmp_path / "logs"))
    settings = EngineSettings(device=torch.device("cpu"), timing=QUICK)
    specs = [TrialSpec("fault", "throughput", b, 0, 0.1) for b in (8, 4)]
    results = RayExecutor(None, threads=1).run(iter(specs), job, settings, script_runners(job))  # type: ignore[arg-type]
    first = next(results)
    assert first.spec.batch_size == 4 and first.status == "ok"  # B=8 still hangs in its task
    deadline = time.time() + 30
    while not _processes_with(mark) and time.time() < deadline:  # its child, found by its unique command line
        time.sleep(0.2)
    (hung,) = _processes_with(mark)
    results.close()  # what a KeyboardInterrupt in the sweep does to the executor
    deadline = time.time() + 10
    while _running(hung) and time.time() < deadline:
        time.sleep(0.2)
    assert not _running(hung)


def _processes_with(text: str) -> list[int]:
    """Pids of the running processes whose command line holds ``text``."""
    out = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and text.encode() in Path(f"/proc/{name}/cmdline").read_bytes() and _running(int(name)):
                out.append(int(name))
        except OSError:
            continue
    return out
