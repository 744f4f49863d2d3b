"""What a script trial left behind, as one :class:`~bsprof.engine.trial.TrialResult`.

The tracker inside the script appends events to a file the parent created; when the child ends (or is
ended), the events, its exit code and its log become one result with the usual status:

* ``ok``: the timed window (throughput) or the target (convergence) was reported;
* ``oom``: the tracker reported an out-of-memory exception, or the log's tail holds an OOM message
  (:data:`~bsprof.engine.oom.OOM_MESSAGES`: the only way to see a CUDA OOM of a script without the tracker's
  hook, e.g. one printed by a launcher);
* ``diverged``: the tracker saw the loss explode;
* ``budget_exhausted``: the trial timed out (the whole process group was killed) or the script ended
  without reaching the target;
* ``error``: a non-zero exit or a signal (with the log's tail), or a script that never called the tracker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bsprof.engine.result import ScriptInfo, TrialExtra, TrialResult, TrialSpec
from bsprof.engine.script_process import exit_text, last_line, log_says_oom, log_tail
from bsprof.engine.script_protocol import TrialOrder
from bsprof.engine.target import TargetWatch
from bsprof.engine.telemetry import Telemetry, downsample_rows
from bsprof.engine.timing import StepTimes
from bsprof.engine.trial import ended, throughput_metrics

if TYPE_CHECKING:
    from bsprof.engine.script_job import ScriptJob
    from bsprof.engine.trial import EngineSettings

__all__ = ["NEVER_TRACKED", "ChildWindow", "interpret", "script_result"]

log = logging.getLogger(__name__)

NEVER_TRACKED = (
    "the script never called bsprof's tracker: add `tracker = bsprof.track()` before the training loop and "
    "`tracker.step(samples=...)` after each optimizer step (and `tracker.evaluate(metric=...)` after each "
    "evaluation for convergence trials), or the HuggingFace/Lightning callback; see README, "
    "'Sweep your own training script'"
)


@dataclass(frozen=True)
class ChildWindow:
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


def interpret(
    job: ScriptJob,
    spec: TrialSpec,
    settings: EngineSettings,
    order: TrialOrder,
    events: list[dict[str, Any]],
    timed_out: bool,
    started: float,
    info: ScriptInfo,
    window: ChildWindow,
) -> TrialResult:
    """The result of a child that has ended (see the module docstring for the statuses).

    Args:
        job: The command (its timeout is quoted in messages).
        spec: The trial.
        settings: The sweep's engine settings (the device recorded when the script reports none).
        order: What the child was asked to do (target, patience, direction).
        events: The tracker's events, in the order written.
        timed_out: Whether the child's process group was killed at the trial timeout.
        started: When the trial started (``time.time()``, seconds).
        info: The command, exit code and log path.
        window: The parent's telemetry window around the child.
    """
    returncode = info.exit_code if info.exit_code is not None else 0
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_kind.setdefault(e["event"], []).append(e)
    exc = by_kind.get("exception", [None])[-1]
    tail = log_tail(Path(info.log))
    failed = replace(info, log_tail=tail)
    metrics, reasons, curve, outcome = _measured(spec, order, by_kind, window)
    measured = {"metrics": metrics, "reasons": reasons, "curve": curve, "window": window}
    if timed_out:
        status = "ok" if outcome == "ok" else "budget_exhausted"
        error = f"trial timed out after {job.trial_timeout_s:g} s (--trial-timeout): its process group was killed"
        return script_result(spec, settings, started, status, error, info=failed, **measured)
    if (exc is not None and exc.get("oom")) or (returncode != 0 and log_says_oom(tail)):
        message = exc["message"] if exc is not None else last_line(tail)
        return script_result(spec, settings, started, "oom", message, info=failed)
    if "diverged" in by_kind:
        d = by_kind["diverged"][0]
        error = f"training loss {d['loss']:.4g} at step {d['step']} (first step: {d['first_loss']:.4g})"
        return script_result(spec, settings, started, "diverged", error, info=info, **measured)
    if returncode != 0:
        message = exc["message"] if exc is not None else last_line(tail)
        error = f"{exit_text(returncode)}: {message} (log: {info.log})"
        return script_result(spec, settings, started, "error", error, info=failed, **measured)
    if "start" not in by_kind:
        return script_result(spec, settings, started, "error", NEVER_TRACKED, info=failed)
    if outcome == "ok":
        return script_result(spec, settings, started, "ok", None, info=info, **measured)
    if outcome == "budget_exhausted":
        return script_result(spec, settings, started, outcome, _missed(order, by_kind), info=info, **measured)
    return script_result(spec, settings, started, "error", outcome, info=failed, **measured)


def _missed(order: TrialOrder, by_kind: dict[str, list[dict[str, Any]]]) -> str:
    end = by_kind.get("end", [{}])[-1]
    return f"target {order.target} not reached: the script ended after {end.get('steps', '?')} steps"


def _measured(
    spec: TrialSpec, order: TrialOrder, by_kind: dict[str, list[dict[str, Any]]], window: ChildWindow
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
    metrics.update(watch.to_target())
    if reached is None:
        for k in ("steps_to_target", "samples_to_target", "time_to_target_s"):
            reasons[k] = "target not reached (budget_exhausted)"
    return metrics, reasons, curve, "ok" if reached is not None else "budget_exhausted"


def script_result(
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
    window: ChildWindow | None = None,
) -> TrialResult:
    """One script trial's result: ``metrics`` (with the script's reported ``device``) and the telemetry of
    ``window``, downsampled, in a script :class:`~bsprof.engine.result.TrialExtra`."""
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
