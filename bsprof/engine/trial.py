"""The throughput trial, and what every trial shares: its settings, its start and how it ends.

:func:`run_throughput_trial` is the one throughput trial: the CLI's sweeps and the pytest-benchmark suite
both run it. Its only pluggable part is how the rounds are timed — a :class:`RoundTimer`: the engine's
:class:`EngineTimer` (:func:`~bsprof.engine.timing.time_steps`) or the suite's ``benchmark.pedantic``
(:class:`bsprof.pytest_session.PedanticTimer`). Memory reset, sampler, telemetry window, OOM handling,
clean-up and the result are the same for both.

A trial always ends in a :class:`~bsprof.engine.result.TrialResult` (built by :func:`ended`) with a status
from :data:`~bsprof.engine.result.STATUSES`, so that the sweep can store it and go on. Only
``KeyboardInterrupt`` and ``SystemExit`` escape.

Memory between trials (:func:`begin_trial`, :func:`run_guarded`): a failed trial's result is built only
*after* its ``except`` block has ended, when the traceback — which holds the failed trial's model, batch and
activations — is gone; only then is memory freed, so the CUDA caching allocator can return that
reservation. Every trial starts with ``gc.collect()``, a device sync and ``empty_cache()`` before the peak
statistics are reset (``reset_peak_memory_stats`` resets the peaks only to what is *currently* reserved), and
records the bytes still allocated as ``mem_baseline_bytes``: a baseline that grows across trials is a leak.

Size (about 450 lines, above the ~400 guideline): the one throughput-trial path (settings, guarded execution, memory
discipline, telemetry window, FLOPs, profiling pass, the one result builder), kept together so there is one copy of
each step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

from bsprof.engine.data import data_wait_metrics
from bsprof.engine.device import device_name, synchronizer
from bsprof.engine.host_load import HostLoad, assess_host_load
from bsprof.engine.monitors import Monitor, Window
from bsprof.engine.oom import free_memory, is_oom, reset_peak_memory
from bsprof.engine.result import ProfileInfo, TrialExtra, TrialResult, TrialSpec
from bsprof.engine.samplers import GpuSampler, NullGpu
from bsprof.engine.step import TrainingStep, flush_denormal
from bsprof.engine.telemetry import Telemetry, downsample_rows, measured_gpu_metrics
from bsprof.engine.timing import StepTimes, TimingSettings, time_steps

if TYPE_CHECKING:
    from bsprof.workload import Workload

__all__ = [
    "EngineSettings",
    "EngineTimer",
    "RoundTimer",
    "TrialResult",
    "TrialSpec",
    "begin_trial",
    "ended",
    "host_load_fields",
    "memory_metrics",
    "run_guarded",
    "run_throughput_trial",
    "throughput_metrics",
    "trial_host_load",
    "trial_window",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    """How trials run on this device.

    Attributes:
        device: The torch device of every trial.
        amp: ``off``, ``bf16`` or ``fp16``.
        compile: Use ``torch.compile`` (static shapes; dynamo is reset at every trial's start).
        compile_backend: ``torch.compile``'s ``backend`` (a name, or a callable: tests count compilations).
        timing: Warm-up and measurement lengths of throughput trials.
        monitor_hz: Telemetry polls per second.
        gpu_sampler_factory: Builds the GPU sampler for the device; ``None`` uses :func:`default_gpu_sampler`.
        profile: After timing, run a ``torch.profiler`` pass (trace and top operators) on the first round's
            trials (seed 0, repeat 0); it never touches the timed steps, so it is not part of :meth:`config`.
        trace_dir: Folder of this run's traces; each batch size writes into ``<trace_dir>/<workload>-B<b>``.
        peak_tflops: Peak TFLOP/s for MFU, overriding the GPU table (and allowing MFU on the CPU).
        flush_denormal: Flush subnormal floats to zero on the CPU during trials (``torch.set_flush_denormal``;
            x86 only). Off by default, as in PyTorch: throughput is timed from the initial state, where
            subnormals are rare, and convergence trials train with the numerics users train with.
        micro_batch_size: Samples per forward/backward pass; smaller batch sizes accumulate gradients over
            several passes per optimizer step (``None``: one pass per step).
        lr_schedule: LR schedule (:class:`~bsprof.engine.schedules.LRSchedule`) of every trial, or ``None``.
        sampler_process: The telemetry sampler process every trial's monitor shares (a
            :class:`~bsprof.engine.sampler_process.SamplerProcess`; :func:`~bsprof.engine.sweep.run_sweep` starts
            one per sweep); ``None``: each trial's monitor starts and ends its own.
        data_parallel: This process's place in a data-parallel job
            (:class:`~bsprof.engine.distributed.DataParallel`): trials build their step under DDP; ``None``: one
            process.
    """

    device: torch.device
    amp: str = "off"
    compile: bool = False
    compile_backend: Any = "inductor"
    timing: TimingSettings = field(default_factory=TimingSettings)
    monitor_hz: float = 20.0
    gpu_sampler_factory: Any = None
    profile: bool = False
    trace_dir: str | None = None
    peak_tflops: float | None = None
    flush_denormal: bool = False
    micro_batch_size: int | None = None
    lr_schedule: Any = None
    sampler_process: Any = field(default=None, compare=False, repr=False)
    data_parallel: Any = None

    def config(self) -> dict[str, object]:
        """The settings that change measurements; part of a run's config hash."""
        t = self.timing
        out: dict[str, object] = {
            "device": str(self.device),
            "amp": self.amp,
            "compile": self.compile,
            "timing": [t.warmup_steps, t.warmup_s, t.min_time_s, t.min_steps, t.block_min_s, t.min_blocks],
            "torch_threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "flush_denormal": self.flush_denormal,
        }
        if self.compile and self.compile_backend != "inductor":
            backend = self.compile_backend
            out["compile_backend"] = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
        if self.data_parallel is not None:
            out["world_size"] = self.data_parallel.world_size
        # Only when set: runs stored before these options keep their identity.
        if self.micro_batch_size is not None:
            out["micro_batch_size"] = self.micro_batch_size
        if self.lr_schedule is not None:
            out["lr_schedule"] = self.lr_schedule.describe()
        return out


