"""The report's sections: for each, its charts, the sentence that reads them in words, and, when its data are
missing, why and what to run.

Sentences are computed from :class:`~bsprof.report.data.ReportData`; numbers are rounded here (presentation).
Text is plain: the template escapes it; text between backticks is shown as code.
"""

from __future__ import annotations

import math
import shlex
from typing import TYPE_CHECKING

from bsprof.report import charts

if TYPE_CHECKING:
    import pandas as pd

    from bsprof.report.data import ReportData

from bsprof.formatting import capitalize, format_bytes, format_number, format_seconds, format_sig, plus_minus
from bsprof.report.sections_accuracy import (
    curves_section,
    generalization_section,
    lr_section,
    steps_section,
    to_target_section,
)
from bsprof.report.sections_compute import (
    benchmarks_section,
    gpu_section,
    memory_section,
    ops_section,
    throughput_section,
)
from bsprof.report.sections_noise import noise_section
from bsprof.report.text import STATUS_ORDER, Section, Table, run_prefix

__all__ = ["Section", "Table", "build_sections"]


def _headline(d: ReportData, store_hint: str) -> Section:
    s = Section("headline", "1. Headline: which batch size?")
    many = len(d.runs) > 1
    rows = []
    for label, rec in d.recommendations:
        t = d.tradeoff[(d.tradeoff["run"] == label) & (d.tradeoff["device"] == rec.device)]

        def at(b: int | None, col: str, t: pd.DataFrame = t) -> float:
            r = t[t["batch_size"] == b]
            return float(r[col].iloc[0]) if b is not None and len(r) and col in r else math.nan

        fast = (
            f"B={rec.fastest_wallclock} ({format_seconds(at(rec.fastest_wallclock, 'wallclock_to_target_s'))})"
            if (rec.fastest_wallclock is not None)
            else "—"
        )
        few = (
            f"B={rec.fewest_samples} ({format_number(at(rec.fewest_samples, 'samples_to_target'))} samples)"
            if (rec.fewest_samples is not None)
            else "—"
        )
        energy = f"B={rec.least_energy}" if rec.least_energy is not None else "not measured"
        f = rec.fit
        if f is None or not math.isfinite(f.b_noise):
            crit = "not estimated (fewer than 2 batch sizes reached the target)"
        elif f.constrained:
            crit = f"≈ {plus_minus(f.b_noise, f.b_noise_se)} samples"
        else:
            crit = f"≈ {format_sig(f.b_noise)} (not constrained: {f.reason})"
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
                sentence += (
                    f". Up to the critical batch size B_crit ≈ {plus_minus(f.b_noise, f.b_noise_se)} a bigger "
                    "batch saves steps almost for free; beyond it, it mostly costs samples"
                )
            s.sentences.append(run_prefix(label, many) + capitalize(sentence) + ".")
    for run in d.runs:
        if not any(label == run.label for label, _ in d.recommendations):
            why = "no trials" if run.trials == 0 else "no throughput trial and no reported convergence trial"
            rows.append(
                [run.label, "—", "—", "—", f"not estimated ({why})", _max_batch_text(d, run.workload, run.device)]
            )
    if rows:
        s.tables.append(
            Table(
                [
                    "run",
                    "fastest wall-clock to target",
                    "fewest samples to target",
                    "least energy to target",
                    "critical batch size B_crit",
                    "largest batch that fits",
                ],
                rows,
            )
        )
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
        ref = next(
            (str(r.config.get("workload_ref") or r.workload) for r in d.runs if r.workload == workload), workload
        )
        return f"not measured (`bsprof find-max-batch --workload {shlex.quote(ref)} --device {shlex.quote(device)}`)"
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
            vals.append(format_bytes(v) if key == "device_memory_bytes" and v else ("" if v is None else str(v)))
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
                "run created": dt.datetime.fromtimestamp(r.created_at, tz=dt.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M UTC"
                ),
                "trials stored": str(r.trials),
            }
        )
    for key in cfg[0] if cfg else ():
        rows.append([key, *[c[key] for c in cfg]])
    return Table(["environment", *[r.label for r in d.runs]], rows)


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
    t = t.sort_values(
        ["_bad", "run", "kind", "batch_size", "seed", "lr"], ascending=[False, True, True, True, True, True]
    )
    rows, classes = [], []
    for rec in t.to_dict("records"):
        cells = []
        for col, _, kind in _TRIAL_COLS:
            v = rec.get(col)
            if kind == "int":
                cells.append(format_number(v))
            elif kind == "g":
                cells.append(format_sig(v))
            elif kind == "g4":
                cells.append(format_number(v, "{:.4f}"))
            elif kind == "s":
                cells.append(format_seconds(v))
            elif kind == "bytes":
                cells.append(format_bytes(v))
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
        throughput_section(d, store_hint),
        memory_section(d, store_hint),
        gpu_section(d),
        steps_section(d, store_hint),
        noise_section(d, store_hint),
        to_target_section(d, store_hint),
        curves_section(d, store_hint),
        generalization_section(d, store_hint),
        lr_section(d, store_hint),
        ops_section(d, store_hint),
        benchmarks_section(d),
        _trials(d),
    ]
