"""Terminal presentation: a progress bar (rich on a terminal, plain log lines otherwise) and summary tables.

Presentation only: numbers come from :mod:`bsprof.analysis`; units are scaled and rounded here.

Size (about 490 lines, above the ~400 guideline): every terminal table (summary, wide summary, progress, comparison,
prediction, host state); presentation only, no analysis.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import TYPE_CHECKING, Any

from bsprof.formatting import TIME_UNITS, format_bytes, format_number, format_seconds, format_spread, select_unit

if TYPE_CHECKING:
    from bsprof.engine.trial import TrialResult, TrialSpec
    from bsprof.store import Store

__all__ = [
    "Progress",
    "config_summary",
    "noise_scale_lines",
    "print_comparison",
    "print_prediction",
    "print_run_note",
    "print_runs",
    "print_summary",
    "run_note",
]

log = logging.getLogger("bsprof")


def _describe(spec: TrialSpec) -> str:
    return f"{spec.kind} B={spec.batch_size} seed={spec.seed} lr={spec.lr:g} round={spec.repeat}"


class Progress:
    """Per-trial progress with ETA: a rich bar when stderr is a terminal, log lines when it is not."""

    def __init__(self, *, force_plain: bool = False) -> None:
        self._rich: Any = None
        self._task: Any = None
        if not force_plain and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()

    def update(self, spec: TrialSpec, result: TrialResult | None, done: int, total: int) -> None:
        if self._rich is not None:
            if self._task is None:
                self._task = self._rich.add_task("trials", total=total, completed=done)
            self._rich.update(self._task, completed=done, description=_describe(spec))
            if result is not None and result.status != "ok":
                self._rich.console.log(f"{_describe(spec)}: {result.status} {result.error or ''}")
            return
        if result is None:
            return
        detail = ""
        if result.status == "ok" and "samples_per_s" in result.metrics:
            detail = f" {result.metrics['samples_per_s']:.0f} samples/s"
        elif result.error:
            detail = f" ({result.error})"
        log.info("[%d/%d] %s: %s%s", done, total, _describe(spec), result.status, detail)


def _ci(row: Any, col: str, fmt: str) -> str:
    mid = format_number(getattr(row, col), fmt)
    lo, hi = format_number(getattr(row, f"{col}_ci_low"), fmt), format_number(getattr(row, f"{col}_ci_high"), fmt)
    return f"{mid} [{lo}–{hi}]" if mid and lo and (lo != mid or hi != mid) else mid


def _status_text(r: Any, drift: str) -> str:
    """``ok``, or what went wrong per trial kind: ``throughput oom; convergence diverged: 2``."""
    parts = []
    tp = str(r.throughput_status or "")
    if tp and tp not in ("nan", "None", "ok"):
        parts.append(f"throughput {tp}")
    conv = str(r.statuses or "")
    if conv and conv not in ("nan", "None"):
        parts.append(f"convergence {conv}")
    if drift:
        parts.append(drift)
    return "; ".join(parts) or "ok"


_WIDE_ONLY = ("samples→target", "train time→target (measured)", "val/train metric")
"""Columns shown only with ``--wide``; without it, spreads and intervals are left out too (fits 100 columns)."""


def print_summary(
    store: Store, run_ids: list[str], *, width: int | None = None, wide: bool = False, console: Any = None
) -> None:
    """Print the trade-off table per batch size and the recommendations, for the given runs.

    Args:
        store: The store.
        run_ids: The runs to show, one table each.
        width: Console width in columns (default: the terminal's; 260 when not a terminal and ``wide``,
            else 100).
        wide: Every column, with spreads and confidence intervals; the default leaves those out so that the
            table fits 100 columns.
        console: A rich ``Console`` to print to (tests render at a given width).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from bsprof.analyze import analyze
    from bsprof.export import trials_frame
    from bsprof.noise_analysis import prediction_trials

    if console is None:  # on a terminal rich fits the table to its width; in a log file, a fixed width
        console = Console(width=width or (None if sys.stdout.isatty() else (260 if wide else 100)))
    for run_id in run_ids:
        run = store.run(run_id)
        trials = trials_frame(store, [run_id])
        if trials.empty:
            console.print(f"run {run_id}: no trials stored")
            continue
        noise_trials = prediction_trials(store, run.workload, trials)
        a = analyze(trials, run.config.get("lr_rule"), noise_trials)  # every derived table, computed once
        table = a.tradeoff
        heads = ["batch", "samples/s [p25–p75]" if wide else "samples\nper s",
                 "step time ± IQR" if wide else "step\ntime", "peak mem",
                 "steps→target [95% CI]" if wide else "steps to\ntarget", "samples→target",
                 "wall-clock→target (est.)" if wide else "time to\ntarget", "train time→target (measured)",
                 "reached", "E(B)", "regime", "val/train metric", "status"]  # fmt: skip
        step_unit = select_unit(table["step_time_s"], TIME_UNITS)  # one unit for the column, from its values
        wall_unit = select_unit(table["wallclock_to_target_s"], TIME_UNITS)
        train_unit = select_unit(table["time_to_target_s"], TIME_UNITS)
        rows = []
        drifted: list[str] = []  # without --wide the detail goes below the table: the status column stays narrow
        busy = {int(b) for b in a.stability.loc[a.stability["verdict"] == "busy", "batch_size"]}
        for r in table.itertuples():
            reached = "" if math.isnan(float(getattr(r, "reached_fraction", math.nan))) else f"{r.reached}/{r.seeds}"
            drift = (f"step time drifted in {int(r.drifted_trials)}/{int(r.throughput_ok)} trials"
                     if float(getattr(r, "drifted_trials", 0) or 0) > 0 else "")  # fmt: skip
            if drift and not wide:
                drifted.append(f"B={r.batch_size} in {int(r.drifted_trials)}/{int(r.throughput_ok)} trials")
                drift = "drift"
            metric = (f"{format_number(r.final_val_metric, '{:.3f}')} / {format_number(r.final_train_metric, '{:.3f}')}"
                      if format_number(r.final_val_metric, "{:.3f}") else "")  # fmt: skip
            if wide:
                speed = format_spread(r.samples_per_s, r.samples_per_s_p25, r.samples_per_s_p75)
                step = (
                    f"{format_seconds(r.step_time_s, step_unit, 4)} ± {format_seconds(r.step_time_iqr_s, step_unit, 2)}"
                    if format_number(r.step_time_s) and format_number(r.step_time_iqr_s)
                    else ""
                )
                steps = _ci(r, "steps_to_target", "{:,.0f}")
            else:
                speed = format_spread(r.samples_per_s, None, None)
                step = format_seconds(r.step_time_s, step_unit, 3) if format_number(r.step_time_s) else ""
                steps = format_number(r.steps_to_target, "{:,.0f}")
            rows.append(
                [
                    str(r.batch_size),
                    speed,
                    step,
                    format_bytes(r.peak_mem_bytes),
                    steps,
                    format_number(r.samples_to_target),
                    format_seconds(r.wallclock_to_target_s, wall_unit, 3),
                    format_seconds(r.time_to_target_s, train_unit, 3),
                    reached,
                    format_number(r.scaling_efficiency, "{:.2f}"),
                    r.regime if isinstance(r.regime, str) else "",
                    metric,
                    _status_text(r, drift) + (" (busy host)" if int(r.batch_size) in busy else ""),
                ]
            )
        keep = [i for i in range(len(heads)) if i == 0 or any(row[i] for row in rows)]  # drop all-empty columns
        if not wide:
            keep = [i for i in keep if heads[i] not in _WIDE_ONLY]
        title = f"{run.workload} — run {run_id} ({run.environment.get('device_name', '')})"
        t = (
            Table(title=title)
            if wide
            else Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
        )
        for i in keep:
            left = heads[i] in ("regime", "status")
            t.add_column(heads[i], justify="left" if left else "right", no_wrap=heads[i] != "status")
        for row in rows:
            t.add_row(*(row[i] for i in keep))
        console.print(t)
        if not wide:
            console.print("time to target = steps to target x step time (est.); more columns: --wide")
            if drifted:
                console.print(f"drift: step time drifted between rounds of a trial at {', '.join(drifted)}")
        _print_stability(console, a.stability)
        for note in a.input_bound:
            console.print(f"[yellow]input-bound:[/yellow] {note}")
        disagree = table[table["time_estimate_disagrees"].astype(bool)]
        if len(disagree):
            ratios = ", ".join(f"B={int(r.batch_size)} {r.time_to_target_ratio:.2f}x" for r in disagree.itertuples())
            console.print(
                "[yellow]note:[/yellow] the convergence trials' own training time to target differs from the estimate "
                f"(steps to target x throughput step time) by more than their noise: measured/estimate {ratios}"
            )
        for rec in a.recommendations:
            if rec.fit is not None and math.isfinite(rec.fit.b_noise):
                f = rec.fit
                flag = "" if f.constrained else f"  (not constrained: {f.reason})"
                console.print(
                    f"fit S = S_min(1 + B_noise/B): S_min = {f.s_min:.3g} ± {f.s_min_se:.2g} steps, "
                    f"B_noise = B_crit = {f.b_noise:.3g} ± {f.b_noise_se:.2g} samples, "
                    f"E_min = {f.e_min:.3g} ± {f.e_min_se:.2g} samples{flag}"
                )
            parts = []
            if rec.fastest_wallclock is not None:
                parts.append(f"fastest wall-clock to target: B={rec.fastest_wallclock}")
            if rec.fewest_samples is not None:
                parts.append(f"fewest samples (compute) to target: B={rec.fewest_samples}")
            if rec.least_energy is not None:
                parts.append(f"least energy to target: B={rec.least_energy}")
            if parts:
                console.print("recommended — " + "; ".join(parts))
            for w in rec.warnings:
                console.print(f"[yellow]warning:[/yellow] {w}")
        for cb in a.critical_batches:
            for line in noise_scale_lines(cb):
                console.print(line, highlight=False)


