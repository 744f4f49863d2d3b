"""``bsprof export``: every DESIGN.md column, in order, first; GPU columns empty on a CPU, with the reason."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from helpers import FAST, THROUGHPUT, CliResult, quick_timing, ref

from bsprof.export import COLUMNS, EXTRA_COLUMNS, trials_frame
from bsprof.store import Store

# The export contract as DESIGN.md words it; COLUMNS must not drift from it.
DESIGN_COLUMNS = [
    "run_id", "workload", "kind", "batch_size", "seed", "lr", "status", "device",
    "samples_per_s", "step_time_s", "peak_mem_bytes", "gpu_util_pct", "power_w", "energy_j",
    "steps_to_target", "samples_to_target", "time_to_target_s", "reached_target",
    "final_train_metric", "final_val_metric",
]  # fmt: skip
GPU_COLUMNS = ("gpu_util_pct", "power_w", "energy_j")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with ok throughput trials (8, 16) of one run and an OOM'ing run (64 ok, 256 and 512 oom)."""
    from bsprof.cli import main

    path = tmp_path_factory.mktemp("export") / "s.db"
    common = ("--store", str(path), *THROUGHPUT, *FAST)
    with pytest.MonkeyPatch.context() as mp:
        quick_timing(mp)
        assert main(["sweep", "-w", ref("tiny.py"), "-b", "8,16", *common]) == 0
        assert main(["sweep", "-w", ref("tiny.py", "oom_at_256"), "-b", "64,256,512", *common]) == 0
    return path


def test_columns_match_design() -> None:
    assert list(COLUMNS) == DESIGN_COLUMNS
    assert not set(COLUMNS) & set(EXTRA_COLUMNS)


def test_export_csv_columns_in_order_and_gpu_empty_with_reason(store: Path, cli: Callable[..., CliResult]) -> None:
    result = cli("export", "--store", store)
    assert result.code == 0, result.err
    rows = list(csv.DictReader(io.StringIO(result.out)))
    header = next(csv.reader(io.StringIO(result.out)))
    assert header[: len(DESIGN_COLUMNS)] == DESIGN_COLUMNS
    assert "empty_reasons" in header
    assert len(rows) == 5
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(int(r["batch_size"]) for r in ok) == [8, 16, 64]
    for r in ok:
        assert r["device"] == "cpu"
        assert float(r["samples_per_s"]) > 0
        assert float(r["step_time_s"]) > 0
        assert float(r["samples_per_s"]) == pytest.approx(int(r["batch_size"]) / float(r["step_time_s"]))
        for col in GPU_COLUMNS:
            assert r[col] == "", f"{col} must be empty on a CPU, not {r[col]!r}"
            assert re.search(rf"(^|; ){col}: [^;]*\bcpu\b", r["empty_reasons"]), r["empty_reasons"]
    # convergence columns are empty for throughput trials
    assert all(r["steps_to_target"] == "" and r["reached_target"] == "" for r in rows)


def test_export_records_failed_trials(store: Path, cli: Callable[..., CliResult]) -> None:
    rows = list(csv.DictReader(io.StringIO(cli("export", "--store", store).out)))
    oom = sorted((int(r["batch_size"]), r["status"]) for r in rows if r["status"] != "ok")
    assert oom == [(256, "oom"), (512, "oom")]
    for r in rows:
        if r["status"] == "oom":
            assert r["samples_per_s"] == ""
            assert r["error"]


def test_export_json_columns_in_order(store: Path, cli: Callable[..., CliResult]) -> None:
    result = cli("export", "--store", store, "--format", "json")
    assert result.code == 0
    records = json.loads(result.out)
    assert len(records) == 5
    for rec in records:
        assert list(rec)[: len(DESIGN_COLUMNS)] == DESIGN_COLUMNS
        if rec["status"] == "ok":
            assert all(rec[c] is None for c in GPU_COLUMNS)
            assert "gpu_util_pct" in rec["empty_reasons"]
            assert isinstance(rec["batch_size"], int)


def test_export_parquet_to_file(store: Path, cli: Callable[..., CliResult], tmp_path: Path) -> None:
    out = tmp_path / "trials.parquet"
    result = cli("export", "--store", store, "--format", "parquet", "-o", out)
    assert result.code == 0, result.err
    assert result.out == ""
    frame = pd.read_parquet(out)
    assert list(frame.columns)[: len(DESIGN_COLUMNS)] == DESIGN_COLUMNS
    assert len(frame) == 5
    assert frame[list(GPU_COLUMNS)].isna().all().all()
    assert frame["empty_reasons"][frame["status"] == "ok"].str.contains("power_w").all()


def test_export_csv_to_file(store: Path, cli: Callable[..., CliResult], tmp_path: Path) -> None:
    out = tmp_path / "trials.csv"
    result = cli("export", "--store", store, "-o", out)
    assert result.code == 0
    assert result.out == ""
    assert pd.read_csv(out).shape[0] == 5


def test_export_filters_by_run(store: Path, cli: Callable[..., CliResult]) -> None:
    with Store(store) as s:
        runs = s.runs()
    assert len(runs) == 2
    rows = list(csv.DictReader(io.StringIO(cli("export", "--store", store, "--run", runs[0].run_id).out)))
    assert {r["run_id"] for r in rows} == {runs[0].run_id}
    assert len(rows) == 2


def test_trials_frame_dtypes(store: Path) -> None:
    frame = trials_frame(store)
    assert list(frame.columns)[: len(COLUMNS)] == list(COLUMNS)
    assert str(frame["peak_mem_bytes"].dtype) == "Int64"
    assert str(frame["reached_target"].dtype) == "boolean"
    ok = frame[frame["status"] == "ok"]
    assert all(math.isfinite(v) for v in ok["samples_per_s"])


def test_export_of_empty_store_has_header(tmp_path: Path, cli: Callable[..., CliResult]) -> None:
    path = tmp_path / "empty.db"
    Store(path, create=True).close()
    result = cli("export", "--store", path)
    assert result.code == 0
    assert result.out.splitlines()[0].split(",")[: len(DESIGN_COLUMNS)] == DESIGN_COLUMNS
    assert len(result.out.splitlines()) == 1


def test_export_ends_with_the_stability_verdict_per_batch_size(store: Path, cli: Callable[..., CliResult]) -> None:
    """Per run and batch size, as :func:`bsprof.stability.stability_table` computes it; empty on failed trials."""
    from bsprof.export import STABILITY_COLUMNS
    from bsprof.stability import VERDICTS, stability_table

    rows = list(csv.DictReader(io.StringIO(cli("export", "--store", store).out)))
    assert list(rows[0])[-2:] == list(STABILITY_COLUMNS)
    frame = trials_frame(store)
    for row in rows:
        if row["status"] != "ok":
            assert row["stability"] == "" and row["stability_why"] == ""
            continue
        assert row["stability"] in VERDICTS
        run = frame[frame["run_id"] == row["run_id"]]
        table = stability_table(run)
        (expected,) = table.loc[table["batch_size"] == int(row["batch_size"]), "verdict"]
        assert row["stability"] == expected
