"""Analysis: pure functions over the export DataFrame (:func:`bsprof.export.trials_frame`).

Nothing here measures or formats: it aggregates trials into per-batch-size tables. Units stay SI
(seconds, bytes, samples/s); rounding and unit scaling belong to the presentation layer.

Size (about 440 lines, above the ~400 guideline): the pure analysis functions (medians, bootstrap intervals, the
steps fit, regimes, trade-off, recommendations); analyze.py composes them once per run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "INPUT_BOUND_FRAC",
    "MAXIMAL_SLOPE",
    "PERFECT_SLOPE",
    "Fits",
    "NoiseScaleFit",
    "add_scaling",
    "bootstrap_median_ci",
    "convergence_analysis",
    "convergence_table",
    "fit_groups",
    "fit_steps_model",
    "input_bound_notes",
    "median_to_target",
    "regime_of",
    "reported_convergence",
    "throughput_table",
    "to_target_values",
]


def _q(series: pd.Series, q: float) -> float:
    return float(series.quantile(q)) if len(series) else math.nan


def _drift(ok: pd.DataFrame) -> dict[str, Any]:
    """Within-trial drift of a batch size's ok throughput trials (columns the engine may not have written)."""
    import pandas as pd

    flags = ok["step_time_drifted"] if "step_time_drifted" in ok.columns else pd.Series(dtype=object)
    rel = pd.to_numeric(ok["step_time_drift_rel"], errors="coerce") if "step_time_drift_rel" in ok.columns else None
    worst = math.nan
    if rel is not None and rel.notna().any():
        worst = float(rel.loc[rel.abs().idxmax()])
    return {"drifted_trials": int(sum(f is True or f == 1 for f in flags.dropna())), "step_time_drift_rel": worst}


INPUT_BOUND_FRAC = 0.2
"""A batch size is *input-bound* when at least this share of its step time is spent waiting for data."""

_DATA_COLUMNS = ("micro_batch_size", "accumulation_steps", "data_wait_s", "data_wait_frac")


def _median(rows: pd.DataFrame, col: str) -> float:
    if col not in rows.columns:
        return math.nan
    v = rows[col].astype(float).dropna()
    return float(v.median()) if len(v) else math.nan


def input_bound_notes(throughput: pd.DataFrame) -> list[str]:
    """One line per input-bound batch size of a :func:`throughput_table`, e.g. ``B=1024: 38% of step time
    waiting for data; add DataLoader workers or make loading cheaper``."""
    if "input_bound" not in throughput.columns:
        return []
    rows = throughput[throughput["input_bound"].fillna(False).astype(bool)]
    return [
        f"B={int(r.batch_size)}: {float(r.data_wait_frac):.0%} of step time waiting for data "
        f"({float(r.data_wait_s) * 1e3:.3g} ms per step); add DataLoader workers or make loading cheaper"
        for r in rows.itertuples()
    ]


def throughput_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, device, batch size): throughput trials aggregated over repeats and seeds.

    Args:
        trials: Rows of the export frame (any kinds; only ``kind == "throughput"`` is used).

    Returns:
        Columns ``workload, device, batch_size, trials, ok, status`` (the worst non-ok status, if any),
        ``samples_per_s`` (median over ok trials), ``samples_per_s_p25``, ``samples_per_s_p75``,
        ``step_time_s`` (median), ``step_time_iqr_s`` (median within-trial IQR), ``peak_mem_bytes``
        (max), ``speedup`` (samples/s relative to the smallest batch size with a measurement),
        ``scaling_efficiency`` (speedup divided by the batch-size ratio; 1 = perfect linear scaling),
        ``drifted_trials`` (ok trials whose step time drifted within the trial, the engine's
        ``step_time_drifted``; 0 where not recorded), ``step_time_drift_rel`` (the largest drift, signed:
        last blocks against first, relative; NaN where not recorded),
        ``micro_batch_size`` and ``accumulation_steps`` (gradient accumulation), ``data_wait_s`` (median seconds
        per step waiting for the next batch; NaN for in-memory data), ``data_wait_frac`` (its median share of
        the step time) and ``input_bound`` (``data_wait_frac >= INPUT_BOUND_FRAC``).
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
        "drifted_trials",
        "step_time_drift_rel",
        *_DATA_COLUMNS,
        "input_bound",
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
                **_drift(ok),
                **{c: _median(ok, c) for c in _DATA_COLUMNS},
            }
        )
    table = pd.DataFrame(rows, columns=cols)
    table["input_bound"] = table["data_wait_frac"].astype(float) >= INPUT_BOUND_FRAC
    for _, g in table.groupby(["workload", "device"]):
        measured = g[g["samples_per_s"].notna()]
        if measured.empty:
            continue
        base = measured.iloc[0]
        speedup = g["samples_per_s"] / base["samples_per_s"]
        table.loc[g.index, "speedup"] = speedup
        table.loc[g.index, "scaling_efficiency"] = speedup / (g["batch_size"] / base["batch_size"])
    return table


