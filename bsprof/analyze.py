"""One analysis of a run's trials: :func:`analyze` derives every table the console and the report show, once.

The per-batch-size statistics are :mod:`bsprof.analysis` (throughput, convergence, scaling, the noise-scale
fit); this module joins them into the trade-off and the recommendation and adds the views the report needs
(GPU telemetry medians, LR tuning, final training state, operator shares, the generalization-gap trend,
measured against estimated time-to-target), held in one typed :class:`Analysis`. Presentation formats these
frames and computes nothing of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bsprof import analysis
from bsprof.analysis import Fits, NoiseScaleFit
from bsprof.noise_analysis import CriticalBatch, critical_batches, noise_scale_table, steps_prediction_table
from bsprof.stability import stability_table

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "GAP_TREND_RHO",
    "GPU_COLUMNS",
    "Analysis",
    "Recommendation",
    "analyze",
    "final_state_table",
    "gap_trend",
    "gpu_table",
    "lr_tuning_table",
    "operator_shares",
    "pareto_front",
    "recommend",
    "tradeoff_table",
]

GPU_COLUMNS = ("gpu_util_pct", "power_w", "energy_per_sample_j")
"""Telemetry medians of :func:`gpu_table` (NaN where not measured)."""

GAP_TREND_RHO = 0.5
"""|Spearman rho| of generalization gap vs batch size above which :func:`gap_trend` calls it a trend."""

_GROUP = ["workload", "device"]


@dataclass(frozen=True)
class Analysis:
    """Every derived table of one run (SI units; one row per workload, device and batch size unless noted).

    Attributes:
        throughput: :func:`bsprof.analysis.throughput_table`.
        convergence: :func:`bsprof.analysis.convergence_table` (with scaling, regimes and fitted steps).
        tradeoff: :func:`tradeoff_table`, with the Pareto flags ``pareto_time_samples`` and
            (where energy was measured) ``pareto_time_energy``.
        recommendations: One per (workload, device), each with its noise-scale fit.
        gpu: :func:`gpu_table`.
        lr_tuning: :func:`lr_tuning_table`.
        gap_trend: :func:`gap_trend`.
        critical_batches: Predicted (noise scale) beside fitted critical batch size per (workload, device)
            (:func:`bsprof.noise_analysis.critical_batches`).
        noise_scale: :func:`bsprof.noise_analysis.noise_scale_table`.
        steps_prediction: :func:`bsprof.noise_analysis.steps_prediction_table`.
        stability: :func:`bsprof.stability.stability_table` (busy / unstable / stable per batch size).
        input_bound: :func:`bsprof.analysis.input_bound_notes` of the throughput table (one line per
            input-bound batch size).
    """

    throughput: pd.DataFrame
    convergence: pd.DataFrame
    tradeoff: pd.DataFrame
    recommendations: tuple[Recommendation, ...]
    gpu: pd.DataFrame
    lr_tuning: pd.DataFrame
    gap_trend: pd.DataFrame
    critical_batches: tuple[CriticalBatch, ...] = ()
    noise_scale: pd.DataFrame | None = None
    steps_prediction: pd.DataFrame | None = None
    stability: pd.DataFrame | None = None
    input_bound: tuple[str, ...] = ()


def analyze(trials: pd.DataFrame, lr_rule: str | None = None, noise_trials: pd.DataFrame | None = None) -> Analysis:
    """Derive every table of one run's trials, each analysis function running once.

    Args:
        trials: The export frame (:func:`bsprof.export.trials_frame`) of one run.
        lr_rule: The run's LR rule (a ``fixed`` rule adds a warning to the recommendations).
        noise_trials: Trials whose noise-scale measurements make the prediction (a ``bsprof predict`` run of the
            same workload); default: ``trials`` (a sweep run with ``--measure-gns``).
    """
    tp = analysis.throughput_table(trials)
    conv, fits = analysis.convergence_analysis(trials)
    trade = tradeoff_table(conv, tp, trials)
    trade["pareto_time_samples"] = pareto_front(trade, "samples_to_target", "wallclock_to_target_s")
    if "energy_to_target_j" in trade.columns:
        trade["pareto_time_energy"] = pareto_front(trade, "energy_to_target_j", "wallclock_to_target_s")
    gns_trials = trials if noise_trials is None else noise_trials
    critical = critical_batches(gns_trials, fits, conv, tp)
    return Analysis(
        throughput=tp,
        convergence=conv,
        tradeoff=trade,
        recommendations=tuple(recommend(trade, fits, lr_rule)),
        gpu=gpu_table(trials),
        lr_tuning=lr_tuning_table(trials),
        gap_trend=gap_trend(conv),
        critical_batches=tuple(critical),
        noise_scale=noise_scale_table(gns_trials),
        steps_prediction=steps_prediction_table(critical, conv, tp),
        stability=stability_table(trials),
        input_bound=tuple(analysis.input_bound_notes(tp)),
    )


def gpu_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, device, batch size): the median ``gpu_util_pct``, ``power_w`` and ``energy_per_sample_j``
    of the ok throughput trials (NaN where not measured)."""
    import pandas as pd

    keys = [*_GROUP, "batch_size"]
    ok = trials[(trials["kind"] == "throughput") & (trials["status"] == "ok")]
    if ok.empty:
        return pd.DataFrame(columns=[*keys, *GPU_COLUMNS])
    vals = pd.DataFrame(
        {c: pd.to_numeric(ok[c], errors="coerce") if c in ok else math.nan for c in GPU_COLUMNS}, index=ok.index
    )
    for k in keys:
        vals[k] = ok[k].astype(int) if k == "batch_size" else ok[k]
    return vals.groupby(keys).median().reset_index()[[*keys, *GPU_COLUMNS]]