def _interval(lo: Any, hi: Any) -> str:
    return (
        f" [{format_number(lo, '{:.3g}')}–{format_number(hi, '{:.3g}')}]"
        if format_number(lo) and format_number(hi)
        else ""
    )


def noise_scale_lines(cb: Any) -> list[str]:
    """Console lines of one :class:`~bsprof.noise_analysis.CriticalBatch`: predicted beside measured B_crit."""
    if cb.predicted is None:
        return []
    when = "at the target" if cb.at_target else "at the end of the budget (target not reached: early estimate)"
    lines = [
        f"noise scale (McCandlish et al. 2018): B_simple {when} = {cb.predicted:.3g}"
        f"{_interval(cb.predicted_low, cb.predicted_high)} examples (90% interval, {cb.predicted_trials} "
        f"trial(s)); predicted B_crit ≈ {cb.predicted:.3g}, confidence {cb.confidence}"
    ]
    if cb.measured is not None and cb.ratio is not None:
        se = f" ± {cb.measured_se:.2g}" if cb.measured_se is not None and math.isfinite(cb.measured_se) else ""
        flag = "" if cb.measured_constrained else " (fit not constrained)"
        lines.append(
            f"predicted vs measured B_crit: {cb.predicted:.3g} vs fitted {cb.measured:.3g}{se}{flag} — ratio "
            f"{cb.ratio:.2f}{_interval(cb.ratio_low, cb.ratio_high)}"
        )
    if cb.fastest_batch_size is not None:
        lines.append(f"predicted fastest wall-clock to target on this device: B={cb.fastest_batch_size}")
    return lines


