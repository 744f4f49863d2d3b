"""Shared pieces of the report's charts: frames with a ``run`` label, log₂ batch-size axes, run colours,
titles and tooltips. Presentation only: units are scaled here, never in the analysis."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from bsprof.formatting import TIME_UNITS, select_unit

if TYPE_CHECKING:
    import pandas as pd

B_TITLE = "batch size B (log₂ scale)"
WIDE, HALF, THIRD = 760, 420, 290
HEIGHT = 260


def _alt() -> Any:
    import altair as alt

    return alt


def _frame(df: pd.DataFrame, what: str) -> pd.DataFrame:
    """A copy with a ``run`` label column, ``inf`` turned into NaN; ValueError when empty."""
    if df is None or len(df) == 0:
        raise ValueError(f"no {what} to chart")
    out = df.copy()
    if "run" not in out.columns:
        parts = [c for c in ("workload", "device") if c in out.columns]
        out["run"] = out[parts].astype(str).agg(" · ".join, axis=1) if parts else "run"
    num = out.select_dtypes(include=["number"]).columns
    out[num] = out[num].replace([np.inf, -np.inf], np.nan)
    return out


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    import pandas as pd

    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce").astype(float).replace([np.inf, -np.inf], np.nan)


def _batch_sizes(*frames: pd.DataFrame) -> list[int]:
    vals: set[int] = set()
    for f in frames:
        if f is not None and "batch_size" in f.columns:
            vals.update(int(b) for b in _num(f, "batch_size").dropna())
    return sorted(vals)


def _domain(bs: list[int], pad: float = 1.3) -> list[float]:
    lo, hi = (bs[0], bs[-1]) if bs else (1, 2)
    return [lo / pad, hi * pad]


def _x_batch(bs: list[int], *, title: str = B_TITLE, domain: list[float] | None = None, field: str = "batch_size"):
    alt = _alt()
    axis = alt.Axis(format="d", labelOverlap=True, title=title)
    if 0 < len(bs) <= 16:
        axis = alt.Axis(format="d", values=bs, labelOverlap=True, title=title)
    return alt.X(f"{field}:Q", scale=alt.Scale(type="log", base=2, domain=domain or _domain(bs)), axis=axis)


def _run_color(df: pd.DataFrame, *, title: str = "run") -> Any:
    alt = _alt()
    runs = sorted(df["run"].astype(str).unique())
    return alt.Color(
        "run:N",
        title=title,
        legend=alt.Legend(
            orient="bottom", labelLimit=420, symbolOpacity=1, direction="vertical" if len(runs) > 3 else "horizontal"
        ),
    )


def _title(text: str, subtitle: str | list[str] | None = None) -> Any:
    alt = _alt()
    if subtitle:
        return alt.TitleParams(text, subtitle=subtitle)
    return alt.TitleParams(text)


def _log_ok(values: Iterable[float]) -> bool:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return bool(v) and min(v) > 0


def _time_unit(seconds: Iterable[float]) -> tuple[str, float]:
    """(unit, multiplier) to display ``seconds`` in: :func:`bsprof.formatting.select_unit` over their values."""
    name, size = select_unit(seconds, TIME_UNITS)
    return name, 1.0 / size


def _tip(field: str, title: str, fmt: str | None = None) -> Any:
    alt = _alt()
    return alt.Tooltip(field, title=title, format=fmt) if fmt else alt.Tooltip(field, title=title)


def _per_run(chart: Any, props: dict[str, Any], title: Any, *, many_runs: bool) -> Any:
    """``chart`` sized by ``props`` and titled; with several runs, one row per run (labelled on top)."""
    alt = _alt()
    if not many_runs:
        return chart.properties(**props, title=title)
    header = alt.Header(labelOrient="top", labelAnchor="start", labelLimit=500)
    return chart.properties(**props).facet(row=alt.Row("run:N", title=None, header=header)).properties(title=title)
