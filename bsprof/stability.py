"""Stability verdicts: per batch size, are a run's throughput figures to be trusted? (pyperf-style)

Computed from the export frame of one run (:func:`stability_table`, one row per workload, device and batch
size of the ok throughput trials); the console, the report and the export only show it. A batch size is:

* ``busy`` when any of its trials was measured on a busy host (``host_busy``, see
  :mod:`bsprof.engine.host_load`) after its re-measures;
* ``unstable`` when, across its trials (rounds x seeds), the standard deviation of samples/s exceeds
  :data:`SPREAD_REL_MAX` of the mean (pyperf's "the benchmark result may be unstable" rule), or the round-to-round
  drift (median of the later half of the rounds against the earlier half, over the median) exceeds
  :data:`DRIFT_REL_MAX`, or the median within-trial spread of the timed blocks (step-time IQR over median)
  exceeds :data:`BLOCK_REL_IQR_MAX`;
* ``stable`` otherwise (``single`` when one trial leaves nothing to compare: only its blocks are checked).
"""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "BLOCK_REL_IQR_MAX",
    "DRIFT_REL_MAX",
    "SPREAD_REL_MAX",
    "VERDICTS",
    "stability_by_run",
    "stability_table",
    "verdict",
]

SPREAD_REL_MAX = 0.10
"""Standard deviation of a batch size's samples/s over its trials, relative to their mean (pyperf: 10%)."""

DRIFT_REL_MAX = 0.10
"""Relative change between the medians of the earlier and the later half of a batch size's rounds."""

BLOCK_REL_IQR_MAX = 0.25
"""Median, over a batch size's trials, of the step-time IQR over the median step time of the timed blocks."""

VERDICTS = ("stable", "single", "unstable", "busy")

_COLUMNS = ["workload", "device", "batch_size", "trials", "busy_trials", "remeasures", "spread_rel",
            "drift_rel", "block_rel_iqr", "verdict", "why"]  # fmt: skip


def verdict(
    samples_per_s: list[float], block_rel_iqr: list[float], busy: list[str]
) -> tuple[str, float | None, float | None, float | None, str]:
    """The verdict of one batch size: (verdict, spread_rel, drift_rel, block_rel_iqr, why).

    Args:
        samples_per_s: The trials' throughput (samples/s), in the order the rounds ran.
        block_rel_iqr: The trials' step-time IQR over median (within-trial spread of the blocks).
        busy: Why each busy trial was busy (empty: none was).
    """
    n = len(samples_per_s)
    mean = statistics.fmean(samples_per_s) if n else math.nan
    spread = statistics.stdev(samples_per_s) / mean if n >= 2 and mean > 0 else None
    drift = None
    if n >= 2:
        half = n // 2
        early, late = statistics.median(samples_per_s[:half]), statistics.median(samples_per_s[n - half :])
        drift = (late - early) / statistics.median(samples_per_s)
    blocks = statistics.median(block_rel_iqr) if block_rel_iqr else None
    why = []
    if busy:
        why.append(f"{len(busy)}/{n} trial(s) measured on a busy host ({busy[0]})")
    if spread is not None and spread > SPREAD_REL_MAX:
        why.append(f"samples/s std {spread:.0%} of the mean (> {SPREAD_REL_MAX:.0%})")
    if drift is not None and abs(drift) > DRIFT_REL_MAX:
        why.append(f"drift {drift:+.0%} between the earlier and later rounds (> ±{DRIFT_REL_MAX:.0%})")
    if blocks is not None and blocks > BLOCK_REL_IQR_MAX:
        why.append(f"step-time IQR {blocks:.0%} of the median within trials (> {BLOCK_REL_IQR_MAX:.0%})")
    v = "busy" if busy else "unstable" if why else "single" if n < 2 else "stable"
    return v, spread, drift, blocks, "; ".join(why)


def stability_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, device, batch size) of the ok throughput trials: ``trials``, ``busy_trials``,
    ``remeasures``, ``spread_rel``, ``drift_rel``, ``block_rel_iqr``, ``verdict`` (one of :data:`VERDICTS`)
    and ``why`` (empty when stable)."""
    import pandas as pd

    tp = trials[(trials["kind"] == "throughput") & (trials["status"] == "ok")] if len(trials) else trials
    if tp is None or tp.empty or "samples_per_s" not in tp:
        return pd.DataFrame(columns=_COLUMNS)
    order = [c for c in ("repeat", "seed", "started_at") if c in tp.columns]
    rows: list[dict[str, Any]] = []
    for (w, d, b), g in tp.sort_values(order).groupby(["workload", "device", "batch_size"], sort=True):
        sps = [float(x) for x in pd.to_numeric(g["samples_per_s"], errors="coerce") if math.isfinite(x)]
        iqr = pd.to_numeric(g["step_time_iqr_s"], errors="coerce") / pd.to_numeric(g["step_time_s"], errors="coerce")
        busy_reasons = [_busy_reason(r) for r in g.itertuples() if _truthy(getattr(r, "host_busy", None))]
        v, spread, drift, blocks, why = verdict(sps, [float(x) for x in iqr if math.isfinite(x)], busy_reasons)
        rem = pd.to_numeric(g["remeasures"], errors="coerce").fillna(0).sum() if "remeasures" in g else 0
        rows.append(
            dict(zip(_COLUMNS, [w, d, int(b), len(sps), len(busy_reasons), int(rem), spread, drift, blocks, v, why]))
        )
    return pd.DataFrame(rows, columns=_COLUMNS)


def stability_by_run(trials: pd.DataFrame) -> pd.DataFrame:
    """:func:`stability_table` of each run of an export frame holding several (``run_id`` first): a batch size's
    verdict is about one run's trials, never pooled across runs."""
    import pandas as pd

    if trials.empty or "run_id" not in trials:
        return pd.DataFrame(columns=["run_id", *_COLUMNS])
    parts = [stability_table(g).assign(run_id=run) for run, g in trials.groupby("run_id", sort=False)]
    return pd.concat(parts, ignore_index=True)[["run_id", *_COLUMNS]]


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 1)


def _busy_reason(row: Any) -> str:
    other = getattr(row, "host_other_cpu_cores", None)
    queue = getattr(row, "host_run_queue", None)
    parts = []
    if isinstance(other, float) and math.isfinite(other):
        parts.append(f"other processes {other:.1f} cores")
    if isinstance(queue, float) and math.isfinite(queue):
        parts.append(f"run queue {queue:.1f}")
    return ", ".join(parts) or "see host_load"
