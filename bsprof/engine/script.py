"""Script trials: one run of a user's training command per trial, measured by the tracker inside it.

The command is a template (``python train.py --batch-size {batch_size} --lr {lr} --seed {seed}``): each
trial fills the placeholders (:data:`PLACEHOLDERS` and the user's own ``--param`` values), starts the
command in its own process group with the trial's :class:`~bsprof.engine.script_protocol.TrialOrder` in the
environment, sends its standard output and error to the trial's log file, and waits. The tracker inside
the script appends events to a file this process created; when the child ends (or is ended), the events,
its exit code and its log become one :class:`~bsprof.engine.trial.TrialResult` with the usual status:

* ``ok``: the timed window (throughput) or the target (convergence) was reported;
* ``oom``: the tracker reported an out-of-memory exception, or the log's tail holds an OOM message
  (:data:`~bsprof.engine.oom.OOM_MESSAGES`: the only way to see a CUDA OOM of a script without the tracker's
  hook, e.g. one printed by a launcher);
* ``diverged``: the tracker saw the loss explode;
* ``budget_exhausted``: the trial timed out (``trial_timeout_s``: the whole process group is killed) or
  the script ended without reaching the target;
* ``error``: a non-zero exit or a signal (with the log's tail), or a script that never called the tracker.

The child never writes the store: only the sweep does, when the trial has ended, so a child killed at any
moment loses nothing but its own trial. ``torchrun`` commands work: the process group holds every rank,
and only rank 0's tracker reports.

(About 480 lines, above the project's ~400: starting the child and reading what it left are one trial's two
halves over the same job, order and events; a split into launch and interpretation modules is the next step.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import string
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bsprof.engine.monitors import Monitor
from bsprof.engine.result import ScriptInfo, TrialExtra, TrialResult, TrialSpec
from bsprof.engine.script_protocol import ENV_VAR, TrialOrder, read_events
from bsprof.engine.target import TargetWatch
from bsprof.engine.telemetry import Telemetry, downsample_rows
from bsprof.engine.timing import StepTimes
from bsprof.engine.trial import default_gpu_sampler, ended, throughput_metrics
from bsprof.errors import BadInput

if TYPE_CHECKING:
    from bsprof.engine.convergence import ConvergenceSettings
    from bsprof.engine.trial import EngineSettings

__all__ = ["PLACEHOLDERS", "ScriptJob", "command_for", "run_script_trial", "script_runners"]

log = logging.getLogger(__name__)

PLACEHOLDERS = ("batch_size", "lr", "seed", "kind", "repeat", "trial_dir")
"""Placeholders every trial fills: global batch size, learning rate (the LR rule's), seed, trial kind,
throughput round, and the trial's folder (its log and events live there)."""

NEVER_TRACKED = (
    "the script never called bsprof's tracker: add `tracker = bsprof.track()` before the training loop and "
    "`tracker.step(samples=...)` after each optimizer step (and `tracker.evaluate(metric=...)` after each "
    "evaluation for convergence trials), or the HuggingFace/Lightning callback; see README, "
    "'Sweep your own training script'"
)

_KILL_GRACE_S = 5.0
_BSPROF_ROOT = str(Path(__file__).resolve().parents[2])
"""The folder holding this ``bsprof`` package: first on the child's ``PYTHONPATH``, so that the tracker the
script imports speaks this sweep's protocol."""
_TAIL_LINES = 20


@dataclass(frozen=True)
class ScriptJob:
    """A user's training command, swept like a workload.

    Attributes:
        name: Name of the job in the store and the report (default: the script's file name).
        command: The command's tokens, with placeholders (:data:`PLACEHOLDERS` and ``params``' keys).
        params: The user's own placeholders and their values.
        base_lr: Learning rate at ``base_batch_size``, scaled by the LR rule (``{lr}``).
        base_batch_size: Batch size (samples) at which ``base_lr`` holds.
        max_lr: Cap of the LR rule (``None``: no cap).
        target: Validation metric to reach in convergence trials.
        higher_is_better: Direction of the metric.
        trial_timeout_s: Seconds after which a trial's process group is killed (``None``: no limit).
        log_dir: Folder of the trials' folders (logs and events).
        cwd: Working directory of the command (``None``: this process's).
        metric_name: What the script's evaluations report (for messages).
        metric_range: The metric's possible values, when known (``None``: unbounded).
    """

    name: str
    command: tuple[str, ...]
    params: dict[str, str] = field(default_factory=dict)
    base_lr: float = 0.1
    base_batch_size: int = 32
    max_lr: float | None = None
    target: float | None = None
    higher_is_better: bool = True
    trial_timeout_s: float | None = None
    log_dir: str = "reports/script-logs"
    cwd: str | None = None
    metric_name: str = "metric"
    metric_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.command:
            raise BadInput("empty training command: give e.g. --cmd 'python train.py --batch-size {batch_size}'")
        names = set(PLACEHOLDERS) | set(self.params)
        for token in self.command:
            for name in _placeholders(token):
                if name not in names:
                    known = ", ".join("{" + n + "}" for n in sorted(names))
                    raise BadInput(f"command placeholder {{{name}}} is unknown: use {known} or --param {name}=V")
        if not any("batch_size" in _placeholders(t) for t in self.command):
            raise BadInput("the command has no {batch_size} placeholder: every trial would run the same batch size")

    def config(self) -> dict[str, object]:
        """What identifies the job in a run's config hash (the log folder and timeout do not)."""
        return {
            "name": self.name,
            "command": list(self.command),
            "params": dict(sorted(self.params.items())),
            "base_lr": self.base_lr,
            "base_batch_size": self.base_batch_size,
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "cwd": self.cwd,
        }

    def has_reached_target(self, value: float, target: float) -> bool:
        """Whether ``value`` meets ``target`` in the metric's direction."""
        return value >= target if self.higher_is_better else value <= target


def _placeholders(token: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(token) if name is not None]
    except ValueError as e:
        raise BadInput(f"command token {token!r}: {e} (write {{{{ and }}}} for literal braces)") from None


def trial_dir(job: ScriptJob, spec: TrialSpec) -> Path:
    """The trial's own folder under the job's log folder."""
    return Path(job.log_dir) / f"{spec.kind}-B{spec.batch_size}-seed{spec.seed}-lr{spec.lr:g}-r{spec.repeat}"


def command_for(job: ScriptJob, spec: TrialSpec, folder: Path) -> list[str]:
    """The command of one trial: every token with its placeholders filled (a value never splits a token)."""
    values = {
        **job.params,
        "batch_size": spec.batch_size,
        "lr": f"{spec.lr:g}",
        "seed": spec.seed,
        "kind": spec.kind,
        "repeat": spec.repeat,
        "trial_dir": str(folder),
    }
    return [token.format_map(values) for token in job.command]


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
        The trial's result (see the module docstring for the statuses); ``extra`` holds the command, the
        exit code, the log's path and, on failure, its tail.
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
    env = {**os.environ, ENV_VAR: order.to_env(), "BSPROF_BATCH_SIZE": str(spec.batch_size)}
    env.update(BSPROF_LR=f"{spec.lr:g}", BSPROF_SEED=str(spec.seed), BSPROF_KIND=spec.kind)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_BSPROF_ROOT, os.environ.get("PYTHONPATH")) if p)
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
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=job.cwd,
                    start_new_session=True,
                )  # fmt: skip
            except OSError as e:
                return _result(spec, settings, started, "error", f"cannot start {argv[0]!r}: {e}", info=info)
            returncode, timed_out = _wait(proc, job.trial_timeout_s)
    info = replace(info, exit_code=returncode)
    sampler = type(gpu).__name__ if window.telemetry.gpu_reason is None else window.telemetry.gpu_reason
    telemetry = _Window(window.telemetry, opened_t, monitor.mode, sampler)
    return _interpret(job, spec, settings, order, read_events(report), timed_out, started, info, telemetry)