def lr_tuning_table(trials: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, device, batch size, LR) of the ``tune`` phase: ``seeds``, ``reached``,
    ``steps_to_target`` (:func:`bsprof.analysis.median_to_target`), ``chosen`` (the LR the ``final`` phase
    re-ran), ``best`` (the lowest finite median at that batch size) and ``best_on_edge`` (the best LR is the
    smallest or largest of a grid of 3 or more: a better one may lie outside it)."""
    import pandas as pd

    keys = [*_GROUP, "batch_size", "lr"]
    cols = [*keys, "seeds", "reached", "steps_to_target", "chosen", "best", "best_on_edge"]
    conv = trials[trials["kind"] == "convergence"]
    phase = conv["phase"] if "phase" in conv.columns else pd.Series("main", index=conv.index)
    tune = conv[phase == "tune"]
    if tune.empty:
        return pd.DataFrame(columns=cols)
    final = conv[phase == "final"]
    chosen = {(w, d, int(b), round(float(lr), 12)) for w, d, b, lr in final[keys].itertuples(index=False)}
    rows = []
    for (w, d, b, lr), g in tune.groupby(keys, sort=True):
        ok = (g["status"] == "ok").to_numpy()
        rows.append(
            {
                "workload": w,
                "device": d,
                "batch_size": int(b),
                "lr": float(lr),
                "seeds": len(g),
                "reached": int(ok.sum()),
                "steps_to_target": analysis.median_to_target(g["steps_to_target"], reached=ok),
                "chosen": (w, d, int(b), round(float(lr), 12)) in chosen,
            }
        )
    table = pd.DataFrame(rows, columns=cols)
    table["best"] = False
    table["best_on_edge"] = False
    for _, g in table.groupby([*_GROUP, "batch_size"]):
        steps = g["steps_to_target"].astype(float)
        if not np.isfinite(steps).any():
            continue
        i = steps[np.isfinite(steps)].idxmin()
        table.loc[i, "best"] = True
        lrs = sorted(g["lr"])
        table.loc[i, "best_on_edge"] = len(lrs) > 2 and table.loc[i, "lr"] in (lrs[0], lrs[-1])
    return table


def final_state_table(curves: pd.DataFrame, keys: Sequence[str] = ("run", "batch_size")) -> pd.DataFrame:
    """Per ``keys``: the median over trials of each learning curve's last ``weight_distance`` and
    ``grad_norm``, and ``seeds`` (trials counted).

    Args:
        curves: Learning-curve rows with ``trial_id``, ``step``, ``keys`` and those two columns.
        keys: Grouping columns.
    """
    import pandas as pd

    keys = list(keys)
    if curves.empty:
        return pd.DataFrame(columns=[*keys, "weight_distance", "grad_norm", "seeds"])
    last = curves.sort_values("step").groupby("trial_id").tail(1)
    g = last.groupby(keys)
    out = g[["weight_distance", "grad_norm"]].median()
    out["seeds"] = g.size()
    return out.reset_index()


def operator_shares(ops: pd.DataFrame, keys: Sequence[str] = ("run", "batch_size")) -> pd.DataFrame:
    """``ops`` with ``share_pct``: each operator's self time per step as a percentage of the total over the
    operators listed for its ``keys`` (one profiled trial)."""
    ops = ops.copy()
    total = ops.groupby(list(keys))["self_s_per_step"].transform("sum")
    ops["share_pct"] = 100.0 * ops["self_s_per_step"] / total.where(total > 0, 1.0)
    return ops


def gap_trend(convergence: pd.DataFrame) -> pd.DataFrame:
    """Per (workload, device): does the generalization gap (final train - validation metric) change with the
    batch size? Spearman's rho over the batch sizes with a finite gap (Keskar et al. 2016 report larger gaps
    for large batches).

    Returns:
        Columns ``workload, device, points, rho`` (0 when the gap is constant; NaN with fewer than 2 points),
        ``trend`` (``grows``, ``shrinks`` or ``none``, by :data:`GAP_TREND_RHO`), and the batch sizes and gaps
        of the smallest and largest gap: ``min_gap_batch_size, min_gap, max_gap_batch_size, max_gap``.
    """
    import pandas as pd

    cols = [*_GROUP, "points", "rho", "trend", "min_gap_batch_size", "min_gap", "max_gap_batch_size", "max_gap"]
    rows = []
    for (w, d), g in convergence.groupby(_GROUP, sort=True):
        gap = pd.to_numeric(g["generalization_gap"], errors="coerce").astype(float)
        ok = g.assign(gap=gap)[np.isfinite(gap)]
        if len(ok) < 2:
            rows.append({"workload": w, "device": d, "points": len(ok), "rho": math.nan, "trend": "none"})
            continue
        rho = (
            float(ok["batch_size"].astype(float).corr(ok["gap"], method="spearman")) if ok["gap"].nunique() > 1 else 0.0
        )
        lo, hi = ok.loc[ok["gap"].idxmin()], ok.loc[ok["gap"].idxmax()]
        trend = "grows" if rho > GAP_TREND_RHO else "shrinks" if rho < -GAP_TREND_RHO else "none"
        rows.append(
            {
                "workload": w,
                "device": d,
                "points": len(ok),
                "rho": rho,
                "trend": trend,
                "min_gap_batch_size": int(lo["batch_size"]),
                "min_gap": float(lo["gap"]),
                "max_gap_batch_size": int(hi["batch_size"]),
                "max_gap": float(hi["gap"]),
            }
        )
    return pd.DataFrame(rows, columns=cols)


# --- the trade-off and the recommendation ---------------------------------------------------------------


def tradeoff_table(convergence: pd.DataFrame, throughput: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """Both halves side by side per (workload, device, batch size).

    Wall-clock-to-target is estimated as median steps-to-target x median throughput step time
    (``wallclock_to_target_s``), which is less noisy than the convergence trials' own training seconds
    (``time_to_target_s``, kept beside it). ``time_to_target_ratio`` is measured / estimated, and
    ``time_estimate_disagrees`` is True where the two per-step times differ by more than their noise: the
    convergence trials' p25-p75 seconds per step does not overlap the throughput trials' spread (p25-p75 over
    trials widened by the median within-trial IQR). Energy-to-target is samples-to-target x energy per sample
    where the throughput trials measured energy.

    Args:
        convergence: :func:`convergence_table`.
        throughput: :func:`throughput_table`.
        trials: The export frame they came from (for the energy medians).
    """
    import pandas as pd

    keys = ["workload", "device", "batch_size"]
    tp = throughput
    tp_cols = [*keys, "samples_per_s", "samples_per_s_p25", "samples_per_s_p75", "step_time_s", "step_time_iqr_s",
               "peak_mem_bytes", "trials", "ok", "status", "drifted_trials", "step_time_drift_rel"]  # fmt: skip
    if "energy_per_sample_j" in trials.columns:
        e = trials[(trials["kind"] == "throughput") & (trials["status"] == "ok")]
        energy = e.groupby(keys)["energy_per_sample_j"].median().rename("energy_per_sample_j").reset_index()
        tp = tp.merge(energy, on=keys, how="left")
        tp_cols.append("energy_per_sample_j")
    renamed = {"status": "throughput_status", "trials": "throughput_trials", "ok": "throughput_ok"}
    merged = convergence.merge(tp[tp_cols].rename(columns=renamed), on=keys, how="outer")
    merged = merged.sort_values(keys).reset_index(drop=True)
    merged["wallclock_to_target_s"] = merged["steps_to_target"] * merged["step_time_s"]
    if "energy_per_sample_j" in merged.columns:
        merged["energy_to_target_j"] = merged["samples_to_target"] * merged["energy_per_sample_j"]
    names = ("time_to_target_s", "wallclock_to_target_s", "batch_size", "step_time_s", "step_time_iqr_s",
             "samples_per_s_p25", "samples_per_s_p75", "train_step_time_p25_s", "train_step_time_p75_s")  # fmt: skip
    col = {c: pd.to_numeric(merged[c], errors="coerce").astype(float).to_numpy() for c in names}
    measured, estimate = col["time_to_target_s"], col["wallclock_to_target_s"]
    with np.errstate(invalid="ignore", divide="ignore"):
        both = np.isfinite(measured) & np.isfinite(estimate) & (estimate > 0)
        merged["time_to_target_ratio"] = np.where(both, measured / np.where(both, estimate, 1.0), np.nan)
        half_iqr = np.nan_to_num(col["step_time_iqr_s"]) / 2
        tp_lo = np.fmin(col["batch_size"] / col["samples_per_s_p75"], col["step_time_s"] - half_iqr)
        tp_hi = np.fmax(col["batch_size"] / col["samples_per_s_p25"], col["step_time_s"] + half_iqr)
        lo, hi = col["train_step_time_p25_s"], col["train_step_time_p75_s"]
        apart = np.isfinite(lo) & np.isfinite(tp_lo) & np.isfinite(tp_hi) & ((lo > tp_hi) | (hi < tp_lo))
    merged["time_estimate_disagrees"] = both & apart
    return merged


def pareto_front(table: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Boolean mask of the rows not dominated in (``x``, ``y``), both minimised; non-finite rows are False."""
    import numpy as np

    xs = table[x].astype(float).to_numpy()
    ys = table[y].astype(float).to_numpy()
    ok = np.isfinite(xs) & np.isfinite(ys)
    mask = []
    for i in range(len(xs)):
        if not ok[i]:
            mask.append(False)
            continue
        dominated = ok & (xs <= xs[i]) & (ys <= ys[i]) & ((xs < xs[i]) | (ys < ys[i]))
        mask.append(not dominated.any())
    import pandas as pd

    return pd.Series(mask, index=table.index)


