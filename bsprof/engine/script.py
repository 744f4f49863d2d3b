"""Script trials: one run of a user's training command per trial, measured by the tracker inside it.

Each trial fills the job's command template (:mod:`bsprof.engine.script_job`), starts the command in its own
process group with the trial's :class:`~bsprof.engine.script_protocol.TrialOrder` in the environment, sends
its standard output and error to the trial's log file, and waits (:mod:`bsprof.engine.script_process`). The
tracker inside the script appends events to a file this process created; when the child ends (or is
ended), the events, its exit code and its log become one :class:`~bsprof.engine.trial.TrialResult`
(:mod:`bsprof.engine.script_result`, which lists the statuses).

The child never writes the store: only the sweep does, when the trial has ended, so a child killed at any
moment loses nothing but its own trial. ``torchrun`` commands work: the process group holds every rank,
and only rank 0's tracker reports.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bsprof.engine.monitors import Monitor
from bsprof.engine.result import ScriptInfo, TrialResult, TrialSpec
from bsprof.engine.script_job import PLACEHOLDERS, ScriptJob, command_for, trial_dir
from bsprof.engine.script_process import child_env, start_child, wait_child
from bsprof.engine.script_protocol import TrialOrder, read_events
from bsprof.engine.script_result import NEVER_TRACKED, ChildWindow, interpret, script_result
from bsprof.engine.trial import default_gpu_sampler

if TYPE_CHECKING:
    from bsprof.engine.convergence import ConvergenceSettings
    from bsprof.engine.trial import EngineSettings

__all__ = [
    "NEVER_TRACKED",
    "PLACEHOLDERS",
    "ScriptJob",
    "command_for",
    "run_script_trial",
    "script_runners",
    "trial_dir",
]

log = logging.getLogger(__name__)


def script_runners(job: ScriptJob, conv: ConvergenceSettings | None = None) -> dict[str, Any]:
    """The sweep's trial runners for ``job``: every kind runs the job's command (see
    :func:`~bsprof.engine.sweep.run_sweep`'s ``runners``; the sweep passes ``job`` as its workload)."""

    def run(_job: object, spec: TrialSpec, settings: EngineSettings) -> TrialResult:
        return run_script_trial(job, spec, settings, conv)

    return {"throughput": run, "convergence": run}


def run_script_trial(
    job: ScriptJob, spec: TrialSpec, settings: EngineSettings, conv: ConvergenceSettings | None = None
) -> TrialResult:
    """Run the job's command for one trial and turn what it reported into a result.

    Args:
        job: The command and how to fill it.
        spec: The trial.
        settings: Timing of throughput trials (the tracker's window) and the device name recorded.
        conv: Patience, step and time budgets of convergence trials (the target is the job's).

    Returns:
        The trial's result (see :mod:`bsprof.engine.script_result` for the statuses); ``extra`` holds the
        command, the exit code, the log's path and, on failure, its tail.
    """
    started = time.time()
    folder = trial_dir(job, spec)
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / "events.jsonl"
    log_path = folder / "output.log"
    report.unlink(missing_ok=True)  # a retried trial starts clean
    report.touch()
    order = _order(job, spec, settings, conv, report)
    argv = command_for(job, spec, folder)
    env = child_env(order, spec)
    info = ScriptInfo(command=shlex.join(argv), log=str(log_path))
    log.info("trial %s: %s", spec, info.command)
    gpu = (settings.gpu_sampler_factory or default_gpu_sampler)(settings.device)
    # No GPU to read: a thread in this (idle, waiting) process is enough; else the sweep's sampler process.
    mode = "thread" if gpu.reason is not None else "auto"
    monitor = Monitor(gpu, hz=settings.monitor_hz, mode=mode, process=settings.sampler_process)
    closing = contextlib.closing(gpu) if hasattr(gpu, "close") else contextlib.nullcontext()
    with open(log_path, "wb") as out, closing, contextlib.closing(monitor):
        opened_t = time.perf_counter()
        with monitor.window() as window:
            try:
                proc = start_child(argv, env, job.cwd, out)
            except OSError as e:
                return script_result(spec, settings, started, "error", f"cannot start {argv[0]!r}: {e}", info=info)
            returncode, timed_out = wait_child(proc, job.trial_timeout_s)
    info = replace(info, exit_code=returncode)
    sampler = type(gpu).__name__ if window.telemetry.gpu_reason is None else window.telemetry.gpu_reason
    telemetry = ChildWindow(window.telemetry, opened_t, monitor.mode, sampler)
    return interpret(job, spec, settings, order, read_events(report), timed_out, started, info, telemetry)


_CONVERGENCE_RULES = ("patience", "max_steps", "max_time_s", "continue_after_target", "explode_factor")
"""The :class:`~bsprof.engine.convergence.ConvergenceSettings` the child's tracker applies, under the same names
in the :class:`~bsprof.engine.script_protocol.TrialOrder` (its defaults hold without settings)."""


def _order(
    job: ScriptJob, spec: TrialSpec, settings: EngineSettings, conv: ConvergenceSettings | None, report: Path
) -> TrialOrder:
    """What the child is asked to do: the trial, the throughput timing and the convergence rules."""
    rules = {name: getattr(conv, name) for name in _CONVERGENCE_RULES} if conv is not None else {}
    return TrialOrder(
        report=str(report.resolve()),
        workload=job.name,
        kind=spec.kind,
        batch_size=spec.batch_size,
        seed=spec.seed,
        lr=spec.lr,
        repeat=spec.repeat,
        timing=asdict(settings.timing),  # the child's tracker rebuilds TimingSettings(**timing)
        target=(conv.target if conv and conv.target is not None else job.target),
        higher_is_better=job.higher_is_better,
        **rules,
    )
