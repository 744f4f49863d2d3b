"""Pure reductions of a monitor window's polls into :class:`Telemetry` (no sampling, no processes here).

GPU reductions (:func:`reduce_gpu`), over all polls of a window or the tail that covers the timed steps
(:func:`measured_gpu_metrics`):

* ``gpu_util_pct`` / ``gpu_util_p95_pct``: mean and 95th percentile (linear interpolation) of utilization;
* ``mem_util_pct``: mean memory-controller utilization; ``mem_used_max_bytes``: most device memory in use;
* ``power_w``: mean power draw; ``sm_clock_hz``: mean SM clock; ``temperature_max_c``;
  ``throttle_reasons``: OR of the clock-event reason masks seen;
* ``energy_j`` with ``energy_source``: ``"energy_counter"`` when the GPU has a total-energy counter (the
  difference of the first and last readings, counted in integer mJ by the sampler so wrap-around is
  harmless), else ``"integrated_power"`` (trapezoids over the power polls, less accurate: NVML power is
  itself an average over up to a second on some GPUs).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "GPU_FIELDS",
    "GPU_SAMPLE_KEYS",
    "Telemetry",
    "downsample_rows",
    "measured_gpu_metrics",
    "reduce_gpu",
]

GPU_SAMPLE_KEYS = (
    "gpu_util_pct",
    "mem_util_pct",
    "mem_used_bytes",
    "power_w",
    "sm_clock_hz",
    "temperature_c",
    "throttle_reasons",
    "energy_counter_j",
)
"""Keys a GPU sampler's poll may carry (SI units; see :mod:`bsprof.engine.nvml` for the NVML source of each)."""


@dataclass(frozen=True)
class Telemetry:
    """Reduced readings of one window.

    Attributes:
        duration_s: Window length (seconds).
        samples: Number of polls in the window.
        rss_baseline_bytes: Process RSS when the window opened (bytes).
        rss_peak_bytes: Peak RSS in the window (bytes): the kernel's exact high-water mark where Linux offers
            it (``rss_peak_source == "VmHWM"``), else the highest sampled RSS (``"sampled"``).
        cpu_pct_mean: Mean process CPU use (percent of one core), or ``None``.
        gpu: GPU readings reduced over the whole window (:data:`GPU_FIELDS`; ``None`` where not measured).
        reasons: Why a field is ``None`` (field name -> reason).
        series: The raw polls: dicts with ``t_s`` (seconds since open) and the sampler keys.
        gpu_reason: Why the GPU could not be read at all (``None`` when it could).
        gpu_field_reasons: Why single GPU fields were missing in some or all polls.
    """

    duration_s: float
    samples: int
    rss_baseline_bytes: int
    rss_peak_bytes: int
    cpu_pct_mean: float | None
    gpu: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    series: tuple[dict[str, float | None], ...] = ()
    gpu_reason: str | None = None
    gpu_field_reasons: dict[str, str] = field(default_factory=dict)
    rss_peak_source: str = "sampled"

    @property
    def rss_growth_bytes(self) -> int:
        """Peak RSS above the baseline (bytes); a lower bound of the trial's host memory, since memory
        that the allocator kept from earlier trials is reused without growing RSS."""
        return max(0, self.rss_peak_bytes - self.rss_baseline_bytes)


GPU_FIELDS = (
    "gpu_util_pct",
    "gpu_util_p95_pct",
    "mem_util_pct",
    "mem_used_max_bytes",
    "power_w",
    "sm_clock_hz",
    "temperature_max_c",
    "throttle_reasons",
    "energy_j",
    "energy_source",
)
"""Keys of the reduced GPU readings (:func:`reduce_gpu`)."""

_MEAN_FIELDS = ("gpu_util_pct", "mem_util_pct", "power_w", "sm_clock_hz")


def _values(rows: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) is not None]


def _p95(values: list[float]) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def _energy(rows: Sequence[dict[str, Any]]) -> tuple[float | None, float | None, str | None, str | None]:
    """(energy J, span s it covers, source, reason if None)."""
    counter = [(float(r["t_s"]), float(r["energy_counter_j"])) for r in rows if r.get("energy_counter_j") is not None]
    if len(counter) >= 2:
        (t0, e0), (t1, e1) = counter[0], counter[-1]
        return e1 - e0, t1 - t0, "energy_counter", None
    power = [(float(r["t_s"]), float(r["power_w"])) for r in rows if r.get("power_w") is not None]
    if len(power) >= 2:
        joules = math.fsum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in itertools.pairwise(power))
        return joules, power[-1][0] - power[0][0], "integrated_power", None
    return None, None, None, "fewer than two energy-counter or power readings in the window"


