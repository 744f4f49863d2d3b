"""The report's sections: for each, its charts, the sentence that reads them in words, and, when its data are
missing, why and what to run.

Sentences are computed from :class:`~bsprof.report.data.ReportData`; numbers are rounded here (presentation).
Text is plain: the template escapes it; text between backticks is shown as code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bsprof.report import charts

if TYPE_CHECKING:
    import pandas as pd

    from bsprof.report.data import ReportData

__all__ = ["Section", "Table", "build_sections"]

STATUS_ORDER = ("ok", "oom", "diverged", "budget_exhausted", "error")


@dataclass
class Table:
    """An HTML table: header cells, rows of text cells, and a CSS class per row."""

    columns: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)
    numeric: set[int] = field(default_factory=set)
    scroll: bool = False


@dataclass
class Section:
    """One section of the page.

    Attributes:
        id: HTML anchor.
        title: Heading.
        sentences: What the charts say, in words (plain text; `code` in backticks).
        charts: (chart id, Altair chart) pairs.
        notes: Why data are missing and what to run (plain text).
        commands: Shell commands worth copying.
        tables: HTML tables.
    """

    id: str
    title: str
    sentences: list[str] = field(default_factory=list)
    charts: list[tuple[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)

    def chart(self, name: str, make: Callable[[], Any]) -> bool:
        """Add the chart ``make()`` builds; when it has nothing to draw (ValueError), add the reason as a note."""
        try:
            self.charts.append((f"chart-{self.id}-{name}", make()))
        except ValueError as e:
            self.notes.append(f"No chart: {e}.")
            return False
        return True


# --- formatting ------------------------------------------------------------------------------------------------


def _f(v: Any, fmt: str = "{:,.0f}") -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "∞"
    return fmt.format(x)


def _g(v: Any, digits: int = 3) -> str:
    """Significant digits, thousands separated for big numbers."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(x):
        return "" if math.isnan(x) else "∞"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _bytes(n: Any) -> str:
    try:
        x = float(n)
    except (TypeError, ValueError):
        return ""
    if math.isnan(x):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return ""


def _seconds(s: Any) -> str:
    try:
        x = float(s)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(x):
        return ""
    if x >= 1:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} µs"


def _pm(value: Any, se: Any) -> str:
    """``value ± se``; a standard error below 0.1% of the value is shown as such."""
    try:
        v, e = float(value), float(se)
    except (TypeError, ValueError):
        return _g(value)
    if not math.isfinite(e):
        return f"{_g(v)} (uncertainty unknown)"
    if v and abs(e / v) < 1e-3:
        return f"{_g(v)} ± <0.1%"
    return f"{_g(v)} ± {_g(e, 2)}"


def _ratio(a: float, b: float) -> str:
    r = a / b
    return f"{r:.1f}x" if r < 10 else f"{r:.0f}x"


def _sizes(bs: Sequence[Any]) -> str:
    b = [str(int(x)) for x in bs]
    return ", ".join(b[:-1]) + f" and {b[-1]}" if len(b) > 1 else (b[0] if b else "")


def _finite(series: pd.Series) -> pd.Series:
    import pandas as pd

    v = pd.to_numeric(series, errors="coerce").astype(float)
    return v[np.isfinite(v)]


def _by_run(df: pd.DataFrame, d: ReportData) -> Iterator[tuple[str, pd.DataFrame]]:
    """(run label, rows) in the report's run order, runs without rows skipped."""
    if df is None or df.empty or "run" not in df.columns:
        return
    for r in d.runs:
        g = df[df["run"] == r.label]
        if len(g):
            yield r.label, g


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _prefix(label: str, many: bool) -> str:
    return f"{label}: " if many else ""


# --- sections --------------------------------------------------------------------------------------------------