# --- convergence -------------------------------------------------------------------------------------------

PERFECT_SLOPE = 0.8
"""Regime threshold: between consecutive batch sizes, steps fall at least as B^-0.8 (a doubling removes
>= 43% of the steps; perfect scaling is B^-1, Shallue et al. 2018)."""

MAXIMAL_SLOPE = 0.15
"""Regime threshold: steps fall more slowly than B^-0.15 (a doubling removes < 10% of the steps):
maximal data parallelism, bigger batches buy (almost) no fewer steps."""

_TO_TARGET = ("steps_to_target", "samples_to_target", "time_to_target_s")


def reported_convergence(trials: pd.DataFrame) -> pd.DataFrame:
    """The convergence trials whose figures are reported: ``main`` and ``final`` phases (tuning trials
    chose the LR; their best-of-K medians are optimistic, so they are not reported)."""
    conv = trials[trials["kind"] == "convergence"]
    if "phase" in conv.columns:
        conv = conv[conv["phase"].fillna("main").isin(["main", "final"])]
    return conv


def to_target_values(values: Iterable[Any], reached: Iterable[bool] | None = None) -> np.ndarray:
    """Per-seed figures to target as floats, a seed that missed the target as ``inf`` (AlgoPerf / MLPerf).

    Args:
        values: Steps, samples or seconds to target per seed; ``None`` or NaN for a seed that missed it.
        reached: Whether each seed reached the target (default: every seed with a value).
    """
    out = np.array([_as_float(x) for x in values], dtype=float)
    if reached is not None:
        out = np.where(np.asarray(list(reached), dtype=bool), out, np.inf)
    return np.where(np.isnan(out), np.inf, out)


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):  # None, pandas' NA
        return math.nan


def median_to_target(values: Iterable[Any], reached: Iterable[bool] | None = None) -> float:
    """The median over seeds of a figure to target, a seed that missed counting as infinitely slow: ``inf``
    when half or more of the seeds missed, NaN with no seed. The one definition every part of bsprof uses."""
    v = to_target_values(values, reached)
    return float(np.median(v)) if len(v) else math.nan


