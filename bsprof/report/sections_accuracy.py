"""The optimization-side sections of the report: steps, samples and time to target, learning curves,
generalization, LR sensitivity."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bsprof.report import charts

if TYPE_CHECKING:
    import pandas as pd

    from bsprof.report.data import ReportData

from bsprof.formatting import format_number, format_ratio, format_seconds, format_sig, join_sizes, plus_minus
from bsprof.report.text import Section, by_run, finite_mask, run_prefix

__all__ = ["curves_section", "generalization_section", "lr_section", "steps_section", "to_target_section"]


def _regime_text(g: pd.DataFrame) -> str:
    runs: list[tuple[str, list[int]]] = []
    for b, reg in zip(g["batch_size"], g["regime"], strict=False):
        if not isinstance(reg, str):
            continue
        if runs and runs[-1][0] == reg:
            runs[-1][1].append(int(b))
        else:
            runs.append((reg, [int(b)]))
    parts = []
    for reg, bs in runs:
        parts.append(f"{reg} at B={bs[0]}" if len(bs) == 1 else f"{reg} for B={bs[0]}–{bs[-1]}")
    return ", ".join(parts)


def _no_convergence(d: ReportData, s: Section, store_hint: str) -> bool:
    conv = d.trials[d.trials["kind"] == "convergence"]
    if conv.empty:
        s.notes.append(
            f"No convergence trials in these runs: run `bsprof sweep --kind convergence {store_hint}` "
            "(or `--kind both`) to measure steps, samples and time to the target."
        )
        return True
    return False


def steps_section(d: ReportData, store_hint: str) -> Section:
    """Section 5: steps to target, the regimes and the noise-scale fit."""
    s = Section("steps", "5. Steps to target and the critical batch size")
    if _no_convergence(d, s, store_hint):
        return s
    c = d.convergence
    many = len(d.runs) > 1
    for run, g in by_run(c, d):
        g = g.sort_values("batch_size")
        fin = g[finite_mask(g, "steps_to_target")]
        missed = g[~finite_mask(g, "steps_to_target")]
        if fin.empty:
            s.sentences.append(
                f"{run_prefix(run, many)}No batch size reached the target on the median seed "
                f"({_statuses(g)}); raise `--max-epochs`/`--max-time` or lower `--target`."
            )
            continue
        a, z = fin.iloc[0], fin.iloc[-1]
        text = (
            f"{run_prefix(run, many)}Steps to target fall from {format_number(a['steps_to_target'])} at "
            f"B={int(a['batch_size'])}"
        )
        if len(fin) > 1:
            text += (
                f" to {format_number(z['steps_to_target'])} at B={int(z['batch_size'])}: "
                f"{format_ratio(a['steps_to_target'], z['steps_to_target'])} fewer steps for "
                f"{format_ratio(z['batch_size'], a['batch_size'])} the batch"
            )
        reg = _regime_text(g)
        if reg:
            text += f"; {reg}"
        s.sentences.append(text + ".")
        fit = d.fits[d.fits["run"] == run]
        if len(fit):
            f = fit.iloc[0]
            if bool(f["constrained"]):
                s.sentences.append(
                    f"{run_prefix(run, many)}Fit S = S_min(1 + B_noise/B): S_min = "
                    f"{plus_minus(f['s_min'], f['s_min_se'])} "
                    f"steps, B_noise = B_crit = {plus_minus(f['b_noise'], f['b_noise_se'])} samples, "
                    f"E_min = {format_sig(f['e_min'])} samples (McCandlish et al. 2018)."
                )
            else:
                s.sentences.append(
                    f"{run_prefix(run, many)}The noise-scale fit is not constrained ({f['reason']}), so "
                    "no fitted curve is drawn; the regimes come from measured slopes."
                )
        if len(missed):
            s.sentences.append(
                f"{run_prefix(run, many)}B={join_sizes(missed['batch_size'])}: the median seed missed the target "
                f"({_statuses(missed)})."
            )
    rules = {r.label: r.lr_rule for r in d.runs}
    if any(v == "fixed" for v in rules.values()):
        s.notes.append(
            "LR rule 'fixed': one learning rate at every batch size makes large batches look worse than "
            "they are (Shallue et al. 2018); re-run with `--lr-rule linear` or `--tune-lr 3`."
        )
    s.chart("steps", lambda: charts.steps_to_target_chart(c, d.fits))
    return s


def _statuses(g: pd.DataFrame) -> str:
    text = "; ".join(x for x in g.get("statuses", []) if isinstance(x, str) and x)
    return text or "no seed reached it"


def to_target_section(d: ReportData, store_hint: str) -> Section:
    """Section 6: samples and wall-clock to target, and the Pareto frontier."""
    s = Section("to-target", "6. Samples and wall-clock to target; Pareto frontier")
    if _no_convergence(d, s, store_hint):
        return s
    t = d.tradeoff
    many = len(d.runs) > 1
    for run, g in by_run(t, d):
        g = g.sort_values("batch_size")
        sm = g[finite_mask(g, "samples_to_target")]
        if len(sm) >= 2:
            a, z = sm.iloc[0], sm.iloc[-1]
            s.sentences.append(
                f"{run_prefix(run, many)}Samples to target grow from {format_number(a['samples_to_target'])} "
                f"at B={int(a['batch_size'])} "
                f"to {format_number(z['samples_to_target'])} at B={int(z['batch_size'])} "
                f"({format_ratio(z['samples_to_target'], a['samples_to_target'])}): bigger batches cost more compute."
            )
        w = g[finite_mask(g, "wallclock_to_target_s")]
        if len(w):
            best = w.loc[w["wallclock_to_target_s"].astype(float).idxmin()]
            text = (
                f"{run_prefix(run, many)}Wall-clock to target is lowest at B={int(best['batch_size'])} "
                f"({format_seconds(best['wallclock_to_target_s'])})"
            )
            first = w.iloc[0]
            if int(first["batch_size"]) != int(best["batch_size"]):
                text += (
                    f", {format_ratio(first['wallclock_to_target_s'], best['wallclock_to_target_s'])} faster than at "
                    f"B={int(first['batch_size'])}"
                )
            front = g[g.get("pareto_time_samples", False) == True]["batch_size"]  # noqa: E712
            if len(front):
                text += (
                    f". The Pareto frontier of time vs samples holds B={join_sizes(sorted(front))}; any other batch "
                    "size is both slower and needs more samples than one of these"
                )
            s.sentences.append(text + ".")
            off = (
                g[g["time_estimate_disagrees"].fillna(False).astype(bool)] if "time_estimate_disagrees" in g else g[:0]
            )
            if len(off):
                ratios = ", ".join(
                    f"B={int(r['batch_size'])}: {format_sig(r['time_to_target_ratio'], 2)}x" for _, r in off.iterrows()
                )
                s.sentences.append(
                    f"{run_prefix(run, many)}The convergence trials' own training time to target differs from this "
                    f"estimate (steps to target x throughput step time) by more than the noise of either "
                    f"(measured / estimate: {ratios}): throughput was measured in a different state than "
                    "training to the target reaches, or the host's speed changed between the trials."
                )
        elif len(sm):
            s.sentences.append(
                f"{run_prefix(run, many)}No wall-clock to target: no throughput trial measured the step "
                f"time (run `bsprof sweep --kind throughput {store_hint}`)."
            )
    s.chart("to-target", lambda: charts.to_target_chart(t))
    if len(t) and finite_mask(t, "wallclock_to_target_s").any():
        s.chart("pareto", lambda: charts.pareto_chart(t))
    if "energy_to_target_j" not in t.columns or not finite_mask(t, "energy_to_target_j").any():
        s.notes.append(
            "Energy to target is not measured (it needs GPU energy readings), so there is no time-vs-energy frontier."
        )
    return s


def curves_section(d: ReportData, store_hint: str) -> Section:
    """Section 7: learning curves per batch size."""
    s = Section("curves", "7. Learning curves")
    if _no_convergence(d, s, store_hint):
        return s
    cv = d.curves
    if cv.empty:
        s.notes.append("No learning-curve points were stored for these convergence trials.")
        return s
    n_trials, n_b = cv["trial_id"].nunique(), cv["batch_size"].nunique()
    text = f"{n_trials} learning curves over {n_b} batch sizes"
    c = d.convergence[finite_mask(d.convergence, "steps_to_target")] if len(d.convergence) else d.convergence
    if len(c) >= 2 and len(d.runs) == 1:
        a, z = c.sort_values("batch_size").iloc[0], c.sort_values("batch_size").iloc[-1]
        text += (
            f": B={int(a['batch_size'])} reaches the target after {format_number(a['steps_to_target'])} steps "
            f"({format_number(a['samples_to_target'])} samples), B={int(z['batch_size'])} after "
            f"{format_number(z['steps_to_target'])} "
            f"steps ({format_number(z['samples_to_target'])} samples)"
        )
    s.sentences.append(
        text + ". Click a batch size in the legend to pick it (shift-click for more, double-click to reset)."
    )
    if len(cv) and cv.groupby("trial_id").size().max() >= 60:
        s.notes.append("Long curves are thinned to log-spaced points to keep the page small.")
    lower = bool(runs_lower_is_better(d))
    s.chart("curves", lambda: charts.learning_curves_chart(cv, d.targets, lower_is_better=lower))
    return s


def generalization_section(d: ReportData, store_hint: str) -> Section:
    """Section 8: generalization gap and distance from initialization."""
    s = Section("generalization", "8. Generalization gap and distance from initialization")
    if _no_convergence(d, s, store_hint):
        return s
    c = d.convergence
    many = len(d.runs) > 1
    trends = {"grows": "grows with the batch size", "shrinks": "shrinks with the batch size"}
    for run, g in by_run(d.gap_trend, d):
        for r in g[g["points"] >= 2].itertuples():
            s.sentences.append(
                f"{run_prefix(run, many)}The gap between final train and validation metric ranges from {r.min_gap:.3f} "
                f"(B={int(r.min_gap_batch_size)}) to {r.max_gap:.3f} (B={int(r.max_gap_batch_size)}) and "
                f"{trends.get(r.trend, 'shows no clear trend with the batch size')} "
                f"(Spearman ρ = {r.rho:.2f}{_keskar(d, run)})."
            )
    fs = d.final_state
    for run, g in by_run(fs, d):
        g = g[finite_mask(g, "weight_distance")].sort_values("batch_size")
        if len(g) >= 2:
            a, z = g.iloc[0], g.iloc[-1]
            s.sentences.append(
                f"{run_prefix(run, many)}At the end of training the weights are "
                f"{format_sig(a['weight_distance'])} from their "
                f"initialization at B={int(a['batch_size'])} and {format_sig(z['weight_distance'])} "
                f"at B={int(z['batch_size'])} "
                "(L2 norm, median over seeds)."
            )
    s.sentences.append(
        "Convergence trials stop at the target unless `--continue-after-target`, so these are the "
        "metrics at (about) the target."
    )
    s.chart("generalization", lambda: charts.generalization_chart(c, fs))
    return s


def lr_section(d: ReportData, store_hint: str) -> Section:
    """Section 9: LR sensitivity of the tuning trials."""
    s = Section("lr", "9. Learning-rate sensitivity")
    t = d.lr_tuning
    warn = [r.label for r in d.runs if r.lr_rule == "fixed"]
    if warn:
        s.notes.append(
            f"Warning: {', '.join(warn)} used LR rule 'fixed' — one learning rate at every batch size "
            "makes large batches look worse than they are (Shallue et al. 2018)."
        )
    if t.empty:
        s.notes.append(
            f"No LR tuning in these runs: `bsprof sweep --tune-lr 3 {store_hint}` tries 3 learning rates "
            "per batch size on a log₂ grid, keeps the best and re-runs it on fresh seeds."
        )
        return s
    many = len(d.runs) > 1
    for run, g in by_run(t, d):
        best = g[g["best"].astype(bool)].sort_values("batch_size")
        if len(best):
            a, z = best.iloc[0], best.iloc[-1]
            text = (
                f"{run_prefix(run, many)}The best learning rate goes from {format_sig(a['lr'])} at "
                f"B={int(a['batch_size'])} to "
                f"{format_sig(z['lr'])} at B={int(z['batch_size'])}"
            )
            edge = best[best["best_on_edge"].astype(bool)]["batch_size"]
            if len(edge):
                text += (
                    f"; at B={join_sizes(edge)} it lies on the edge of the grid, so a better LR may lie outside it "
                    "(a larger `--tune-lr`)"
                )
            s.sentences.append(text + ".")
    s.chart("lr", lambda: charts.lr_sensitivity_chart(t))
    return s


def runs_lower_is_better(d: ReportData) -> bool:
    """Whether every run with a stored direction has a lower-is-better metric (an MSE); ``False`` when the
    store does not say (older stores) or the runs disagree."""
    t = d.trials
    if "higher_is_better" not in t.columns:
        return False
    v = t["higher_is_better"].dropna()
    return bool(len(v)) and not v.astype(bool).any()


def _keskar(d: ReportData, run: str) -> str:
    """The Keskar et al. reference, for a higher-is-better metric only (their larger large-batch gaps are in
    accuracy); nothing for a lower-is-better metric (an MSE) or when the store does not say (older stores)."""
    t = d.trials
    if "higher_is_better" not in t.columns:
        return ""
    v = t.loc[t["run"] == run, "higher_is_better"].dropna()
    return "; Keskar et al. 2016 report larger gaps for large batches" if len(v) and bool(v.iloc[0]) else ""
