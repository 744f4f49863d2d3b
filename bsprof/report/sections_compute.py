"""The compute-side sections of the report: throughput, memory, GPU telemetry, operators, benchmarks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from bsprof.report import charts

if TYPE_CHECKING:
    from bsprof.report.data import ReportData

from bsprof.formatting import (
    capitalize,
    format_bytes,
    format_number,
    format_ratio,
    format_seconds,
    format_sig,
    join_sizes,
)
from bsprof.report.text import Section, Table, by_run, finite_mask, run_prefix

__all__ = ["benchmarks_section", "gpu_section", "memory_section", "ops_section", "throughput_section"]


def throughput_section(d: ReportData, store_hint: str) -> Section:
    """Section 2: throughput and step time."""
    s = Section("throughput", "2. Throughput and step time")
    tp = d.throughput
    ok = tp[finite_mask(tp, "samples_per_s")] if len(tp) else tp
    if ok.empty:
        s.notes.append(
            "No successful throughput trial in these runs"
            + (" (every one failed: see the trial table)." if len(tp) else ".")
            + f" Run `bsprof sweep --kind throughput {store_hint}` to measure samples/s and step time."
        )
        return s
    many = len(d.runs) > 1
    for run, g in by_run(ok, d):
        g = g.sort_values("batch_size")
        b, v = g["batch_size"].to_numpy(), g["samples_per_s"].astype(float).to_numpy()
        if len(g) == 1:
            s.sentences.append(f"{run_prefix(run, many)}Only B={b[0]} measured: {format_number(v[0])} samples/s.")
            continue
        i = int(np.argmax(v))
        text = (
            f"{run_prefix(run, many)}Throughput grows {format_ratio(v[i], v[0])} from B={b[0]} "
            f"({format_number(v[0])} samples/s) to "
        )
        if i == len(v) - 1:
            text += f"B={b[i]} ({format_number(v[i])} samples/s), " + (
                "still rising" if v[-1] > 1.05 * v[-2] else "levelling off"
            )
        else:
            text += f"a peak at B={b[i]} ({format_number(v[i])} samples/s), then "
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
                f"{run_prefix(run, many)}Measurements are noisy: at B={int(g.loc[j, 'batch_size'])} the p75 "
                f"throughput is "
                f"{spread.max():.1f}x the p25 (a busy host?); more `--repeats` give steadier medians."
            )
        drifted = g[g["drifted_trials"].astype(float).fillna(0) > 0] if "drifted_trials" in g else g[:0]
        if len(drifted):
            worst = drifted.loc[drifted["step_time_drift_rel"].astype(float).abs().idxmax()]
            s.sentences.append(
                f"{run_prefix(run, many)}The step time drifted within {int(drifted['drifted_trials'].sum())} "
                f"trial(s) at B={join_sizes(drifted['batch_size'])} (last blocks against first: up to "
                f"{float(worst['step_time_drift_rel']):+.0%} at B={int(worst['batch_size'])}): those medians mix two "
                "states (a model drifting into slow numerics, throttling, or a busy host)."
            )
    for label, note in d.input_bound:
        s.sentences.append(f"{run_prefix(label, many)}Input-bound: {note}.")
    s.chart("throughput", lambda: charts.throughput_chart(d.throughput))
    return s


def memory_section(d: ReportData, store_hint: str) -> Section:
    """Section 3: peak memory, device capacity, out-of-memory batch sizes."""
    import pandas as pd

    s = Section("memory", "3. Peak memory")
    tp = d.throughput
    many = len(d.runs) > 1
    caps = {
        r.label: r.environment.get("device_memory_bytes") for r in d.runs if r.environment.get("device_memory_bytes")
    }
    conv_oom = d.trials[(d.trials["kind"] == "convergence") & (d.trials["status"] == "oom")][["run", "batch_size"]]
    mem = tp[finite_mask(tp, "peak_mem_bytes")] if len(tp) else tp
    oom_rows = (
        pd.concat([tp[tp["status"].astype(str).str.contains("oom")][["run", "batch_size"]], conv_oom])
        if len(tp)
        else conv_oom
    )
    if mem.empty and oom_rows.empty:
        s.notes.append(f"No peak memory measured (no successful throughput trial). Run `bsprof sweep {store_hint}`.")
        return s
    for run, g in by_run(mem, d):
        g = g.sort_values("batch_size")
        lo, hi = g.iloc[0], g.iloc[-1]
        text = (
            f"{run_prefix(run, many)}Peak memory goes from {format_bytes(lo['peak_mem_bytes'])} at "
            f"B={int(lo['batch_size'])} "
            f"to {format_bytes(hi['peak_mem_bytes'])} at B={int(hi['batch_size'])}"
        )
        if run in caps:
            text += (
                f", {float(g['peak_mem_bytes'].max()) / float(caps[run]):.0%} of the device's {format_bytes(caps[run])}"
            )
        s.sentences.append(text + ".")
    devices = {r.label: r.device for r in d.runs}
    if any(not str(devices.get(r, "")).startswith("cuda") for r in mem["run"].unique()):
        s.sentences.append(
            "On a CPU, peak memory is the growth of the process's peak resident memory during the trial (the "
            "kernel's high-water mark on Linux, else sampled): a lower bound, since memory freed by earlier trials "
            "is reused without growing it."
        )
    if len(oom_rows):
        for run, g in by_run(oom_rows, d):
            s.sentences.append(f"{run_prefix(run, many)}Out of memory at B={join_sizes(sorted(set(g['batch_size'])))}.")
    else:
        s.sentences.append("No batch size ran out of memory.")
    s.chart("memory", lambda: charts.memory_chart(tp, caps or None, conv_oom))
    return s


def gpu_section(d: ReportData) -> Section:
    """Section 4: GPU utilization, power and energy per sample, or why they are missing."""
    s = Section("gpu", "4. GPU utilization, power and energy")
    g = d.gpu
    cols = [c for c in ("gpu_util_pct", "power_w", "energy_per_sample_j") if c in g.columns and g[c].notna().any()]
    if not cols:
        reasons = sorted(
            {
                str(r.environment.get("gpu_telemetry_reason"))
                for r in d.runs
                if r.environment.get("gpu_telemetry_reason")
            }
        )
        why = f" ({'; '.join(reasons)})" if reasons else ""
        s.notes.append(
            f"Not measured{why}. Run on a CUDA GPU with NVML telemetry (`pip install 'bsprof[gpu]'`, then "
            "`bsprof sweep --device cuda`) to see utilization, power and energy per sample here."
        )
        return s
    many = len(d.runs) > 1
    for run, r in by_run(g, d):
        r = r.sort_values("batch_size")
        bits = []
        for col, name, fmt in (("gpu_util_pct", "GPU utilization", "{:.0f}%"), ("power_w", "power", "{:.0f} W")):
            v = r[["batch_size", col]].dropna() if col in r else r.iloc[0:0]
            if len(v) >= 1:
                bits.append(
                    f"{name} goes from {fmt.format(v[col].iloc[0])} at B={int(v['batch_size'].iloc[0])} to "
                    f"{fmt.format(v[col].iloc[-1])} at B={int(v['batch_size'].iloc[-1])}"
                )
        if "energy_per_sample_j" in r:
            v = r[["batch_size", "energy_per_sample_j"]].dropna()
            if len(v):
                lo = v.loc[v["energy_per_sample_j"].idxmin()]
                bits.append(
                    f"energy per sample is lowest at B={int(lo['batch_size'])} "
                    f"({lo['energy_per_sample_j'] * 1e3:.3g} mJ)"
                )
        if bits:
            s.sentences.append(run_prefix(run, many) + capitalize("; ".join(bits)) + ".")
    s.chart("gpu", lambda: charts.gpu_chart(g))
    return s


def ops_section(d: ReportData, store_hint: str) -> Section:
    """Section 10: where the time goes (top operators) and the TensorBoard command."""
    s = Section("ops", "10. Where the time goes")
    ops = d.top_ops
    root = d.trace_roots[0] if d.trace_roots else "reports/traces"
    if ops.empty:
        s.notes.append(
            f"No operator profile in these runs: `bsprof profile {store_hint}` (or `bsprof sweep --profile`) "
            "adds a torch.profiler pass per batch size, with a TensorBoard trace and the top operators."
        )
        if d.trace_roots:
            s.commands.append(f"tensorboard --logdir {root}")
        return s
    many = len(d.runs) > 1
    for run, g in by_run(ops, d):
        bs = sorted(g["batch_size"].unique())
        parts = []
        for b in (bs[0], bs[-1]) if len(bs) > 1 else (bs[0],):
            top = g[g["batch_size"] == b].sort_values("self_s_per_step", ascending=False).iloc[0]
            parts.append(f"at B={int(b)} {top['name']} takes {top['share_pct']:.0f}% of the operators' self time")
        s.sentences.append(run_prefix(run, many) + capitalize("; ".join(parts)) + ".")
    s.chart("ops", lambda: charts.top_operators_chart(ops))
    s.sentences.append(
        "Open the full traces in TensorBoard (needs `pip install 'bsprof[tensorboard]'`) or in Perfetto's UI:"
    )
    for r in d.trace_roots or [root]:
        s.commands.append(f"tensorboard --logdir {r}")
    return s


def benchmarks_section(d: ReportData) -> Section:
    """Section 11: pytest-benchmark results."""
    s = Section("benchmarks", "11. pytest-benchmark results")
    b = d.benchmarks
    if b is None:
        s.notes.append(
            "No benchmark results: pass `--benchmark-json FILE` (written by "
            "`pytest benchmarks --benchmark-json FILE`) to include them."
        )
        return s
    if b.empty:
        s.notes.append("The benchmark JSON file(s) hold no benchmarks.")
        return s
    files = sorted(set(b["file"]))
    rel = (b["iqr"] / b["median"]).astype(float)
    text = f"{len(b)} benchmark(s) from {join_sizes(files) if len(files) > 1 else files[0]}"
    fast, slow = b.loc[b["median"].idxmin()], b.loc[b["median"].idxmax()]
    if len(b) > 1:
        text += (
            f"; medians range from {format_seconds(fast['median'])} ({fast['name']}) to "
            f"{format_seconds(slow['median'])} "
            f"({slow['name']})"
        )
    else:
        text += f": median {format_seconds(fast['median'])} per round"
    if rel.notna().any() and rel.max() > 0.1:
        j = rel.idxmax()
        text += f"; the noisiest, {b.loc[j, 'name']}, has an IQR of {rel.max():.0%} of its median"
    s.sentences.append(text + ".")
    s.chart("benchmarks", lambda: charts.benchmarks_chart(b))
    rows = [
        [
            r["name"],
            format_seconds(r["min"]),
            format_seconds(r["median"]),
            format_seconds(r["iqr"]),
            format_number(r["rounds"]),
            _extra_text(r["extra_info"]),
        ]
        for _, r in b.iterrows()
    ]
    s.tables.append(Table(["benchmark", "min", "median", "IQR", "rounds", "extra_info"], rows, numeric={1, 2, 3, 4}))
    return s


def _extra_text(extra_json: str) -> str:
    """A benchmark's ``extra_info`` (JSON text) as ``key: value; key: value``, numbers to 3 significant digits."""
    import json

    if not extra_json:
        return ""
    extra = json.loads(extra_json)
    parts = []
    for k, v in sorted(extra.items()):
        shown = format_sig(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
        parts.append(f"{k}: {shown}")
    return "; ".join(parts)