def bootstrap_median_ci(values: np.ndarray, rng: np.random.Generator, n_boot: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the median of ``values``: the 2.5% and 97.5% quantiles of the medians
    of ``n_boot`` resamples drawn with ``rng`` (NaN for no value, the value itself for one)."""
    if len(values) == 0:
        return math.nan, math.nan
    if len(values) == 1:
        return float(values[0]), float(values[0])
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    medians = np.median(values[idx], axis=1)
    lo, hi = np.quantile(medians, [0.025, 0.975], method="inverted_cdf")
    return float(lo), float(hi)


Fits = dict[tuple[str, str], "NoiseScaleFit | None"]
"""Noise-scale fit per (workload, device); ``None`` where fewer than two batch sizes reached the target."""


def convergence_table(trials: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The table of :func:`convergence_analysis` (its fits dropped)."""
    return convergence_analysis(trials, n_boot=n_boot, seed=seed)[0]


def convergence_analysis(trials: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, Fits]:
    """Per (workload, device, batch size): steps-, samples- and time-to-target across seeds, and the fits.

    A seed that missed the target (any status but ``ok``) counts as infinitely slow (the AlgoPerf /
    MLPerf convention): the median is ``inf`` when half or more of the seeds failed.

    Returns:
        Columns ``workload, device, batch_size, lr, seeds, reached, reached_fraction``, and for each of
        ``steps_to_target, samples_to_target, time_to_target_s``: the median and ``_ci_low`` /
        ``_ci_high`` (bootstrap 95% CI of the median), plus ``statuses`` (counts of non-ok statuses),
        ``final_train_metric`` and ``final_val_metric`` (medians), ``generalization_gap``
        (train - validation metric), ``epochs_to_target`` (median), ``bracket_rel_width`` (largest
        (steps - bracket) / steps over the seeds), ``target_fallbacks`` (total), ``train_step_time_s`` with
        ``train_step_time_p25_s`` / ``_p75_s`` (the convergence trials' own training seconds per step, over
        the seeds that reached the target), and the columns of :func:`add_scaling`. The fits are
        :func:`fit_steps_model` per (workload, device), each computed once.
    """
    import numpy as np
    import pandas as pd

    conv = reported_convergence(trials)
    rng = np.random.default_rng(seed)
    rows = []
    for (workload, device, b), g in conv.groupby(["workload", "device", "batch_size"], sort=True):
        ok = g["status"] == "ok"
        row: dict[str, Any] = {
            "workload": workload,
            "device": device,
            "batch_size": int(b),
            "lr": float(g["lr"].median()),
            "seeds": len(g),
            "reached": int(ok.sum()),
            "reached_fraction": float(ok.mean()),
            "statuses": ", ".join(f"{s}: {n}" for s, n in g.loc[~ok, "status"].value_counts().items()),
        }
        for col in _TO_TARGET:
            vals = to_target_values(pd.to_numeric(g[col], errors="coerce"), reached=ok)
            row[col] = float(np.median(vals)) if len(vals) else math.nan
            row[f"{col}_ci_low"], row[f"{col}_ci_high"] = bootstrap_median_ci(vals, rng, n_boot)
        for col in ("final_train_metric", "final_val_metric", "epochs_to_target"):
            row[col] = float(pd.to_numeric(g.loc[ok, col], errors="coerce").median()) if ok.any() else math.nan
        row["generalization_gap"] = row["final_train_metric"] - row["final_val_metric"]
        if ok.any() and "bracket_steps" in g.columns:
            s = pd.to_numeric(g.loc[ok, "steps_to_target"], errors="coerce")
            br = pd.to_numeric(g.loc[ok, "bracket_steps"], errors="coerce")
            row["bracket_rel_width"] = float(((s - br) / s).max())
        else:
            row["bracket_rel_width"] = math.nan
        per_step = (pd.to_numeric(g.loc[ok, "time_to_target_s"], errors="coerce")
                    / pd.to_numeric(g.loc[ok, "steps_to_target"], errors="coerce")).astype(float).dropna()  # fmt: skip
        row["train_step_time_s"] = float(per_step.median()) if len(per_step) else math.nan
        row["train_step_time_p25_s"] = _q(per_step, 0.25)
        row["train_step_time_p75_s"] = _q(per_step, 0.75)
        row["target_fallbacks"] = (
            int(pd.to_numeric(g["target_fallbacks"], errors="coerce").fillna(0).sum())
            if "target_fallbacks" in g.columns
            else 0
        )
        rows.append(row)
    cols = ["workload", "device", "batch_size", "lr", "seeds", "reached", "reached_fraction", "statuses"]
    for col in _TO_TARGET:
        cols += [col, f"{col}_ci_low", f"{col}_ci_high"]
    cols += ["final_train_metric", "final_val_metric", "generalization_gap", "epochs_to_target",
             "bracket_rel_width", "target_fallbacks", "train_step_time_s", "train_step_time_p25_s",
             "train_step_time_p75_s"]  # fmt: skip
    table = pd.DataFrame(rows, columns=cols)
    fits = fit_groups(table)
    return add_scaling(table, fits), fits


def fit_groups(table: pd.DataFrame) -> Fits:
    """:func:`fit_steps_model` of each (workload, device) of a convergence table, on its finite medians."""
    fits: Fits = {}
    for (workload, device), g in table.groupby(["workload", "device"], sort=True):
        finite = g[np.isfinite(g["steps_to_target"].astype(float))]
        fits[(workload, device)] = (
            fit_steps_model(finite["batch_size"], finite["steps_to_target"]) if len(finite) else None
        )
    return fits


def add_scaling(table: pd.DataFrame, fits: Fits) -> pd.DataFrame:
    """Add scaling efficiency, slopes, the noise-scale fit's prediction and a regime per batch size.

    Columns added: ``scaling_efficiency`` E(B) = S(B0)·B0 / (S(B)·B) against the smallest batch size B0
    with a finite median; ``local_slope``, the measured ``-dlog S / dlog B`` from the previous batch size;
    ``model_slope`` = B_noise / (B + B_noise), the slope of the fitted S = S_min(1 + B_noise/B); and
    ``regime`` from ``model_slope`` when the fit is constrained (smooth, robust to seed noise), else from
    ``local_slope`` (see :func:`regime_of`); ``regime_source`` says which.
    """
    table = table.copy()
    for col in ("scaling_efficiency", "local_slope", "model_slope", "fit_steps"):
        table[col] = math.nan
    table["regime"] = None
    table["regime_source"] = None
    for key, g in table.groupby(["workload", "device"], sort=False):
        finite = g[np.isfinite(g["steps_to_target"].astype(float))] if len(g) else g
        if finite.empty:
            continue
        b0, s0 = finite.iloc[0]["batch_size"], finite.iloc[0]["steps_to_target"]
        table.loc[finite.index, "scaling_efficiency"] = (s0 * b0) / (finite["steps_to_target"] * finite["batch_size"])
        idx = list(finite.index)
        if len(idx) > 1:
            slopes = -np.diff(np.log(finite["steps_to_target"].astype(float))) / np.diff(
                np.log(finite["batch_size"].astype(float))
            )
            table.loc[idx[1:], "local_slope"] = slopes
        fit = fits.get(key)
        if fit is not None and fit.constrained:
            bs = g["batch_size"].astype(float)
            table.loc[g.index, "model_slope"] = fit.b_noise / (bs + fit.b_noise)
            table.loc[g.index, "fit_steps"] = fit.s_min * (1 + fit.b_noise / bs)
            table.loc[g.index, "regime"] = [regime_of(x) for x in table.loc[g.index, "model_slope"]]
            table.loc[g.index, "regime_source"] = "fit"
        elif len(idx) > 1:
            for i in idx[1:]:
                table.loc[i, "regime"] = regime_of(float(table.loc[i, "local_slope"]))
            table.loc[idx[0], "regime"] = table.loc[idx[1], "regime"]
            table.loc[idx, "regime_source"] = "measured slope"
    return table


def regime_of(slope: float) -> str:
    """The Shallue et al. regime of a local slope ``-dlog S / dlog B`` (see :data:`PERFECT_SLOPE`)."""
    if slope >= PERFECT_SLOPE:
        return "perfect scaling"
    if slope < MAXIMAL_SLOPE:
        return "maximal data parallelism"
    return "diminishing returns"


@dataclass(frozen=True)
class NoiseScaleFit:
    """Fit of S(B) = S_min (1 + B_noise / B) to median steps-to-target (McCandlish et al. 2018).

    Attributes:
        s_min: Fewest steps to target at infinite batch size.
        b_noise: Noise scale (samples); the critical batch size B_crit = E_min / S_min equals it.
        e_min: Fewest samples to target at tiny batch sizes, S_min·B_noise.
        s_min_se, b_noise_se, e_min_se: Standard errors (from the fit's covariance, delta method for E_min).
        points: Batch sizes used.
        constrained: Whether the data pin the parameters down; else ``reason`` says why.
        reason: Why the fit is flagged, or ``None``.
    """

    s_min: float
    b_noise: float
    e_min: float
    s_min_se: float
    b_noise_se: float
    e_min_se: float
    points: int
    constrained: bool
    reason: str | None = None

    @property
    def b_crit(self) -> float:
        """Critical batch size E_min / S_min (samples)."""
        return self.e_min / self.s_min if self.s_min > 0 else math.nan


def fit_steps_model(batch_sizes: Sequence[float], steps: Sequence[float]) -> NoiseScaleFit | None:
    """Fit S = S_min(1 + B_noise/B) by least squares on log S (relative errors), with scipy.

    Non-finite points (batch sizes where the median seed missed the target) are left out. Returns
    ``None`` with fewer than two usable points. The fit is flagged unconstrained when fewer than three
    points, a relative standard error above 50%, or B_noise outside [B_min/4, 4·B_max] (the data then show
    only one regime).
    """
    import numpy as np
    from scipy.optimize import OptimizeWarning, curve_fit

    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    keep = np.isfinite(s) & (s > 0) & np.isfinite(b) & (b > 0)
    b, s = b[keep], s[keep]
    if len(b) < 2:
        return None

    def model(bb: np.ndarray, log_smin: float, log_bnoise: float) -> np.ndarray:
        return log_smin + np.log1p(np.exp(log_bnoise) / bb)

    p0 = (math.log(s.min()), math.log(float(np.median(b))))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # an undefined covariance is flagged below
            (log_smin, log_bn), pcov = curve_fit(model, b, np.log(s), p0=p0, maxfev=20000)
    except (RuntimeError, ValueError) as e:
        return NoiseScaleFit(math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, len(b), False,
                             f"fit failed: {e}")  # fmt: skip
    s_min, b_noise = math.exp(log_smin), math.exp(log_bn)
    var = np.diag(pcov) if np.all(np.isfinite(pcov)) else np.array([math.inf, math.inf])
    # Standard errors of the parameters from those of their logs (delta method): se(x) = x * se(log x).
    s_min_se = s_min * math.sqrt(var[0])
    b_noise_se = b_noise * math.sqrt(var[1])
    e_min = s_min * b_noise
    cov01 = pcov[0, 1] if np.all(np.isfinite(pcov)) else math.inf
    e_min_se = e_min * math.sqrt(max(var[0] + var[1] + 2 * cov01, 0.0)) if math.isfinite(cov01) else math.inf
    reason = None
    if len(b) < 3:
        reason = f"only {len(b)} batch sizes reached the target"
    elif not (math.isfinite(s_min_se) and math.isfinite(b_noise_se)):
        reason = "the fit's covariance is undefined"
    elif s_min_se / s_min > 0.5 or b_noise_se / b_noise > 0.5:
        reason = "parameters uncertain by more than 50%"
    elif not (b.min() / 4 <= b_noise <= 4 * b.max()):
        reason = f"B_noise {b_noise:.3g} lies outside the swept batch sizes"
    return NoiseScaleFit(s_min, b_noise, e_min, s_min_se, b_noise_se, e_min_se, len(b), reason is None, reason)
