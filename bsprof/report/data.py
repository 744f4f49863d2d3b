"""The report's data: every frame a chart or a sentence of the report needs, read once from a store.

(About 420 lines: the store readers the report alone needs — curves, operator rows, max-batch results, run
labels — stay beside :func:`report_data`, which calls :func:`bsprof.analyze.analyze` for every derived table.)

:func:`report_data` reads the chosen runs (by default the latest run per workload), runs the analysis per run
and labels every row with its run, so that several runs (two devices, AMP on and off...) land side by side
in the same charts. Frames stay in SI units; :mod:`bsprof.report.charts` scales them for display.

:func:`load_benchmark_json` reads and validates pytest-benchmark ``--benchmark-json`` files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bsprof.engine.result import TrialExtra
from bsprof.errors import BadInput

if TYPE_CHECKING:
    import pandas as pd

    from bsprof.analyze import Recommendation
    from bsprof.store import Store

__all__ = ["CURVE_POINTS_TOTAL", "ReportData", "RunInfo", "load_benchmark_json", "report_data"]

CURVE_POINTS_TOTAL = 24_000
"""Learning-curve points kept over all trials (each trial's curve is thinned on a log scale to fit);
bounds the page's size for big stores."""

CURVE_POINTS_PER_TRIAL = 60
_KEYS = ["run", "batch_size"]


@dataclass(frozen=True)
class RunInfo:
    """One run of the report.

    Attributes:
        run_id: The store's run id.
        label: Short name shown in legends, unique within the report.
        workload: Workload name.
        device: Device string of the run's configuration.
        created_at: Unix time the run was opened.
        config: The run's hashed configuration.
        environment: Versions, device, host, git commit.
        trials: Number of trials stored.
    """

    run_id: str
    label: str
    workload: str
    device: str
    created_at: float
    config: dict[str, Any]
    environment: dict[str, Any]
    trials: int

    @property
    def lr_rule(self) -> str | None:
        return self.config.get("lr_rule")


@dataclass
class ReportData:
    """Everything the report shows, as pandas frames with a ``run`` label column.

    Attributes:
        runs: The runs, in report order.
        trials: The export frame (:func:`bsprof.trials_frame`) of those runs, plus ``run``.
        throughput, gpu, convergence, tradeoff, lr_tuning, gap_trend: The frames of
            :class:`bsprof.analyze.Analysis`, one :func:`~bsprof.analyze.analyze` call per run.
        fits: One row per run with a noise-scale fit: ``s_min``, ``b_noise``, their standard errors,
            ``e_min``, ``points``, ``constrained``, ``reason``.
        recommendations: (run label, :class:`~bsprof.analysis.Recommendation`) per run and device.
        curves: Learning-curve rows of the reported convergence trials, thinned: ``run, trial_id,
            batch_size, seed, status, step, samples, train_s, val_metric, train_loss, weight_distance,
            grad_norm``.
        final_state: :func:`bsprof.analyze.final_state_table` of the curves, per run and batch size.
        top_ops: Per run, batch size and operator: ``name``, ``self_s_per_step``, ``share_pct``, ``time``
            (``device`` or ``cpu``).
        trace_roots: Folders holding the profiler traces (for ``tensorboard --logdir``).
        max_batch: ``find-max-batch`` results for the runs' workloads, latest per (workload, device).
        benchmarks: pytest-benchmark rows (see :func:`load_benchmark_json`), or ``None``.
        targets: Target metric per run label (from the trials), where known.
        critical: Predicted (noise scale) beside fitted B_crit per run and device
            (:func:`bsprof.noise_analysis.critical_table`, plus ``run``).
        steps_prediction: Predicted vs measured S(B) (:func:`bsprof.noise_analysis.steps_prediction_table`).
        noise_curves: Noise-scale measurements of the runs' convergence trials: ``run, trial_id, batch_size,
            seed, step, epochs, b_simple, b_simple_low, b_simple_high``.
        stability: :func:`bsprof.stability.stability_table` per run (busy / unstable batch sizes are the
            report's banner).
        input_bound: (run label, note) per input-bound batch size (:attr:`bsprof.analyze.Analysis.input_bound`).
    """

    runs: list[RunInfo]
    trials: pd.DataFrame
    throughput: pd.DataFrame
    gpu: pd.DataFrame
    convergence: pd.DataFrame
    tradeoff: pd.DataFrame
    fits: pd.DataFrame
    recommendations: list[tuple[str, Recommendation]]
    curves: pd.DataFrame
    final_state: pd.DataFrame
    lr_tuning: pd.DataFrame
    top_ops: pd.DataFrame
    trace_roots: list[str]
    max_batch: pd.DataFrame
    gap_trend: pd.DataFrame
    benchmarks: pd.DataFrame | None = None
    targets: dict[str, float] = field(default_factory=dict)
    critical: pd.DataFrame | None = None
    steps_prediction: pd.DataFrame | None = None
    noise_curves: pd.DataFrame | None = None
    stability: pd.DataFrame | None = None
    input_bound: list[tuple[str, str]] = field(default_factory=list)


def _labels(runs: Sequence[Any]) -> list[str]:
    """Short unique labels: ``workload · device``, then the settings that tell runs apart, then the id."""
    base = [f"{r.workload} · {r.config.get('engine', {}).get('device', '?')}" for r in runs]
    out = list(base)
    for i, r in enumerate(runs):
        twins = [j for j, b in enumerate(base) if b == base[i]]
        if len(twins) == 1:
            continue
        eng = r.config.get("engine", {})
        bits = []
        for key, value in (("amp", eng.get("amp")), ("compile", eng.get("compile"))):
            if len({str(runs[j].config.get("engine", {}).get(key)) for j in twins}) > 1:
                bits.append(f"{key} {value}" if key == "amp" else ("compiled" if value else "eager"))
        if len({str(runs[j].config.get("lr_rule")) for j in twins}) > 1:
            bits.append(f"LR rule {r.config.get('lr_rule')}")
        if len({str(runs[j].config.get("tune_lr")) for j in twins}) > 1:
            bits.append(f"LR tuned x{r.config['tune_lr']}" if r.config.get("tune_lr") else "LR not tuned")
        out[i] = " · ".join([base[i], *bits])
    for i, r in enumerate(runs):
        if out.count(out[i]) > 1:
            out[i] = f"{out[i]} · {r.run_id[:8]}"
    return out


def _concat(frames: list[pd.DataFrame], columns: Iterable[str] = ()) -> pd.DataFrame:
    import pandas as pd

    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["run", *columns])
    return pd.concat(frames, ignore_index=True)