def default_gpu_sampler(device: torch.device) -> GpuSampler:
    """The GPU sampler for ``device``: NVML for a CUDA device, else (or when NVML fails) a :class:`NullGpu`
    with its reason."""
    if device.type != "cuda":
        return NullGpu(f"trial ran on {device.type}, not a GPU")
    from bsprof.engine.nvml import open_nvml_gpu, torch_device_uuid

    index = device.index if device.index is not None else torch.cuda.current_device()
    return open_nvml_gpu(index, uuid=torch_device_uuid(index))


# --- what every trial shares: its start, its end, its failure ------------------------------------------------


def begin_trial(settings: EngineSettings) -> int | None:
    """Start a trial from a clean slate: a fresh ``torch.compile`` cache (when compiling), garbage collected,
    the allocator's unused blocks released, peak statistics reset.

    Returns:
        Bytes allocated on the device after the clean-up (CUDA), ``None`` elsewhere.
    """
    if settings.compile:
        torch._dynamo.reset()  # compiled graphs of earlier trials never serve (or reshape) this one
    return reset_peak_memory(settings.device)


def ended(spec: TrialSpec, status: str, device: torch.device, started: float, **fields: Any) -> TrialResult:
    """The :class:`TrialResult` of a trial that began at ``started`` (Unix seconds) on ``device``: device name
    and duration filled in, ``fields`` as given. The one place trial results are assembled."""
    return TrialResult(
        spec=spec,
        status=status,
        device=str(device),
        device_name=device_name(device),
        started_at=started,
        duration_s=time.time() - started,
        **fields,
    )