def print_prediction(store: Store, run_id: str, *, width: int | None = None) -> None:
    """Print a ``bsprof predict`` run: the noise scale over its short run, predicted B_crit and S(B), the batch
    size predicted fastest here, beside the workload's latest measured sweep when there is one, and the caveats."""
    from rich.console import Console
    from rich.table import Table

    from bsprof.analyze import analyze
    from bsprof.export import trials_frame
    from bsprof.noise_analysis import CAVEATS

    console = Console(width=width or (None if sys.stdout.isatty() else 220))
    run = store.run(run_id)
    trials = trials_frame(store, [run_id])
    a = analyze(trials, run.config.get("lr_rule"))
    console.print(f"{run.workload} — noise-scale prediction, run {run_id} ({run.environment.get('device_name', '')})")
    for t in trials[trials["kind"] == "convergence"].itertuples():
        points = [r for r in store.curve(int(t.trial_id)) if "b_simple" in r]
        text = ", ".join(f"{r['step']}: {format_number(r['b_simple'], '{:.3g}') or '—'}" for r in points)
        console.print(f"B_simple over the short run at B={t.batch_size} (step: examples): {text}", highlight=False)
    sweeps = [r for r in store.runs() if r.workload == run.workload and r.config.get("mode", "sweep") == "sweep"
              and "convergence" in r.config.get("kinds", ())]  # fmt: skip
    if sweeps:
        sweep = max(sweeps, key=lambda r: r.created_at)
        a = analyze(trials_frame(store, [sweep.run_id]), sweep.config.get("lr_rule"), trials)
        console.print(f"measured: the convergence sweep run {sweep.run_id}")
    for cb in a.critical_batches:
        for line in noise_scale_lines(cb):
            console.print(line, highlight=False)
    steps = a.steps_prediction
    if steps is not None and len(steps):
        rel = bool(steps["relative"].any())
        t = Table(title="predicted steps to target S(B) = S_min(1 + B_noise/B)" + (" (× S_min)" if rel else ""))
        for h in ("batch", "S(B) [B_noise interval]", "measured S", "step time", "predicted time to target"):
            t.add_column(h, justify="right")
        for r in steps.itertuples():
            t.add_row(
                str(r.batch_size),
                f"{format_number(r.predicted_steps, '{:,.3g}')}{_interval(r.predicted_low, r.predicted_high)}",
                format_number(r.measured_steps, "{:,.0f}"),
                format_number(r.step_time_s * 1e3, "{:.3f} ms"),
                format_number(r.predicted_time_s, "{:.3g} s" if not rel else "{:.3g} s·S_min"),
            )
        console.print(t)
    console.print("what this prediction cannot know:")
    for c in CAVEATS:
        console.print(f"- {c}", highlight=False)