def _headline(d: ReportData, store_hint: str) -> Section:
    s = Section("headline", "1. Headline: which batch size?")
    many = len(d.runs) > 1
    rows = []
    for label, rec in d.recommendations:
        t = d.tradeoff[(d.tradeoff["run"] == label) & (d.tradeoff["device"] == rec.device)]

        def at(b: int | None, col: str, t: pd.DataFrame = t) -> float:
            r = t[t["batch_size"] == b]
            return float(r[col].iloc[0]) if b is not None and len(r) and col in r else math.nan

        fast = f"B={rec.fastest_wallclock} ({_seconds(at(rec.fastest_wallclock, 'wallclock_to_target_s'))})" if (
            rec.fastest_wallclock is not None) else "—"  # fmt: skip
        few = f"B={rec.fewest_samples} ({_f(at(rec.fewest_samples, 'samples_to_target'))} samples)" if (
            rec.fewest_samples is not None) else "—"  # fmt: skip
        energy = f"B={rec.least_energy}" if rec.least_energy is not None else "not measured"
        f = rec.fit
        if f is None or not math.isfinite(f.b_noise):
            crit = "not estimated (fewer than 2 batch sizes reached the target)"
        elif f.constrained:
            crit = f"≈ {_pm(f.b_noise, f.b_noise_se)} samples"
        else:
            crit = f"≈ {_g(f.b_noise)} (not constrained: {f.reason})"
        run = next(r for r in d.runs if r.label == label)
        rows.append([label, fast, few, energy, crit, _max_batch_text(d, run.workload, run.device)])
        parts = []
        if rec.fastest_wallclock is not None:
            parts.append(f"train with B={rec.fastest_wallclock} for the fastest wall-clock to target")
        if rec.fewest_samples is not None and rec.fewest_samples != rec.fastest_wallclock:
            parts.append(f"B={rec.fewest_samples} for the fewest samples (least compute)")
        if rec.least_energy is not None:
            parts.append(f"B={rec.least_energy} for the least energy")
        if parts:
            sentence = "; ".join(parts)
            if f is not None and f.constrained:
                sentence += (f". Up to the critical batch size B_crit ≈ {_pm(f.b_noise, f.b_noise_se)} a bigger "
                             "batch saves steps almost for free; beyond it, it mostly costs samples")  # fmt: skip
            s.sentences.append(_prefix(label, many) + _cap(sentence) + ".")
    for run in d.runs:
        if not any(label == run.label for label, _ in d.recommendations):
            why = "no trials" if run.trials == 0 else "no throughput trial and no reported convergence trial"
            rows.append([run.label, "—", "—", "—", f"not estimated ({why})", _max_batch_text(d, run.workload, run.device)])
    if rows:
        s.tables.append(Table(["run", "fastest wall-clock to target", "fewest samples to target",
                               "least energy to target", "critical batch size B_crit", "largest batch that fits"],
                              rows))  # fmt: skip
    if not any(r.fastest_wallclock is not None for _, r in d.recommendations):
        kinds = set(d.trials["kind"]) if len(d.trials) else set()
        missing = [k for k in ("throughput", "convergence") if k not in kinds]
        if missing:
            s.notes.append(
                f"No wall-clock-to-target: it needs throughput and convergence trials; these runs have no {missing[0]} "
                f"trials (run `bsprof sweep --kind both {store_hint}`)."
            )
        else:
            s.notes.append("No wall-clock-to-target: no batch size has both a throughput and a reached target.")
    elif len(d.tradeoff):
        s.chart("wallclock", lambda: charts.headline_chart(d.tradeoff, d.fits))
    s.tables.append(_environment_table(d))
    return s


def _max_batch_text(d: ReportData, workload: str, device: str) -> str:
    mb = d.max_batch[(d.max_batch["workload"] == workload) & (d.max_batch["device"] == device)]
    if mb.empty:
        tp = d.throughput[(d.throughput["run"].isin([r.label for r in d.runs if r.workload == workload]))]
        ooms = tp[tp["status"].astype(str).str.contains("oom")]["batch_size"] if len(tp) else []
        if len(ooms):
            return f"below B={int(min(ooms))} (out of memory in the sweep)"
        return f"not measured (`bsprof find-max-batch --workload {workload} --device {device}`)"
    r = mb.iloc[-1]
    if r["max_batch_size"] is None or (isinstance(r["max_batch_size"], float) and math.isnan(r["max_batch_size"])):
        return "even the smallest batch tried ran out of memory"
    if r["first_oom_batch_size"] is None or (
        isinstance(r["first_oom_batch_size"], float) and math.isnan(r["first_oom_batch_size"])
    ):
        return f"B ≥ {int(r['max_batch_size'])} (no out-of-memory up to the --cap)"
    return f"B = {int(r['max_batch_size'])} (first out-of-memory at {int(r['first_oom_batch_size'])})"


