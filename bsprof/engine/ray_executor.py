"""Trials as Ray tasks (``--executor ray``, the optional extra ``bsprof[ray]``).

Each trial is one Ray task running the same trial runner as the local executor; its result comes back to
the driver, which alone writes the store, so resume works as locally. Ray schedules, places and restarts;
bsprof only states each task's resources, and that is how trials are packed:

- a trial on CUDA asks for one GPU and one CPU, a data-parallel trial of N ranks for N GPUs and N CPUs. Ray
  gives each task its own devices through ``CUDA_VISIBLE_DEVICES``, so two trials never share a GPU;
- a CPU throughput trial asks for as many CPUs as torch threads it uses (the driver's ``--threads``, or all
  of its cores by default), a CPU convergence trial for one CPU (and runs with one thread), a CPU
  data-parallel trial for N CPUs (one thread per rank). Ray's CPUs are counts, not pinned cores: the
  requests keep a node from being oversubscribed, they do not bind a trial to particular cores.

Three kinds of trial run in a task, each through the local executor's runner:

- a built-in or plugin workload: the worker loads it by its reference and primes itself once;
- a script trial (``--cmd``): the job itself is sent; the worker starts the user's command as a child
  process (in the driver's working directory) and reads its events file and log on its own node, as the
  local executor does; only the result travels back. A trial run on another node also sends back its log,
  which the driver writes at the same path when it has no file there;
- a data-parallel trial (``nproc_per_node``): the task runs torch's elastic launcher (as ``torchrun
  --standalone`` does) with N ranks, which run the trial together exactly as under ``torchrun``
  (:class:`~bsprof.engine.distributed.DataParallelDriver`); rank 0's merged result is the task's.

At most as many trials are in flight as the cluster has slots for them, so that an OOM is known before
most larger batch sizes are submitted. A task whose worker dies (killed, out of host memory, node lost) is
retried once by Ray (``max_retries=1``); if it dies again the trial is stored as ``error`` with Ray's
reason. No other trial is affected. Before a retry runs, the processes the dead attempt left on that node (a
script's child, data-parallel ranks) are ended (:data:`TRIAL_ENV`).

``ray`` is imported only here, and this module only when ``--executor ray`` is asked for.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bsprof.errors import BadInput

if TYPE_CHECKING:
    from bsprof.engine.sweep import Runner
    from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec
    from bsprof.workload import Workload

__all__ = ["MAX_LOG_BYTES", "MAX_RETRIES", "TRIAL_ENV", "RayExecutor"]

log = logging.getLogger(__name__)

MAX_RETRIES = 1
"""Times Ray re-runs a trial whose worker died before the trial is stored as ``error``."""

MAX_LOG_BYTES = 4 << 20
"""A script trial's log sent back from another node is cut to its last this many bytes."""

_CANCEL_WAIT_S = 5.0
"""Seconds to wait for cancelled tasks to end before their trials' processes on this node are looked for."""

TRIAL_ENV = "BSPROF_RAY_TRIAL"
"""Set in a task's worker while it runs a trial (to the trial's id), so every process the trial starts inherits
it: a retry finds and ends what an earlier attempt on its node left running (a dead worker's script child)."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInput("--executor ray needs Ray: pip install 'bsprof[ray]'") from None
    return ray


_PRIMED: set[str] = set()
"""Workloads this worker process has primed (its one-time costs paid before its first trial)."""


@dataclass(frozen=True)
class _Work:
    """One task's trial.

    Attributes:
        workload: The workload's reference, loaded on the worker, or the workload itself (a script job).
        spec: The trial.
        settings: The driver's engine settings.
        runners: The sweep's trial runner per kind.
        threads: Torch threads of the trial (per rank for a data-parallel trial).
        nproc: Ranks of a data-parallel trial (``None``: one process).
        cwd: The driver's working directory (relative paths of commands and workload files resolve there).
        driver_node: Ray node id of the driver.
        trial_id: The same in every attempt of the trial (:data:`TRIAL_ENV`).
    """

    workload: str | Any
    spec: TrialSpec
    settings: EngineSettings
    runners: dict[str, Runner]
    threads: int
    nproc: int | None
    cwd: str
    driver_node: str
    trial_id: str = ""


@dataclass(frozen=True)
class _Done:
    """What a task sends back: the result, and a script trial's log when the task ran on another node."""

    result: TrialResult
    log_bytes: bytes | None = None