def _thin(n: int, keep: int) -> list[int]:
    """At most ``keep`` indices of ``range(n)``, log-spaced (curves are read on log axes), first and last kept."""
    import numpy as np

    if n <= keep:
        return list(range(n))
    idx = np.unique(np.round(np.geomspace(1, n, keep)).astype(int) - 1)
    return sorted({0, n - 1, *idx.tolist()})


_NOISE_COLS = ["step", "epochs", "b_simple", "b_simple_low", "b_simple_high"]


def _noise_curves(store: Store, trials: pd.DataFrame) -> pd.DataFrame:
    """Every noise-scale measurement (learning-curve rows with ``b_simple``) of the convergence trials."""
    import pandas as pd

    rows = []
    if "gns_measurements" in trials.columns:
        measured = trials[(trials["kind"] == "convergence") & pd.to_numeric(trials["gns_measurements"]).gt(0)]
        for t in measured[["run", "trial_id", "batch_size", "seed"]].to_dict("records"):
            for r in store.curve(int(t["trial_id"])):
                if "b_simple" in r:
                    rows.append({**t, **{c: r.get(c) for c in _NOISE_COLS}})
    frame = pd.DataFrame(rows, columns=["run", "trial_id", "batch_size", "seed", *_NOISE_COLS])
    for c in _NOISE_COLS:
        frame[c] = pd.to_numeric(frame[c].replace({"inf": math.inf}), errors="coerce")
    return frame


