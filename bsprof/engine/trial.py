"""One trial: a (workload, kind, batch size, seed, lr, repeat) measurement, and its outcome.

A trial always ends in a :class:`TrialResult` with a status — ``ok``, ``oom``, ``diverged``,
``budget_exhausted`` or ``error`` — so that the sweep can store it and go on. Only ``KeyboardInterrupt``
and ``SystemExit`` escape.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bsprof.engine.device import device_name, synchronizer
from bsprof.engine.monitors import Monitor
from bsprof.engine.oom import free_memory, is_oom
from bsprof.engine.samplers import GpuSampler, NullGpu
from bsprof.engine.step import TrainingStep
from bsprof.engine.telemetry import Telemetry, downsample_rows, measured_gpu_metrics
from bsprof.engine.timing import StepTimes, TimingSettings, time_steps

if TYPE_CHECKING:
    from bsprof.workload import Workload

__all__ = [
    "KINDS",
    "STATUSES",
    "EngineSettings",
    "TrialResult",
    "TrialSpec",
    "memory_metrics",
    "run_throughput_trial",
    "throughput_metrics",
]

log = logging.getLogger(__name__)

KINDS = ("throughput", "convergence")
STATUSES = ("ok", "oom", "diverged", "budget_exhausted", "error")


@dataclass(frozen=True)
class TrialSpec:
    """What a trial measures; its identity in the store.

    Attributes:
        workload: Workload name.
        kind: ``throughput`` or ``convergence``.
        batch_size: Samples per step.
        seed: Seeds model initialisation and batch order.
        lr: Learning rate.
        repeat: Round of a throughput sweep's rotation (0-based); 0 for convergence.
        phase: ``main``; with LR tuning, ``tune`` or ``final`` (not part of the key: seeds differ).
    """

    workload: str
    kind: str
    batch_size: int
    seed: int
    lr: float
    repeat: int = 0
    phase: str = "main"

    def key(self) -> tuple[str, int, int, float, int]:
        return (self.kind, self.batch_size, self.seed, round(self.lr, 12), self.repeat)


@dataclass(frozen=True)
class EngineSettings:
    """How trials run on this device.

    Attributes:
        device: The torch device of every trial.
        amp: ``off``, ``bf16`` or ``fp16``.
        compile: Use ``torch.compile``.
        timing: Warm-up and measurement lengths of throughput trials.
        monitor_hz: Telemetry polls per second.
        gpu_sampler_factory: Builds the GPU sampler for the device; ``None`` uses :func:`default_gpu_sampler`.
        profile: After timing, run a ``torch.profiler`` pass (trace and top operators) on the first round's
            trials (seed 0, repeat 0); it never touches the timed steps, so it is not part of :meth:`config`.
        trace_dir: Folder of this run's traces; each batch size writes into ``<trace_dir>/<workload>-B<b>``.
        peak_tflops: Peak TFLOP/s for MFU, overriding the GPU table (and allowing MFU on the CPU).
        sampler_process: The telemetry sampler process every trial's monitor shares (a
            :class:`~bsprof.engine.monitors.SamplerProcess`; :func:`~bsprof.engine.sweep.run_sweep` starts
            one per sweep); ``None``: each trial's monitor starts and ends its own.
    """

    device: torch.device
    amp: str = "off"
    compile: bool = False
    timing: TimingSettings = field(default_factory=TimingSettings)
    monitor_hz: float = 20.0
    gpu_sampler_factory: Any = None
    profile: bool = False
    trace_dir: str | None = None
    peak_tflops: float | None = None
    sampler_process: Any = field(default=None, compare=False, repr=False)

    def config(self) -> dict[str, object]:
        """The settings that change measurements; part of a run's config hash."""
        t = self.timing
        return {
            "device": str(self.device),
            "amp": self.amp,
            "compile": self.compile,
            "timing": [t.warmup_steps, t.warmup_s, t.min_time_s, t.min_steps, t.block_min_s, t.min_blocks],
            "torch_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
        }


def default_gpu_sampler(device: torch.device) -> GpuSampler:
    """The GPU sampler for ``device``: NVML for a CUDA device, else (or when NVML fails) a :class:`NullGpu`
    with its reason."""
    if device.type != "cuda":
        return NullGpu(f"trial ran on {device.type}, not a GPU")
    from bsprof.engine.nvml import open_nvml_gpu, torch_device_uuid

    index = device.index if device.index is not None else torch.cuda.current_device()
    return open_nvml_gpu(index, uuid=torch_device_uuid(index))