def config_summary(config: dict[str, Any]) -> str:
    """A run's settings in one short line: ``kinds, device, amp, LR rule, target`` (what tells runs apart)."""
    engine = config.get("engine") or {}
    conv = config.get("convergence") or {}
    parts = [
        "+".join(config.get("kinds") or []) or "?",
        str(engine.get("device", "?")),
        f"amp {engine.get('amp', 'off')}",
    ]
    if engine.get("compile"):
        parts.append("compile")
    if config.get("lr_rule"):
        parts.append(f"lr {config['lr_rule']}" + (f" tune {config['tune_lr']}" if config.get("tune_lr") else ""))
    if conv.get("target") is not None:
        parts.append(f"target {conv['target']:g}")
    if config.get("source"):
        parts.append(str(config["source"]))
    return ", ".join(parts)


def print_runs(store: Store) -> None:
    """``bsprof runs``: one line per run, oldest first (id, workload, created, trials, settings)."""
    import datetime

    counts = store.trial_counts()
    runs = store.runs()
    latest = set(store.latest_run_ids())
    rows = [
        (
            r.run_id,
            r.workload,
            datetime.datetime.fromtimestamp(r.created_at).strftime("%Y-%m-%d %H:%M"),
            str(counts.get(r.run_id, 0)),
            config_summary(r.config) + ("  (latest: shown by default)" if r.run_id in latest else ""),
        )
        for r in runs
    ]
    heads = ("run", "workload", "created", "trials", "settings")
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(heads[:-1])]
    for row in [heads, *rows]:
        print("  ".join(c.ljust(w) if i != 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))), row[-1])


def run_note(store: Store, run_ids: list[str], *, chosen: bool) -> str | None:
    """Which runs are shown and how many others the store holds for the same workloads (``None``: no others)."""
    others = store.other_runs(run_ids)
    if not others:
        return None
    workloads = {store.run(r).workload for r in run_ids}
    how = "the runs asked for" if chosen else "the latest run per workload"
    return (
        f"showing {how} ({', '.join(run_ids)}); the store holds {len(others)} other run(s) of "
        f"{', '.join(sorted(workloads))}: `bsprof runs` lists them, --run ID picks one"
    )


def print_run_note(store: Store, run_ids: list[str], *, chosen: bool) -> None:
    """Print :func:`run_note` when there is one."""
    note = run_note(store, run_ids, chosen=chosen)
    if note:
        print(note)


def _print_stability(console: Any, stability: Any) -> None:
    """The stability banner: one line per batch size whose throughput is not to be trusted."""
    bad = stability[stability["verdict"].isin(["busy", "unstable"])]
    for r in bad.itertuples():
        console.print(f"[bold yellow]{r.verdict.upper()}:[/bold yellow] B={r.batch_size}: {r.why}")
    if (bad["verdict"] == "busy").any():
        console.print(
            "[yellow]the host was busy: these figures may be far too slow; run `bsprof check` and see README, "
            "'Noisy hosts'[/yellow]"
        )


