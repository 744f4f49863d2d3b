"""A ``torch.profiler`` pass over a few training steps: a TensorBoard trace, and the top operators.

Runs after a throughput trial's timing, so the profiler's overhead never reaches the measured step time.
The schedule is ``wait`` / ``warmup`` / ``active`` steps (one cycle); the active steps are written by
``tensorboard_trace_handler`` as ``<worker>.<ms>.pt.trace.json`` into one folder per batch size,
``<trace root>/<run>/<workload>-B<batch>/``. Open them with ``tensorboard --logdir <trace root>`` and the
``torch-tb-profiler`` plugin (``pip install 'bsprof[tensorboard]'``; deprecated upstream, so optional),
or load the same files in Perfetto's UI (https://ui.perfetto.dev) or Holistic Trace Analysis.

The report does not need TensorBoard to say where the time goes: :func:`top_operators` reduces the
profile to rows per operator, in seconds *per training step* so batch sizes compare directly:

=========================  ===================================================================
``name``                   operator (``aten::mm``...) or annotated region (``Optimizer.step#SGD.step``)
``calls_per_step``         calls per training step
``self_cpu_s_per_step``    host time inside the operator itself, children excluded (seconds)
``self_cpu_pct``           share of all operators' self host time (percent)
``cpu_total_s_per_step``   host time including children (seconds)
``self_device_s_per_step`` device (CUDA kernel) self time (seconds); ``None`` without a GPU
``self_device_pct``        share of all self device time (percent); ``None`` without a GPU
=========================  ===================================================================
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["ProfileResult", "profile_steps", "top_operators", "trace_folder"]

log = logging.getLogger(__name__)


def trace_folder(run_trace_dir: str | Path, workload: str, batch_size: int) -> Path:
    """``<run_trace_dir>/<workload>-B<batch_size>``: the trace folder of one batch size of a run, whose own
    folder is ``<trace root>/<run id>``."""
    return Path(run_trace_dir) / f"{workload}-B{batch_size}"


@dataclass(frozen=True)
class ProfileResult:
    """What a profiler pass produced.

    Attributes:
        trace_dir: The folder the traces went to.
        trace_files: Trace files written by this pass.
        top_ops: Operator rows (see the module docstring), heaviest first.
        active_steps: Steps recorded.
        sort_by: ``self_device_s_per_step`` on CUDA, else ``self_cpu_s_per_step``.
    """

    trace_dir: str
    trace_files: list[str] = field(default_factory=list)
    top_ops: list[dict[str, Any]] = field(default_factory=list)
    active_steps: int = 0
    sort_by: str = "self_cpu_s_per_step"


def _device_self_us(event: Any) -> float:
    value = getattr(event, "self_device_time_total", None)
    if value is None:
        value = getattr(event, "self_cuda_time_total", 0.0)
    return float(value or 0.0)


def top_operators(
    events: Any, *, active_steps: int, with_device: bool, top: int = 20
) -> tuple[list[dict[str, Any]], str]:
    """Rows of the heaviest operators by self time, per training step.

    Args:
        events: ``profiler.key_averages()`` (an iterable of ``FunctionEventAvg``; times in microseconds).
        active_steps: Training steps the events cover.
        with_device: Include device time columns and sort by them (CUDA runs).
        top: Rows kept.

    Returns:
        (rows, sort key).
    """
    steps = max(1, active_steps)
    evs = [e for e in events if not str(e.key).startswith("ProfilerStep")]
    cpu_total_us = math.fsum(float(e.self_cpu_time_total) for e in evs) or 1.0
    dev_total_us = math.fsum(_device_self_us(e) for e in evs) or 1.0
    rows = []
    for e in evs:
        dev_us = _device_self_us(e)
        rows.append(
            {
                "name": str(e.key),
                "calls_per_step": e.count / steps,
                "self_cpu_s_per_step": float(e.self_cpu_time_total) / 1e6 / steps,
                "self_cpu_pct": 100.0 * float(e.self_cpu_time_total) / cpu_total_us,
                "cpu_total_s_per_step": float(e.cpu_time_total) / 1e6 / steps,
                "self_device_s_per_step": dev_us / 1e6 / steps if with_device else None,
                "self_device_pct": 100.0 * dev_us / dev_total_us if with_device else None,
            }
        )
    key = "self_device_s_per_step" if with_device else "self_cpu_s_per_step"
    if with_device:
        # Host-heavy operators matter on a GPU too (launch-bound small batches): keep the top of both.
        by_dev = sorted(rows, key=lambda r: r["self_device_s_per_step"], reverse=True)[:top]
        by_cpu = sorted(rows, key=lambda r: r["self_cpu_s_per_step"], reverse=True)[:top]
        names = {r["name"] for r in by_dev} | {r["name"] for r in by_cpu}
        kept = [r for r in rows if r["name"] in names]
        return sorted(kept, key=lambda r: (r[key], r["self_cpu_s_per_step"]), reverse=True), key
    return sorted(rows, key=lambda r: r[key], reverse=True)[:top], key


def profile_steps(
    step: Callable[[], object],
    *,
    trace_dir: str | Path,
    device: torch.device,
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
    sync: Callable[[], None] = lambda: None,
    worker_name: str | None = None,
    top: int = 20,
) -> ProfileResult:
    """Profile ``wait + warmup + active`` calls of ``step`` and write the active ones as a trace.

    Args:
        step: One training step.
        trace_dir: Folder for the trace (created).
        device: The step's device (CUDA adds the CUDA activity).
        wait: Steps skipped before the profiler starts.
        warmup: Steps recorded but discarded (profiler warm-up).
        active: Steps recorded and written.
        sync: Waits for the device; called after the last step.
        worker_name: Trace file prefix (default: ``<host>_<pid>``, the handler's own default).
        top: Operator rows kept.

    Returns:
        The trace folder and files, and the top operators.
    """
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    folder = Path(trace_dir)
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    with_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if with_device else [])
    with profile(
        activities=activities,
        schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(folder), worker_name=worker_name),
    ) as prof:
        for _ in range(wait + warmup + active):
            step()
            prof.step()
        sync()
    rows, key = top_operators(prof.key_averages(), active_steps=active, with_device=with_device, top=top)
    files = sorted(str(p) for p in set(folder.iterdir()) - before if p.name.endswith((".json", ".json.gz")))
    if not files:
        log.warning("profiler wrote no trace into %s", folder)
    return ProfileResult(str(folder), files, rows, active, key)
