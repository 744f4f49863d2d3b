"""The optimization side of the report's charts: steps to target and the regimes, learning curves,
generalization, LR sensitivity (see :mod:`bsprof.report.charts`).

About 480 lines: one Altair chart per function for the accuracy half of the report; they share the log-axis
and regime-band helpers kept here, so splitting the module would only scatter those helpers.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import altair as alt
    import pandas as pd

from bsprof.report._chart_base import (
    HALF,
    HEIGHT,
    THIRD,
    WIDE,
    _alt,
    _batch_sizes,
    _domain,
    _frame,
    _log_enc,
    _log_ok,
    _log_ticks,
    _num,
    _per_run,
    _run_color,
    _tip,
    _title,
    _x_batch,
)

__all__ = [
    "REGIME_COLORS",
    "generalization_chart",
    "learning_curves_chart",
    "lr_sensitivity_chart",
    "steps_to_target_chart",
]


REGIME_COLORS = {
    "perfect scaling": "#b7e4c7",
    "diminishing returns": "#ffe8a3",
    "maximal data parallelism": "#e0e0e0",
}
"""Background colour of each Shallue et al. regime."""


def _regime_bands(conv: pd.DataFrame, dom: list[float]) -> pd.DataFrame:
    import pandas as pd

    rows = []
    for run, g in conv[conv["regime"].notna()].groupby("run", sort=True):
        b = sorted(g["batch_size"].astype(float))
        reg = dict(zip(g["batch_size"].astype(float), g["regime"], strict=False))
        for i, x in enumerate(b):
            # The outer bands run past the axis (clipped), so the shading fills the plot whatever its padding.
            lo = math.sqrt(b[i - 1] * x) if i else dom[0] / 4
            hi = math.sqrt(x * b[i + 1]) if i + 1 < len(b) else dom[1] * 4
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
    ytitle = "steps to target (log scale)"
    x = _x_batch(bs, domain=dom)
    first = fin.groupby("run").head(1).set_index("run")
    fin = fin.assign(
        perfect=[
            first.loc[r, "steps_to_target"] * first.loc[r, "batch_size"] / b
            for r, b in zip(fin["run"], fin["batch_size"])
        ]
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
    keep = [
        "run",
        "batch_size",
        "steps_to_target",
        "steps_to_target_ci_low",
        "steps_to_target_ci_high",
        "perfect",
        "reached",
        "seeds",
        "scaling_efficiency",
        "regime",
        "lr",
    ]
    fin = fin[keep]
    bands = _regime_bands(c, dom)
    fill = alt.Fill(
        "regime:N",
        title="regime",
        scale=alt.Scale(domain=list(REGIME_COLORS), range=list(REGIME_COLORS.values())),
        legend=alt.Legend(orient="bottom"),
    )
    curve = pd.DataFrame(columns=["run", "batch_size", "fit"])
    if fits is not None and len(fits):
        f = _frame(fits, "fits")
        f = f[f["constrained"].astype(bool) & f["run"].isin(runs)]
        grid = np.geomspace(dom[0], dom[1], 60)
        rows = [
            {"run": r.run, "batch_size": b, "fit": r.s_min * (1 + r.b_noise / b)} for r in f.itertuples() for b in grid
        ]
        curve = pd.DataFrame(rows, columns=["run", "batch_size", "fit"])
    missed = c[c["steps_to_target"].isna()]
    top = float(np.nanmax(np.r_[fin["steps_to_target_ci_high"].dropna(), fin["steps_to_target"]]))
    m = missed.assign(y=top * 1.25, seeds_missed=missed["seeds"] - missed["reached"])
    m = m[["run", "batch_size", "y", "reached", "seeds", "seeds_missed"]]
    cols = ["steps_to_target", "steps_to_target_ci_low", "steps_to_target_ci_high", "perfect"]
    drawn = [*fin[cols].to_numpy().ravel(), *curve["fit"], *m["y"]]

    def y(field: str, title: str | None = None) -> Any:
        return _log_enc("y", field, drawn, title=title, fmt="~s")

    layers = []
    if len(runs) == 1 and len(bands):
        layers.append(
            alt.Chart(bands)
            .mark_rect(opacity=0.7, clip=True)
            .encode(
                x=_x_batch(bs, domain=dom, field="lo"),
                x2="hi:Q",
                fill=fill,
                tooltip=[_tip("regime:N", "regime"), _tip("batch_size:Q", "B")],
            )
        )
    base = alt.Chart(fin).encode(x=x, color=color)
    layers.append(base.mark_line(strokeDash=[5, 4], opacity=0.6).encode(y=y("perfect")))
    if len(curve):
        layers.append(
            alt.Chart(curve)
            .mark_line(strokeDash=[1, 3], strokeWidth=2.5)
            .encode(x=alt.X("batch_size:Q"), y=y("fit"), color=color, detail="run:N")
        )
    ci = fin[fin["steps_to_target_ci_low"].notna() & fin["steps_to_target_ci_high"].notna()]
    if len(ci):
        layers.append(
            alt.Chart(ci)
            .mark_rule(strokeWidth=2)
            .encode(x=x, y=y("steps_to_target_ci_low"), y2="steps_to_target_ci_high:Q", color=color)
        )
    layers.append(base.mark_line(point=True).encode(y=y("steps_to_target", ytitle), tooltip=tips))
    if len(missed):
        layers.append(
            alt.Chart(m)
            .mark_point(shape="cross", size=140, filled=True, color="#d62728")
            .encode(
                x=x,
                y=y("y"),
                tooltip=[
                    _tip("run:N", "run"),
                    _tip("batch_size:Q", "B"),
                    _tip("reached:Q", "seeds reached target"),
                    _tip("seeds:Q", "seeds"),
                ],
            )
        )
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
        .mark_rect(clip=True)
        .encode(
            x=_x_batch(bs, domain=dom, field="lo"),
            x2="hi:Q",
            y=alt.Y("run:N", title=None, axis=alt.Axis(labelLimit=300)),
            fill=fill,
            tooltip=[_tip("run:N", "run"), _tip("batch_size:Q", "B"), _tip("regime:N", "regime")],
        )
        .properties(width=WIDE, height=22 * len(runs), title="Regime per run")
    )
    return alt.vconcat(main, strip).resolve_scale(color="independent", fill="independent")


def learning_curves_chart(
    curves: pd.DataFrame,
    targets: Mapping[str, float] | None = None,
    metric: str = "validation metric",
    *,
    lower_is_better: bool = False,
) -> alt.TopLevelMixin:
    """Validation metric vs steps, vs samples and vs training seconds (log x), one line per trial, coloured
    by batch size; click the legend to pick batch sizes (shift-click for several).

    Args:
        curves: Rows ``run, trial_id, batch_size, step, samples, train_s, val_metric`` (as
            :attr:`ReportData.curves`; e.g. ``Store.curve(trial_id)`` rows with those keys added).
        targets: Target metric per run label (a dashed horizontal line).
        metric: Name of the metric on the y axis.
        lower_is_better: The metric falls towards its target (an MSE): a log y axis when every value is
            positive, so a small target is not flattened against zero by the first evaluations' large values.
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
        c["trial_id"] = c.groupby(["run", "batch_size", *(["seed"] if "seed" in c.columns else [])]).ngroup()
    if "seed" not in c.columns:
        c["seed"] = 0
    c = c[["run", "trial_id", "batch_size", "seed", "step", "samples", "train_s", "val_metric"]]
    runs = sorted(c["run"].astype(str).unique())
    # Curves are the bulk of a page: inline them as CSV (header once, 5 significant digits) with the run
    # label as an index looked up from a small table, instead of one JSON object per point.
    c["ri"] = c["run"].map({r: i for i, r in enumerate(runs)})
    cols = ["ri", "trial_id", "batch_size", "seed", "step", "samples", "train_s", "val_metric"]
    csv = c[cols].to_csv(index=False, float_format="%.5g", lineterminator="\n")
    name = "curves-" + hashlib.sha256(csv.encode()).hexdigest()[:12]  # stored once, used by the three panels
    data = alt.NamedData(name=name, format=alt.DataFormat(type="csv", parse=dict.fromkeys(cols, "number")))
    run_table = alt.LookupData(
        data=alt.InlineData(values=[{"ri": i, "run": r} for i, r in enumerate(runs)]), key="ri", fields=["run"]
    )
    pick = alt.selection_point(fields=["batch_size"], bind="legend", name="pick_batch")
    bs = _batch_sizes(c)
    color = alt.Color(
        "batch_size:O",
        title="batch size B",
        scale=alt.Scale(scheme="viridis", domain=bs),
        legend=alt.Legend(orient="right", symbolType="stroke", symbolStrokeWidth=3),
    )
    log_y = lower_is_better and bool((c["val_metric"] > 0).all())
    y_title = metric + (" (log scale)" if log_y else "")
    targets_drawn = [v for v in (targets or {}).values() if v is not None]
    if log_y:
        y = _log_enc("y", "val_metric", [*c["val_metric"], *targets_drawn], title=y_title)
    else:
        y = alt.Y("val_metric:Q", title=y_title, scale=alt.Scale(zero=False))
    tips = [
        _tip("run:N", "run"),
        _tip("batch_size:O", "B"),
        _tip("seed:Q", "seed"),
        _tip("step:Q", "step", ",d"),
        _tip("samples:Q", "samples", ",d"),
        _tip("train_s:Q", "training s", ".3g"),
        _tip("val_metric:Q", metric, ".4f"),
    ]
    enc: dict[str, Any] = {
        "y": y,
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
        (
            ("step", "steps (log scale)", "~s"),
            ("samples", "samples seen (log scale)", "~s"),
            ("train_s", "training seconds (log scale)", "~g"),
        )
    ):
        line = (
            alt.Chart(data)
            .transform_lookup(lookup="ri", from_=run_table)
            .transform_filter(f"datum.{col} > 0")
            .mark_line(point=alt.OverlayMarkDef(size=12))
            .encode(x=_log_enc("x", col, c[col], title=xtitle, fmt=fmt), **enc)
        )
        if i == 0:
            line = line.add_params(pick)
        layer = [line]
        if len(tgt):
            layer.append(
                alt.Chart(tgt)
                .mark_rule(strokeDash=[6, 4], color="#444")
                .encode(y="target:Q", tooltip=[_tip("run:N", "run"), _tip("target:Q", "target", ".4g")])
            )
        panels.append(alt.layer(*layer).properties(width=THIRD, height=HEIGHT, title=f"vs {xtitle.split(' (')[0]}"))
    sub = (
        "one line per trial (seed); dashed: target; click a batch size in the legend to pick it, shift-click for more"
        + ("; dash pattern: run" if len(runs) > 1 else "")
    )
    chart = alt.hconcat(*panels).properties(title=_title(f"Learning curves: {metric}", sub))
    chart.datasets = {name: csv}
    return chart


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
                tooltip=[
                    _tip("run:N", "run"),
                    _tip("batch_size:Q", "B"),
                    _tip("final_train_metric:Q", "train", ".4f"),
                    _tip("final_val_metric:Q", "validation", ".4f"),
                    _tip("gap:Q", "gap", ".4f"),
                ],
            )
            .properties(width=HALF, height=HEIGHT, title=_title("Generalization gap", "final train − validation"))
        )
    if final_state is not None and len(final_state):
        f = _frame(final_state, "final state")
        f["weight_distance"] = _num(f, "weight_distance")
        f["grad_norm"] = _num(f, "grad_norm")
        f = f[f["weight_distance"].notna()][["run", "batch_size", "weight_distance", "grad_norm"]]
        if len(f):
            title = "‖w − w₀‖₂ at the end"
            if _log_ok(f["weight_distance"]):
                y = _log_enc("y", "weight_distance", f["weight_distance"], title=title + " (log scale)")
            else:
                y = alt.Y("weight_distance:Q", scale=alt.Scale(zero=True), title=title)
            panels.append(
                alt.Chart(f)
                .mark_line(point=True)
                .encode(
                    x=_x_batch(bs),
                    y=y,
                    color=_run_color(f),
                    tooltip=[
                        _tip("run:N", "run"),
                        _tip("batch_size:Q", "B"),
                        _tip("weight_distance:Q", "distance from init", ".3g"),
                        _tip("grad_norm:Q", "gradient norm at the end", ".3g"),
                    ],
                )
                .properties(
                    width=HALF,
                    height=HEIGHT,
                    title=_title("Distance from initialization", "L2 norm of the weight change, median"),
                )
            )
    if not panels:
        raise ValueError("no final train/validation metric and no weight distance")
    return alt.hconcat(*panels)


