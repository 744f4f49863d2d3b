"""The compute side of the report's charts: throughput, step time, memory, GPU telemetry, operators,
pytest-benchmark results (see :mod:`bsprof.report.charts`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import altair as alt
    import pandas as pd

from bsprof.formatting import BYTE_UNITS, select_unit
from bsprof.report._chart_base import (
    HALF,
    HEIGHT,
    THIRD,
    WIDE,
    _alt,
    _batch_sizes,
    _frame,
    _log_enc,
    _log_ok,
    _num,
    _per_run,
    _run_color,
    _time_unit,
    _tip,
    _title,
    _x_batch,
)

__all__ = ["benchmarks_chart", "gpu_chart", "memory_chart", "throughput_chart", "top_operators_chart"]


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
    t["ideal"] = [
        first.loc[r, "samples_per_s"] * b / first.loc[r, "batch_size"] for r, b in zip(t["run"], t["batch_size"])
    ]
    keep = [
        "run",
        "batch_size",
        "samples_per_s",
        "samples_per_s_p25",
        "samples_per_s_p75",
        "ideal",
        "step_time_ms",
        "step_p25_ms",
        "step_p75_ms",
        "speedup",
        "scaling_efficiency",
        "trials",
        "ok",
    ]
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
    drawn = t[["ideal", "samples_per_s", "samples_per_s_p25", "samples_per_s_p75"]].to_numpy().ravel()
    left = alt.layer(
        base.mark_line(strokeDash=[5, 4], opacity=0.6).encode(y=_log_enc("y", "ideal", drawn, fmt="~s")),
        base.mark_rule(strokeWidth=2).encode(
            y=_log_enc("y", "samples_per_s_p25", drawn, fmt="~s"), y2="samples_per_s_p75:Q"
        ),
        base.mark_line(point=True).encode(
            y=_log_enc("y", "samples_per_s", drawn, title="throughput (samples/s, log scale)", fmt="~s"),
            tooltip=tips,
        ),
    ).properties(
        width=HALF,
        height=HEIGHT,
        title=_title("Throughput vs batch size", "dashed: ideal linear scaling from the smallest B; bars: p25–p75"),
    )
    drawn = t[["step_time_ms", "step_p25_ms", "step_p75_ms"]].to_numpy().ravel()
    right = alt.layer(
        base.mark_rule(strokeWidth=2).encode(y=_log_enc("y", "step_p25_ms", drawn), y2="step_p75_ms:Q"),
        base.mark_line(point=True).encode(
            y=_log_enc("y", "step_time_ms", drawn, title="step time (ms, log scale)"), tooltip=tips
        ),
    ).properties(
        width=HALF,
        height=HEIGHT,
        title=_title("Step time vs batch size", "median over trials of each trial's median step; bars: p25–p75"),
    )
    return alt.hconcat(left, right)


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
    unit, div = select_unit([biggest], [u for u in BYTE_UNITS if u[0] in ("GiB", "MiB")], at_least=4)
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
    ytitle = f"peak memory ({unit}, log scale)" if log else f"peak memory ({unit})"
    drawn = [*mem["peak_mem"], *caps["capacity"]]

    def y(field: str) -> Any:
        if log:
            return _log_enc("y", field, drawn, title=ytitle)
        return alt.Y(f"{field}:Q", scale=alt.Scale(zero=True), title=ytitle, axis=alt.Axis(format="~g"))

    layers = []
    if len(mem):
        layers.append(
            alt.Chart(mem)
            .mark_line(point=True)
            .encode(
                x=x,
                y=y("peak_mem"),
                color=color,
                tooltip=[
                    _tip("run:N", "run"),
                    _tip("batch_size:Q", "B"),
                    _tip("peak_mem:Q", f"peak ({unit})", ",.3~g"),
                ],
            )
        )
    if len(caps):
        layers.append(
            alt.Chart(caps)
            .mark_rule(strokeDash=[6, 3], strokeWidth=2)
            .encode(
                y=y("capacity"),
                color=color,
                tooltip=[_tip("run:N", "run"), _tip("capacity:Q", f"device memory ({unit})", ",.3~g")],
            )
        )
    if len(ooms):
        o = alt.Chart(ooms).encode(x=x)
        layers.append(
            o.mark_rule(color="#d62728", strokeDash=[4, 3], strokeWidth=2).encode(
                tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "out of memory at B")]
            )
        )
        layers.append(
            o.mark_text(color="#d62728", dy=-4, baseline="bottom", fontWeight="bold").encode(
                text="label:N", y=alt.value(0)
            )
        )
    sub = ["red dashed lines: batch sizes that ran out of memory" if len(ooms) else "no batch size ran out of memory"]
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
        if log and _log_ok(d["value"]):
            y = _log_enc("y", "value", d["value"], title=title)
        else:
            y = alt.Y("value:Q", scale=alt.Scale(zero=True), title=title.replace(", log scale", ""))
        panels.append(
            alt.Chart(d)
            .mark_line(point=True)
            .encode(
                x=_x_batch(bs),
                y=y,
                color=color,
                tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "B"), _tip("value:Q", title, ".3g")],
            )
            .properties(width=THIRD if len(_GPU_PANELS) > 2 else HALF, height=220, title=title.split(" (")[0])
        )
    if not panels:
        raise ValueError("no GPU utilization, power or energy measured")
    return alt.hconcat(*panels)


def top_operators_chart(top_ops: pd.DataFrame, top: int = 9) -> alt.TopLevelMixin:
    """Where the time goes: the share of self time per training step of the heaviest operators, one bar per
    batch size (the rest folded into "other").

    Args:
        top_ops: Rows ``run, batch_size, name, self_s_per_step, share_pct`` (as :attr:`ReportData.top_ops`;
            the shares come from :func:`bsprof.analyze.operator_shares`).
        top: Operators named (the others are summed as "other"; 9 + other fill the 10 colours).
    """
    alt = _alt()
    t = _frame(top_ops, "operator profile")
    t["self_s_per_step"] = _num(t, "self_s_per_step")
    t = t[t["self_s_per_step"].notna()]
    if t.empty:
        raise ValueError("no operator times")
    # Rank operators by their share summed over batch sizes, so that one heavy at small batches (the optimizer
    # step, say) is named even though the big batches' absolute times dwarf it.
    rank = t.groupby("name")["share_pct"].sum().sort_values(ascending=False)
    heavy = set(rank.index[:top])
    t["op"] = np.where(t["name"].isin(heavy), t["name"], "other")
    agg = t.groupby(["run", "batch_size", "op"], as_index=False)[["self_s_per_step", "share_pct"]].sum()
    unit, scale = _time_unit(agg["self_s_per_step"])
    agg["self_time"] = agg["self_s_per_step"] * scale
    order = [*[n for n in rank.index if n in heavy], "other"]
    chart = (
        alt.Chart(agg)
        .mark_bar()
        .encode(
            y=alt.Y("batch_size:O", title="batch size B", sort="ascending"),
            x=alt.X(
                "share_pct:Q",
                stack="zero",
                title="share of operator self time per training step (%)",
                scale=alt.Scale(domain=[0, 100]),
            ),
            color=alt.Color(
                "op:N",
                title="operator",
                sort=order,
                scale=alt.Scale(scheme="tableau10"),
                legend=alt.Legend(labelLimit=300, orient="right"),
            ),
            order=alt.Order("share_pct:Q", sort="descending"),
            tooltip=[
                _tip("run:N", "run"),
                _tip("batch_size:O", "B"),
                _tip("op:N", "operator"),
                _tip("self_time:Q", f"self time per step ({unit})", ".3g"),
                _tip("share_pct:Q", "share (%)", ".1f"),
            ],
        )
    )
    props = {"width": WIDE - 160, "height": max(100, 24 * agg["batch_size"].nunique())}
    title = _title("Where the time goes: top operators by self time", "hover a bar for seconds per step")
    return _per_run(chart, props, title, many_runs=agg["run"].nunique() > 1)


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
    xtitle = f"time per round ({unit}{', log scale' if log else ''})"
    drawn = b[["min", "q1", "q3", "median"]].to_numpy().ravel()

    def x(field: str, title: str | None = None) -> Any:
        if log:
            return _log_enc("x", field, drawn, title=title)
        return alt.X(f"{field}:Q", scale=alt.Scale(zero=True), title=title or alt.Undefined)

    y = alt.Y("bench:N", title=None, sort=None, axis=alt.Axis(labelLimit=420))
    tips = [
        _tip("bench:N", "benchmark"),
        _tip("min:Q", f"min ({unit})", ".4g"),
        _tip("median:Q", f"median ({unit})", ".4g"),
        _tip("q1:Q", f"q1 ({unit})", ".4g"),
        _tip("q3:Q", f"q3 ({unit})", ".4g"),
        _tip("rounds:Q", "rounds"),
        _tip("extra_info:N", "extra_info"),
    ]
    base = alt.Chart(b).encode(y=y)
    return alt.layer(
        base.mark_rule(strokeWidth=6, opacity=0.45, color="#4c78a8").encode(x=x("q1", xtitle), x2="q3:Q", tooltip=tips),
        base.mark_tick(color="#d62728", thickness=2, size=16).encode(x=x("min"), tooltip=tips),
        base.mark_point(filled=True, size=60, color="#1f3b63").encode(x=x("median"), tooltip=tips),
    ).properties(
        width=WIDE - 240,
        height=max(60, 24 * len(b)),
        title=_title("pytest-benchmark: time per round", "dot: median; bar: q1–q3 (IQR); red tick: min"),
    )
