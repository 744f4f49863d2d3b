"""What the benchmark suite records: engine results as pytest-benchmark ``extra_info`` and as store trials.

Pure functions over :class:`~bsprof.engine.trial.TrialResult` objects (and, for throughput, pytest-benchmark's
per-round times and the telemetry window), used by ``benchmarks/test_throughput.py`` and
``benchmarks/test_convergence.py``. Units are SI and in every key; a field that was not measured is ``None``
with a ``<field>_reason`` key saying why, never zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from bsprof.engine.telemetry import Telemetry
    from bsprof.engine.trial import TrialResult, TrialSpec

__all__ = ["convergence_extra_info", "throughput_extra_info", "throughput_result"]


def _with_reasons(out: dict[str, Any], values: Mapping[str, Any], reasons: Mapping[str, str], keys: Sequence[str]):
    for k in keys:
        out[k] = values.get(k)
        if out[k] is None:
            out[f"{k}_reason"] = reasons.get(k, "not measured")


def throughput_extra_info(
    result: TrialResult, *, rounds: int, iterations: int, warmup_rounds: int, step_times_s: Sequence[float]
) -> dict[str, Any]:
    """``extra_info`` of a throughput benchmark: what was measured (SI units), ``None`` plus a ``<key>_reason``
    where not measured, and the per-round step times (for ``bsprof compare``)."""
    m = result.metrics
    out: dict[str, Any] = {
        "workload": result.spec.workload,
        "batch_size": result.spec.batch_size,
        "seed": result.spec.seed,
        "lr": result.spec.lr,
        "device": result.device,
        "device_name": result.device_name,
        "rounds": rounds,
        "iterations": iterations,
        "warmup_rounds": warmup_rounds,
        "samples_per_s": m.get("samples_per_s"),
        "step_time_s": m.get("step_time_s"),
        "step_time_iqr_s": m.get("step_time_iqr_s"),
    }
    _with_reasons(
        out,
        m,
        result.reasons,
        ("peak_mem_bytes", "gpu_util_pct", "power_w", "energy_j", "energy_per_sample_j"),
    )
    if out["peak_mem_bytes"] is not None:  # cuda_allocator, rss_vmhwm or rss_sampled (the engine's names)
        out["peak_mem_source"] = m.get("peak_mem_source") or result.reasons.get("peak_mem_bytes")
    if m.get("energy_source"):
        out["energy_source"] = m["energy_source"]
    # Process CPU use over the window (percent of one core). On the CPU, well below 100 x threads means other
    # processes of this machine took the core for part of the time; a hypervisor's stolen time does not show.
    out["cpu_pct_mean"] = result.extra.get("cpu_pct_mean")
    out["step_times_s"] = list(step_times_s)
    return out


def _median_or_none(values: Sequence[float | None]) -> float | None:
    """Median with a missed target counting as infinitely many (AlgoPerf); ``None`` when that median is infinite."""
    from bsprof import analysis

    if not values:
        return None
    m = analysis.median_to_target(values)
    return None if math.isinf(m) else m


def convergence_extra_info(results: Sequence[TrialResult], *, target: float | None) -> dict[str, Any]:
    """``extra_info`` of a convergence benchmark: per-seed steps, samples and seconds to target (``None`` for a
    seed that missed it), their medians (a missed seed counts as infinitely slow; ``None`` if the median seed
    missed), the fraction of seeds that reached the target, statuses, LR and device."""
    first = results[0]
    per: dict[str, list[Any]] = {k: [] for k in ("steps_to_target", "samples_to_target", "time_to_target_s")}
    for r in results:
        for k, values in per.items():
            values.append(r.metrics.get(k) if r.status == "ok" else None)
    reached = sum(1 for r in results if r.status == "ok" and r.metrics.get("reached_target"))
    out: dict[str, Any] = {
        "workload": first.spec.workload,
        "batch_size": first.spec.batch_size,
        "lr": first.spec.lr,
        "device": first.device,
        "device_name": first.device_name,
        "target": target,
        "seeds": [r.spec.seed for r in results],
        "statuses": [r.status for r in results],
        "steps_to_target_per_seed": per["steps_to_target"],
        "samples_to_target_per_seed": per["samples_to_target"],
        "time_to_target_s_per_seed": per["time_to_target_s"],
        "reached_fraction": reached / len(results),
        "final_val_metric_per_seed": [r.metrics.get("final_val_metric") for r in results],
    }
    for k, values in per.items():
        out[f"{k}_median"] = _median_or_none(values)
        if out[f"{k}_median"] is None:
            out[f"{k}_median_reason"] = "the median seed did not reach the target"
    errors = [r.error for r in results if r.error]
    if errors:
        out["errors"] = errors
    return out


def throughput_result(
    device: torch.device,
    spec: TrialSpec,
    *,
    round_times_s: Sequence[float],
    iterations: int,
    warmup_steps: int,
    telemetry: Telemetry,
    started: float,
    duration_s: float,
) -> TrialResult:
    """A :class:`TrialResult` from pytest-benchmark's per-round times (seconds per step) and the window's telemetry.

    Each round is a block of ``iterations`` steps, so the engine's :class:`StepTimes` statistics (median, IQR,
    samples/s) apply unchanged, and the trial can be stored like a sweep's.
    """
    from bsprof.engine.device import device_name
    from bsprof.engine.telemetry import downsample_rows
    from bsprof.engine.timing import StepTimes
    from bsprof.engine.trial import TrialResult, throughput_metrics

    times = StepTimes(tuple(t * iterations for t in round_times_s), iterations, spec.batch_size, warmup_steps)
    metrics, reasons = throughput_metrics(times, telemetry, device)
    return TrialResult(
        spec=spec,
        status="ok",
        device=str(device),
        device_name=device_name(device),
        metrics=metrics,
        reasons=reasons,
        step_times=times,
        started_at=started,
        duration_s=duration_s,
        extra={
            "source": "pytest-benchmark",
            "rel_iqr": times.rel_iqr,
            "cpu_pct_mean": telemetry.cpu_pct_mean,
            "telemetry": downsample_rows(telemetry.series),
        },
    )