def _legend_ticks(values: pd.Series) -> Any:
    """Log-axis ticks (:func:`_log_ticks`) within the values' range (a log colour legend otherwise labels one or
    two); the range's ends too when fewer than two ticks fall inside it."""
    v = [float(x) for x in values if x > 0 and math.isfinite(x)]
    if not v:
        return _alt().Undefined
    lo, hi = min(v), max(v)
    inside = [t for t in _log_ticks(v, max_ticks=6, nice=False) if lo <= t <= hi]
    return [lo, *inside, hi] if len(inside) < 2 else inside


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
    tips = [
        _tip("run:N", "run"),
        _tip("batch_size:O", "B"),
        _tip("lr:Q", "learning rate", ".3g"),
        _tip("steps:Q", "median steps to target", ",.0f"),
        _tip("reached:Q", "seeds reached"),
        _tip("seeds:Q", "seeds"),
        _tip("chosen:N", "chosen and re-run"),
    ]
    ok = "isValid(datum.steps) && isFinite(datum.steps)"
    layers = alt.layer(
        alt.Chart()
        .mark_rect()
        .encode(
            x=x,
            y=y,
            tooltip=tips,
            color=alt.Color(
                "steps:Q",
                title="median steps to target (log scale)",
                scale=alt.Scale(type="log", scheme="viridis"),
                legend=alt.Legend(orient="right", gradientLength=160, titleLimit=260, values=_legend_ticks(fin)),
            ),
        )
        .transform_filter(ok),
        alt.Chart().mark_rect(color="#f2f2f2").encode(x=x, y=y, tooltip=tips).transform_filter(f"!({ok})"),
        alt.Chart()
        .mark_rect(fill=None, stroke="#d62728", strokeWidth=3)
        .encode(x=x, y=y)
        .transform_filter("datum.chosen"),
        alt.Chart()
        .mark_text(fontSize=11)
        .encode(x=x, y=y, text="label:N", color=alt.condition("datum.dark", alt.value("white"), alt.value("#222"))),
        data=t,
    )
    runs = t["run"].unique()
    n_lr, n_b = len(lr_order), t["batch_size"].nunique()
    props: dict[str, Any] = {"width": min(WIDE, max(240, 62 * n_lr)), "height": max(120, 26 * n_b)}
    title = _title(
        "LR sensitivity: median steps to target of the tuning trials",
        "darker: fewer steps; ✗: half the seeds or more missed the target; red outline: the LR chosen and re-run",
    )
    return _per_run(layers, props, title, many_runs=len(runs) > 1)
