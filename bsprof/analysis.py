"""Analysis: pure functions over the export DataFrame (:func:`bsprof.export.trials_frame`).

Nothing here measures or formats: it aggregates trials into per-batch-size tables. Units stay SI
(seconds, bytes, samples/s); rounding and unit scaling belong to the presentation layer.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["throughput_table"]


def _q(series: pd.Series, q: float) -> float:
    return float(series.quantile(q)) if len(series) else math.nan


def throughput_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, device, batch size): throughput trials aggregated over repeats and seeds.

    Args:
        trials: Rows of the export frame (any kinds; only ``kind == "throughput"`` is used).

    Returns:
        Columns ``workload, device, batch_size, trials, ok, status`` (the worst non-ok status, if any),
        ``samples_per_s`` (median over ok trials), ``samples_per_s_p25``, ``samples_per_s_p75``,
        ``step_time_s`` (median), ``step_time_iqr_s`` (median within-trial IQR), ``peak_mem_bytes``
        (max), ``speedup`` (samples/s relative to the smallest batch size with a measurement) and
        ``scaling_efficiency`` (speedup divided by the batch-size ratio; 1 = perfect linear scaling).
    """
    import pandas as pd

    cols = [
        "workload",
        "device",
        "batch_size",
        "trials",
        "ok",
        "status",
        "samples_per_s",
        "samples_per_s_p25",
        "samples_per_s_p75",
        "step_time_s",
        "step_time_iqr_s",
        "peak_mem_bytes",
        "speedup",
        "scaling_efficiency",
    ]
    tp = trials[trials["kind"] == "throughput"]
    rows = []
    for (workload, device, b), g in tp.groupby(["workload", "device", "batch_size"], sort=True):
        ok = g[g["status"] == "ok"]
        bad = sorted(set(g["status"]) - {"ok"})
        rows.append(
            {
                "workload": workload,
                "device": device,
                "batch_size": int(b),
                "trials": len(g),
                "ok": len(ok),
                "status": "ok" if not bad else ",".join(bad),
                "samples_per_s": float(ok["samples_per_s"].median()) if len(ok) else math.nan,
                "samples_per_s_p25": _q(ok["samples_per_s"].astype(float), 0.25),
                "samples_per_s_p75": _q(ok["samples_per_s"].astype(float), 0.75),
                "step_time_s": float(ok["step_time_s"].median()) if len(ok) else math.nan,
                "step_time_iqr_s": float(ok["step_time_iqr_s"].median()) if len(ok) else math.nan,
                "peak_mem_bytes": float(ok["peak_mem_bytes"].max())
                if len(ok) and ok["peak_mem_bytes"].notna().any()
                else math.nan,
            }
        )
    table = pd.DataFrame(rows, columns=cols)
    for _, g in table.groupby(["workload", "device"]):
        measured = g[g["samples_per_s"].notna()]
        if measured.empty:
            continue
        base = measured.iloc[0]
        speedup = g["samples_per_s"] / base["samples_per_s"]
        table.loc[g.index, "speedup"] = speedup
        table.loc[g.index, "scaling_efficiency"] = speedup / (g["batch_size"] / base["batch_size"])
    return table
