"""What the benchmark suite records of the engine's trials as pytest-benchmark ``extra_info``.

Pure functions over :class:`~bsprof.engine.result.TrialResult` objects — the engine's trials, whose
throughput rounds pytest-benchmark timed (:class:`bsprof.pytest_session.PedanticTimer`) — used by
``benchmarks/test_throughput.py`` and ``benchmarks/test_convergence.py``. Units are SI and in every key; a
field that was not measured is ``None`` with a ``<field>_reason`` key saying why, never zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bsprof.engine.result import TrialResult

__all__ = ["convergence_extra_info", "throughput_extra_info"]


def _with_reasons(out: dict[str, Any], values: Mapping[str, Any], reasons: Mapping[str, str], keys: Sequence[str]):
    for k in keys:
        out[k] = values.get(k)
        if out[k] is None:
            out[f"{k}_reason"] = reasons.get(k, "not measured")


def throughput_extra_info(result: TrialResult, *, warmup_rounds: int) -> dict[str, Any]:
    """``extra_info`` of a throughput benchmark: what was measured (SI units), ``None`` plus a ``<key>_reason``
    where not measured, and the per-round step times (for ``bsprof compare``).

    Args:
        result: The trial (``ok``, with its step times: one block per pytest-benchmark round).
        warmup_rounds: Untimed rounds pytest-benchmark ran first.
    """
    m = result.metrics
    times = result.step_times
    if times is None:
        raise ValueError(f"trial {result.spec} has no step times ({result.status})")
    out: dict[str, Any] = {
        "workload": result.spec.workload,
        "batch_size": result.spec.batch_size,
        "seed": result.spec.seed,
        "lr": result.spec.lr,
        "device": result.device,
        "device_name": result.device_name,
        "rounds": len(times.block_times_s),
        "iterations": times.steps_per_block,
        "warmup_rounds": warmup_rounds,
        "samples_per_s": m.get("samples_per_s"),
        "step_time_s": m.get("step_time_s"),
        "step_time_iqr_s": m.get("step_time_iqr_s"),
    }
    _with_reasons(
        out,
        m,
        result.reasons,
        ("peak_mem_bytes", "mem_baseline_bytes", "gpu_util_pct", "power_w", "energy_j", "energy_per_sample_j"),
    )
    if out["peak_mem_bytes"] is not None:  # cuda_allocator, rss_vmhwm or rss_sampled (the engine's names)
        out["peak_mem_source"] = m.get("peak_mem_source") or result.reasons.get("peak_mem_bytes")
    if m.get("energy_source"):
        out["energy_source"] = m["energy_source"]
    # Process CPU use over the window (percent of one core). On the CPU, well below 100 x threads means other
    # processes of this machine took the core for part of the time; a hypervisor's stolen time does not show.
    out["cpu_pct_mean"] = result.extra.cpu_pct_mean
    load = result.extra.host_load  # bsprof.engine.host_load: `bsprof compare` refuses busy benchmarks
    out["host_busy"] = load.busy if load is not None else None
    if load is not None and load.busy:
        out["host_busy_reason"] = "; ".join(load.busy_reasons)
    out["step_times_s"] = list(times.step_times_s)
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
