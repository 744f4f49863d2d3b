"""Tidy export of a store: one row per trial, the DESIGN.md columns first, SI units in every name.

Empty (``None`` / NaN, an empty cell in CSV) means *not measured*; the ``empty_reasons`` column says why.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from bsprof.errors import BadInput
from bsprof.files import write_atomic

if TYPE_CHECKING:
    import pandas as pd

    from bsprof.store import Store

__all__ = [
    "COLUMNS",
    "CURVE_KEYS",
    "EXTRA_COLUMNS",
    "FORMATS",
    "STABILITY_COLUMNS",
    "curves_frame",
    "export_frame",
    "trials_frame",
    "write_export",
]

COLUMNS = (
    "run_id", "workload", "kind", "batch_size", "seed", "lr", "status", "device",
    "samples_per_s", "step_time_s", "peak_mem_bytes", "gpu_util_pct", "power_w", "energy_j",
    "steps_to_target", "samples_to_target", "time_to_target_s", "reached_target",
    "final_train_metric", "final_val_metric",
)  # fmt: skip
"""The export contract of DESIGN.md, in order."""

EXTRA_COLUMNS = (
    "trial_id", "repeat", "phase", "device_name", "step_time_iqr_s", "measured_steps", "peak_mem_reserved_bytes",
    "error", "empty_reasons", "started_at", "duration_s",
)  # fmt: skip
"""Further columns bsprof adds after the contract's; later features append their own after these."""

FORMATS = ("csv", "json", "parquet")

STABILITY_COLUMNS = ("stability", "stability_why")
"""The last columns of ``bsprof export``: on throughput rows, their batch size's stability verdict in its run
(:func:`bsprof.stability.stability_table`: ``stable``, ``single``, ``unstable`` or ``busy``) and why (empty when
stable); empty on convergence rows and on trials that did not measure."""


def trials_frame(store: Store | str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The trials of a store (all runs, or ``run_ids``) as a tidy DataFrame.

    Args:
        store: A :class:`~bsprof.store.Store` or the path of one.
        run_ids: Restrict to these runs.

    Returns:
        One row per trial: :data:`COLUMNS`, then :data:`EXTRA_COLUMNS`, then any further metric a trial
        stored. Missing values are NaN / None.
    """
    import pandas as pd

    from bsprof.store import Store

    owned = not isinstance(store, Store)
    st = Store(store) if owned else store
    try:
        rows = st.trial_rows(run_ids)
    finally:
        if owned:
            st.close()
    records = []
    for row in rows:
        reasons = row.pop("reasons") or {}
        row.pop("step_times", None)
        row.pop("extra", None)
        if row["status"] != "ok":
            reasons = {"(all)": f"trial ended {row['status']}", **reasons}
        row["empty_reasons"] = "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or None
        records.append(row)
    extra = sorted({k for r in records for k in r} - set(COLUMNS) - set(EXTRA_COLUMNS))
    frame = pd.DataFrame.from_records(records, columns=[*COLUMNS, *EXTRA_COLUMNS, *extra])
    for col in ("steps_to_target", "samples_to_target", "peak_mem_bytes", "peak_mem_reserved_bytes", "measured_steps"):
        frame[col] = frame[col].astype("Int64")
    frame["reached_target"] = frame["reached_target"].astype("boolean")
    return frame


def export_frame(store: Store | str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """What ``bsprof export`` writes: :func:`trials_frame` with :data:`STABILITY_COLUMNS` last, the verdicts
    computed once by :func:`bsprof.stability.stability_by_run` and only joined here."""
    from bsprof.stability import stability_by_run

    frame = trials_frame(store, run_ids)
    keys = ["run_id", "workload", "device", "batch_size"]
    verdicts = stability_by_run(frame)[[*keys, "verdict", "why"]]
    verdicts = verdicts.rename(columns={"verdict": "stability", "why": "stability_why"}).assign(kind="throughput")
    verdicts["batch_size"] = verdicts["batch_size"].astype(frame["batch_size"].dtype)
    out = frame.merge(verdicts, on=[*keys, "kind"], how="left", validate="many_to_one")
    out.loc[out["status"] != "ok", list(STABILITY_COLUMNS)] = None
    return out


CURVE_KEYS = ("run_id", "trial_id", "workload", "batch_size", "seed", "lr", "phase")
"""The trial identity on each learning-curve row of :func:`curves_frame`."""


def curves_frame(store: Store | str | Path, run_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """The learning curves of a store's convergence trials: one row per evaluation (``bsprof export --curves``).

    Columns: :data:`CURVE_KEYS`, then the curve's own fields (``step, samples, epochs, train_s, train_loss,
    val_metric, ...``; with ``--measure-gns`` also ``b_simple, b_simple_low, b_simple_high, grad_sq, trace_cov,
    b_simple_ema, gns_s`` where the noise scale was measured). Empty where not recorded.
    """
    import pandas as pd

    from bsprof.store import Store

    owned = not isinstance(store, Store)
    st = Store(store) if owned else store
    try:
        records = []
        for row in st.trial_rows(run_ids):
            if row["kind"] != "convergence":
                continue
            ident = {k: row.get(k) for k in CURVE_KEYS}
            records.extend({**ident, **point} for point in st.curve(int(row["trial_id"])))
    finally:
        if owned:
            st.close()
    rest = list(dict.fromkeys(k for r in records for k in r if k not in CURVE_KEYS))
    frame = pd.DataFrame.from_records(records, columns=[*CURVE_KEYS, *rest])
    return frame.replace({"inf": float("inf"), "-inf": float("-inf")})


def write_export(frame: pd.DataFrame, fmt: str, out: str | Path | None) -> str | None:
    """Write ``frame`` as ``fmt`` to ``out``, or return the text when ``out`` is ``None`` (csv/json only)."""
    if fmt not in FORMATS:
        raise BadInput(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if out is None:
            raise BadInput("--format parquet needs -o FILE (parquet is binary)")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise BadInput("--format parquet needs pyarrow: pip install 'bsprof[parquet]'") from None
        write_atomic(out, lambda tmp: frame.to_parquet(tmp, index=False), "--output")
        return None
    if fmt == "csv":
        text = frame.to_csv(index=False)
    else:
        text = json.dumps(json.loads(frame.to_json(orient="records")), indent=1)
    if out is None:
        return text
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), "--output")
    return None
