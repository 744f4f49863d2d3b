"""The noise-scale side of the analysis: predicted critical batch size beside the measured (fitted) one.

Convergence trials run with ``--measure-gns`` store, per measured evaluation, the gradient noise scale B_simple
(:mod:`bsprof.noise_scale`, McCandlish et al. 2018) in their learning curve, and as trial metrics the value at
their last evaluation — the one that reached the target, when it was reached (``gns_b_simple``, with its
bootstrap interval ``gns_b_simple_low``/``gns_b_simple_high``). The paper finds the critical batch size of a
target tracks the noise scale at the loss the target corresponds to (both grow as the loss falls), so the
prediction is B_crit ≈ B_noise ≈ B_simple at the target:

- predicted B_crit: the trials' mean tr(Σ) estimate over their mean |G|² estimate at their last evaluation
  (``gns_trace_cov``, ``gns_grad_sq``; trials that reached the target when any did) — separate averages, then
  the ratio, as the paper smooths — with a bootstrap interval over trials (a single trial: its own interval);
- measured B_crit: B_noise of :func:`bsprof.analysis.fit_steps_model` on the median steps-to-target;
- their ratio, with an interval combining both uncertainties on the log scale (independent errors; the
  predicted interval read as ±1.645 standard errors, the fitted one from the fit's covariance);
- S(B) = S_min(1 + B_noise/B) predicted, S_min calibrated by the smallest batch size's median steps-to-target,
  beside the measured medians; and the batch size predicted fastest in wall-clock from the throughput step
  times, S(B)·step_time(B) (S_min cancels).

What the prediction cannot know is stated with it (:data:`CAVEATS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bsprof.noise_scale import StepsPrediction, fastest_batch_size

if TYPE_CHECKING:
    import pandas as pd

    from bsprof.analysis import NoiseScaleFit
    from bsprof.store import Store

__all__ = [
    "CAVEATS",
    "GNS_METRICS",
    "CriticalBatch",
    "critical_batches",
    "critical_table",
    "noise_scale_table",
    "prediction_trials",
    "steps_prediction_table",
]

GNS_METRICS = ("gns_b_simple", "gns_b_simple_low", "gns_b_simple_high", "gns_grad_sq", "gns_trace_cov", "gns_time_s")
"""Trial metrics a convergence trial with ``--measure-gns`` stores (examples; seconds for the time)."""

CAVEATS = (
    "B_simple approximates B_noise only when the loss's Hessian is well conditioned (McCandlish et al. 2018, "
    "§2.2); otherwise B_noise = tr(HΣ)/(GᵀHG), and with it the critical batch size, can differ from it several-fold.",
    "The noise scale grows as the loss falls: an estimate from early training underestimates the value near "
    "the target, and so the critical batch size.",
    "S(B) = S_min(1 + B_noise/B) assumes a well-tuned learning rate at every batch size; a fixed or "
    "linearly-scaled-and-capped LR bends the measured curve away from it.",
)
"""What a noise-scale prediction cannot know (printed with it)."""

_Z90 = 1.6448536269514722  # two-sided 90% normal quantile


def _num(frame: pd.DataFrame, col: str) -> np.ndarray:
    import pandas as pd

    if col not in frame:
        return np.full(len(frame), math.nan)
    return pd.to_numeric(frame[col].replace({"inf": math.inf}), errors="coerce").to_numpy(dtype=float)


def _gns_trials(trials: pd.DataFrame) -> pd.DataFrame:
    if "gns_b_simple" not in trials.columns:
        return trials.iloc[0:0]
    conv = trials[(trials["kind"] == "convergence") & (trials["status"].isin(["ok", "budget_exhausted"]))]
    return conv[np.isfinite(_num(conv, "gns_b_simple"))]


def prediction_trials(store: Store, workload: str, trials: pd.DataFrame) -> pd.DataFrame:
    """The trials whose noise-scale measurements predict a run's B_crit: the run's own ``trials`` when they
    measured it (``--measure-gns``), else those of the workload's latest ``bsprof predict`` run, if any."""
    from bsprof.export import trials_frame

    if "gns_b_simple" in trials.columns and trials["gns_b_simple"].notna().any():
        return trials
    predicts = [r for r in store.runs() if r.workload == workload and r.config.get("mode") == "predict"]
    if not predicts:
        return trials
    return trials_frame(store, [max(predicts, key=lambda r: r.created_at).run_id])


