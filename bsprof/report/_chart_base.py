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
WIDE, HALF, THIRD = 760, 420, 260
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


_TICK_STEPS = ((1, 2, 3, 5), (1, 2, 5), (1, 3), (1,))
"""Multipliers of each power of 10 a log axis may tick at, densest first."""


def _log_ticks(values: Iterable[float], *, max_ticks: int = 7, nice: bool = True) -> list[float]:
    """Tick values for a base-10 log axis over ``values``: the densest of 1-2-3-5, 1-2-5, 1-3 or 1 per decade
    (then every 2nd, 3rd... decade) that puts at most ``max_ticks`` ticks on the axis.

    The axis spans whole decades around the values when its scale is ``nice`` (Vega's log default), else just
    the values' range; the ticks run over the whole decades either way (Vega drops those outside the domain).
    Empty when no value is > 0.
    """
    v = [float(x) for x in values if x is not None and math.isfinite(x) and x > 0]
    if not v:
        return []
    e0, e1 = math.floor(math.log10(min(v))), math.ceil(math.log10(max(v)))
    e1 = max(e1, e0 + 1)
    lo, hi = (10.0**e0, 10.0**e1) if nice else (min(v), max(v))
    for mults in _TICK_STEPS:
        ticks = [t for t in (float(f"{m}e{e}") for e in range(e0, e1 + 1) for m in mults) if t <= 10.0**e1]
        if sum(lo <= t <= hi for t in ticks) <= max_ticks:
            return ticks
    stride = math.ceil((e1 - e0 + 1) / max_ticks)
    return [float(f"1e{e}") for e in range(e0, e1 + 1, stride)]


def _batch_ticks(bs: list[int], *, max_ticks: int = 12) -> list[int]:
    """The batch sizes themselves when few, else powers of 2 over their range (every 2nd, 3rd... when many)."""
    if 0 < len(bs) <= max_ticks:
        return bs
    if not bs:
        return []
    e0, e1 = math.floor(math.log2(bs[0])), math.ceil(math.log2(bs[-1]))
    stride = math.ceil((e1 - e0 + 1) / max_ticks)
    return [2**e for e in range(e0, e1 + 1, stride)]


def _log_axis(ticks: list[float] | list[int], *, title: str | None = None, fmt: str = "~g") -> Any:
    """The axis of every log scale in the report: explicit ``ticks`` (:func:`_log_ticks`, :func:`_batch_ticks`),
    a compact number format, and labels that would touch dropped (``labelOverlap``) rather than crowded."""
    alt = _alt()
    return alt.Axis(
        format=fmt,
        values=list(ticks) if ticks else alt.Undefined,
        labelOverlap="greedy",
        labelSeparation=4,
        title=alt.Undefined if title is None else title,
    )


def _log_enc(
    channel: str,
    field: str,
    values: Iterable[float],
    *,
    title: str | None = None,
    fmt: str = "~g",
    max_ticks: int = 7,
    nice: bool = True,
    padding: float | None = None,
) -> Any:
    """A base-10 log-scale ``"x"`` or ``"y"`` encoding of the quantitative ``field``, its axis by :func:`_log_axis`
    with ticks over ``values`` (every value the layer draws on this axis: lines, bands, reference lines)."""
    alt = _alt()
    scale = alt.Scale(type="log", nice=nice, padding=alt.Undefined if padding is None else padding)
    axis = _log_axis(_log_ticks(values, max_ticks=max_ticks, nice=nice), title=title, fmt=fmt)
    return (alt.X if channel == "x" else alt.Y)(f"{field}:Q", scale=scale, axis=axis)


def _x_batch(bs: list[int], *, title: str = B_TITLE, domain: list[float] | None = None, field: str = "batch_size"):
    """The batch-size x encoding: log2 scale over ``domain`` (default: the batch sizes, padded), ticks at the
    batch sizes (:func:`_batch_ticks`), axis by :func:`_log_axis`."""
    alt = _alt()
    scale = alt.Scale(type="log", base=2, domain=domain or _domain(bs))
    return alt.X(f"{field}:Q", scale=scale, axis=_log_axis(_batch_ticks(bs), title=title, fmt="d"))


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