_ENV_ROWS = (
    ("device", "device"),
    ("device_name", "device name"),
    ("device_memory_bytes", "device memory"),
    ("torch_version", "torch"),
    ("cuda_version", "CUDA"),
    ("nvidia_driver_version", "NVIDIA driver"),
    ("python_version", "Python"),
    ("bsprof_version", "bsprof"),
    ("cpu_model", "CPU"),
    ("cpu_count", "CPU cores"),
    ("torch_num_threads", "torch threads"),
    ("hostname", "host"),
    ("platform", "platform"),
    ("git_commit", "git commit"),
)


def _environment_table(d: ReportData) -> Table:
    import datetime as dt

    rows = []
    for key, name in _ENV_ROWS:
        vals = []
        for r in d.runs:
            v = r.environment.get(key)
            vals.append(_bytes(v) if key == "device_memory_bytes" and v else ("" if v is None else str(v)))
        if any(vals):
            rows.append([name, *vals])
    cfg = []
    for r in d.runs:
        eng = r.config.get("engine", {})
        cfg.append(
            {
                "precision (AMP)": str(eng.get("amp", "")),
                "torch.compile": "on" if eng.get("compile") else "off",
                "LR rule": str(r.config.get("lr_rule", "")),
                "LR tuning": f"{r.config.get('tune_lr')} LRs per batch size" if r.config.get("tune_lr") else "off",
                "run id": r.run_id,
                "run created": dt.datetime.fromtimestamp(r.created_at, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "trials stored": str(r.trials),
            }
        )
    for key in cfg[0] if cfg else ():
        rows.append([key, *[c[key] for c in cfg]])
    return Table(["environment", *[r.label for r in d.runs]], rows)


def _throughput(d: ReportData, store_hint: str) -> Section:
    s = Section("throughput", "2. Throughput and step time")
    tp = d.throughput
    ok = tp[_finite_mask(tp, "samples_per_s")] if len(tp) else tp
    if ok.empty:
        s.notes.append(
            "No successful throughput trial in these runs"
            + (" (every one failed: see the trial table)." if len(tp) else ".")
            + f" Run `bsprof sweep --kind throughput {store_hint}` to measure samples/s and step time."
        )
        return s
    many = len(d.runs) > 1
    for run, g in _by_run(ok, d):
        g = g.sort_values("batch_size")
        b, v = g["batch_size"].to_numpy(), g["samples_per_s"].astype(float).to_numpy()
        if len(g) == 1:
            s.sentences.append(f"{_prefix(run, many)}Only B={b[0]} measured: {_f(v[0])} samples/s.")
            continue
        i = int(np.argmax(v))
        text = f"{_prefix(run, many)}Throughput grows {_ratio(v[i], v[0])} from B={b[0]} ({_f(v[0])} samples/s) to "
        if i == len(v) - 1:
            text += f"B={b[i]} ({_f(v[i])} samples/s), " + (
                "still rising" if v[-1] > 1.05 * v[-2] else "levelling off"
            )
        else:
            text += f"a peak at B={b[i]} ({_f(v[i])} samples/s), then "
            drop = 1 - v[-1] / v[i]
            text += f"falls {drop:.0%} by B={b[-1]}" if drop > 0.05 else f"stays within 5% up to B={b[-1]}"
        eff = float(g["scaling_efficiency"].iloc[-1]) if "scaling_efficiency" in g else math.nan
        if math.isfinite(eff):
            text += f"; at B={b[-1]} it reaches {eff:.0%} of ideal linear scaling."
        else:
            text += "."
        s.sentences.append(text)
        spread = (g["samples_per_s_p75"] / g["samples_per_s_p25"]).astype(float)
        if spread.notna().any() and spread.max() > 1.5:
            j = spread.idxmax()
            s.sentences.append(
                f"{_prefix(run, many)}Measurements are noisy: at B={int(g.loc[j, 'batch_size'])} the p75 throughput is "
                f"{spread.max():.1f}x the p25 (a busy host?); more `--repeats` give steadier medians."
            )
    s.chart("throughput", lambda: charts.throughput_chart(d.throughput))
    return s


def _finite_mask(df: pd.DataFrame, col: str) -> pd.Series:
    import pandas as pd

    v = pd.to_numeric(df[col], errors="coerce").astype(float)
    return pd.Series(np.isfinite(v), index=df.index)


def _memory(d: ReportData, store_hint: str) -> Section:
    import pandas as pd

    s = Section("memory", "3. Peak memory")
    tp = d.throughput
    many = len(d.runs) > 1
    caps = {r.label: r.environment.get("device_memory_bytes") for r in d.runs if r.environment.get("device_memory_bytes")}
    conv_oom = d.trials[(d.trials["kind"] == "convergence") & (d.trials["status"] == "oom")][["run", "batch_size"]]
    mem = tp[_finite_mask(tp, "peak_mem_bytes")] if len(tp) else tp
    oom_rows = pd.concat([tp[tp["status"].astype(str).str.contains("oom")][["run", "batch_size"]], conv_oom]) if len(
        tp) else conv_oom  # fmt: skip
    if mem.empty and oom_rows.empty:
        s.notes.append(f"No peak memory measured (no successful throughput trial). Run `bsprof sweep {store_hint}`.")
        return s
    for run, g in _by_run(mem, d):
        g = g.sort_values("batch_size")
        lo, hi = g.iloc[0], g.iloc[-1]
        text = (f"{_prefix(run, many)}Peak memory goes from {_bytes(lo['peak_mem_bytes'])} at B={int(lo['batch_size'])} "
                f"to {_bytes(hi['peak_mem_bytes'])} at B={int(hi['batch_size'])}")  # fmt: skip
        if run in caps:
            text += f", {float(g['peak_mem_bytes'].max()) / float(caps[run]):.0%} of the device's {_bytes(caps[run])}"
        s.sentences.append(text + ".")
    devices = {r.label: r.device for r in d.runs}
    if any(not str(devices.get(r, "")).startswith("cuda") for r in mem["run"].unique()):
        s.sentences.append(
            "On a CPU, peak memory is the growth of the process's resident memory during the trial, sampled: a lower "
            "bound, since memory freed by earlier trials is reused without growing it."
        )
    if len(oom_rows):
        for run, g in _by_run(oom_rows, d):
            s.sentences.append(f"{_prefix(run, many)}Out of memory at B={_sizes(sorted(set(g['batch_size'])))}.")
    else:
        s.sentences.append("No batch size ran out of memory.")
    s.chart("memory", lambda: charts.memory_chart(tp, caps or None, conv_oom))
    return s


def _gpu(d: ReportData) -> Section:
    s = Section("gpu", "4. GPU utilization, power and energy")
    g = d.gpu
    cols = [c for c in ("gpu_util_pct", "power_w", "energy_per_sample_j") if c in g.columns and g[c].notna().any()]
    if not cols:
        reasons = sorted({str(r.environment.get("gpu_telemetry_reason")) for r in d.runs
                          if r.environment.get("gpu_telemetry_reason")})  # fmt: skip
        why = f" ({'; '.join(reasons)})" if reasons else ""
        s.notes.append(
            f"Not measured{why}. Run on a CUDA GPU with NVML telemetry (`pip install 'bsprof[gpu]'`, then "
            "`bsprof sweep --device cuda`) to see utilization, power and energy per sample here."
        )
        return s
    many = len(d.runs) > 1
    for run, r in _by_run(g, d):
        r = r.sort_values("batch_size")
        bits = []
        for col, name, fmt in (("gpu_util_pct", "GPU utilization", "{:.0f}%"), ("power_w", "power", "{:.0f} W")):
            v = r[["batch_size", col]].dropna() if col in r else r.iloc[0:0]
            if len(v) >= 1:
                bits.append(f"{name} goes from {fmt.format(v[col].iloc[0])} at B={int(v['batch_size'].iloc[0])} to "
                            f"{fmt.format(v[col].iloc[-1])} at B={int(v['batch_size'].iloc[-1])}")  # fmt: skip
        if "energy_per_sample_j" in r:
            v = r[["batch_size", "energy_per_sample_j"]].dropna()
            if len(v):
                lo = v.loc[v["energy_per_sample_j"].idxmin()]
                bits.append(f"energy per sample is lowest at B={int(lo['batch_size'])} "
                            f"({lo['energy_per_sample_j'] * 1e3:.3g} mJ)")  # fmt: skip
        if bits:
            s.sentences.append(_prefix(run, many) + _cap("; ".join(bits)) + ".")
    s.chart("gpu", lambda: charts.gpu_chart(g))
    return s


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
        s.notes.append(f"No convergence trials in these runs: run `bsprof sweep --kind convergence {store_hint}` "
                       "(or `--kind both`) to measure steps, samples and time to the target.")  # fmt: skip
        return True
    return False


def _steps(d: ReportData, store_hint: str) -> Section:
    s = Section("steps", "5. Steps to target and the critical batch size")
    if _no_convergence(d, s, store_hint):
        return s
    c = d.convergence
    many = len(d.runs) > 1
    for run, g in _by_run(c, d):
        g = g.sort_values("batch_size")
        fin = g[_finite_mask(g, "steps_to_target")]
        missed = g[~_finite_mask(g, "steps_to_target")]
        if fin.empty:
            s.sentences.append(f"{_prefix(run, many)}No batch size reached the target on the median seed "
                               f"({_statuses(g)}); raise `--max-epochs`/`--max-time` or lower `--target`.")  # fmt: skip
            continue
        a, z = fin.iloc[0], fin.iloc[-1]
        text = f"{_prefix(run, many)}Steps to target fall from {_f(a['steps_to_target'])} at B={int(a['batch_size'])}"
        if len(fin) > 1:
            text += (f" to {_f(z['steps_to_target'])} at B={int(z['batch_size'])}: "
                     f"{_ratio(a['steps_to_target'], z['steps_to_target'])} fewer steps for "
                     f"{_ratio(z['batch_size'], a['batch_size'])} the batch")  # fmt: skip
        reg = _regime_text(g)
        if reg:
            text += f"; {reg}"
        s.sentences.append(text + ".")
        fit = d.fits[d.fits["run"] == run]
        if len(fit):
            f = fit.iloc[0]
            if bool(f["constrained"]):
                s.sentences.append(
                    f"{_prefix(run, many)}Fit S = S_min(1 + B_noise/B): S_min = {_pm(f['s_min'], f['s_min_se'])} "
                    f"steps, B_noise = B_crit = {_pm(f['b_noise'], f['b_noise_se'])} samples, "
                    f"E_min = {_g(f['e_min'])} samples (McCandlish et al. 2018)."
                )
            else:
                s.sentences.append(f"{_prefix(run, many)}The noise-scale fit is not constrained ({f['reason']}), so "
                                   "no fitted curve is drawn; the regimes come from measured slopes.")  # fmt: skip
        if len(missed):
            s.sentences.append(f"{_prefix(run, many)}B={_sizes(missed['batch_size'])}: the median seed missed the target "
                               f"({_statuses(missed)}).")  # fmt: skip
    rules = {r.label: r.lr_rule for r in d.runs}
    if any(v == "fixed" for v in rules.values()):
        s.notes.append("LR rule 'fixed': one learning rate at every batch size makes large batches look worse than "
                       "they are (Shallue et al. 2018); re-run with `--lr-rule linear` or `--tune-lr 3`.")  # fmt: skip
    s.chart("steps", lambda: charts.steps_to_target_chart(c, d.fits))
    return s


def _statuses(g: pd.DataFrame) -> str:
    text = "; ".join(x for x in g.get("statuses", []) if isinstance(x, str) and x)
    return text or "no seed reached it"


def _to_target(d: ReportData, store_hint: str) -> Section:
    s = Section("to-target", "6. Samples and wall-clock to target; Pareto frontier")
    if _no_convergence(d, s, store_hint):
        return s
    t = d.tradeoff
    many = len(d.runs) > 1
    for run, g in _by_run(t, d):
        g = g.sort_values("batch_size")
        sm = g[_finite_mask(g, "samples_to_target")]
        if len(sm) >= 2:
            a, z = sm.iloc[0], sm.iloc[-1]
            s.sentences.append(
                f"{_prefix(run, many)}Samples to target grow from {_f(a['samples_to_target'])} at B={int(a['batch_size'])} "
                f"to {_f(z['samples_to_target'])} at B={int(z['batch_size'])} "
                f"({_ratio(z['samples_to_target'], a['samples_to_target'])}): bigger batches cost more compute."
            )
        w = g[_finite_mask(g, "wallclock_to_target_s")]
        if len(w):
            best = w.loc[w["wallclock_to_target_s"].astype(float).idxmin()]
            text = (f"{_prefix(run, many)}Wall-clock to target is lowest at B={int(best['batch_size'])} "
                    f"({_seconds(best['wallclock_to_target_s'])})")  # fmt: skip
            first = w.iloc[0]
            if int(first["batch_size"]) != int(best["batch_size"]):
                text += (f", {_ratio(first['wallclock_to_target_s'], best['wallclock_to_target_s'])} faster than at "
                         f"B={int(first['batch_size'])}")  # fmt: skip
            front = g[g.get("pareto_time_samples", False) == True]["batch_size"]  # noqa: E712
            if len(front):
                text += (f". The Pareto frontier of time vs samples holds B={_sizes(sorted(front))}; any other batch "
                         "size is both slower and needs more samples than one of these")  # fmt: skip
            s.sentences.append(text + ".")
        elif len(sm):
            s.sentences.append(f"{_prefix(run, many)}No wall-clock to target: no throughput trial measured the step "
                               f"time (run `bsprof sweep --kind throughput {store_hint}`).")  # fmt: skip
    s.chart("to-target", lambda: charts.to_target_chart(t))
    if len(t) and _finite_mask(t, "wallclock_to_target_s").any():
        s.chart("pareto", lambda: charts.pareto_chart(t))
    if "energy_to_target_j" not in t.columns or not _finite_mask(t, "energy_to_target_j").any():
        s.notes.append("Energy to target is not measured (it needs GPU energy readings), so there is no time-vs-energy "
                       "frontier.")  # fmt: skip
    return s


def _curves(d: ReportData, store_hint: str) -> Section:
    s = Section("curves", "7. Learning curves")
    if _no_convergence(d, s, store_hint):
        return s
    cv = d.curves
    if cv.empty:
        s.notes.append("No learning-curve points were stored for these convergence trials.")
        return s
    n_trials, n_b = cv["trial_id"].nunique(), cv["batch_size"].nunique()
    text = f"{n_trials} learning curves over {n_b} batch sizes"
    c = d.convergence[_finite_mask(d.convergence, "steps_to_target")] if len(d.convergence) else d.convergence
    if len(c) >= 2 and len(d.runs) == 1:
        a, z = c.sort_values("batch_size").iloc[0], c.sort_values("batch_size").iloc[-1]
        text += (f": B={int(a['batch_size'])} reaches the target after {_f(a['steps_to_target'])} steps "
                 f"({_f(a['samples_to_target'])} samples), B={int(z['batch_size'])} after {_f(z['steps_to_target'])} "
                 f"steps ({_f(z['samples_to_target'])} samples)")  # fmt: skip
    s.sentences.append(text + ". Click a batch size in the legend to pick it (shift-click for more, double-click to reset).")
    if len(cv) and cv.groupby("trial_id").size().max() >= 60:
        s.notes.append("Long curves are thinned to log-spaced points to keep the page small.")
    s.chart("curves", lambda: charts.learning_curves_chart(cv, d.targets))
    return s


def _generalization(d: ReportData, store_hint: str) -> Section:
    s = Section("generalization", "8. Generalization gap and distance from initialization")
    if _no_convergence(d, s, store_hint):
        return s
    c = d.convergence
    many = len(d.runs) > 1
    for run, g in _by_run(c, d):
        gap = (g["final_train_metric"] - g["final_val_metric"]).astype(float)
        ok = g[np.isfinite(gap)].assign(gap=gap[np.isfinite(gap)])
        if len(ok) >= 2:
            lo, hi = ok.loc[ok["gap"].idxmin()], ok.loc[ok["gap"].idxmax()]
            rho = ok["batch_size"].astype(float).corr(ok["gap"], method="spearman")
            trend = ("grows with the batch size" if rho > 0.5 else "shrinks with the batch size" if rho < -0.5
                     else "shows no clear trend with the batch size")  # fmt: skip
            s.sentences.append(
                f"{_prefix(run, many)}The gap between final train and validation metric ranges from {lo['gap']:.3f} "
                f"(B={int(lo['batch_size'])}) to {hi['gap']:.3f} (B={int(hi['batch_size'])}) and {trend} "
                f"(Spearman ρ = {rho:.2f}; Keskar et al. 2016 report larger gaps for large batches)."
            )
    fs = d.final_state
    for run, g in _by_run(fs, d):
        g = g[_finite_mask(g, "weight_distance")].sort_values("batch_size")
        if len(g) >= 2:
            a, z = g.iloc[0], g.iloc[-1]
            s.sentences.append(
                f"{_prefix(run, many)}At the end of training the weights are {_g(a['weight_distance'])} from their "
                f"initialization at B={int(a['batch_size'])} and {_g(z['weight_distance'])} at B={int(z['batch_size'])} "
                "(L2 norm, median over seeds)."
            )
    s.sentences.append("Convergence trials stop at the target unless `--continue-after-target`, so these are the "
                       "metrics at (about) the target.")  # fmt: skip
    s.chart("generalization", lambda: charts.generalization_chart(c, fs))
    return s


def _lr(d: ReportData, store_hint: str) -> Section:
    s = Section("lr", "9. Learning-rate sensitivity")
    t = d.lr_tuning
    warn = [r.label for r in d.runs if r.lr_rule == "fixed"]
    if warn:
        s.notes.append(f"Warning: {', '.join(warn)} used LR rule 'fixed' — one learning rate at every batch size "
                       "makes large batches look worse than they are (Shallue et al. 2018).")  # fmt: skip
    if t.empty:
        s.notes.append(f"No LR tuning in these runs: `bsprof sweep --tune-lr 3 {store_hint}` tries 3 learning rates "
                       "per batch size on a log₂ grid, keeps the best and re-runs it on fresh seeds.")  # fmt: skip
        return s
    many = len(d.runs) > 1
    for run, g in _by_run(t, d):
        best = []
        edge = []
        for b, gb in g.groupby("batch_size"):
            fin = gb[_finite_mask(gb, "steps_to_target")]
            if fin.empty:
                continue
            i = fin["steps_to_target"].astype(float).idxmin()
            best.append((int(b), float(fin.loc[i, "lr"])))
            lrs = sorted(gb["lr"].astype(float))
            if float(fin.loc[i, "lr"]) in (lrs[0], lrs[-1]) and len(lrs) > 2:
                edge.append(int(b))
        if best:
            text = (f"{_prefix(run, many)}The best learning rate goes from {_g(best[0][1])} at B={best[0][0]} to "
                    f"{_g(best[-1][1])} at B={best[-1][0]}")  # fmt: skip
            if edge:
                text += (f"; at B={_sizes(edge)} it lies on the edge of the grid, so a better LR may lie outside it "
                         "(a larger `--tune-lr`)")  # fmt: skip
            s.sentences.append(text + ".")
    s.chart("lr", lambda: charts.lr_sensitivity_chart(t))
    return s


def _ops(d: ReportData, store_hint: str) -> Section:
    s = Section("ops", "10. Where the time goes")
    ops = d.top_ops
    root = d.trace_roots[0] if d.trace_roots else "reports/traces"
    if ops.empty:
        s.notes.append(f"No operator profile in these runs: `bsprof profile {store_hint}` (or `bsprof sweep --profile`) "
                       "adds a torch.profiler pass per batch size, with a TensorBoard trace and the top operators.")  # fmt: skip
        if d.trace_roots:
            s.commands.append(f"tensorboard --logdir {root}")
        return s
    many = len(d.runs) > 1
    for run, g in _by_run(ops, d):
        bs = sorted(g["batch_size"].unique())
        parts = []
        for b in (bs[0], bs[-1]) if len(bs) > 1 else (bs[0],):
            top = g[g["batch_size"] == b].sort_values("self_s_per_step", ascending=False).iloc[0]
            parts.append(f"at B={int(b)} {top['name']} takes {top['share_pct']:.0f}% of the operators' self time")
        s.sentences.append(_prefix(run, many) + _cap("; ".join(parts)) + ".")
    s.chart("ops", lambda: charts.top_operators_chart(ops))
    s.sentences.append("Open the full traces in TensorBoard (needs `pip install 'bsprof[tensorboard]'`) or in "
                       "Perfetto's UI:")  # fmt: skip
    for r in d.trace_roots or [root]:
        s.commands.append(f"tensorboard --logdir {r}")
    return s


def _benchmarks(d: ReportData) -> Section:
    s = Section("benchmarks", "11. pytest-benchmark results")
    b = d.benchmarks
    if b is None:
        s.notes.append("No benchmark results: pass `--benchmark-json FILE` (written by "
                       "`pytest benchmarks --benchmark-json FILE`) to include them.")  # fmt: skip
        return s
    if b.empty:
        s.notes.append("The benchmark JSON file(s) hold no benchmarks.")
        return s
    files = sorted(set(b["file"]))
    rel = (b["iqr"] / b["median"]).astype(float)
    text = f"{len(b)} benchmark(s) from {_sizes(files) if len(files) > 1 else files[0]}"
    fast, slow = b.loc[b["median"].idxmin()], b.loc[b["median"].idxmax()]
    if len(b) > 1:
        text += (f"; medians range from {_seconds(fast['median'])} ({fast['name']}) to {_seconds(slow['median'])} "
                 f"({slow['name']})")  # fmt: skip
    else:
        text += f": median {_seconds(fast['median'])} per round"
    if rel.notna().any() and rel.max() > 0.1:
        j = rel.idxmax()
        text += f"; the noisiest, {b.loc[j, 'name']}, has an IQR of {rel.max():.0%} of its median"
    s.sentences.append(text + ".")
    s.chart("benchmarks", lambda: charts.benchmarks_chart(b))
    rows = [[r["name"], _seconds(r["min"]), _seconds(r["median"]), _seconds(r["iqr"]), _f(r["rounds"]), r["extra_info"]]
            for _, r in b.iterrows()]  # fmt: skip
    s.tables.append(Table(["benchmark", "min", "median", "IQR", "rounds", "extra_info"], rows, numeric={1, 2, 3, 4}))
    return s


_TRIAL_COLS = (
    ("run", "run", None),
    ("kind", "kind", None),
    ("phase", "phase", None),
    ("batch_size", "B", "int"),
    ("seed", "seed", "int"),
    ("lr", "LR", "g"),
    ("status", "status", None),
    ("samples_per_s", "samples/s", "int"),
    ("step_time_s", "step time", "s"),
    ("peak_mem_bytes", "peak mem", "bytes"),
    ("steps_to_target", "steps→target", "int"),
    ("samples_to_target", "samples→target", "int"),
    ("time_to_target_s", "time→target", "s"),
    ("final_val_metric", "final val", "g4"),
    ("error", "error / note", "text"),
)


def _trials(d: ReportData) -> Section:
    s = Section("trials", "12. Every trial")
    t = d.trials
    if t.empty:
        s.notes.append("These runs hold no trials yet.")
        return s
    counts = t["status"].value_counts()
    order = [x for x in STATUS_ORDER if x in counts] + [x for x in counts.index if x not in STATUS_ORDER]
    s.sentences.append(f"{len(t)} trials: " + ", ".join(f"{int(counts[x])} {x}" for x in order) + ".")
    bad = t[t["status"] != "ok"]
    if len(bad):
        s.sentences.append("Failed trials are listed first and highlighted; none is dropped from any figure's count.")
    t = t.assign(_bad=(t["status"] != "ok").astype(int))
    t = t.sort_values(["_bad", "run", "kind", "batch_size", "seed", "lr"], ascending=[False, True, True, True, True, True])
    rows, classes = [], []
    for rec in t.to_dict("records"):
        cells = []
        for col, _, kind in _TRIAL_COLS:
            v = rec.get(col)
            if kind == "int":
                cells.append(_f(v))
            elif kind == "g":
                cells.append(_g(v))
            elif kind == "g4":
                cells.append(_f(v, "{:.4f}"))
            elif kind == "s":
                cells.append(_seconds(v))
            elif kind == "bytes":
                cells.append(_bytes(v))
            elif kind == "text":
                cells.append("" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)[:300])
            else:
                cells.append("" if v is None else str(v))
        rows.append(cells)
        classes.append(f"status-{rec['status']}")
    numeric = {i for i, (_, _, k) in enumerate(_TRIAL_COLS) if k in ("int", "g", "g4", "s", "bytes")}
    s.tables.append(Table([h for _, h, _ in _TRIAL_COLS], rows, classes, numeric, scroll=len(rows) > 25))
    return s


def build_sections(d: ReportData, store_hint: str = "") -> list[Section]:
    """Every section of the report, in order (sections without data say why, and what to run)."""
    return [
        _headline(d, store_hint),
        _throughput(d, store_hint),
        _memory(d, store_hint),
        _gpu(d),
        _steps(d, store_hint),
        _to_target(d, store_hint),
        _curves(d, store_hint),
        _generalization(d, store_hint),
        _lr(d, store_hint),
        _ops(d, store_hint),
        _benchmarks(d),
        _trials(d),
    ]