@dataclass
class TrialResult:
    """What a trial produced. Metric names carry their units (``step_time_s``, ``peak_mem_bytes``).

    Attributes:
        spec: The trial's identity.
        status: One of :data:`STATUSES`.
        device: Device string, e.g. ``cpu`` or ``cuda:0``.
        device_name: e.g. ``NVIDIA A100-SXM4-80GB``.
        metrics: Export columns measured by this trial (missing ones are absent or ``None``).
        reasons: Why a metric is ``None`` (column -> reason).
        step_times: Raw block timings (throughput trials).
        error: Message of a failed trial.
        started_at: Unix time (seconds) when the trial began.
        duration_s: Wall-clock seconds of the whole trial, set-up included.
        curve: Learning-curve rows (convergence trials).
        extra: Anything else worth keeping (stored as JSON).
    """

    spec: TrialSpec
    status: str
    device: str
    device_name: str = ""
    metrics: dict[str, float | int | bool | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    step_times: StepTimes | None = None
    error: str | None = None
    started_at: float = 0.0
    duration_s: float = 0.0
    curve: list[dict[str, float | None]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def memory_metrics(device: torch.device, telemetry: Telemetry | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Peak memory of the trial and how it was measured (``peak_mem_source``).

    CUDA: the caching allocator's peak allocated and reserved bytes since the reset at the trial's start.
    CPU: the growth of the process's peak RSS over its RSS when the window opened — exact (the kernel's
    high-water mark, ``rss_vmhwm``) on Linux, sampled (``rss_sampled``) elsewhere; a lower bound, since
    memory the allocator kept from earlier trials is reused without growing RSS.
    """
    if device.type == "cuda":
        return (
            {
                "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_mem_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "peak_mem_source": "cuda_allocator",
            },
            {},
        )
    if telemetry is None:
        return {"peak_mem_bytes": None}, {"peak_mem_bytes": "no telemetry window"}
    return (
        {
            "peak_mem_bytes": telemetry.rss_growth_bytes,
            "peak_mem_reserved_bytes": None,
            "peak_mem_source": "rss_vmhwm" if telemetry.rss_peak_source == "VmHWM" else "rss_sampled",
        },
        {"peak_mem_reserved_bytes": f"{device.type}: no caching allocator statistics"},
    )


def throughput_metrics(
    times: StepTimes, telemetry: Telemetry, device: torch.device
) -> tuple[dict[str, Any], dict[str, str]]:
    """The measured columns of a throughput trial: step-time statistics, peak memory, GPU telemetry over the
    timed steps; and the reasons of the empty ones. Shared by the CLI's trials and the pytest suite's."""
    metrics: dict[str, Any] = {
        "samples_per_s": times.samples_per_s,
        "step_time_s": times.median_s,
        "step_time_iqr_s": times.iqr_s,
        "measured_steps": times.measured_steps,
    }
    reasons: dict[str, str] = {}
    samples = times.measured_steps * times.batch_size
    for m, r in (
        memory_metrics(device, telemetry),
        measured_gpu_metrics(telemetry, measured_s=times.measured_s, samples=samples),
    ):
        metrics.update(m)
        reasons.update(r)
    return metrics, reasons


def _flops_metrics(
    workload: Workload, spec: TrialSpec, settings: EngineSettings, step: TrainingStep, times: StepTimes
) -> tuple[dict[str, Any], dict[str, str]]:
    """FLOPs of one more step, counted after timing (the timed steps never run under the counter): on the
    trial's own step, or on a fresh eager step when the model is compiled."""
    from bsprof.engine.flops import count_flops, flops_metrics

    flops, why = None, None
    try:
        counted = step
        if settings.compile:
            counted = TrainingStep.for_trial(workload, spec, settings, compile=False)
        flops = count_flops(counted)
    except Exception as e:  # noqa: BLE001 - a failed count leaves the FLOP fields empty, the trial stands
        why = f"FLOP counting failed: {type(e).__name__}: {e}"[:300]
        free_memory(settings.device)
    return flops_metrics(
        flops,
        times.median_s,
        device=settings.device,
        device_name=device_name(settings.device),
        amp=settings.amp,
        peak_tflops=settings.peak_tflops,
        reason=why,
    )


def _profile(workload: Workload, spec: TrialSpec, settings: EngineSettings, step: TrainingStep) -> dict[str, Any]:
    """The optional profiler pass, after timing, on the trial's step: trace folder and top operators."""
    from bsprof.engine.profiling import profile_steps

    folder = Path(settings.trace_dir or "reports/traces/unnamed-run") / f"{workload.name}-B{spec.batch_size}"
    try:
        result = profile_steps(step, trace_dir=folder, device=settings.device, sync=synchronizer(settings.device))
    except Exception as e:  # noqa: BLE001 - profiling is a by-product; its failure must not fail the trial
        log.warning("profiling B=%d failed: %s", spec.batch_size, e)
        return {"profile_error": f"{type(e).__name__}: {e}"[:500]}
    return {
        "trace_dir": result.trace_dir,
        "trace_files": result.trace_files,
        "top_ops": result.top_ops,
        "top_ops_sort": result.sort_by,
        "profile_active_steps": result.active_steps,
    }


def failure_result(spec: TrialSpec, exc: BaseException, device: torch.device, started: float) -> TrialResult:
    """Turn an exception raised inside a trial into an ``oom`` or ``error`` result (memory freed)."""
    oom = is_oom(exc)
    message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500] if str(exc) else type(exc).__name__
    if not oom:
        log.warning("trial %s failed: %s", spec, message)
        log.debug("%s", "".join(traceback.format_exception(exc)))
    free_memory(device)
    return TrialResult(
        spec=spec,
        status="oom" if oom else "error",
        device=str(device),
        device_name=device_name(device),
        error=message,
        started_at=started,
        duration_s=time.time() - started,
    )


def run_throughput_trial(workload: Workload, spec: TrialSpec, settings: EngineSettings) -> TrialResult:
    """Build a fresh training step, warm up, time blocks of steps; measure memory and telemetry.

    Args:
        workload: The workload (its name should equal ``spec.workload``).
        spec: Batch size, seed, LR and repeat of this trial (``kind == "throughput"``).
        settings: Device, precision and timing.

    Returns:
        A result with ``samples_per_s``, ``step_time_s``, ``step_time_iqr_s``, ``peak_mem_bytes`` and the
        GPU fields (``None`` with a reason where not measured); status ``oom`` or ``error`` on failure.
    """
    device = settings.device
    started = time.time()
    step: TrainingStep | None = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        gpu = (settings.gpu_sampler_factory or default_gpu_sampler)(device)
        monitor = Monitor(gpu, hz=settings.monitor_hz, process=settings.sampler_process)
        closing = contextlib.closing(gpu) if hasattr(gpu, "close") else contextlib.nullcontext()
        # The sampler closes after the window's last poll; the monitor's own sampler process (if it has one)
        # after the window. The window opens before the model is built: a sampler process starting here is
        # not part of the timed steps.
        with closing, contextlib.closing(monitor), monitor.window() as window:
            step = TrainingStep.for_trial(workload, spec, settings)
            times = time_steps(step, batch_size=spec.batch_size, settings=settings.timing, sync=synchronizer(device))
        expected = times.warmup_steps + times.measured_steps
        if step.steps_done != expected:
            raise RuntimeError(f"engine bug: {step.steps_done} steps ran, {expected} were timed")
        telemetry = window.telemetry
        metrics, reasons = throughput_metrics(times, telemetry, device)
        flops, flops_reasons = _flops_metrics(workload, spec, settings, step, times)
        metrics.update(flops)
        reasons.update(flops_reasons)
        extra: dict[str, Any] = {"cpu_pct_mean": telemetry.cpu_pct_mean, "rel_iqr": times.rel_iqr}
        extra["telemetry"] = downsample_rows(telemetry.series)
        extra["gpu_sampler"] = type(gpu).__name__ if telemetry.gpu_reason is None else telemetry.gpu_reason
        extra["monitor_mode"] = monitor.mode
        if settings.profile and spec.repeat == 0 and spec.seed == 0:
            extra.update(_profile(workload, spec, settings, step))
        return TrialResult(
            spec=spec,
            status="ok",
            device=str(device),
            device_name=device_name(device),
            metrics=metrics,
            reasons=reasons,
            step_times=times,
            started_at=started,
            duration_s=time.time() - started,
            extra=extra,
        )
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a stored trial
        del step
        return failure_result(spec, exc, device, started)
