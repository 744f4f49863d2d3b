"""The report's noise-scale charts: B_simple over training per batch size, and predicted vs measured S(B).

Presentation only: the values come from the learning curves (``--measure-gns``) and from
:mod:`bsprof.noise_analysis`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bsprof.report._chart_base import (
    HALF,
    HEIGHT,
    _alt,
    _batch_sizes,
    _frame,
    _log_enc,
    _num,
    _per_run,
    _tip,
    _title,
    _x_batch,
)

if TYPE_CHECKING:
    import altair as alt
    import pandas as pd

__all__ = ["noise_scale_chart", "predicted_steps_chart"]


def noise_scale_chart(curves: pd.DataFrame, critical: pd.DataFrame | None = None) -> alt.TopLevelMixin:
    """B_simple vs epochs of training (log-log), one line per trial coloured by batch size, with the predicted
    and the fitted (measured) critical batch size as horizontal rules.

    Args:
        curves: Rows ``run, trial_id, batch_size, seed, epochs, b_simple, b_simple_low, b_simple_high``.
        critical: Rows ``run, predicted, measured`` (examples) for the rules, optional.
    """
    import pandas as pd

    alt = _alt()
    c = _frame(curves, "noise-scale measurements")
    for col in ("epochs", "b_simple", "b_simple_low", "b_simple_high", "step"):
        c[col] = _num(c, col)
    c = c[(c["b_simple"] > 0) & (c["epochs"] > 0)]
    if c.empty:
        raise ValueError("no resolved noise-scale measurement")
    bs = _batch_sizes(c)
    color = alt.Color("batch_size:O", title="batch size B", scale=alt.Scale(scheme="viridis", domain=bs))
    tips = [
        _tip("batch_size:O", "B"),
        _tip("seed:Q", "seed"),
        _tip("step:Q", "step", ",d"),
        _tip("epochs:Q", "epochs", ".3g"),
        _tip("b_simple:Q", "B_simple", ".3g"),
        _tip("b_simple_low:Q", "90% low", ".3g"),
        _tip("b_simple_high:Q", "90% high", ".3g"),
    ]
    x = _log_enc("x", "epochs", c["epochs"], title="epochs of training (log scale)")
    rules = pd.DataFrame(columns=["run", "value", "what"])
    if critical is not None and len(critical):
        rules = critical.melt(id_vars=["run"], value_vars=["predicted", "measured"], var_name="what")
        rules = rules[pd.to_numeric(rules["value"], errors="coerce") > 0]
        rules["what"] = rules["what"].map({"predicted": "predicted B_crit", "measured": "fitted B_crit"})
    drawn = [*c["b_simple"], *pd.to_numeric(rules["value"])]
    y = _log_enc("y", "b_simple", drawn, title="B_simple = tr(Σ)/|G|² (examples, log scale)")
    layers = [
        alt.Chart(c)
        .mark_line(point=alt.OverlayMarkDef(size=14), opacity=0.7)
        .encode(x=x, y=y, color=color, detail="trial_id:N", tooltip=tips)
    ]
    if len(rules):
        layers.append(
            alt.Chart(rules)
            .mark_rule(strokeDash=[6, 4])
            .encode(
                y=_log_enc("y", "value", drawn),
                color=alt.value("#444"),
                strokeDash=alt.StrokeDash("what:N", title=None, legend=alt.Legend(orient="bottom")),
                tooltip=[_tip("what:N", "what"), _tip("value:Q", "examples", ".3g")],
            )
        )
    sub = "one line per trial; the noise scale grows as the loss falls (McCandlish et al. 2018)"
    many = c["run"].nunique() > 1
    return _per_run(alt.layer(*layers), {"width": HALF, "height": HEIGHT}, _title("Gradient noise scale", sub),
                    many_runs=many)  # fmt: skip


def predicted_steps_chart(steps: pd.DataFrame) -> alt.TopLevelMixin:
    """Predicted S(B) = S_min(1 + B_noise/B) (line, band over the B_noise interval) and the measured median
    steps-to-target (points) vs batch size, log-log.

    Args:
        steps: :func:`bsprof.noise_analysis.steps_prediction_table` rows with a ``run`` label.
    """
    alt = _alt()
    s = _frame(steps, "steps predictions")
    for col in ("predicted_steps", "predicted_low", "predicted_high", "measured_steps"):
        s[col] = _num(s, col)
    bs = _batch_sizes(s)
    x = _x_batch(bs)
    ytitle = "steps to target (log scale)" + (" — relative to S_min" if bool(s["relative"].any()) else "")
    drawn = s[["predicted_steps", "predicted_low", "predicted_high", "measured_steps"]].to_numpy().ravel()
    y = _log_enc("y", "predicted_steps", drawn, title=ytitle)
    tips: list[Any] = [
        _tip("batch_size:Q", "B", "d"),
        _tip("predicted_steps:Q", "predicted S(B)", ".3g"),
        _tip("predicted_low:Q", "low (B_noise low)", ".3g"),
        _tip("predicted_high:Q", "high (B_noise high)", ".3g"),
        _tip("measured_steps:Q", "measured median", ".3g"),
    ]
    band = (
        alt.Chart(s[s["predicted_low"].notna() & s["predicted_high"].notna()])
        .mark_area(opacity=0.2, color="#4c78a8")
        .encode(x=x, y=_log_enc("y", "predicted_low", drawn, title=ytitle), y2="predicted_high:Q")
    )
    line = alt.Chart(s).mark_line(color="#4c78a8").encode(x=x, y=y, tooltip=tips)
    points = (
        alt.Chart(s[s["measured_steps"].notna()])
        .mark_point(filled=True, size=50, color="#e45756")
        .encode(x=x, y=_log_enc("y", "measured_steps", drawn, title=ytitle), tooltip=tips)
    )
    sub = "line: predicted from the noise scale (band: its 90% interval); points: measured median over seeds"
    many = s["run"].nunique() > 1
    return _per_run(alt.layer(band, line, points), {"width": HALF, "height": HEIGHT},
                    _title("Predicted vs measured steps to target", sub), many_runs=many)  # fmt: skip