def _curves(store: Store, conv: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    cols = ["step", "samples", "train_s", "val_metric", "train_loss", "weight_distance", "grad_norm"]
    trials = conv[["run", "trial_id", "batch_size", "seed", "status"]].to_dict("records")
    per_trial = max(8, min(CURVE_POINTS_PER_TRIAL, CURVE_POINTS_TOTAL // max(1, len(trials))))
    rows = []
    for t in trials:
        curve = [r for r in store.curve(int(t["trial_id"])) if r.get("val_metric") is not None]
        for i in _thin(len(curve), per_trial):
            r = curve[i]
            rows.append({**t, **{c: r.get(c) for c in cols}})
    frame = pd.DataFrame(rows, columns=["run", "trial_id", "batch_size", "seed", "status", *cols])
    for c in cols:
        frame[c] = pd.to_numeric(frame[c], errors="coerce")
    return frame


def _top_ops(rows: list[dict[str, Any]], labels: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """Operator rows from the trials' profiles (first profiled trial per run and batch size)."""
    import pandas as pd

    from bsprof.analyze import operator_shares

    out, roots, seen = [], set(), set()
    for row in rows:
        profile = TrialExtra.from_json(row.get("extra")).profile
        if profile is None:
            continue
        if profile.trace_dir:
            roots.add(str(Path(profile.trace_dir).parent.parent))
        ops = profile.top_ops
        key = (row["run_id"], row["batch_size"])
        if not ops or key in seen:
            continue
        seen.add(key)
        dev = any(o.get("self_device_s_per_step") for o in ops)
        time_key = "self_device_s_per_step" if dev else "self_cpu_s_per_step"
        parsed = []
        for o in ops:
            name = o.get("name")
            t = o.get(time_key)
            try:
                t = float(t)
            except (TypeError, ValueError):
                continue
            if name and math.isfinite(t) and t >= 0:
                parsed.append((str(name), t))
        for name, t in parsed:
            out.append(
                {
                    "run": labels[row["run_id"]],
                    "batch_size": int(row["batch_size"]),
                    "name": name,
                    "self_s_per_step": t,
                    "time": "device" if dev else "cpu",
                }
            )
    cols = [*_KEYS, "name", "self_s_per_step", "time"]
    return operator_shares(pd.DataFrame(out, columns=cols), _KEYS), sorted(roots)


def _fit_row(label: str, rec: Recommendation) -> dict[str, Any] | None:
    f = rec.fit
    if f is None:
        return None
    return {
        "run": label,
        "s_min": f.s_min,
        "s_min_se": f.s_min_se,
        "b_noise": f.b_noise,
        "b_noise_se": f.b_noise_se,
        "e_min": f.e_min,
        "e_min_se": f.e_min_se,
        "points": f.points,
        "constrained": f.constrained,
        "reason": f.reason,
    }


def report_data(
    store: Store | str | Path,
    run_ids: Sequence[str] | None = None,
    benchmark_json: Sequence[str | Path] = (),
) -> ReportData:
    """Read the runs of a store and compute every frame of the report.

    Args:
        store: A :class:`~bsprof.store.Store` or the path of one (a missing or foreign file is
            :class:`~bsprof.errors.BadInput`).
        run_ids: Runs to show; default: the latest run per workload.
        benchmark_json: pytest-benchmark JSON files to include.

    Raises:
        BadInput: Unknown run, a store with no runs, or a bad benchmark file.
    """
    import pandas as pd

    from bsprof.analysis import reported_convergence
    from bsprof.analyze import GPU_COLUMNS, analyze, final_state_table
    from bsprof.export import trials_frame
    from bsprof.noise_analysis import critical_table, prediction_trials
    from bsprof.store import Store

    benchmarks = load_benchmark_json(benchmark_json) if benchmark_json else None
    owned = not isinstance(store, Store)
    st = Store(store) if owned else store
    try:
        ids = list(dict.fromkeys(run_ids)) if run_ids else st.latest_run_ids()
        if not ids:
            raise BadInput(f"store {st.path} holds no runs yet: run `bsprof sweep` first")
        records = [st.run(r) for r in ids]  # BadInput for an unknown run
        rows = st.trial_rows(ids)
        counts = {r: 0 for r in ids}
        for row in rows:
            counts[row["run_id"]] += 1
        label_of = dict(zip(ids, _labels(records), strict=True))
        runs = [
            RunInfo(
                r.run_id,
                label_of[r.run_id],
                r.workload,
                str(r.config.get("engine", {}).get("device", "")),
                r.created_at,
                r.config,
                r.environment,
                counts[r.run_id],
            )
            for r in records
        ]
        trials = trials_frame(st, ids)
        trials.insert(0, "run", trials["run_id"].map(label_of))
        for col in ("epochs_to_target", "target"):  # stored by convergence trials; absent in throughput-only runs
            if col not in trials.columns:
                trials[col] = math.nan
        tp, conv, trade, fits, recs, gpu, lr, gaps, crit, steps_pred = [], [], [], [], [], [], [], [], [], []
        stab: list[pd.DataFrame] = []
        input_bound: list[tuple[str, str]] = []
        for run in runs:
            t = trials[trials["run_id"] == run.run_id]
            if t.empty:
                continue
            # every derived table of the run, each computed once
            a = analyze(t, run.lr_rule, prediction_trials(st, run.workload, t))
            crit.append(critical_table(a.critical_batches).assign(run=run.label))
            if a.steps_prediction is not None:
                steps_pred.append(a.steps_prediction.assign(run=run.label))
            tp.append(a.throughput.assign(run=run.label))
            conv.append(a.convergence.assign(run=run.label))
            trade.append(a.tradeoff.assign(run=run.label))
            gpu.append(a.gpu.assign(run=run.label))
            lr.append(a.lr_tuning.assign(run=run.label))
            gaps.append(a.gap_trend.assign(run=run.label))
            stab.append(a.stability.assign(run=run.label))
            input_bound.extend((run.label, note) for note in a.input_bound)
            for rec in a.recommendations:
                recs.append((run.label, rec))
                if (fr := _fit_row(run.label, rec)) is not None:
                    fits.append(fr)
        conv_frame = _concat(conv)
        reported = reported_convergence(trials)
        curves = _curves(st, reported)
        noise_curves = _noise_curves(st, trials)
        top_ops, roots = _top_ops(rows, label_of)
        max_batch = _max_batch(st.max_batch_results(), {(r.workload, r.device) for r in runs})
    finally:
        if owned:
            st.close()
    targets = {}
    if "target" in trials.columns:
        for label, g in trials[trials["kind"] == "convergence"].groupby("run"):
            v = pd.to_numeric(g["target"], errors="coerce").dropna()
            if len(v):
                targets[str(label)] = float(v.median())
    return ReportData(
        input_bound=input_bound,
        runs=runs,
        trials=trials,
        throughput=_concat(tp),
        gpu=_concat(gpu, GPU_COLUMNS),
        convergence=conv_frame,
        tradeoff=_concat(trade),
        stability=_concat(stab, ["batch_size", "verdict", "why"]),
        fits=pd.DataFrame(
            fits,
            columns=[
                "run",
                "s_min",
                "s_min_se",
                "b_noise",
                "b_noise_se",
                "e_min",
                "e_min_se",
                "points",
                "constrained",
                "reason",
            ],
        ),
        recommendations=recs,
        curves=curves,
        final_state=final_state_table(curves, _KEYS),
        lr_tuning=_concat(lr),
        gap_trend=_concat(gaps),
        top_ops=top_ops,
        trace_roots=roots,
        max_batch=max_batch,
        benchmarks=benchmarks,
        targets=targets,
        critical=_concat(crit),
        steps_prediction=_concat(steps_pred),
        noise_curves=noise_curves,
    )


def _max_batch(results: list[dict[str, Any]], wanted: set[tuple[str, str]]) -> pd.DataFrame:
    import pandas as pd

    latest: dict[tuple[str, str], dict[str, Any]] = {}
    workloads = {w for w, _ in wanted}
    for r in results:  # oldest first: later results replace earlier ones
        if r["workload"] in workloads:
            latest[(r["workload"], r["device"])] = r
    rows = []
    for (workload, device), r in sorted(latest.items()):
        tried = [(int(b), str(s)) for b, s in r.get("tried") or []]
        rows.append(
            {
                "workload": workload,
                "device": device,
                "max_batch_size": r["max_batch_size"],
                "first_oom_batch_size": r["first_oom_batch_size"],
                "largest_tried": max((b for b, _ in tried), default=None),
                "oom_batch_sizes": sorted(b for b, s in tried if s == "oom"),
            }
        )
    cols = ["workload", "device", "max_batch_size", "first_oom_batch_size", "largest_tried", "oom_batch_sizes"]
    return pd.DataFrame(rows, columns=cols)


# --- pytest-benchmark ----------------------------------------------------------------------------------------


def load_benchmark_json(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Rows of pytest-benchmark ``--benchmark-json`` files (read by :mod:`bsprof.benchmark_json`): one per benchmark.

    Returns:
        Columns ``file, group, name, fullname, min, max, mean, median, q1, q3, iqr, stddev, rounds``
        (seconds per round), ``extra_info`` (JSON text), ``machine`` and ``datetime``.

    Raises:
        BadInput: A file that is missing, not JSON, not in pytest-benchmark's format, or without a median.
    """
    import pandas as pd

    from bsprof.benchmark_json import STATS, read_benchmark_json

    rows = []
    for p in paths:
        where = f"--benchmark-json {p}"
        doc = read_benchmark_json(p, label=where)
        host = " ".join(str(doc.machine_info.get(k, "")) for k in ("node", "processor", "python_version")).strip()
        for b in doc.benchmarks:
            if math.isnan(b.stats["median"]):
                raise BadInput(f"{where}: benchmark {b.name!r} has no stats.median")
            # Long series (e.g. ``step_times_s``, one value per round) are summarised: the table shows figures.
            extra = {k: f"[{len(v)} values]" if isinstance(v, list) and len(v) > 12 else v
                     for k, v in b.extra_info.items()}  # fmt: skip
            rows.append(
                {
                    "file": doc.path.name,
                    "group": b.group,
                    "name": b.name,
                    "fullname": b.fullname,
                    **b.stats,
                    "extra_info": json.dumps(extra, sort_keys=True, default=str) if extra else "",
                    "machine": host,
                    "datetime": doc.datetime,
                }
            )
    cols = ["file", "group", "name", "fullname", *STATS, "extra_info", "machine", "datetime"]
    return pd.DataFrame(rows, columns=cols)
