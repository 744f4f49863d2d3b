"""Trials as Ray tasks (``--executor ray``, the optional extra ``bsprof[ray]``).

Each trial is one Ray task running the same trial runner as the local executor; its result comes back to
the driver, which alone writes the store, so resume works as locally. Ray schedules, places and restarts;
bsprof only states each task's resources:

- a trial on CUDA asks for one GPU (Ray gives each task its own device through ``CUDA_VISIBLE_DEVICES``,
  so two throughput trials never share a GPU) and one CPU;
- a CPU throughput trial asks for as many CPUs as torch threads it uses (the driver's ``--threads``, or all
  of its cores by default), so throughput trials never share cores; a CPU convergence trial asks for one CPU
  (and runs with one thread).

At most as many trials are in flight as the cluster has slots for them, so that an OOM is known before
most larger batch sizes are submitted. A task whose worker dies (killed, out of host memory, node lost) is
retried once by Ray (``max_retries=1``); if it dies again the trial is stored as ``error`` with Ray's
reason. No other trial is affected.

``ray`` is imported only here, and this module only when ``--executor ray`` is asked for.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from bsprof.errors import BadInput

if TYPE_CHECKING:
    from bsprof.engine.sweep import Runner
    from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec
    from bsprof.workload import Workload

__all__ = ["MAX_RETRIES", "RayExecutor"]

log = logging.getLogger(__name__)

MAX_RETRIES = 1
"""Times Ray re-runs a trial whose worker died before the trial is stored as ``error``."""


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise BadInput("--executor ray needs Ray: pip install 'bsprof[ray]'") from None
    return ray


_PRIMED: set[str] = set()
"""Workloads this worker process has primed (its one-time costs paid before its first trial)."""


def _trial_task(workload_ref: str, spec: TrialSpec, settings: EngineSettings, runner: Runner, threads: int) -> Any:
    """Body of one Ray task: load the workload on the worker and run the trial there."""
    from bsprof.workload import load_workload

    torch.set_num_threads(threads)
    device = settings.device
    if device.type == "cuda":  # Ray makes the task's one GPU the only visible one
        device = torch.device("cuda", 0)
        torch.cuda.set_device(0)
    settings = replace(settings, device=device, sampler_process=None)
    workload = load_workload(workload_ref)
    if workload_ref not in _PRIMED:  # a fresh worker's one-time costs stay off its first trial
        from bsprof.engine.sweep import prime_process

        prime_process(workload, settings, spec.batch_size)
        _PRIMED.add(workload_ref)
    return runner(workload, spec, settings)


class RayExecutor:
    """Run trials as Ray tasks (an :class:`~bsprof.engine.sweep.Executor`).

    Args:
        workload_ref: How the workload is named (each worker loads it: a built-in name, ``module:factory`` or
            a file path every node can reach).
        threads: Torch threads (and CPUs requested) of a CPU throughput trial.
        owns_ray: Shut Ray down on :meth:`close` (it was started here).
    """

    def __init__(self, workload_ref: str, *, threads: int | None = None, owns_ray: bool = False) -> None:
        self.ray = _import_ray()
        self.workload_ref = workload_ref
        self.threads = threads or torch.get_num_threads()
        self.owns_ray = owns_ray

    @classmethod
    def start(cls, workload_ref: str, *, address: str | None = None, **init_kwargs: Any) -> RayExecutor:
        """Connect to Ray: a new local instance by default, ``address`` to join a cluster (``auto``: the one
        this node belongs to)."""
        ray = _import_ray()
        owns = not ray.is_initialized()
        if owns:
            ray.init(address=address, log_to_driver=False, **init_kwargs)
        return cls(workload_ref, owns_ray=owns)

    def resources(self, spec: TrialSpec, settings: EngineSettings) -> dict[str, float]:
        """The Ray resource request of one trial (see the module docstring)."""
        if settings.device.type == "cuda":
            return {"num_gpus": 1, "num_cpus": 1}
        return {"num_cpus": self.threads if spec.kind == "throughput" else 1}

    def _slots(self, settings: EngineSettings) -> int:
        """Trials in flight: one per GPU (CUDA) or per CPU of the cluster; Ray queues those it cannot place yet."""
        total = self.ray.cluster_resources()
        return max(1, math.floor(total.get("GPU" if settings.device.type == "cuda" else "CPU", 0)))

    def plan(self, settings: EngineSettings) -> str:
        """How trials are packed, in one paragraph for the console."""
        total = self.ray.cluster_resources()
        if settings.device.type == "cuda":
            how = "every trial takes one GPU of its own (never shared) and one CPU"
        else:
            how = f"a throughput trial takes {self.threads} CPUs (its torch threads), a convergence trial 1"
        return (
            f"ray: cluster of {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs; {how}; at most "
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
        pending: dict[Any, tuple[TrialSpec, float]] = {}
        queue = iter(specs)
        exhausted = False
        while True:
            while not exhausted and len(pending) < slots:
                spec = next(queue, None)
                if spec is None:
                    exhausted = True
                    break
                threads = self.threads if spec.kind == "throughput" or settings.device.type == "cuda" else 1
                ref = task.options(**self.resources(spec, settings)).remote(
                    self.workload_ref, spec, settings, runners[spec.kind], threads
                )
                pending[ref] = (spec, time.time())
            if not pending:
                return
            ready, _ = ray.wait(list(pending), num_returns=1)
            spec, started = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                reason = f"ray: {type(e).__name__} after {MAX_RETRIES} retry: {e}".splitlines()[0][:500]
                log.warning("trial %s lost: %s", spec, reason)
                result = ended(spec, "error", settings.device, started, error=reason)
            yield result

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self.owns_ray:
            self.ray.shutdown()