def _describe_failure(spec: TrialSpec, exc: BaseException) -> tuple[str, str]:
    """(status, message) of an exception raised inside a trial; holds no reference to it."""
    oom = is_oom(exc)
    message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:500] if str(exc) else type(exc).__name__
    if not oom:
        log.warning("trial %s failed: %s", spec, message)
        log.debug("%s", "".join(traceback.format_exception(exc)))
    return ("oom" if oom else "error"), message


def run_guarded(body: Callable[[], TrialResult], spec: TrialSpec, device: torch.device, started: float) -> TrialResult:
    """``body()``, or the ``oom`` / ``error`` result of the exception it raised.

    The failure's result is built after the ``except`` block has ended: the exception and its traceback —
    whose frames hold the failed trial's model, batch and activations — are released first, then
    :func:`~bsprof.engine.oom.free_memory` returns their memory (``maxbatch.probe_fits`` does the same).
    """
    try:
        return body()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a stored trial
        status, message = _describe_failure(spec, exc)
    free_memory(device)
    return ended(spec, status, device, started, error=message)


# --- the throughput trial -----------------------------------------------------------------------------------


class RoundTimer(Protocol):
    """Times a throughput trial's rounds: warm-up included, returns the raw blocks.

    Attributes:
        source: Who timed them (stored as :attr:`TrialExtra.source`).
    """

    source: ClassVar[str]

    def __call__(
        self,
        step: Callable[[], object],
        *,
        batch_size: int,
        sync: Callable[[], None],
        reset: Callable[[], None] | None = None,
    ) -> StepTimes:
        """Time ``step``; ``reset`` (untimed) returns it to the trial's initial state between blocks."""
        ...


@dataclass(frozen=True)
class EngineTimer:
    """The engine's timer (:func:`~bsprof.engine.timing.time_steps`) with ``settings``."""

    settings: TimingSettings
    source: ClassVar[str] = "engine"

    def __call__(
        self,
        step: Callable[[], object],
        *,
        batch_size: int,
        sync: Callable[[], None],
        reset: Callable[[], None] | None = None,
    ) -> StepTimes:
        return time_steps(step, batch_size=batch_size, settings=self.settings, sync=sync, reset=reset)