@dataclass(frozen=True)
class _Window:
    """The parent's telemetry window around the child, and when it opened (``time.perf_counter``: on Linux
    the system-wide monotonic clock, the child's clock too)."""

    telemetry: Telemetry
    opened_t: float
    mode: str
    sampler: str

    def over(self, start_t: float | None, end_t: float | None) -> Telemetry:
        """The window cut to end at the child's ``end_t`` (the polls after it cover the script's exit)."""
        if end_t is None or start_t is None:
            return self.telemetry
        end_s = end_t - self.opened_t
        rows = tuple(r for r in self.telemetry.series if r.get("t_s") is not None and float(r["t_s"]) <= end_s)
        return replace(self.telemetry, duration_s=max(0.0, end_s), series=rows)


def _wait(proc: subprocess.Popen[bytes], timeout_s: float | None) -> tuple[int, bool]:
    """(exit code, timed out): wait for the child; past ``timeout_s`` end its process group."""
    try:
        returncode, timed_out = proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        returncode, timed_out = _kill_group(proc), True
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc, quiet=True)  # strays of the group (e.g. ranks a launcher left behind)
    return returncode, timed_out


def _order(
    job: ScriptJob, spec: TrialSpec, settings: EngineSettings, conv: ConvergenceSettings | None, report: Path
) -> TrialOrder:
    t = settings.timing
    timing = {
        "warmup_steps": t.warmup_steps,
        "warmup_s": t.warmup_s,
        "min_time_s": t.min_time_s,
        "min_steps": t.min_steps,
        "block_min_s": t.block_min_s,
        "min_blocks": t.min_blocks,
        "max_time_s": t.max_time_s,
    }
    return TrialOrder(
        report=str(report.resolve()),
        workload=job.name,
        kind=spec.kind,
        batch_size=spec.batch_size,
        seed=spec.seed,
        lr=spec.lr,
        repeat=spec.repeat,
        timing=timing,
        target=(conv.target if conv and conv.target is not None else job.target),
        patience=conv.patience if conv else 1,
        higher_is_better=job.higher_is_better,
        max_steps=conv.max_steps if conv else None,
        max_time_s=conv.max_time_s if conv else None,
        continue_after_target=conv.continue_after_target if conv else False,
        explode_factor=conv.explode_factor if conv else 10.0,
    )