def reduce_gpu(
    rows: Sequence[dict[str, Any]], *, reason: str | None = None, field_reasons: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Reduce GPU polls into :data:`GPU_FIELDS` (a pure function over the rows).

    Args:
        rows: Polls with ``t_s`` and the GPU sampler's keys (``gpu_util_pct``, ``power_w``,
            ``energy_counter_j`` ...); missing keys or ``None`` values are skipped.
        reason: Why the GPU could not be read at all; every field is then ``None`` with this reason.
        field_reasons: Why single fields were missing, from the sampler.

    Returns:
        (values, reasons): values has every key of :data:`GPU_FIELDS`, ``None`` where not measured, and
        reasons says why for each ``None``.
    """
    if reason is not None:
        return dict.fromkeys(GPU_FIELDS), dict.fromkeys(GPU_FIELDS, reason)
    field_reasons = field_reasons or {}
    out: dict[str, Any] = {}
    reasons: dict[str, str] = {}

    def missing(key: str, source: str) -> None:
        out[key] = None
        reasons[key] = field_reasons.get(source, f"no {source} readings in the window")

    for key in _MEAN_FIELDS:
        vals = _values(rows, key)
        if vals:
            out[key] = math.fsum(vals) / len(vals)
        else:
            missing(key, key)
    util = _values(rows, "gpu_util_pct")
    if util:
        out["gpu_util_p95_pct"] = _p95(util)
    else:
        missing("gpu_util_p95_pct", "gpu_util_pct")
    for key, source in (("mem_used_max_bytes", "mem_used_bytes"), ("temperature_max_c", "temperature_c")):
        vals = _values(rows, source)
        if vals:
            out[key] = max(vals)
        else:
            missing(key, source)
    masks = _values(rows, "throttle_reasons")
    if masks:
        mask = 0
        for m in masks:
            mask |= int(m)
        out["throttle_reasons"] = mask
    else:
        missing("throttle_reasons", "throttle_reasons")
    joules, _span, source_name, why = _energy(rows)
    out["energy_j"] = joules
    out["energy_source"] = source_name
    if joules is None:
        detail = field_reasons.get("energy_counter_j") or field_reasons.get("power_w")
        reasons["energy_j"] = reasons["energy_source"] = f"{why}" + (f" ({detail})" if detail else "")
    return {k: out[k] for k in GPU_FIELDS}, reasons


def measured_gpu_metrics(
    telemetry: Telemetry, *, measured_s: float, samples: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """GPU metrics of a throughput trial's timed steps, from the tail of its telemetry window.

    The window opens before the model is built and closes right after the last timed block, so the polls
    of the last ``measured_s`` seconds cover the timed steps. When fewer than two GPU polls fall there
    (a window shorter than two sampling periods), the whole window is used instead, and said so.

    Args:
        telemetry: The trial's window.
        measured_s: Seconds of timed steps (warm-up excluded).
        samples: Training samples in the timed steps.

    Returns:
        (metrics, reasons): :data:`GPU_FIELDS` plus ``energy_per_sample_j``. ``energy_j`` is the energy of
        the timed steps: the window's average power (from the energy counter where there is one, else the
        integrated power) times ``measured_s``.
    """
    if telemetry.gpu_reason is not None:
        keys = (*GPU_FIELDS, "energy_per_sample_j")
        return dict.fromkeys(keys), dict.fromkeys(keys, telemetry.gpu_reason)
    start = telemetry.duration_s - measured_s
    tail = [r for r in telemetry.series if r.get("t_s") is not None and float(r["t_s"]) >= start]
    gpu_rows = [r for r in tail if any(k in r for k in ("gpu_util_pct", "power_w", "energy_counter_j"))]
    rows: Sequence[dict[str, Any]] = tail
    note = None
    if len(gpu_rows) < 2:
        rows = telemetry.series
        note = "timed steps shorter than two polls: GPU readings cover set-up and warm-up too"
    metrics, reasons = reduce_gpu(rows, field_reasons=telemetry.gpu_field_reasons)
    _joules, span_s, _source, _why = _energy(rows)
    if metrics["energy_j"] is not None and span_s and span_s > 0:
        metrics["energy_j"] = metrics["energy_j"] / span_s * measured_s
        metrics["energy_per_sample_j"] = metrics["energy_j"] / samples if samples > 0 else None
        if samples <= 0:
            reasons["energy_per_sample_j"] = "no timed samples"
    else:
        metrics["energy_j"] = None
        metrics["energy_source"] = None
        metrics["energy_per_sample_j"] = None
        why = reasons.get("energy_j") or "energy readings span no time"
        reasons["energy_j"] = reasons["energy_source"] = reasons["energy_per_sample_j"] = why
    if note:
        reasons["gpu_window"] = note
    return metrics, reasons


def downsample_rows(rows: Sequence[dict[str, Any]], max_rows: int = 2000) -> list[dict[str, Any]]:
    """At most ``max_rows`` evenly spaced rows, first and last kept (all of them if there are fewer)."""
    n = len(rows)
    if n <= max_rows:
        return list(rows)
    if max_rows < 2:
        return list(rows[-max_rows:]) if max_rows else []
    step = (n - 1) / (max_rows - 1)
    return [rows[round(i * step)] for i in range(max_rows)]