def _change_text(c: Any) -> str:
    """``+20.0%`` (and the throughput change for step times); ``missed`` when the new median missed the target."""
    if math.isnan(c.change):
        return ""
    if math.isinf(c.change):
        return "median seed now misses"
    text = f"{c.change:+.1%}"
    if c.metric == "step_time_s" and c.change > -1:
        text += f" (samples/s {1 / (1 + c.change) - 1:+.1%})"
    return text


_METRIC_LABELS = {"step_time_s": "step time", "steps_to_target": "steps to target", "peak_mem_bytes": "peak memory"}


def print_comparison(
    comparisons: list[Any], *, threshold: float, alpha: float, mem_threshold: float | None = None, width: int = 160
) -> None:
    """Print ``bsprof compare``'s table: per benchmark and metric, both statistics, the change, p and the verdict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def value(metric: str, v: float) -> str:
        if math.isinf(v):
            return "missed"
        if metric == "step_time_s":
            return format_seconds(v, step_unit, 4)
        if metric == "peak_mem_bytes":
            return format_bytes(v)
        return format_number(v, "{:,.0f}" if float(v).is_integer() else "{:,.1f}")

    step_unit = select_unit([v for c in comparisons if c.metric == "step_time_s" for v in (c.base, c.new)], TIME_UNITS)
    colour = {"regression": "red", "improvement": "green", "not significant": "yellow"}
    mem = f"; peak memory: grows by > {mem_threshold:.0%}" if mem_threshold is not None else ""
    t = Table(
        title=f"bsprof compare (regression: worse by > {threshold:.0%} and one-sided Mann-Whitney U p < {alpha:g}"
        f"{mem}; a baseline benchmark missing or out of memory fails)"
    )
    names = [c.name.split("::")[-1] for c in comparisons]
    name_width = max([len("benchmark"), *map(len, names)])
    for head in ("benchmark", "metric", "baseline", "new", "change", "p", "n", "verdict"):
        t.add_column(
            head,
            justify="left" if head in ("benchmark", "metric", "verdict") else "right",
            min_width=name_width if head == "benchmark" else None,
        )
    for c, name in zip(comparisons, names):
        verdict = f"[{colour.get(c.verdict, 'red')}]{c.verdict}[/]" if c.verdict != "unchanged" else c.verdict
        if c.metric == "status":
            t.add_row(escape(name), "status", "ok", c.verdict, "", "", "", verdict)
            continue
        t.add_row(
            escape(name),
            f"{_METRIC_LABELS.get(c.metric, c.metric)} ({c.statistic})",
            value(c.metric, c.base),
            value(c.metric, c.new),
            _change_text(c),
            "" if math.isnan(c.p_value) else f"{c.p_value:.2g}",
            f"{c.n_base}/{c.n_new}",
            verdict,
        )
    Console(width=max(width, name_width + 125)).print(t)


def print_host_state(state: Any, advice: list[str]) -> None:
    """``bsprof check``'s output: the host's readings (a :class:`~bsprof.host_check.HostState`), then advice."""
    load = state.load
    if load is None:
        print("host: CPU counters not readable (/proc/stat): contention cannot be detected here")
    else:
        steal = "n/a" if load.steal_pct is None else f"{load.steal_pct:.1f}%"
        print(
            f"host: {load.cpu_count} cores; other processes {load.other_cpu_cores or 0:.2f} cores busy; run queue "
            f"{load.run_queue_mean or 0:.1f}; steal {steal}; load average (1 min) "
            f"{'n/a' if state.load_avg_1m is None else f'{state.load_avg_1m:.2f}'}"
        )
    print(f"CPU frequency governor: {', '.join(state.governors) or 'not exposed by this kernel'}")
    for g in state.gpus:
        if g.reason is not None:
            print(f"GPU {g.index}: not readable ({g.reason})")
            continue
        clock = "n/a" if g.sm_clock_hz is None else f"{g.sm_clock_hz / 1e6:.0f}"
        top = "n/a" if g.max_sm_clock_hz is None else f"{g.max_sm_clock_hz / 1e6:.0f}"
        print(
            f"GPU {g.index} {g.name}: persistence mode {'n/a' if g.persistence_mode is None else g.persistence_mode}; "
            f"SM clock {clock}/{top} MHz; throttle reasons {', '.join(g.throttle_reasons) or 'none'}; other "
            f"processes {'n/a' if g.other_processes is None else g.other_processes}"
        )
    verdict = "busy" if load is not None and load.busy else "quiet"
    print(f"verdict: {verdict}")
    for line in advice:
        print(f"- {line}")