@dataclass(frozen=True)
class Recommendation:
    """The batch sizes that minimise each cost, for one (workload, device)."""

    workload: str
    device: str
    fastest_wallclock: int | None
    fewest_samples: int | None
    least_energy: int | None
    fit: NoiseScaleFit | None
    lr_rule: str | None = None
    warnings: tuple[str, ...] = ()


def recommend(tradeoff: pd.DataFrame, fits: Fits, lr_rule: str | None = None) -> list[Recommendation]:
    """Per (workload, device): the batch size with the lowest wall-clock-to-target, the one with the fewest
    samples-to-target, the one with the least energy-to-target (where measured), and the noise-scale fit.

    Args:
        tradeoff: :func:`tradeoff_table`.
        fits: :func:`convergence_analysis`'s fits.
        lr_rule: The run's LR rule (``fixed`` adds a warning).
    """
    out = []
    for (workload, device), g in tradeoff.groupby(["workload", "device"], sort=True):

        def argmin(col: str, g: pd.DataFrame = g) -> int | None:
            if col not in g.columns:
                return None
            v = g[col].astype(float)
            v = v[np.isfinite(v)]
            return int(g.loc[v.idxmin(), "batch_size"]) if len(v) else None

        warnings = []
        if lr_rule == "fixed":
            warnings.append("LR rule 'fixed': one LR at every batch size makes large batches look worse than "
                            "they are (Shallue et al. 2018); use --lr-rule linear or --tune-lr")  # fmt: skip
        out.append(Recommendation(workload, device, argmin("wallclock_to_target_s"), argmin("samples_to_target"),
                                  argmin("energy_to_target_j"), fits.get((workload, device)), lr_rule,
                                  tuple(warnings)))  # fmt: skip
    return out