def _trial_task(work: _Work) -> _Done:
    """Body of one Ray task: run the trial on the worker (see the module docstring)."""
    import ray

    if os.path.isdir(work.cwd):
        os.chdir(work.cwd)
    else:
        log.warning("the driver's folder %s is not on this node; relative paths resolve in %s", work.cwd, os.getcwd())
    _end_strays(work.trial_id)
    os.environ[TRIAL_ENV] = work.trial_id
    try:
        if work.nproc is not None:
            result = _launch_ranks(work)
        elif isinstance(work.workload, str):
            result = _run_workload(work)
        else:  # a script job: its runner starts the command; this worker does not touch the device itself
            result = work.runners[work.spec.kind](work.workload, work.spec, _on_worker(work.settings))
    finally:
        del os.environ[TRIAL_ENV]
    return _Done(result, _log_to_send(result, ray.get_runtime_context().get_node_id() != work.driver_node))


def _end_strays(trial_id: str) -> list[int]:
    """Kill (SIGKILL) this node's processes left by an earlier attempt of the trial: those whose environment
    holds ``TRIAL_ENV=trial_id`` (a script's child outlives its killed worker: it runs in its own session).
    Linux only (``/proc``); elsewhere nothing is done. Returns the pids killed."""
    if not trial_id or not os.path.isdir("/proc"):
        return []
    needle = f"{TRIAL_ENV}={trial_id}".encode()
    killed = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            os.kill(int(name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or another user's process: not ours
            continue
        killed.append(int(name))
    if killed:
        log.warning("trial %s: ended %d process(es) left by its earlier attempt: %s", trial_id, len(killed), killed)
    return killed


def _on_worker(settings: EngineSettings) -> EngineSettings:
    """The driver's settings as a one-process task sees them: no sampler process of the driver's, and on CUDA
    the task's one GPU, which Ray makes the only visible one (``cuda:0``, whatever the driver's index)."""
    settings = replace(settings, sampler_process=None)
    return replace(settings, device=torch.device("cuda", 0)) if settings.device.type == "cuda" else settings


def _run_workload(work: _Work) -> TrialResult:
    from bsprof.workload import load_workload

    torch.set_num_threads(work.threads)
    settings = _on_worker(work.settings)
    if settings.device.type == "cuda":
        torch.cuda.set_device(0)
    workload = load_workload(work.workload)
    if work.workload not in _PRIMED:  # a fresh worker's one-time costs stay off its first trial
        from bsprof.engine.sweep import prime_process

        prime_process(workload, settings, work.spec.batch_size)
        _PRIMED.add(work.workload)
    return work.runners[work.spec.kind](workload, work.spec, settings)


def _launch_ranks(work: _Work) -> TrialResult:
    """The data-parallel trial in ``work.nproc`` local ranks through torch's elastic launcher; rank 0's result."""
    import ray
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from bsprof.engine.trial import ended

    started = time.time()
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=work.nproc or 1,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        start_method="spawn",
    )
    try:
        returned = elastic_launch(config, _rank)(ray.cloudpickle.dumps(work))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"exit code {failure.exitcode}" if failure.exitcode >= 0 else failure.message
        why = f"rank {rank} failed ({how}); the ranks' output is in Ray's worker logs (/tmp/ray/session_latest)"
        return ended(work.spec, "error", work.settings.device, started, error=why.splitlines()[0][:500])
    return returned[0]


def _rank(blob: bytes) -> TrialResult | None:
    """One rank of a data-parallel trial (run by the elastic launcher): rank 0 drives the trial and returns its
    merged result, the others follow it (as under ``torchrun``)."""
    import torch.distributed as dist

    from bsprof.engine import distributed
    from bsprof.workload import load_workload

    work: _Work = pickle.loads(blob)
    torch.set_num_threads(work.threads)
    world = distributed.context_from_env()
    if world is None:
        raise RuntimeError("a data-parallel rank started without WORLD_SIZE/RANK in its environment")
    settings = replace(work.settings, device=world.device(work.settings.device), data_parallel=world)
    settings = replace(settings, sampler_process=None)
    world.start(settings.device)
    try:
        workload = load_workload(work.workload)
        if world.rank != 0:
            distributed.follow(world, workload, settings, work.runners)
            return None
        driver = distributed.DataParallelDriver(world)
        try:
            return next(iter(driver.run([work.spec], workload, settings, work.runners)))
        finally:
            driver.close()
    finally:
        if dist.is_initialized():  # a rank that failed before the driver's close() or follow()'s end
            dist.destroy_process_group()


def _log_to_send(result: TrialResult, remote: bool) -> bytes | None:
    """The end of a script trial's log when the task ran on another node than the driver, else ``None``."""
    script = result.extra.script
    if not remote or script is None:
        return None
    try:
        with open(script.log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - MAX_LOG_BYTES))
            return f.read()
    except OSError as e:
        log.warning("trial %s: cannot read its log %s to send it back: %s", result.spec, script.log, e)
        return None


