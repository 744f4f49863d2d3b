"""The report's charts, one function each, as Altair chart objects (also the notebook API).

Every function takes analysis frames (SI units, as :mod:`bsprof.analysis` and
:func:`bsprof.report.report_data` return them) and returns an ``altair`` chart; units are scaled here, for
display only. Frames may carry a ``run`` column (a label per run): runs are then drawn side by side in the
same chart, one colour each. Without it the label is ``workload · device``.

In a notebook::

    import bsprof
    from bsprof.analysis import throughput_table
    from bsprof.report import charts, report_data

    charts.throughput_chart(throughput_table(bsprof.trials_frame("reports/bsprof.db")))
    data = report_data("reports/bsprof.db")          # every frame of the report, latest run per workload
    charts.steps_to_target_chart(data.convergence, data.fits)

A function raises ``ValueError`` when its frame holds nothing it can draw. Charts with more than 5,000 rows
(learning curves of big sweeps) need ``alt.data_transformers.disable_max_rows()`` in a notebook.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import altair as alt
    import pandas as pd

__all__ = [
    "REGIME_COLORS",
    "benchmarks_chart",
    "generalization_chart",
    "gpu_chart",
    "headline_chart",
    "learning_curves_chart",
    "lr_sensitivity_chart",
    "memory_chart",
    "pareto_chart",
    "steps_to_target_chart",
    "throughput_chart",
    "to_target_chart",
    "top_operators_chart",
]

REGIME_COLORS = {
    "perfect scaling": "#b7e4c7",
    "diminishing returns": "#ffe8a3",
    "maximal data parallelism": "#e0e0e0",
}
"""Background colour of each Shallue et al. regime."""

B_TITLE = "batch size B (log₂ scale)"
WIDE, HALF, THIRD = 760, 420, 290
HEIGHT = 260
_MIB = 2.0**20


# --- helpers -------------------------------------------------------------------------------------------------


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
        legend=alt.Legend(orient="bottom", labelLimit=420, symbolOpacity=1,
                          direction="vertical" if len(runs) > 3 else "horizontal"),
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
    v = [abs(x) for x in seconds if x is not None and math.isfinite(x) and x != 0]
    m = float(np.median(v)) if v else 1.0
    for unit, scale in (("s", 1.0), ("ms", 1e3), ("µs", 1e6)):
        if m * scale >= 1:
            return unit, scale
    return "ns", 1e9


def _tip(field: str, title: str, fmt: str | None = None) -> Any:
    alt = _alt()
    return alt.Tooltip(field, title=title, format=fmt) if fmt else alt.Tooltip(field, title=title)


# --- 1 headline --------------------------------------------------------------------------------------------------


def headline_chart(tradeoff: pd.DataFrame, fits: pd.DataFrame | None = None) -> alt.TopLevelMixin:
    """Wall-clock-to-target vs batch size (log-log), the fastest batch size ringed, and the critical batch
    size B_crit ± 1 standard error shaded where the noise-scale fit is constrained.

    Args:
        tradeoff: :func:`bsprof.analysis.tradeoff_table` (``wallclock_to_target_s`` per batch size).
        fits: Rows ``run, b_noise, b_noise_se, constrained`` (see :class:`bsprof.report.ReportData`).
    """
    alt = _alt()
    t = _frame(tradeoff, "trade-off table")
    t["wallclock_to_target_s"] = _num(t, "wallclock_to_target_s")
    t = t[t["wallclock_to_target_s"].notna()]
    if t.empty:
        raise ValueError("no wall-clock-to-target: the table needs both throughput and convergence trials")
    t["best"] = t["wallclock_to_target_s"] == t.groupby("run")["wallclock_to_target_s"].transform("min")
    t = t[["run", "batch_size", "wallclock_to_target_s", "samples_to_target", "steps_to_target", "best"]]
    bs = _batch_sizes(t)
    dom = _domain(bs)
    color = _run_color(t)
    layers = []
    if fits is not None and len(fits):
        f = _frame(fits, "fits")
        f = f[f["constrained"].astype(bool) & f["run"].isin(t["run"])]
        if len(f):
            f = f.assign(
                lo=np.clip(f["b_noise"] - f["b_noise_se"], dom[0], dom[1]),
                hi=np.clip(f["b_noise"] + f["b_noise_se"], dom[0], dom[1]),
                b=np.clip(f["b_noise"], dom[0], dom[1]),
            )[["run", "lo", "hi", "b", "b_noise", "b_noise_se"]]
            tips = [_tip("run:N", "run"), _tip("b_noise:Q", "B_crit", ".3g"), _tip("b_noise_se:Q", "± s.e.", ".2g")]
            layers.append(
                alt.Chart(f).mark_rect(opacity=0.15).encode(x="lo:Q", x2="hi:Q", color=color, tooltip=tips)
            )
            layers.append(
                alt.Chart(f).mark_rule(strokeDash=[2, 2]).encode(x=alt.X("b:Q"), color=color, tooltip=tips)
            )
    base = alt.Chart(t).encode(
        x=_x_batch(bs, domain=dom),
        y=alt.Y("wallclock_to_target_s:Q", scale=alt.Scale(type="log"), title="wall-clock to target (s, log scale)"),
        color=color,
        tooltip=[
            _tip("run:N", "run"),
            _tip("batch_size:Q", "B"),
            _tip("wallclock_to_target_s:Q", "wall-clock to target (s)", ".3g"),
            _tip("steps_to_target:Q", "steps to target", ",.0f"),
            _tip("samples_to_target:Q", "samples to target", ",.0f"),
        ],
    )
    layers += [
        base.mark_line(point=True),
        base.transform_filter("datum.best").mark_point(size=260, strokeWidth=2.5, filled=False),
    ]
    return alt.layer(*layers).properties(
        width=WIDE,
        height=HEIGHT,
        title=_title(
            "Wall-clock to target vs batch size (log-log)",
            "ring: fastest batch size; shaded band and dotted line: critical batch size B_crit ± 1 s.e. "
            "(noise-scale fit)",
        ),
    )


# --- 2 throughput --------------------------------------------------------------------------------------------


def throughput_chart(throughput: pd.DataFrame) -> alt.TopLevelMixin:
    """Throughput (samples/s) vs batch size with the ideal linear-scaling line from the smallest measured
    batch size and the p25–p75 spread over repeats, next to the median step time (both log-log).

    Args:
        throughput: :func:`bsprof.analysis.throughput_table`.
    """
    alt = _alt()
    t = _frame(throughput, "throughput trials")
    for c in ("samples_per_s", "samples_per_s_p25", "samples_per_s_p75", "step_time_s", "step_time_iqr_s"):
        t[c] = _num(t, c)
    t = t[t["samples_per_s"].notna() & (t["samples_per_s"] > 0)]
    if t.empty:
        raise ValueError("no successful throughput trial to chart")
    t["step_time_ms"] = t["step_time_s"] * 1e3
    # The step-time spread over repeats, from the throughput quartiles (step time = B / throughput).
    t["step_p25_ms"] = t["batch_size"] / t["samples_per_s_p75"] * 1e3
    t["step_p75_ms"] = t["batch_size"] / t["samples_per_s_p25"] * 1e3
    t = t.sort_values(["run", "batch_size"])
    first = t.groupby("run").head(1).set_index("run")
    t["ideal"] = [first.loc[r, "samples_per_s"] * b / first.loc[r, "batch_size"] for r, b in zip(t["run"], t["batch_size"])]
    keep = ["run", "batch_size", "samples_per_s", "samples_per_s_p25", "samples_per_s_p75", "ideal", "step_time_ms",
            "step_p25_ms", "step_p75_ms", "speedup", "scaling_efficiency", "trials", "ok"]  # fmt: skip
    t = t[[c for c in keep if c in t.columns]]
    bs = _batch_sizes(t)
    x = _x_batch(bs)
    color = _run_color(t)
    tips = [
        _tip("run:N", "run"),
        _tip("batch_size:Q", "B"),
        _tip("samples_per_s:Q", "samples/s (median)", ",.0f"),
        _tip("samples_per_s_p25:Q", "p25", ",.0f"),
        _tip("samples_per_s_p75:Q", "p75", ",.0f"),
        _tip("step_time_ms:Q", "step time (ms)", ".3g"),
        _tip("scaling_efficiency:Q", "scaling efficiency", ".2f"),
    ]
    base = alt.Chart(t).encode(x=x, color=color)
    ys = alt.Scale(type="log")
    left = alt.layer(
        base.mark_line(strokeDash=[5, 4], opacity=0.6).encode(y=alt.Y("ideal:Q", scale=ys)),
        base.mark_rule(strokeWidth=2).encode(y=alt.Y("samples_per_s_p25:Q", scale=ys), y2="samples_per_s_p75:Q"),
        base.mark_line(point=True).encode(
            y=alt.Y("samples_per_s:Q", scale=ys, title="throughput (samples/s, log scale)", axis=alt.Axis(format="~s")),
            tooltip=tips,
        ),
    ).properties(
        width=HALF,
        height=HEIGHT,
        title=_title("Throughput vs batch size", "dashed: ideal linear scaling from the smallest B; bars: p25–p75"),
    )
    right = alt.layer(
        base.mark_rule(strokeWidth=2).encode(y=alt.Y("step_p25_ms:Q", scale=ys), y2="step_p75_ms:Q"),
        base.mark_line(point=True).encode(
            y=alt.Y("step_time_ms:Q", scale=ys, title="step time (ms, log scale)", axis=alt.Axis(format="~g")),
            tooltip=tips,
        ),
    ).properties(
        width=HALF,
        height=HEIGHT,
        title=_title("Step time vs batch size", "median over trials of each trial's median step; bars: p25–p75"),
    )
    return alt.hconcat(left, right)


# --- 3 memory ------------------------------------------------------------------------------------------------


def memory_chart(
    throughput: pd.DataFrame,
    capacity_bytes: Mapping[str, float] | float | None = None,
    oom: pd.DataFrame | None = None,
) -> alt.TopLevelMixin:
    """Peak memory vs batch size, the device's memory where known (horizontal line) and out-of-memory batch
    sizes (red vertical lines).

    Args:
        throughput: :func:`bsprof.analysis.throughput_table` (``peak_mem_bytes``; ``status`` with ``oom``).
        capacity_bytes: Device memory, per run label or one number for every run.
        oom: Extra ``run, batch_size`` rows that ran out of memory (e.g. from convergence trials).
    """
    import pandas as pd

    alt = _alt()
    t = _frame(throughput, "throughput trials")
    biggest = max([*_num(t, "peak_mem_bytes").dropna(), *_capacities(capacity_bytes), 0.0])
    unit, div = ("GiB", 2.0**30) if biggest >= 4 * 2.0**30 else ("MiB", _MIB)
    t["peak_mem"] = _num(t, "peak_mem_bytes") / div
    ooms = t[t["status"].astype(str).str.contains("oom")][["run", "batch_size"]]
    if oom is not None and len(oom):
        ooms = pd.concat([ooms, _frame(oom, "oom")[["run", "batch_size"]]], ignore_index=True)
    ooms = ooms.drop_duplicates().assign(label="OOM")
    mem = t[t["peak_mem"].notna()][["run", "batch_size", "peak_mem"]]
    if mem.empty and ooms.empty:
        raise ValueError("no peak memory measured and no out-of-memory trial")
    caps = pd.DataFrame(columns=["run", "capacity"])
    if capacity_bytes is not None:
        runs = sorted(set(mem["run"]) | set(ooms["run"]))
        capmap = capacity_bytes if isinstance(capacity_bytes, Mapping) else dict.fromkeys(runs, capacity_bytes)
        caps = pd.DataFrame(
            [{"run": r, "capacity": float(v) / div} for r, v in capmap.items() if v and r in runs],
            columns=["run", "capacity"],
        )
    bs = _batch_sizes(mem, ooms)
    x = _x_batch(bs)
    color = _run_color(pd.concat([mem[["run"]], ooms[["run"]], caps[["run"]]]))
    log = len(caps) > 0 and _log_ok(mem["peak_mem"])
    ys = alt.Scale(type="log") if log else alt.Scale(zero=True)
    ytitle = f"peak memory ({unit}, log scale)" if log else f"peak memory ({unit})"
    layers = []
    if len(mem):
        layers.append(
            alt.Chart(mem)
            .mark_line(point=True)
            .encode(
                x=x,
                y=alt.Y("peak_mem:Q", scale=ys, title=ytitle, axis=alt.Axis(format="~g")),
                color=color,
                tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "B"), _tip("peak_mem:Q", f"peak ({unit})", ",.3~g")],
            )
        )
    if len(caps):
        layers.append(
            alt.Chart(caps)
            .mark_rule(strokeDash=[6, 3], strokeWidth=2)
            .encode(y=alt.Y("capacity:Q", scale=ys, title=ytitle), color=color,
                    tooltip=[_tip("run:N", "run"), _tip("capacity:Q", f"device memory ({unit})", ",.3~g")])
        )  # fmt: skip
    if len(ooms):
        o = alt.Chart(ooms).encode(x=x)
        layers.append(o.mark_rule(color="#d62728", strokeDash=[4, 3], strokeWidth=2).encode(
            tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "out of memory at B")]))  # fmt: skip
        layers.append(
            o.mark_text(color="#d62728", dy=-4, baseline="bottom", fontWeight="bold").encode(
                text="label:N", y=alt.value(0)
            )
        )
    sub = ["red dashed lines: batch sizes that ran out of memory"]
    if len(caps):
        sub.append("dashed horizontal line: the device's memory")
    return alt.layer(*layers).properties(
        width=WIDE, height=HEIGHT, title=_title("Peak memory vs batch size", "; ".join(sub))
    )


def _capacities(capacity_bytes: Mapping[str, float] | float | None) -> list[float]:
    if capacity_bytes is None:
        return []
    vals = capacity_bytes.values() if isinstance(capacity_bytes, Mapping) else [capacity_bytes]
    return [float(v) for v in vals if v]


# --- 4 GPU ---------------------------------------------------------------------------------------------------


_GPU_PANELS = (
    ("gpu_util_pct", "GPU utilization (%)", 1.0, False),
    ("power_w", "power (W)", 1.0, False),
    ("energy_per_sample_j", "energy per sample (mJ, log scale)", 1e3, True),
)


def gpu_chart(gpu: pd.DataFrame) -> alt.TopLevelMixin:
    """GPU utilization, power and energy per sample vs batch size: one panel per measured column.

    Args:
        gpu: Per ``run, batch_size``: ``gpu_util_pct``, ``power_w``, ``energy_per_sample_j`` (medians of
            ok throughput trials; NaN where not measured), as :attr:`ReportData.gpu`.
    """
    alt = _alt()
    g = _frame(gpu, "GPU telemetry")
    panels = []
    bs = _batch_sizes(g)
    color = _run_color(g)
    for col, title, scale, log in _GPU_PANELS:
        v = _num(g, col) * scale
        if not v.notna().any():
            continue
        d = g.assign(value=v)[["run", "batch_size", "value"]].dropna()
        ys = alt.Scale(type="log") if log and _log_ok(d["value"]) else alt.Scale(zero=True)
        panels.append(
            alt.Chart(d)
            .mark_line(point=True)
            .encode(
                x=_x_batch(bs),
                y=alt.Y("value:Q", scale=ys, title=title if ys.type == "log" else title.replace(", log scale", "")),
                color=color,
                tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "B"), _tip("value:Q", title, ".3g")],
            )
            .properties(width=THIRD if len(_GPU_PANELS) > 2 else HALF, height=220, title=title.split(" (")[0])
        )
    if not panels:
        raise ValueError("no GPU utilization, power or energy measured")
    return alt.hconcat(*panels)


# --- 5 steps to target ---------------------------------------------------------------------------------------


def _regime_bands(conv: pd.DataFrame, dom: list[float]) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for run, g in conv[conv["regime"].notna()].groupby("run", sort=True):
        b = sorted(g["batch_size"].astype(float))
        reg = dict(zip(g["batch_size"].astype(float), g["regime"], strict=False))
        for i, x in enumerate(b):
            lo = math.sqrt(b[i - 1] * x) if i else dom[0]
            hi = math.sqrt(x * b[i + 1]) if i + 1 < len(b) else dom[1]
            rows.append({"run": run, "batch_size": x, "lo": lo, "hi": hi, "regime": reg[x]})
    return pd.DataFrame(rows, columns=["run", "batch_size", "lo", "hi", "regime"])


def steps_to_target_chart(convergence: pd.DataFrame, fits: pd.DataFrame | None = None) -> alt.TopLevelMixin:
    """Steps-to-target vs batch size on log-log axes: the median over seeds with its bootstrap 95% CI, the
    perfect-scaling line from the smallest batch size, the fitted S = S_min(1 + B_noise/B) curve where the
    fit is constrained, and the regimes (Shallue et al.) shaded behind one run or as a strip per run below.

    Args:
        convergence: :func:`bsprof.analysis.convergence_table`.
        fits: Rows ``run, s_min, b_noise, constrained`` (see :class:`bsprof.report.ReportData`).
    """
    import pandas as pd

    alt = _alt()
    c = _frame(convergence, "convergence trials")
    for col in ("steps_to_target", "steps_to_target_ci_low", "steps_to_target_ci_high", "reached_fraction"):
        c[col] = _num(c, col)
    fin = c[c["steps_to_target"].notna()].sort_values(["run", "batch_size"])
    if fin.empty:
        raise ValueError("no batch size reached the target on the median seed")
    bs = _batch_sizes(c)
    dom = _domain(bs, 1.45)
    runs = sorted(c["run"].astype(str).unique())
    color = _run_color(c)
    ys = alt.Scale(type="log")
    ytitle = "steps to target (log scale)"
    x = _x_batch(bs, domain=dom)
    first = fin.groupby("run").head(1).set_index("run")
    fin = fin.assign(
        perfect=[first.loc[r, "steps_to_target"] * first.loc[r, "batch_size"] / b for r, b in zip(fin["run"], fin["batch_size"])]  # noqa: E501
    )
    tips = [
        _tip("run:N", "run"),
        _tip("batch_size:Q", "B"),
        _tip("steps_to_target:Q", "steps to target (median)", ",.0f"),
        _tip("steps_to_target_ci_low:Q", "95% CI low", ",.0f"),
        _tip("steps_to_target_ci_high:Q", "95% CI high", ",.0f"),
        _tip("reached:Q", "seeds reached"),
        _tip("seeds:Q", "seeds"),
        _tip("scaling_efficiency:Q", "scaling efficiency", ".2f"),
        _tip("regime:N", "regime"),
        _tip("lr:Q", "learning rate", ".3g"),
    ]
    keep = ["run", "batch_size", "steps_to_target", "steps_to_target_ci_low", "steps_to_target_ci_high", "perfect",
            "reached", "seeds", "scaling_efficiency", "regime", "lr"]  # fmt: skip
    fin = fin[keep]
    bands = _regime_bands(c, dom)
    fill = alt.Fill(
        "regime:N",
        title="regime",
        scale=alt.Scale(domain=list(REGIME_COLORS), range=list(REGIME_COLORS.values())),
        legend=alt.Legend(orient="bottom"),
    )
    layers = []
    if len(runs) == 1 and len(bands):
        layers.append(
            alt.Chart(bands).mark_rect(opacity=0.7).encode(
                x=alt.X("lo:Q", scale=alt.Scale(type="log", base=2, domain=dom)), x2="hi:Q", fill=fill,
                tooltip=[_tip("regime:N", "regime"), _tip("batch_size:Q", "B")],
            )
        )  # fmt: skip
    base = alt.Chart(fin).encode(x=x, color=color)
    layers.append(base.mark_line(strokeDash=[5, 4], opacity=0.6).encode(y=alt.Y("perfect:Q", scale=ys)))
    if fits is not None and len(fits):
        f = _frame(fits, "fits")
        f = f[f["constrained"].astype(bool) & f["run"].isin(runs)]
        grid = np.geomspace(dom[0], dom[1], 60)
        curve = pd.DataFrame(
            [{"run": r.run, "batch_size": b, "fit": r.s_min * (1 + r.b_noise / b)} for r in f.itertuples() for b in grid]
        )
        if len(curve):
            layers.append(
                alt.Chart(curve).mark_line(strokeDash=[1, 3], strokeWidth=2.5).encode(
                    x=alt.X("batch_size:Q"), y=alt.Y("fit:Q", scale=ys), color=color, detail="run:N"
                )
            )  # fmt: skip
    ci = fin[fin["steps_to_target_ci_low"].notna() & fin["steps_to_target_ci_high"].notna()]
    if len(ci):
        layers.append(
            alt.Chart(ci).mark_rule(strokeWidth=2).encode(
                x=x, y=alt.Y("steps_to_target_ci_low:Q", scale=ys), y2="steps_to_target_ci_high:Q", color=color
            )
        )  # fmt: skip
    layers.append(
        base.mark_line(point=True).encode(
            y=alt.Y("steps_to_target:Q", scale=ys, title=ytitle, axis=alt.Axis(format="~s")), tooltip=tips
        )
    )
    missed = c[c["steps_to_target"].isna()]
    if len(missed):
        top = float(np.nanmax(np.r_[fin["steps_to_target_ci_high"].dropna(), fin["steps_to_target"]]))
        m = missed.assign(y=top * 1.25, seeds_missed=missed["seeds"] - missed["reached"])
        m = m[["run", "batch_size", "y", "reached", "seeds", "seeds_missed"]]
        layers.append(
            alt.Chart(m).mark_point(shape="cross", size=140, filled=True, color="#d62728").encode(
                x=x, y=alt.Y("y:Q", scale=ys),
                tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "B"), _tip("reached:Q", "seeds reached target"),
                         _tip("seeds:Q", "seeds")],
            )
        )  # fmt: skip
    sub = ["solid: median over seeds, bars: 95% CI; dashed: perfect scaling (doubling B halves the steps)"]
    second = []
    if fits is not None and len(fits) and f["constrained"].astype(bool).any():
        second.append("dotted: fit S = S_min(1 + B_noise/B)")
    if len(missed):
        second.append("red cross: the median seed missed the target")
    if len(runs) == 1 and len(bands):
        second.append("background: regime")
    if second:
        sub.append("; ".join(second))
    main = alt.layer(*layers).properties(
        width=WIDE, height=300, title=_title("Steps to target vs batch size (log-log)", sub)
    )
    if len(runs) == 1 or bands.empty:
        return main
    strip = (
        alt.Chart(bands)
        .mark_rect()
        .encode(
            x=alt.X("lo:Q", scale=alt.Scale(type="log", base=2, domain=dom),
                    axis=alt.Axis(format="d", values=bs if len(bs) <= 16 else alt.Undefined, title=B_TITLE)),
            x2="hi:Q",
            y=alt.Y("run:N", title=None, axis=alt.Axis(labelLimit=300)),
            fill=fill,
            tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "B"), _tip("regime:N", "regime")],
        )
        .properties(width=WIDE, height=22 * len(runs), title="Regime per run")
    )
    return alt.vconcat(main, strip).resolve_scale(color="independent", fill="independent")


# --- 6 samples and wall-clock to target, Pareto -----------------------------------------------------------------


def to_target_chart(tradeoff: pd.DataFrame) -> alt.TopLevelMixin:
    """Samples-to-target (compute) and wall-clock-to-target (median steps × median step time) vs batch size,
    log-log, with 95% CIs over seeds; the best batch size of each is ringed.

    Args:
        tradeoff: :func:`bsprof.analysis.tradeoff_table`.
    """
    alt = _alt()
    t = _frame(tradeoff, "trade-off table")
    for col in ("samples_to_target", "samples_to_target_ci_low", "samples_to_target_ci_high", "steps_to_target",
                "steps_to_target_ci_low", "steps_to_target_ci_high", "step_time_s", "wallclock_to_target_s"):  # fmt: skip
        t[col] = _num(t, col)
    t["wall_lo"] = t["steps_to_target_ci_low"] * t["step_time_s"]
    t["wall_hi"] = t["steps_to_target_ci_high"] * t["step_time_s"]
    bs = _batch_sizes(t)
    panels = []
    for col, lo, hi, title, ytitle, fmt in (
        ("samples_to_target", "samples_to_target_ci_low", "samples_to_target_ci_high", "Samples to target (compute)",
         "samples to target (log scale)", "~s"),
        ("wallclock_to_target_s", "wall_lo", "wall_hi", "Wall-clock to target",
         "wall-clock to target (s, log scale)", "~g"),
    ):  # fmt: skip
        d = t[t[col].notna()]
        if d.empty:
            continue
        d = d.assign(best=d[col] == d.groupby("run")[col].transform("min"))
        d = d[["run", "batch_size", col, lo, hi, "best", "steps_to_target", "step_time_s"]]
        color = _run_color(d)
        ys = alt.Scale(type="log")
        base = alt.Chart(d).encode(x=_x_batch(bs), color=color)
        tips = [_tip("run:N", "run"), _tip("batch_size:Q", "B"), _tip(f"{col}:Q", title, ",.4~g"),
                _tip(f"{lo}:Q", "95% CI low", ",.4~g"), _tip(f"{hi}:Q", "95% CI high", ",.4~g"),
                _tip("steps_to_target:Q", "steps to target", ",.0f")]  # fmt: skip
        ci = d[d[lo].notna() & d[hi].notna()]
        layers = [
            alt.Chart(ci).mark_rule(strokeWidth=2).encode(x=_x_batch(bs), y=alt.Y(f"{lo}:Q", scale=ys), y2=f"{hi}:Q",
                                                          color=color),  # fmt: skip
            base.mark_line(point=True).encode(
                y=alt.Y(f"{col}:Q", scale=ys, title=ytitle, axis=alt.Axis(format=fmt)), tooltip=tips
            ),
            base.transform_filter("datum.best").mark_point(size=260, strokeWidth=2.5, filled=False).encode(
                y=alt.Y(f"{col}:Q", scale=ys)
            ),
        ]
        panels.append(alt.layer(*layers).properties(width=HALF, height=HEIGHT, title=_title(title, "ring: lowest")))
    if not panels:
        raise ValueError("no batch size reached the target")
    return alt.hconcat(*panels)


def pareto_chart(tradeoff: pd.DataFrame) -> alt.TopLevelMixin:
    """Wall-clock-to-target against samples-to-target (and against energy-to-target where measured), one
    point per batch size, the Pareto frontier (no other batch size is both faster and cheaper) joined.

    Args:
        tradeoff: :func:`bsprof.analysis.tradeoff_table`, with boolean ``pareto_time_samples`` (and
            ``pareto_time_energy``) columns as :func:`bsprof.report.report_data` adds them; computed here when
            absent.
    """
    from bsprof.analysis import pareto_front

    alt = _alt()
    t = _frame(tradeoff, "trade-off table")
    panels = []
    for xcol, flag, xtitle, title in (
        ("samples_to_target", "pareto_time_samples", "samples to target (log scale)", "Time vs samples"),
        ("energy_to_target_j", "pareto_time_energy", "energy to target (J, log scale)", "Time vs energy"),
    ):
        if xcol not in t.columns:
            continue
        d = t.assign(xv=_num(t, xcol), yv=_num(t, "wallclock_to_target_s"))
        d = d[d["xv"].notna() & d["yv"].notna() & (d["xv"] > 0) & (d["yv"] > 0)]
        if d.empty:
            continue
        if flag not in d.columns:
            d[flag] = False
            for _, g in d.groupby("run"):
                d.loc[g.index, flag] = pareto_front(g, "xv", "yv")
        d = d.assign(front=d[flag].astype(bool), label="B=" + d["batch_size"].astype(int).astype(str))
        d = d[["run", "batch_size", "xv", "yv", "front", "label"]].sort_values(["run", "xv"])
        color = _run_color(d)
        x = alt.X("xv:Q", scale=alt.Scale(type="log", nice=False, padding=14), title=xtitle, axis=alt.Axis(format="~s"))
        y = alt.Y("yv:Q", scale=alt.Scale(type="log", nice=False, padding=14), title="wall-clock to target (s, log scale)")
        tips = [_tip("run:N", "run"), _tip("batch_size:Q", "B"), _tip("xv:Q", xtitle.split(" (")[0], ",.4~g"),
                _tip("yv:Q", "wall-clock to target (s)", ".3g"), _tip("front:N", "on the Pareto frontier")]  # fmt: skip
        base = alt.Chart(d).encode(x=x, y=y, color=color)
        panels.append(
            alt.layer(
                base.transform_filter("datum.front").mark_line(strokeWidth=2),
                base.mark_point(filled=True, size=70).encode(
                    opacity=alt.condition("datum.front", alt.value(1.0), alt.value(0.35)), tooltip=tips
                ),
                base.transform_filter("datum.front").mark_text(dx=7, dy=-7, align="left", fontSize=10).encode(
                    text="label:N"
                ),
            ).properties(
                width=HALF, height=HEIGHT,
                title=_title(f"Pareto frontier: {title.lower()}", "line and labels: batch sizes no other beats on both axes; faded: beaten"),
            )
        )  # fmt: skip
    if not panels:
        raise ValueError("no batch size has both samples- and wall-clock-to-target")
    return alt.hconcat(*panels)


# --- 7 learning curves ---------------------------------------------------------------------------------------------


def learning_curves_chart(
    curves: pd.DataFrame, targets: Mapping[str, float] | None = None, metric: str = "validation metric"
) -> alt.TopLevelMixin:
    """Validation metric vs steps, vs samples and vs training seconds (log x), one line per trial, coloured
    by batch size; click the legend to pick batch sizes (shift-click for several).

    Args:
        curves: Rows ``run, trial_id, batch_size, step, samples, train_s, val_metric`` (as
            :attr:`ReportData.curves`; e.g. ``Store.curve(trial_id)`` rows with those keys added).
        targets: Target metric per run label (a dashed horizontal line).
        metric: Name of the metric on the y axis.
    """
    import pandas as pd

    alt = _alt()
    c = _frame(curves, "learning curves")
    for col in ("step", "samples", "train_s", "val_metric"):
        c[col] = _num(c, col)
    c = c[c["val_metric"].notna()]
    if c.empty:
        raise ValueError("no evaluated learning-curve point")
    if "trial_id" not in c.columns:
        c["trial_id"] = c["run"].astype(str) + "/" + c["batch_size"].astype(str) + "/" + c.get("seed", 0).astype(str)
    c = c[["run", "trial_id", "batch_size", "seed", "step", "samples", "train_s", "val_metric"]]
    runs = sorted(c["run"].astype(str).unique())
    pick = alt.selection_point(fields=["batch_size"], bind="legend", name="pick_batch")
    bs = _batch_sizes(c)
    color = alt.Color(
        "batch_size:O",
        title="batch size B",
        scale=alt.Scale(scheme="viridis", domain=bs),
        legend=alt.Legend(orient="right", symbolType="stroke", symbolStrokeWidth=3),
    )
    tips = [_tip("run:N", "run"), _tip("batch_size:O", "B"), _tip("seed:Q", "seed"), _tip("step:Q", "step", ",d"),
            _tip("samples:Q", "samples", ",d"), _tip("train_s:Q", "training s", ".3g"),
            _tip("val_metric:Q", metric, ".4f")]  # fmt: skip
    enc: dict[str, Any] = {
        "y": alt.Y("val_metric:Q", title=metric, scale=alt.Scale(zero=False)),
        "color": color,
        "detail": "trial_id:N",
        "opacity": alt.condition(pick, alt.value(0.85), alt.value(0.07)),
        "tooltip": tips,
    }
    if len(runs) > 1:
        enc["strokeDash"] = alt.StrokeDash(
            "run:N", title="run", legend=alt.Legend(orient="bottom", labelLimit=420, symbolType="stroke")
        )
    tgt = pd.DataFrame(
        [{"run": r, "target": v} for r, v in (targets or {}).items() if r in runs and v is not None],
        columns=["run", "target"],
    )
    panels = []
    for i, (col, xtitle, fmt) in enumerate(
        (("step", "steps (log scale)", "~s"), ("samples", "samples seen (log scale)", "~s"),
         ("train_s", "training seconds (log scale)", "~g"))  # fmt: skip
    ):
        d = c[c[col] > 0]
        line = alt.Chart(d).mark_line(point=alt.OverlayMarkDef(size=12)).encode(
            x=alt.X(f"{col}:Q", scale=alt.Scale(type="log"), title=xtitle, axis=alt.Axis(format=fmt)), **enc
        )
        if i == 0:
            line = line.add_params(pick)
        layer = [line]
        if len(tgt):
            layer.append(alt.Chart(tgt).mark_rule(strokeDash=[6, 4], color="#444").encode(
                y="target:Q", tooltip=[_tip("run:N", "run"), _tip("target:Q", "target", ".4g")]))  # fmt: skip
        panels.append(alt.layer(*layer).properties(width=THIRD, height=HEIGHT, title=f"vs {xtitle.split(' (')[0]}"))
    sub = "one line per trial (seed); dashed: target; click a batch size in the legend to pick it, shift-click for more" + (
        "; dash pattern: run" if len(runs) > 1 else "")
    return alt.hconcat(*panels).properties(title=_title(f"Learning curves: {metric}", sub))


# --- 8 generalization ----------------------------------------------------------------------------------------------


def generalization_chart(convergence: pd.DataFrame, final_state: pd.DataFrame | None = None) -> alt.TopLevelMixin:
    """Generalization gap (final train metric − validation metric, medians over seeds that reached the
    target) and the weights' L2 distance from initialization at the end of training, vs batch size.

    Args:
        convergence: :func:`bsprof.analysis.convergence_table` (``final_train_metric``, ``final_val_metric``).
        final_state: Per ``run, batch_size``: ``weight_distance`` (and ``grad_norm``), as
            :attr:`ReportData.final_state`.
    """
    alt = _alt()
    c = _frame(convergence, "convergence trials")
    c["gap"] = _num(c, "final_train_metric") - _num(c, "final_val_metric")
    c["final_train_metric"], c["final_val_metric"] = _num(c, "final_train_metric"), _num(c, "final_val_metric")
    g = c[c["gap"].notna()][["run", "batch_size", "gap", "final_train_metric", "final_val_metric"]]
    panels = []
    bs = _batch_sizes(c, final_state) if final_state is not None else _batch_sizes(c)
    if len(g):
        panels.append(
            alt.Chart(g)
            .mark_line(point=True)
            .encode(
                x=_x_batch(bs),
                y=alt.Y("gap:Q", title="train − validation metric", scale=alt.Scale(zero=True)),
                color=_run_color(g),
                tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "B"), _tip("final_train_metric:Q", "train", ".4f"),
                         _tip("final_val_metric:Q", "validation", ".4f"), _tip("gap:Q", "gap", ".4f")],
            )  # fmt: skip
            .properties(width=HALF, height=HEIGHT, title=_title("Generalization gap", "final train − validation"))
        )
    if final_state is not None and len(final_state):
        f = _frame(final_state, "final state")
        f["weight_distance"] = _num(f, "weight_distance")
        f["grad_norm"] = _num(f, "grad_norm")
        f = f[f["weight_distance"].notna()][["run", "batch_size", "weight_distance", "grad_norm"]]
        if len(f):
            ys = alt.Scale(type="log") if _log_ok(f["weight_distance"]) else alt.Scale(zero=True)
            panels.append(
                alt.Chart(f)
                .mark_line(point=True)
                .encode(
                    x=_x_batch(bs),
                    y=alt.Y("weight_distance:Q", scale=ys,
                            title="‖w − w₀‖₂ at the end" + (" (log scale)" if ys.type == "log" else "")),
                    color=_run_color(f),
                    tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "B"),
                             _tip("weight_distance:Q", "distance from init", ".3g"),
                             _tip("grad_norm:Q", "gradient norm at the end", ".3g")],
                )  # fmt: skip
                .properties(width=HALF, height=HEIGHT,
                            title=_title("Distance from initialization", "L2 norm of the weight change, median"))
            )  # fmt: skip
    if not panels:
        raise ValueError("no final train/validation metric and no weight distance")
    return alt.hconcat(*panels)


# --- 9 LR sensitivity ------------------------------------------------------------------------------------------------


def lr_sensitivity_chart(lr_tuning: pd.DataFrame) -> alt.TopLevelMixin:
    """Median steps-to-target per (batch size, learning rate) of the LR-tuning trials as a heatmap; a cross
    where half the seeds or more missed the target; the LR that was chosen and re-run outlined.

    Args:
        lr_tuning: Rows ``run, batch_size, lr, seeds, reached, steps_to_target, chosen`` (as
            :attr:`ReportData.lr_tuning`).
    """
    alt = _alt()
    t = _frame(lr_tuning, "LR-tuning trials")
    t["steps"] = _num(t, "steps_to_target")
    t["chosen"] = t.get("chosen", False)
    t["chosen"] = t["chosen"].fillna(False).astype(bool)
    t["label"] = [f"{s:,.0f}" if math.isfinite(s) else "✗" for s in t["steps"].fillna(np.inf)]
    t["lr_label"] = [f"{x:.3g}" for x in t["lr"]]
    fin = t["steps"][np.isfinite(t["steps"]) & (t["steps"] > 0)]
    mid = math.sqrt(fin.min() * fin.max()) if len(fin) else 0.0
    t["dark"] = t["steps"].fillna(np.inf) < mid  # white text on the dark (few-step) cells
    t = t[["run", "batch_size", "lr", "lr_label", "seeds", "reached", "steps", "chosen", "label", "dark"]]
    lr_order = [f"{x:.3g}" for x in sorted(t["lr"].unique())]
    x = alt.X("lr_label:O", sort=lr_order, title="learning rate (log₂ grid)", axis=alt.Axis(labelAngle=0))
    y = alt.Y("batch_size:O", title="batch size B", sort="ascending")
    tips = [_tip("run:N", "run"), _tip("batch_size:O", "B"), _tip("lr:Q", "learning rate", ".3g"),
            _tip("steps:Q", "median steps to target", ",.0f"), _tip("reached:Q", "seeds reached"),
            _tip("seeds:Q", "seeds"), _tip("chosen:N", "chosen and re-run")]  # fmt: skip
    ok = "isValid(datum.steps) && isFinite(datum.steps)"
    layers = alt.layer(
        alt.Chart().mark_rect().encode(x=x, y=y, tooltip=tips,
            color=alt.Color("steps:Q", title="median steps to target (log scale)", scale=alt.Scale(type="log",
                            scheme="viridis"), legend=alt.Legend(orient="right", gradientLength=160, titleLimit=260,
                                                                 values=_log_ticks(fin))),
        ).transform_filter(ok),
        alt.Chart().mark_rect(color="#f2f2f2").encode(x=x, y=y, tooltip=tips).transform_filter(f"!({ok})"),
        alt.Chart().mark_rect(fill=None, stroke="#d62728", strokeWidth=3).encode(x=x, y=y).transform_filter(
            "datum.chosen"),
        alt.Chart().mark_text(fontSize=11).encode(x=x, y=y, text="label:N",
            color=alt.condition("datum.dark", alt.value("white"), alt.value("#222"))),
        data=t,
    )  # fmt: skip
    runs = t["run"].unique()
    n_lr, n_b = len(lr_order), t["batch_size"].nunique()
    props: dict[str, Any] = {"width": min(WIDE, max(240, 62 * n_lr)), "height": max(120, 26 * n_b)}
    title = _title(
        "LR sensitivity: median steps to target of the tuning trials",
        "darker: fewer steps; ✗: half the seeds or more missed the target; red outline: the LR chosen and re-run",
    )
    if len(runs) > 1:
        return layers.properties(**props).facet(
            row=alt.Row("run:N", title=None, header=alt.Header(labelOrient="top", labelAnchor="start", labelLimit=500))
        ).properties(title=title)  # fmt: skip
    return layers.properties(**props, title=title)


def _log_ticks(values: pd.Series) -> Any:
    """1-2-5 ticks within the values' range (a log colour legend otherwise labels one or two)."""
    v = [float(x) for x in values if x > 0 and math.isfinite(x)]
    if not v:
        return _alt().Undefined
    lo, hi = min(v), max(v)
    ticks = [m * 10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    inside = [t for t in ticks if lo <= t <= hi]
    return [lo, *inside, hi] if len(inside) < 2 else inside


# --- 10 top operators ---------------------------------------------------------------------------------------------


def top_operators_chart(top_ops: pd.DataFrame, top: int = 8) -> alt.TopLevelMixin:
    """Where the time goes: the share of self time per training step of the heaviest operators, one bar per
    batch size (the rest folded into "other").

    Args:
        top_ops: Rows ``run, batch_size, name, self_s_per_step`` (as :attr:`ReportData.top_ops`).
        top: Operators named per run.
    """
    alt = _alt()
    t = _frame(top_ops, "operator profile")
    t["self_s_per_step"] = _num(t, "self_s_per_step")
    t = t[t["self_s_per_step"].notna()]
    if t.empty:
        raise ValueError("no operator times")
    heavy = set()
    for _, g in t.groupby("run"):
        share = g.groupby("name")["self_s_per_step"].sum().sort_values(ascending=False)
        heavy.update(share.index[:top])
    t["op"] = np.where(t["name"].isin(heavy), t["name"], "other")
    agg = t.groupby(["run", "batch_size", "op"], as_index=False)["self_s_per_step"].sum()
    agg["share_pct"] = 100 * agg["self_s_per_step"] / agg.groupby(["run", "batch_size"])["self_s_per_step"].transform("sum")
    unit, scale = _time_unit(agg["self_s_per_step"])
    agg["self_time"] = agg["self_s_per_step"] * scale
    order = [*sorted(heavy, key=lambda n: -t.loc[t["op"] == n, "self_s_per_step"].sum()), "other"]
    chart = alt.Chart(agg).mark_bar().encode(
        y=alt.Y("batch_size:O", title="batch size B", sort="ascending"),
        x=alt.X("share_pct:Q", stack="zero", title="share of operator self time per training step (%)",
                scale=alt.Scale(domain=[0, 100])),
        color=alt.Color("op:N", title="operator", sort=order, scale=alt.Scale(scheme="tableau10"),
                        legend=alt.Legend(labelLimit=300, orient="right")),
        order=alt.Order("share_pct:Q", sort="descending"),
        tooltip=[_tip("run:N", "run"), _tip("batch_size:O", "B"), _tip("op:N", "operator"),
                 _tip("self_time:Q", f"self time per step ({unit})", ".3g"), _tip("share_pct:Q", "share (%)", ".1f")],
    )  # fmt: skip
    props = {"width": WIDE - 160, "height": max(100, 24 * agg["batch_size"].nunique())}
    title = _title("Where the time goes: top operators by self time", "hover a bar for seconds per step")
    if agg["run"].nunique() > 1:
        return chart.properties(**props).facet(
            row=alt.Row("run:N", title=None, header=alt.Header(labelOrient="top", labelAnchor="start", labelLimit=500))
        ).properties(title=title)  # fmt: skip
    return chart.properties(**props, title=title)


# --- 11 pytest-benchmark ---------------------------------------------------------------------------------------------


def benchmarks_chart(benchmarks: pd.DataFrame) -> alt.TopLevelMixin:
    """pytest-benchmark results: the median time per round of each benchmark with its interquartile range
    (bar) and minimum (tick).

    Args:
        benchmarks: :func:`bsprof.report.load_benchmark_json` rows (seconds).
    """
    alt = _alt()
    b = _frame(benchmarks, "benchmarks")
    unit, scale = _time_unit(_num(b, "median"))
    for col in ("min", "median", "q1", "q3", "max"):
        b[col] = _num(b, col) * scale
    b["bench"] = b["file"].astype(str) + " :: " + b["name"].astype(str) if b["file"].nunique() > 1 else b["name"]
    b = b[["bench", "min", "median", "q1", "q3", "max", "rounds", "extra_info"]]
    log = _log_ok(b["min"]) and (b["median"].max() / max(b["min"].min(), 1e-300) > 50)
    xs = alt.Scale(type="log") if log else alt.Scale(zero=True)
    xtitle = f"time per round ({unit}{', log scale' if log else ''})"
    y = alt.Y("bench:N", title=None, sort=None, axis=alt.Axis(labelLimit=420))
    tips = [_tip("bench:N", "benchmark"), _tip("min:Q", f"min ({unit})", ".4g"),
            _tip("median:Q", f"median ({unit})", ".4g"), _tip("q1:Q", f"q1 ({unit})", ".4g"),
            _tip("q3:Q", f"q3 ({unit})", ".4g"), _tip("rounds:Q", "rounds"), _tip("extra_info:N", "extra_info")]  # fmt: skip
    base = alt.Chart(b).encode(y=y)
    return alt.layer(
        base.mark_rule(strokeWidth=6, opacity=0.45, color="#4c78a8").encode(
            x=alt.X("q1:Q", scale=xs, title=xtitle), x2="q3:Q", tooltip=tips),
        base.mark_tick(color="#d62728", thickness=2, size=16).encode(x=alt.X("min:Q", scale=xs), tooltip=tips),
        base.mark_point(filled=True, size=60, color="#1f3b63").encode(x=alt.X("median:Q", scale=xs), tooltip=tips),
    ).properties(
        width=WIDE - 240, height=max(60, 24 * len(b)),
        title=_title("pytest-benchmark: time per round", "dot: median; bar: q1–q3 (IQR); red tick: min"),
    )  # fmt: skip