def memory_metrics(
    device: torch.device, telemetry: Telemetry | None, baseline_bytes: int | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Peak memory of the trial, how it was measured (``peak_mem_source``), and the memory in use when it
    started (``mem_baseline_bytes``).

    CUDA: the caching allocator's peak allocated and reserved bytes since the reset at the trial's start
    (:func:`begin_trial`), and the bytes allocated then. CPU: the growth of the process's peak RSS over its
    RSS when the window opened — exact (the kernel's high-water mark, ``rss_vmhwm``) on Linux, sampled
    (``rss_sampled``) elsewhere; a lower bound, since memory the allocator kept from earlier trials is reused
    without growing RSS — and that RSS as the baseline.
    """
    if device.type == "cuda":
        return (
            {
                "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)),
                "peak_mem_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
                "peak_mem_source": "cuda_allocator",
                "mem_baseline_bytes": baseline_bytes,
            },
            {} if baseline_bytes is not None else {"mem_baseline_bytes": "not recorded at the trial's start"},
        )
    if telemetry is None:
        return {"peak_mem_bytes": None}, {"peak_mem_bytes": "no telemetry window"}
    return (
        {
            "peak_mem_bytes": telemetry.rss_growth_bytes,
            "peak_mem_reserved_bytes": None,
            "peak_mem_source": "rss_vmhwm" if telemetry.rss_peak_source == "VmHWM" else "rss_sampled",
            "mem_baseline_bytes": telemetry.rss_baseline_bytes,
        },
        {"peak_mem_reserved_bytes": f"{device.type}: no caching allocator statistics"},
    )


def throughput_metrics(
    times: StepTimes,
    telemetry: Telemetry,
    device: torch.device,
    baseline_bytes: int | None = None,
    *,
    memory: tuple[dict[str, Any], dict[str, str]] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The measured columns of a throughput trial: step-time statistics (with the within-trial drift and its
    flag, ``step_time_drift_rel`` and ``step_time_drifted``), memory, GPU telemetry over the timed steps; and
    the reasons of the empty ones. ``memory``: the :func:`memory_metrics` of another process (a script
    trial's child measures its own), used instead of this process's."""
    metrics: dict[str, Any] = {
        "samples_per_s": times.samples_per_s,
        "step_time_s": times.median_s,
        "step_time_iqr_s": times.iqr_s,
        "measured_steps": times.measured_steps,
        "step_time_drift_rel": times.drift_rel,
        "step_time_drifted": times.drifted,
    }
    reasons: dict[str, str] = {}
    samples = times.measured_steps * times.batch_size
    for m, r in (
        memory if memory is not None else memory_metrics(device, telemetry, baseline_bytes),
        measured_gpu_metrics(telemetry, measured_s=times.measured_s, samples=samples),
    ):
        metrics.update(m)
        reasons.update(r)
    return metrics, reasons


@contextlib.contextmanager
def trial_window(settings: EngineSettings) -> Iterator[tuple[Window, Monitor, GpuSampler]]:
    """The telemetry window of one trial (throughput or convergence): the device's GPU sampler and a
    :class:`~bsprof.engine.monitors.Monitor` on the settings' shared sampler process, polled while the ``with``
    body runs. The sampler closes after the window's last poll; the monitor's own sampler process (if it has
    one) after the window."""
    gpu = (settings.gpu_sampler_factory or default_gpu_sampler)(settings.device)
    monitor = Monitor(gpu, hz=settings.monitor_hz, process=settings.sampler_process)
    closing = contextlib.closing(gpu) if hasattr(gpu, "close") else contextlib.nullcontext()
    with closing, contextlib.closing(monitor), monitor.window() as window:
        yield window, monitor, gpu


def host_load_fields(
    telemetry: Telemetry, device: torch.device
) -> tuple[HostLoad | None, dict[str, Any], dict[str, str]]:
    """A trial's host load (:func:`trial_host_load`) with its export metrics (``host_busy``, ``host_*``), or
    ``None`` and the reason ``host_busy`` is empty."""
    load = trial_host_load(telemetry, device)
    if load is None:
        return None, {}, {"host_busy": "the host's CPU counters (/proc/stat) could not be read"}
    return load, load.metrics(), {}


def trial_host_load(telemetry: Telemetry, device: torch.device) -> HostLoad | None:
    """What else the host did during a trial's window (:func:`~bsprof.engine.host_load.assess_host_load`): on
    the CPU the trial needs torch's intra-op threads, on a GPU one thread and its GPU to itself."""
    gpu_others = [int(r["gpu_other_processes"]) for r in telemetry.series if r.get("gpu_other_processes") is not None]
    return assess_host_load(
        telemetry.series,
        cpu_count=os.cpu_count() or 1,
        threads=torch.get_num_threads() if device.type == "cpu" else 1,
        gpu_other_processes=max(gpu_others) if gpu_others else None,
    )


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
        try:
            flops = count_flops(counted)
        finally:
            if counted is not step:
                counted.close()
    except Exception as e:  # noqa: BLE001 - a failed count leaves the FLOP fields empty, the trial stands
        why = f"FLOP counting failed: {type(e).__name__}: {e}"[:300]
    if why is not None:
        free_memory(settings.device)  # after the handler: the traceback no longer holds the counted step
    return flops_metrics(
        flops,
        times.median_s,
        device=settings.device,
        device_name=device_name(settings.device),
        amp=settings.amp,
        peak_tflops=settings.peak_tflops,
        reason=why,
    )


def _profile(workload: Workload, spec: TrialSpec, settings: EngineSettings, step: TrainingStep) -> ProfileInfo:
    """The optional profiler pass, after timing, on the trial's step: trace folder and top operators."""
    from bsprof.engine.profiling import profile_steps, trace_folder

    folder = trace_folder(settings.trace_dir or "reports/traces/unnamed-run", workload.name, spec.batch_size)
    try:
        result = profile_steps(step, trace_dir=folder, device=settings.device, sync=synchronizer(settings.device))
    except Exception as e:  # noqa: BLE001 - profiling is a by-product; its failure must not fail the trial
        log.warning("profiling B=%d failed: %s", spec.batch_size, e)
        return ProfileInfo(error=f"{type(e).__name__}: {e}"[:500])
    return ProfileInfo(
        trace_dir=result.trace_dir,
        trace_files=tuple(result.trace_files),
        top_ops=tuple(result.top_ops),
        top_ops_sort=result.sort_by,
        active_steps=result.active_steps,
    )


def run_throughput_trial(
    workload: Workload, spec: TrialSpec, settings: EngineSettings, *, timer: RoundTimer | None = None
) -> TrialResult:
    """Build a fresh training step and time its rounds; measure memory and telemetry around them.

    Every calibration and timed block starts from the step's initial model and optimizer state (restored
    outside the timed region), so the step time is that of the first steps of training at ``spec.lr``, the
    steps convergence trials count.

    Args:
        workload: The workload (its name should equal ``spec.workload``).
        spec: Batch size, seed, LR and repeat of this trial (``kind == "throughput"``).
        settings: Device, precision, timing and the shared sampler process.
        timer: How the rounds are timed (default: the engine's timer with ``settings.timing``).

    Returns:
        A result with ``samples_per_s``, ``step_time_s``, ``step_time_iqr_s``, ``peak_mem_bytes``,
        ``mem_baseline_bytes`` and the GPU fields (``None`` with a reason where not measured); status ``oom``
        or ``error`` on failure.
    """
    started = time.time()
    chosen = timer if timer is not None else EngineTimer(settings.timing)
    return run_guarded(lambda: _throughput(workload, spec, settings, chosen, started), spec, settings.device, started)


def _throughput(
    workload: Workload, spec: TrialSpec, settings: EngineSettings, timer: RoundTimer, started: float
) -> TrialResult:
    device = settings.device
    baseline = begin_trial(settings)
    # The window opens before the model is built: a sampler process starting here is not part of the timed steps.
    with trial_window(settings) as (window, monitor, gpu), flush_denormal(settings.flush_denormal):
        step = TrainingStep.for_trial(workload, spec, settings)
        initial = step.snapshot()
        try:
            times = timer(
                step, batch_size=spec.batch_size, sync=synchronizer(device), reset=lambda: step.restore(initial)
            )
        except BaseException:
            step.close()  # loader workers end now, not when the traceback is released
            raise
    try:
        expected = times.warmup_steps + times.measured_steps
        if step.steps_done != expected:
            raise RuntimeError(f"engine bug: {step.steps_done} steps ran, {expected} were timed")
        telemetry = window.telemetry
        metrics, reasons = throughput_metrics(times, telemetry, device, baseline)
        metrics.update(step.batching_metrics())
        waits, wait_reasons = data_wait_metrics(
            step.source.waits_s, steps=times.measured_steps, measured_s=times.measured_s
        )
        metrics.update(waits)
        reasons.update(wait_reasons)
        load, load_metrics, load_reasons = host_load_fields(telemetry, device)
        metrics.update(load_metrics)
        reasons.update(load_reasons)
        flops, flops_reasons = _flops_metrics(workload, spec, settings, step, times)
        metrics.update(flops)
        reasons.update(flops_reasons)
        profiled = settings.profile and spec.repeat == 0 and spec.seed == 0
        extra = TrialExtra(
            source=timer.source,
            rel_iqr=times.rel_iqr,
            cpu_pct_mean=telemetry.cpu_pct_mean,
            telemetry=tuple(downsample_rows(telemetry.series)),
            gpu_sampler=type(gpu).__name__ if telemetry.gpu_reason is None else telemetry.gpu_reason,
            monitor_mode=monitor.mode,
            profile=_profile(workload, spec, settings, step) if profiled else None,
            host_load=load,
        )
    finally:
        step.close()
    return ended(spec, "ok", device, started, metrics=metrics, reasons=reasons, step_times=times, extra=extra)