def _kill_group(proc: subprocess.Popen[bytes], *, quiet: bool = False) -> int:
    """End the child's process group: SIGTERM, then SIGKILL after a grace period. Returns the exit code."""
    try:
        os.killpg(proc.pid, signal.SIGTERM if not quiet else signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone
    try:
        return proc.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended in between
        return proc.wait()


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError as e:
        return f"(log unreadable: {e})"
    return "\n".join(lines[-_TAIL_LINES:])


def _log_says_oom(tail: str) -> bool:
    from bsprof.engine.oom import OOM_MESSAGES

    low = tail.lower()
    return any(m in low for m in OOM_MESSAGES) or "outofmemoryerror" in low


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _interpret(
    job: ScriptJob,
    spec: TrialSpec,
    settings: EngineSettings,
    order: TrialOrder,
    events: list[dict[str, Any]],
    timed_out: bool,
    started: float,
    info: ScriptInfo,
    window: _Window,
) -> TrialResult:
    returncode = info.exit_code if info.exit_code is not None else 0
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_kind.setdefault(e["event"], []).append(e)
    exc = by_kind.get("exception", [None])[-1]
    tail = _tail(Path(info.log))
    failed = replace(info, log_tail=tail)
    metrics, reasons, curve, outcome = _measured(spec, order, by_kind, window)
    measured = {"metrics": metrics, "reasons": reasons, "curve": curve, "window": window}
    if timed_out:
        status = "ok" if outcome == "ok" else "budget_exhausted"
        error = f"trial timed out after {job.trial_timeout_s:g} s (--trial-timeout): its process group was killed"
        return _result(spec, settings, started, status, error, info=failed, **measured)
    if (exc is not None and exc.get("oom")) or (returncode != 0 and _log_says_oom(tail)):
        message = exc["message"] if exc is not None else _last_line(tail)
        return _result(spec, settings, started, "oom", message, info=failed)
    if "diverged" in by_kind:
        d = by_kind["diverged"][0]
        error = f"training loss {d['loss']:.4g} at step {d['step']} (first step: {d['first_loss']:.4g})"
        return _result(spec, settings, started, "diverged", error, info=info, **measured)
    if returncode != 0:
        message = exc["message"] if exc is not None else _last_line(tail)
        error = f"{_exit_text(returncode)}: {message} (log: {info.log})"
        return _result(spec, settings, started, "error", error, info=failed, **measured)
    if "start" not in by_kind:
        return _result(spec, settings, started, "error", NEVER_TRACKED, info=failed)
    if outcome == "ok":
        return _result(spec, settings, started, "ok", None, info=info, **measured)
    if outcome == "budget_exhausted":
        return _result(spec, settings, started, outcome, _missed(order, by_kind), info=info, **measured)
    return _result(spec, settings, started, "error", outcome, info=failed, **measured)


def _last_line(tail: str) -> str:
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"


def _missed(order: TrialOrder, by_kind: dict[str, list[dict[str, Any]]]) -> str:
    end = by_kind.get("end", [{}])[-1]
    return f"target {order.target} not reached: the script ended after {end.get('steps', '?')} steps"


def _measured(
    spec: TrialSpec, order: TrialOrder, by_kind: dict[str, list[dict[str, Any]]], window: _Window
) -> tuple[dict[str, Any], dict[str, str], list[dict[str, Any]], str]:
    """(metrics, reasons, curve, outcome): outcome ``ok``, ``budget_exhausted`` or an error message."""
    end = by_kind.get("end", [{}])[-1]
    if spec.kind == "throughput":
        timed = next((e for e in by_kind.get("throughput", []) if "block_times_s" in e), None)
        if timed is None:
            steps = end.get("steps", by_kind.get("throughput", [{}])[-1].get("steps", 0))
            return {}, {}, [], (
                f"the script ended after {steps} steps, before bsprof's timed window completed one block: let it "
                "run longer (it may stop when tracker.should_stop() says so)"
            )  # fmt: skip
        times = StepTimes(
            tuple(timed["block_times_s"]), timed["steps_per_block"], timed["batch_size"], timed["warmup_steps"]
        )
        telemetry = window.over(timed.get("window_start_t"), timed.get("window_end_t"))
        device = torch.device(timed.get("device") or "cpu")
        memory = (timed.get("memory", {}), timed.get("memory_reasons", {}))
        metrics, reasons = throughput_metrics(times, telemetry, device, memory=memory)
        metrics["device"] = timed.get("device")
        return metrics, reasons, [], "ok"
    evals = by_kind.get("eval", [])
    target = order.target
    metrics = {"target": target, "evaluations": len(evals), "steps_run": end.get("steps"), **end.get("memory", {})}
    metrics["device"] = end.get("device")
    reasons = dict(end.get("memory_reasons", {}))
    metrics["train_time_s"] = end.get("train_s", evals[-1]["train_s"] if evals else None)
    metrics["eval_time_s"] = end.get("eval_s")
    metrics["final_val_metric"] = evals[-1]["val_metric"] if evals else None
    metrics["final_train_metric"] = None
    reasons["final_train_metric"] = "script trials report validation evaluations only"
    metrics["epochs_to_target"] = None
    reasons["epochs_to_target"] = "script trials do not report epochs"
    if target is None or not evals:
        why = "no target given" if target is None else "the script reported no evaluation: call tracker.evaluate()"
        return metrics, reasons, [], why
    watch = TargetWatch(target, order.patience, order.higher_is_better)
    curve = []
    for e in evals:
        row = {k: e.get(k) for k in ("step", "samples", "train_s", "val_metric", "train_loss")}
        watch.observe(row)
        curve.append(row)
    reached = watch.reached
    metrics.update(
        reached_target=reached is not None,
        steps_to_target=reached["step"] if reached else None,
        samples_to_target=reached["samples"] if reached else None,
        time_to_target_s=reached["train_s"] if reached else None,
        bracket_steps=reached["bracket_step"] if reached else None,
        target_fallbacks=watch.fallbacks,
    )
    if reached is None:
        for k in ("steps_to_target", "samples_to_target", "time_to_target_s"):
            reasons[k] = "target not reached (budget_exhausted)"
    return metrics, reasons, curve, "ok" if reached is not None else "budget_exhausted"


def _result(
    spec: TrialSpec,
    settings: EngineSettings,
    started: float,
    status: str,
    error: str | None,
    *,
    info: ScriptInfo,
    metrics: dict[str, Any] | None = None,
    reasons: dict[str, str] | None = None,
    curve: list[dict[str, Any]] | None = None,
    window: _Window | None = None,
) -> TrialResult:
    metrics = dict(metrics or {})
    reported = metrics.pop("device", None)
    device = torch.device(reported) if reported else settings.device
    if error and status != "ok":
        log.warning("trial %s: %s: %s", spec, status, error)
    return ended(
        spec,
        status,
        device,
        started,
        metrics=metrics,
        reasons=dict(reasons or {}),
        error=error,
        curve=list(curve or []),
        extra=TrialExtra(
            source="script",
            script=info,
            telemetry=tuple(downsample_rows(window.telemetry.series)) if window else (),
            gpu_sampler=window.sampler if window else None,
            monitor_mode=window.mode if window else None,
        ),
    )
