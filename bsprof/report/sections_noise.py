"""The report's noise-scale section: B_simple over training, predicted beside fitted B_crit, predicted S(B)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bsprof.formatting import format_sig, plus_minus
from bsprof.report.noise_charts import noise_scale_chart, predicted_steps_chart
from bsprof.report.text import Section, run_prefix

if TYPE_CHECKING:
    from bsprof.report.data import ReportData

__all__ = ["noise_section"]


def _interval(lo: object, hi: object) -> str:
    return f" [{format_sig(lo)}–{format_sig(hi)}]" if format_sig(lo) and format_sig(hi) else ""


def noise_section(d: ReportData, store_hint: str) -> Section:
    """Section 5b: the gradient noise scale (McCandlish et al. 2018) and the critical batch size it predicts."""
    from bsprof.noise_analysis import CAVEATS

    s = Section("noise-scale", "5b. Gradient noise scale: the predicted critical batch size")
    crit = d.critical
    have = crit is not None and len(crit) and crit["predicted"].notna().any()
    if not have:
        s.notes.append(
            "No noise-scale measurement in these runs: `bsprof predict` estimates the critical batch size in a "
            f"short run, `bsprof sweep --measure-gns {store_hint}` measures it in every convergence trial."
        )
        return s
    many = len(d.runs) > 1
    for r in crit[crit["predicted"].notna()].itertuples():
        when = "at the target" if r.at_target else "at the end of a budget that missed the target (early)"
        text = (
            f"{run_prefix(r.run, many)}B_simple = tr(Σ)/|G|² {when}: {format_sig(r.predicted)}"
            f"{_interval(r.predicted_low, r.predicted_high)} examples (90% interval, {r.predicted_trials} trial(s)), "
            f"the predicted critical batch size; confidence {r.confidence}."
        )
        if r.measured is not None and not math.isnan(float(r.measured)) and r.ratio is not None:
            text += (
                f" The fit of the measured steps gives B_crit = {plus_minus(r.measured, r.measured_se)}: "
                f"predicted/measured = {r.ratio:.2f}{_interval(r.ratio_low, r.ratio_high)}."
            )
        if r.fastest_batch_size is not None and not math.isnan(float(r.fastest_batch_size)):
            text += f" Predicted fastest wall-clock to target on this device: B={int(r.fastest_batch_size)}."
        s.sentences.append(text)
    s.notes.extend(CAVEATS)
    rules = crit[["run", "predicted", "measured"]]
    if d.noise_curves is not None and len(d.noise_curves):
        s.chart("over-training", lambda: noise_scale_chart(d.noise_curves, rules))
    if d.steps_prediction is not None and len(d.steps_prediction):
        s.chart("steps", lambda: predicted_steps_chart(d.steps_prediction))
    return s
