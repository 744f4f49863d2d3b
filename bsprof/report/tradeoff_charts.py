"""The trade-off charts of the report: wall-clock to target with the critical batch size, samples and wall-clock
to target, the Pareto frontier (see :mod:`bsprof.report.charts`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from bsprof.formatting import TIME_UNITS, select_unit

if TYPE_CHECKING:
    import altair as alt
    import pandas as pd

from bsprof.report._chart_base import (
    HALF,
    HEIGHT,
    WIDE,
    _alt,
    _batch_sizes,
    _domain,
    _frame,
    _log_enc,
    _num,
    _run_color,
    _tip,
    _title,
    _x_batch,
)

__all__ = ["headline_chart", "pareto_chart", "to_target_chart"]


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
    unit, per_unit_s = select_unit(t["wallclock_to_target_s"], TIME_UNITS)  # from the data: ms, µs, ... not 0.0001 s
    t["wallclock"] = t["wallclock_to_target_s"] / per_unit_s
    t = t[["run", "batch_size", "wallclock", "samples_to_target", "steps_to_target", "best"]]
    bs = _batch_sizes(t)
    dom = _domain(bs)
    color = _run_color(t)
    layers = []
    banded = False
    if fits is not None and len(fits):
        f = _frame(fits, "fits")
        f = f[f["constrained"].astype(bool) & f["run"].isin(t["run"])]
        banded = len(f) > 0
        if banded:
            f = f.assign(
                lo=np.clip(f["b_noise"] - f["b_noise_se"], dom[0], dom[1]),
                hi=np.clip(f["b_noise"] + f["b_noise_se"], dom[0], dom[1]),
                b=np.clip(f["b_noise"], dom[0], dom[1]),
            )[["run", "lo", "hi", "b", "b_noise", "b_noise_se"]]
            tips = [_tip("run:N", "run"), _tip("b_noise:Q", "B_crit", ".3g"), _tip("b_noise_se:Q", "± s.e.", ".2g")]
            layers.append(alt.Chart(f).mark_rect(opacity=0.15).encode(x="lo:Q", x2="hi:Q", color=color, tooltip=tips))
            layers.append(alt.Chart(f).mark_rule(strokeDash=[2, 2]).encode(x=alt.X("b:Q"), color=color, tooltip=tips))
    base = alt.Chart(t).encode(
        x=_x_batch(bs, domain=dom),
        y=_log_enc("y", "wallclock", t["wallclock"], title=f"wall-clock to target ({unit}, log scale)"),
        color=color,
        tooltip=[
            _tip("run:N", "run"),
            _tip("batch_size:Q", "B"),
            _tip("wallclock:Q", f"wall-clock to target ({unit})", ".3g"),
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
            "ring: fastest batch size"
            + ("; band and dotted line: critical batch size B_crit ± 1 s.e. (noise-scale fit)" if banded else ""),
        ),
    )


def to_target_chart(tradeoff: pd.DataFrame) -> alt.TopLevelMixin:
    """Samples-to-target (compute) and wall-clock-to-target (median steps × median step time) vs batch size,
    log-log, with 95% CIs over seeds; the best batch size of each is ringed.

    Args:
        tradeoff: :func:`bsprof.analysis.tradeoff_table`.
    """
    alt = _alt()
    t = _frame(tradeoff, "trade-off table")
    for col in (
        "samples_to_target",
        "samples_to_target_ci_low",
        "samples_to_target_ci_high",
        "steps_to_target",
        "steps_to_target_ci_low",
        "steps_to_target_ci_high",
        "step_time_s",
        "wallclock_to_target_s",
    ):
        t[col] = _num(t, col)
    t["wall_lo"] = t["steps_to_target_ci_low"] * t["step_time_s"]
    t["wall_hi"] = t["steps_to_target_ci_high"] * t["step_time_s"]
    bs = _batch_sizes(t)
    panels = []
    for col, lo, hi, title, ytitle, fmt in (
        (
            "samples_to_target",
            "samples_to_target_ci_low",
            "samples_to_target_ci_high",
            "Samples to target (compute)",
            "samples to target (log scale)",
            "~s",
        ),
        (
            "wallclock_to_target_s",
            "wall_lo",
            "wall_hi",
            "Wall-clock to target",
            "wall-clock to target (s, log scale)",
            "~g",
        ),
    ):
        d = t[t[col].notna()]
        if d.empty:
            continue
        d = d.assign(best=d[col] == d.groupby("run")[col].transform("min"))
        d = d[["run", "batch_size", col, lo, hi, "best", "steps_to_target", "step_time_s"]]
        color = _run_color(d)
        drawn = d[[col, lo, hi]].to_numpy().ravel()
        base = alt.Chart(d).encode(x=_x_batch(bs), color=color)
        tips = [
            _tip("run:N", "run"),
            _tip("batch_size:Q", "B"),
            _tip(f"{col}:Q", title, ",.4~g"),
            _tip(f"{lo}:Q", "95% CI low", ",.4~g"),
            _tip(f"{hi}:Q", "95% CI high", ",.4~g"),
            _tip("steps_to_target:Q", "steps to target", ",.0f"),
        ]
        ci = d[d[lo].notna() & d[hi].notna()]
        layers = [
            alt.Chart(ci)
            .mark_rule(strokeWidth=2)
            .encode(x=_x_batch(bs), y=_log_enc("y", lo, drawn, fmt=fmt), y2=f"{hi}:Q", color=color),
            base.mark_line(point=True).encode(y=_log_enc("y", col, drawn, title=ytitle, fmt=fmt), tooltip=tips),
            base.transform_filter("datum.best")
            .mark_point(size=260, strokeWidth=2.5, filled=False)
            .encode(y=_log_enc("y", col, drawn, fmt=fmt)),
        ]
        panels.append(alt.layer(*layers).properties(width=HALF, height=HEIGHT, title=_title(title, "ring: lowest")))
    if not panels:
        raise ValueError("no batch size reached the target")
    return alt.hconcat(*panels)


def pareto_chart(tradeoff: pd.DataFrame) -> alt.TopLevelMixin:
    """Wall-clock-to-target against samples-to-target (and against energy-to-target where measured), one
    point per batch size, the Pareto frontier (no other batch size is both faster and cheaper) joined.

    Args:
        tradeoff: :attr:`bsprof.analyze.Analysis.tradeoff`, with its boolean ``pareto_time_samples`` (and
            ``pareto_time_energy``) columns.
    """
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
            raise ValueError(f"the trade-off table has no {flag} column (analysis computes it)")
        d = d.assign(front=d[flag].astype(bool), label="B=" + d["batch_size"].astype(int).astype(str))
        d = d[["run", "batch_size", "xv", "yv", "front", "label"]].sort_values(["run", "xv"])
        color = _run_color(d)
        x = _log_enc("x", "xv", d["xv"], title=xtitle, fmt="~s", nice=False, padding=14)
        y = _log_enc("y", "yv", d["yv"], title="wall-clock to target (s, log scale)", nice=False, padding=14)
        tips = [
            _tip("run:N", "run"),
            _tip("batch_size:Q", "B"),
            _tip("xv:Q", xtitle.split(" (")[0], ",.4~g"),
            _tip("yv:Q", "wall-clock to target (s)", ".3g"),
            _tip("front:N", "on the Pareto frontier"),
        ]
        base = alt.Chart(d).encode(x=x, y=y, color=color)
        panels.append(
            alt.layer(
                base.transform_filter("datum.front").mark_line(strokeWidth=2),
                base.mark_point(filled=True, size=70).encode(
                    opacity=alt.condition("datum.front", alt.value(1.0), alt.value(0.35)), tooltip=tips
                ),
                # One run: every point labelled (beaten ones faded); several: the frontier only, for legibility.
                (base if d["run"].nunique() == 1 else base.transform_filter("datum.front"))
                .mark_text(dx=7, dy=-7, align="left", fontSize=10)
                .encode(text="label:N", opacity=alt.condition("datum.front", alt.value(1.0), alt.value(0.5))),
            ).properties(
                width=HALF,
                height=HEIGHT,
                title=_title(
                    f"Pareto frontier: {title.lower()}",
                    "line: batch sizes no other beats on both axes; faded: beaten by one of them",
                ),
            )
        )
    if not panels:
        raise ValueError("no batch size has both samples- and wall-clock-to-target")
    return alt.hconcat(*panels)