def _keep_log(done: _Done) -> None:
    """Write a log sent back from another node at its path on this one, unless a file is there (a shared
    filesystem) or the folder cannot be made."""
    script = done.result.extra.script
    if done.log_bytes is None or script is None or os.path.exists(script.log):
        return
    try:
        Path(script.log).parent.mkdir(parents=True, exist_ok=True)
        Path(script.log).write_bytes(done.log_bytes)
    except OSError as e:
        log.warning("trial %s: cannot write its log at %s: %s", done.result.spec, script.log, e)


class RayExecutor:
    """Run trials as Ray tasks (an :class:`~bsprof.engine.sweep.Executor`).

    Args:
        workload_ref: How the workload is named (each worker loads it: a built-in name, ``module:factory`` or
            a file path every node can reach); ``None``: the sweep's workload itself is sent with each trial
            (a script job, :class:`~bsprof.engine.script.ScriptJob`).
        threads: Torch threads (and CPUs requested) of a CPU throughput trial.
        nproc_per_node: Ranks of each trial (data-parallel trials, launched inside the task); ``None``: one.
        owns_ray: Shut Ray down on :meth:`close` (it was started here).
    """

    def __init__(
        self,
        workload_ref: str | None,
        *,
        threads: int | None = None,
        nproc_per_node: int | None = None,
        owns_ray: bool = False,
    ) -> None:
        self.ray = _import_ray()
        if nproc_per_node is not None and workload_ref is None:
            raise BadInput("data-parallel trials through Ray need a workload reference, not a script job")
        self.workload_ref = workload_ref
        self.threads = threads or torch.get_num_threads()
        self.nproc = nproc_per_node
        self.owns_ray = owns_ray

    @classmethod
    def start(cls, workload_ref: str | None, *, address: str | None = None, **kwargs: Any) -> RayExecutor:
        """Connect to Ray: a new local instance by default, ``address`` to join a cluster (``auto``: the one
        this node belongs to); ``kwargs`` go to the constructor."""
        ray = _import_ray()
        owns = not ray.is_initialized()
        if owns:
            ray.init(address=address, log_to_driver=False)
        return cls(workload_ref, owns_ray=owns, **kwargs)

    def resources(self, spec: TrialSpec, settings: EngineSettings) -> dict[str, float]:
        """The Ray resource request of one trial (see the module docstring)."""
        if self.nproc is not None:
            return (
                {"num_gpus": self.nproc, "num_cpus": self.nproc}
                if settings.device.type == "cuda"
                else {"num_cpus": self.nproc}
            )
        if settings.device.type == "cuda":
            return {"num_gpus": 1, "num_cpus": 1}
        return {"num_cpus": self.threads if spec.kind == "throughput" else 1}

    def _threads(self, spec: TrialSpec, settings: EngineSettings) -> int:
        if self.nproc is not None:
            return 1
        return self.threads if spec.kind == "throughput" or settings.device.type == "cuda" else 1

    def _slots(self, settings: EngineSettings) -> int:
        """Trials in flight: one per GPU (CUDA) or per CPU of the cluster, divided by the ranks of a trial; Ray
        queues those it cannot place yet."""
        total = self.ray.cluster_resources()
        units = total.get("GPU" if settings.device.type == "cuda" else "CPU", 0)
        return max(1, math.floor(units / (self.nproc or 1)))

    def plan(self, settings: EngineSettings) -> str:
        """How trials are packed, in one paragraph for the console."""
        total = self.ray.cluster_resources()
        cuda = settings.device.type == "cuda"
        if self.nproc is not None:
            unit = f"{self.nproc} GPUs" if cuda else f"{self.nproc} CPUs (one thread per rank)"
            how = f"every trial runs {self.nproc} data-parallel ranks in one task and takes {unit} of its own"
        elif cuda:
            how = "every trial takes one GPU of its own (never shared) and one CPU"
        else:
            threads = "Ray sets OMP_NUM_THREADS to them" if self.workload_ref is None else "its torch threads"
            how = (
                f"a throughput trial takes {self.threads} CPUs ({threads}), a convergence trial 1 "
                "(Ray counts CPUs, it does not pin cores)"
            )
        what = "script trials (the command runs in the task)" if self.workload_ref is None else "trials"
        return (
            f"ray: cluster of {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs; {what}: {how}; at most "
            f"{self._slots(settings)} trials in flight; a trial whose worker dies is retried once, then stored as error"
        )

    def run(
        self, specs: Iterable[TrialSpec], workload: Workload, settings: EngineSettings, runners: dict[str, Runner]
    ) -> Iterator[TrialResult]:
        """Submit the trials as tasks (at most one slot's worth in flight), yield each result as it returns."""
        from bsprof.engine.trial import ended

        ray = self.ray
        task = ray.remote(max_retries=MAX_RETRIES)(_trial_task)
        slots = self._slots(settings)
        shipped = self.workload_ref if self.workload_ref is not None else workload
        driver_node = ray.get_runtime_context().get_node_id()
        pending: dict[Any, tuple[TrialSpec, float, str]] = {}
        queue = iter(specs)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < slots:
                    spec = next(queue, None)
                    if spec is None:
                        exhausted = True
                        break
                    trial_id = uuid.uuid4().hex
                    threads = self._threads(spec, settings)
                    work = _Work(
                        shipped, spec, settings, runners, threads, self.nproc, os.getcwd(), driver_node, trial_id
                    )
                    ref = task.options(**self.resources(spec, settings)).remote(work)
                    pending[ref] = (spec, time.time(), trial_id)
                if not pending:
                    return
                ready, _ = ray.wait(list(pending), num_returns=1)
                spec, started, _ = pending.pop(ready[0])
                try:
                    done = ray.get(ready[0])
                except ray.exceptions.RayError as e:
                    reason = f"ray: {type(e).__name__} after {MAX_RETRIES} retry: {e}".splitlines()[0][:500]
                    log.warning("trial %s lost: %s", spec, reason)
                    yield ended(spec, "error", settings.device, started, error=reason)
                    continue
                _keep_log(done)
                yield done.result
        finally:
            self._abandon(pending)

    def _abandon(self, pending: dict[Any, tuple[TrialSpec, float, str]]) -> None:
        """The sweep stopped (Ctrl-C, an error) with trials in flight: cancel their tasks (killing the workers)
        and end what they started on this node (a script's child runs in its own session and would outlive its
        worker); on other nodes a dead worker's children end with their own trial."""
        if not pending:
            return
        log.warning("cancelling %d trial(s) in flight: %s", len(pending), [spec for spec, _, _ in pending.values()])
        for ref in pending:
            self.ray.cancel(ref, force=True)
        self.ray.wait(list(pending), num_returns=len(pending), timeout=_CANCEL_WAIT_S)  # a child started meanwhile
        for _, _, trial_id in pending.values():
            _end_strays(trial_id)

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self.owns_ray:
            self.ray.shutdown()