def noise_scale_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, device, batch size): B_simple at the last evaluation of the trials that measured it.

    Columns: ``workload, device, batch_size, trials, reached, b_simple`` (median, examples),
    ``b_simple_p25, b_simple_p75`` (over trials) and ``gns_time_s`` (median seconds spent measuring per trial).
    """
    import pandas as pd

    cols = ["workload", "device", "batch_size", "trials", "reached", "b_simple", "b_simple_p25", "b_simple_p75",
            "gns_time_s"]  # fmt: skip
    g = _gns_trials(trials)
    rows = []
    for (w, d, b), grp in g.groupby(["workload", "device", "batch_size"], sort=True):
        v = _num(grp, "gns_b_simple")
        rows.append(
            {
                "workload": w, "device": d, "batch_size": int(b), "trials": len(grp),
                "reached": int(grp["reached_target"].fillna(False).astype(bool).sum()),
                "b_simple": float(np.median(v)), "b_simple_p25": float(np.quantile(v, 0.25)),
                "b_simple_p75": float(np.quantile(v, 0.75)), "gns_time_s": float(np.nanmedian(_num(grp, "gns_time_s"))),
            }
        )  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


@dataclass(frozen=True)
class CriticalBatch:
    """Predicted (noise scale) and measured (fitted) critical batch size of one workload on one device.

    Attributes:
        workload: Workload name.
        device: Device label.
        predicted: Predicted B_crit (examples), ``None`` without a noise-scale measurement.
        predicted_low: Lower end of its 90% interval (examples).
        predicted_high: Upper end (examples; ``inf`` when |G|² was not resolved in part of the resamples).
        predicted_trials: Trials the prediction pools.
        at_target: Whether the pooled values were measured at the target (else at the end of a budget: early).
        measured: Fitted B_noise = B_crit of :func:`~bsprof.analysis.fit_steps_model` (examples), ``None`` if no fit.
        measured_se: Its standard error (examples).
        measured_constrained: Whether the fit pins B_noise down (see the fit's ``reason``).
        ratio: predicted / measured.
        ratio_low: Lower end of the ratio's 90% interval.
        ratio_high: Upper end.
        confidence: ``high``, ``medium`` or ``low``: the interval's half-width within 25% / 50% of the value, measured
            at the target, and (for ``high``) pooled over more than one trial — a single trial's interval holds the
            probes' noise, not the spread between seeds.
        prediction: The S(B) model with the predicted B_noise (S_min calibrated where a batch size reached
            the target), ``None`` without a prediction.
        fastest_batch_size: The batch size predicted fastest in wall-clock on this device, ``None`` without
            throughput step times.
    """

    workload: str
    device: str
    predicted: float | None
    predicted_low: float | None
    predicted_high: float | None
    predicted_trials: int
    at_target: bool
    measured: float | None
    measured_se: float | None
    measured_constrained: bool
    ratio: float | None
    ratio_low: float | None
    ratio_high: float | None
    confidence: str
    prediction: StepsPrediction | None
    fastest_batch_size: int | None


def _pooled(g: pd.DataFrame, n_boot: int, seed: int) -> tuple[float, float, float, bool]:
    """B_simple pooled over trials: the ratio of their mean tr(Σ) and mean |G|² estimates (never a mean of
    ratios), with a bootstrap over trials; one trial keeps its own interval."""
    reached = g["reached_target"].fillna(False).astype(bool).to_numpy()
    use = g[reached] if reached.any() else g
    grad, trace = _num(use, "gns_grad_sq"), _num(use, "gns_trace_cov")
    if len(use) == 1 or not (np.isfinite(grad).all() and np.isfinite(trace).all()):
        v = _num(use, "gns_b_simple")
        return float(np.median(v)), float(np.min(_num(use, "gns_b_simple_low"))), float(
            np.max(_num(use, "gns_b_simple_high"))), bool(reached.any())  # fmt: skip
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(use), size=(n_boot, len(use)))
    g_mean, t_mean = grad[idx].mean(axis=1), trace[idx].mean(axis=1)
    ratios = np.where(g_mean > 0, t_mean / np.where(g_mean > 0, g_mean, 1.0), np.inf)
    lo = float(np.quantile(ratios, 0.05, method="lower"))
    hi = float(np.quantile(ratios, 0.95, method="higher"))
    point = float(trace.mean() / grad.mean()) if grad.mean() > 0 else math.inf
    return point, lo, hi, bool(reached.any())


def _log_se(low: float | None, high: float | None) -> float:
    if low is None or high is None or not (low > 0 and math.isfinite(high) and high >= low):
        return math.inf
    return (math.log(high) - math.log(low)) / (2 * _Z90)


def _confidence(low: float, high: float, value: float, at_target: bool) -> str:
    width = (high - low) / (2 * value) if value > 0 and math.isfinite(high) and math.isfinite(low) else math.inf
    if not at_target or width > 0.5:
        return "low"
    return "high" if width <= 0.25 else "medium"


def critical_batches(
    trials: pd.DataFrame,
    fits: Mapping[tuple[str, str], NoiseScaleFit | None],
    convergence: pd.DataFrame,
    throughput: pd.DataFrame,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> list[CriticalBatch]:
    """Predicted beside measured critical batch size per (workload, device) with a prediction or a fit.

    Args:
        trials: The run's export frame (the noise-scale metrics of its convergence trials).
        fits: The steps-model fits per (workload, device) (:func:`bsprof.analysis.convergence_analysis`).
        convergence: The convergence table (median ``steps_to_target`` per batch size) to calibrate S_min.
        throughput: The throughput table (median ``step_time_s`` per batch size) for the fastest batch size.
        n_boot: Bootstrap resamples over trials.
        seed: Seed of the bootstrap.
    """
    g_all = _gns_trials(trials)
    keys = {(str(w), str(d)) for w, d in g_all[["workload", "device"]].itertuples(index=False)}
    keys |= {k for k, f in fits.items() if f is not None}
    out = []
    for w, d in sorted(keys):
        g = g_all[(g_all["workload"] == w) & (g_all["device"] == d)]
        fit = fits.get((w, d))
        measured = fit.b_noise if fit is not None and math.isfinite(fit.b_noise) else None
        measured_se = fit.b_noise_se if measured is not None else None
        pred = lo = hi = None
        at_target = False
        prediction = fastest = None
        ratio = r_lo = r_hi = None
        confidence = "low"
        if len(g):
            pred, lo, hi, at_target = _pooled(g, n_boot, seed)
            confidence = _confidence(lo, hi, pred, at_target)
            if len(g) == 1 and confidence == "high":  # one trial's interval holds probe noise, not seed-to-seed
                confidence = "medium"
            prediction = StepsPrediction(pred, lo, hi, _s_min(convergence, w, d, pred))
            fastest = _fastest(throughput, w, d, pred)
            if measured is not None and measured > 0:
                ratio = pred / measured
                se = math.hypot(_log_se(lo, hi), (measured_se or math.inf) / measured)
                r_lo, r_hi = (ratio * math.exp(-_Z90 * se), ratio * math.exp(_Z90 * se)) if math.isfinite(se) else (
                    0.0, math.inf)  # fmt: skip
        out.append(
            CriticalBatch(
                w,
                d,
                pred,
                lo,
                hi,
                len(g),
                at_target,
                measured,
                measured_se,
                bool(fit is not None and fit.constrained),
                ratio,
                r_lo,
                r_hi,
                confidence,
                prediction,
                fastest,
            )
        )
    return out


def critical_table(critical: Sequence[CriticalBatch]) -> pd.DataFrame:
    """The :class:`CriticalBatch` records as a frame (one row each, their scalar attributes)."""
    import pandas as pd

    cols = [f for f in CriticalBatch.__dataclass_fields__ if f != "prediction"]
    rows = [{c: getattr(cb, c) for c in cols} | {"s_min": cb.prediction.s_min if cb.prediction else None}
            for cb in critical]  # fmt: skip
    return pd.DataFrame(rows, columns=[*cols, "s_min"])


def _rows(frame: pd.DataFrame, w: str, d: str) -> pd.DataFrame:
    if frame.empty or "workload" not in frame:
        return frame.iloc[0:0]
    return frame[(frame["workload"] == w) & (frame["device"] == d)].sort_values("batch_size")


def _s_min(convergence: pd.DataFrame, w: str, d: str, b_noise: float) -> float | None:
    rows = _rows(convergence, w, d)
    for b, s in zip(rows["batch_size"], _num(rows, "steps_to_target")):
        if math.isfinite(s) and s > 0:
            return float(s) / (1 + b_noise / float(b))  # the smallest batch size that reached the target
    return None


def _fastest(throughput: pd.DataFrame, w: str, d: str, b_noise: float) -> int | None:
    rows = _rows(throughput, w, d)
    t = _num(rows, "step_time_s")
    if not np.isfinite(t).any():
        return None
    return fastest_batch_size([int(b) for b in rows["batch_size"]], list(t), b_noise)


def steps_prediction_table(
    critical: list[CriticalBatch], convergence: pd.DataFrame, throughput: pd.DataFrame
) -> pd.DataFrame:
    """Predicted S(B) beside the measured median steps-to-target, per (workload, device, batch size).

    The batch sizes are those of the convergence and the throughput tables (a ``bsprof predict`` run has one
    convergence trial and a throughput pass over all of them).

    Columns: ``workload, device, batch_size, measured_steps`` (median; NaN where not measured or missed),
    ``predicted_steps``, ``predicted_low``, ``predicted_high`` (S(B) at the ends of the B_noise interval),
    ``step_time_s`` (median throughput step time), ``predicted_time_s`` (S(B)·step time; seconds of S_min-step
    units when relative) and ``relative`` (True: in units of S_min, no batch size having reached the target).
    """
    import pandas as pd

    cols = ["workload", "device", "batch_size", "measured_steps", "predicted_steps", "predicted_low",
            "predicted_high", "step_time_s", "predicted_time_s", "relative"]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for cb in critical:
        if cb.prediction is None:
            continue
        p = cb.prediction
        conv = _rows(convergence, cb.workload, cb.device)
        measured = {int(b): float(s) for b, s in zip(conv["batch_size"], _num(conv, "steps_to_target"))}
        tp = _rows(throughput, cb.workload, cb.device)
        step_time = {int(b): float(t) for b, t in zip(tp["batch_size"], _num(tp, "step_time_s"))}
        sizes = sorted(set(measured) | set(step_time))
        for b in sizes:
            t = step_time.get(b, math.nan)
            rows.append(
                {
                    "workload": cb.workload,
                    "device": cb.device,
                    "batch_size": b,
                    "measured_steps": measured.get(b, math.nan),
                    "predicted_steps": p.steps(b),
                    "predicted_low": p.steps(b, p.b_noise_low) if p.b_noise_low is not None else math.nan,
                    "predicted_high": p.steps(b, p.b_noise_high) if p.b_noise_high is not None else math.nan,
                    "step_time_s": t,
                    "predicted_time_s": p.steps(b) * t,
                    "relative": p.s_min is None,
                }
            )
    return pd.DataFrame(rows, columns=cols)
