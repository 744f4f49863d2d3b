"""The SQLite store: runs resume by config hash, one row per trial key, errors replaced, bad files refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from bsprof.engine.result import ProfileInfo, TrialExtra
from bsprof.engine.timing import StepTimes
from bsprof.engine.trial import TrialResult, TrialSpec
from bsprof.errors import BadInput
from bsprof.store import SCHEMA_VERSION, Store, config_hash

ENV = {"device": "cpu", "torch_version": "test"}
CONFIG = {"workload": {"name": "tiny"}, "kinds": ["throughput"]}


def _result(batch_size: int, status: str = "ok", *, repeat: int = 0, sps: float = 100.0, **kw: object) -> TrialResult:
    spec = TrialSpec("tiny", "throughput", batch_size, 0, 0.1, repeat)
    return TrialResult(
        spec=spec,
        status=status,
        device="cpu",
        metrics={"samples_per_s": sps, "step_time_s": batch_size / sps} if status == "ok" else {},
        error=None if status == "ok" else f"{status} at {batch_size}",
        started_at=1000.0 + batch_size,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "sub" / "s.db", create=True) as s:
        yield s


def test_store_creates_file_and_folder_with_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "s.db"
    with Store(path, create=True) as s:
        assert s.integrity_check() == "ok"
    assert path.is_file()
    con = sqlite3.connect(path)
    try:
        assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_store_reopens_existing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path, create=True) as s:
        run = s.open_run("tiny", CONFIG, ENV)
        s.add_trial(run.run_id, _result(8))
    with Store(path) as s:
        assert [r["batch_size"] for r in s.trial_rows()] == [8]


def test_open_run_resumes_same_config_and_fresh_makes_new(store: Store) -> None:
    a = store.open_run("tiny", CONFIG, ENV)
    b = store.open_run("tiny", dict(CONFIG), ENV)
    assert a.run_id == b.run_id == config_hash(CONFIG)[:12]
    c = store.open_run("tiny", CONFIG, ENV, fresh=True)
    assert c.run_id != a.run_id
    assert c.config_hash == a.config_hash
    assert store.open_run("tiny", CONFIG, ENV).run_id == c.run_id  # the latest run of the config resumes
    other = store.open_run("tiny", {**CONFIG, "kinds": ["convergence"]}, ENV)
    assert other.run_id not in (a.run_id, c.run_id)
    assert [r.run_id for r in store.runs()] == [a.run_id, c.run_id, other.run_id]
    assert store.run(a.run_id).environment == ENV
    assert store.run(a.run_id).config == CONFIG


def test_unknown_run_is_bad_input(store: Store) -> None:
    with pytest.raises(BadInput, match="no run"):
        store.run("nope")


def test_add_trial_round_trips_metrics_step_times_extra_and_curve(store: Store) -> None:
    run = store.open_run("tiny", CONFIG, ENV)
    result = _result(
        16,
        step_times=StepTimes((0.2, 0.4, 0.3), steps_per_block=2, batch_size=16, warmup_steps=5),
        reasons={"gpu_util_pct": "no GPU"},
        extra=EXTRA,
        curve=[{"step": 1.0, "val_metric": 0.5}, {"step": 2.0, "val_metric": None}],
    )
    assert store.add_trial(run.run_id, result) is True
    (row,) = store.trial_rows([run.run_id])
    assert row["status"] == "ok"
    assert row["samples_per_s"] == 100.0
    assert row["reasons"] == {"gpu_util_pct": "no GPU"}
    assert row["step_times"] == {"block_times_s": [0.2, 0.4, 0.3], "steps_per_block": 2, "warmup_steps": 5}
    assert TrialExtra.from_json(row["extra"]) == EXTRA
    assert row["started_at"] == 1016.0
    assert store.curve(row["trial_id"]) == [{"step": 1.0, "val_metric": 0.5}, {"step": 2.0, "val_metric": None}]


EXTRA = TrialExtra(
    rel_iqr=0.04,
    cpu_pct_mean=98.5,
    telemetry=({"t_s": 0.0, "rss_bytes": 1e6}, {"t_s": 0.05, "rss_bytes": 2e6}),
    gpu_sampler="trial ran on cpu, not a GPU",
    monitor_mode="process",
    profile=ProfileInfo(
        trace_dir="traces/run/tiny-B16",
        trace_files=("a.pt.trace.json",),
        top_ops=({"name": "aten::mm", "self_cpu_s_per_step": 1e-4},),
        top_ops_sort="self_cpu_s_per_step",
        active_steps=3,
    ),
)


def test_extra_of_a_store_written_before_the_typed_extra_reads_back() -> None:
    """bsprof 0.1 stored the engine's by-products as a free dict with the same flat keys."""
    old = {
        "cpu_pct_mean": 97.0,
        "rel_iqr": 0.02,
        "telemetry": [{"t_s": 0.0, "cpu_pct": 97.0}],
        "gpu_sampler": "NvmlGpu",
        "monitor_mode": "thread",
        "trace_dir": "reports/traces/r/w-B8",
        "top_ops": [{"name": "aten::addmm", "self_cpu_s_per_step": 2e-5}],
        "profile_active_steps": 3,
        "note": "a key no engine wrote is ignored",
    }
    extra = TrialExtra.from_json(old)
    assert (extra.cpu_pct_mean, extra.rel_iqr, extra.gpu_sampler, extra.monitor_mode) == (
        97.0,
        0.02,
        "NvmlGpu",
        "thread",
    )
    assert extra.telemetry == ({"t_s": 0.0, "cpu_pct": 97.0},) and extra.source == "engine"
    assert extra.profile == ProfileInfo(
        trace_dir="reports/traces/r/w-B8",
        top_ops=({"name": "aten::addmm", "self_cpu_s_per_step": 2e-5},),
        active_steps=3,
    )
    assert TrialExtra.from_json({"skipped_after_oom": True}) == TrialExtra(skipped_after_oom=True)
    assert TrialExtra.from_json({}) == TrialExtra.from_json(None) == TrialExtra()
    assert TrialExtra.from_json({"profile_error": "RuntimeError: x"}).profile == ProfileInfo(error="RuntimeError: x")
    assert TrialExtra.from_json({"rel_iqr": "fast", "telemetry": "oops"}) == TrialExtra()  # wrong types: defaults


def test_add_trial_never_duplicates_a_key(store: Store) -> None:
    run = store.open_run("tiny", CONFIG, ENV)
    assert store.add_trial(run.run_id, _result(8, sps=100.0)) is True
    assert store.add_trial(run.run_id, _result(8, sps=999.0)) is False  # the first writer's trial is kept
    assert store.add_trial(run.run_id, _result(8, repeat=1)) is True  # another repeat is another trial
    rows = store.trial_rows([run.run_id])
    assert [(r["batch_size"], r["repeat"], r["samples_per_s"]) for r in rows] == [(8, 0, 100.0), (8, 1, 100.0)]


def test_error_trials_are_not_finished_and_get_replaced(store: Store) -> None:
    run = store.open_run("tiny", CONFIG, ENV)
    store.add_trial(run.run_id, _result(8))
    store.add_trial(run.run_id, _result(16, "error"))
    store.add_trial(run.run_id, _result(32, "oom"))
    keys = store.finished_keys(run.run_id)
    assert keys == {("throughput", 8, 0, 0.1, 0), ("throughput", 32, 0, 0.1, 0)}
    assert store.add_trial(run.run_id, _result(16)) is True
    rows = store.trial_rows([run.run_id])
    assert sorted((r["batch_size"], r["status"]) for r in rows) == [(8, "ok"), (16, "ok"), (32, "oom")]
    # a finished trial is not replaced by a later error
    assert store.add_trial(run.run_id, _result(8, "error")) is False
    assert {r["status"] for r in store.trial_rows([run.run_id]) if r["batch_size"] == 8} == {"ok"}


def test_failed_trials_are_stored_with_their_message(store: Store) -> None:
    run = store.open_run("tiny", CONFIG, ENV)
    store.add_trial(run.run_id, _result(64, "oom"))
    (row,) = store.trial_rows()
    assert (row["status"], row["error"]) == ("oom", "oom at 64")


def test_non_finite_metrics_do_not_break_json(store: Store) -> None:
    run = store.open_run("tiny", CONFIG, ENV)
    res = _result(8)
    res.metrics["step_time_iqr_s"] = float("nan")
    store.add_trial(run.run_id, res)
    (row,) = store.trial_rows()
    assert row["step_time_iqr_s"] is None


def test_trial_rows_filter_by_run(store: Store) -> None:
    a = store.open_run("tiny", CONFIG, ENV)
    b = store.open_run("tiny", CONFIG, ENV, fresh=True)
    store.add_trial(a.run_id, _result(8))
    store.add_trial(b.run_id, _result(16))
    assert [r["batch_size"] for r in store.trial_rows([b.run_id])] == [16]
    assert len(store.trial_rows()) == 2


def test_max_batch_rows(store: Store) -> None:
    store.add_max_batch("tiny", "cpu", {"cap": 10}, ENV, 100, 101, [(64, "ok"), (128, "oom")])
    (row,) = store.max_batch_results()
    assert (row["max_batch_size"], row["first_oom_batch_size"]) == (100, 101)
    assert row["tried"] == [[64, "ok"], [128, "oom"]]


def test_missing_store_without_create_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="not found"):
        Store(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()


def test_directory_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="directory"):
        Store(tmp_path, create=True)


def test_non_sqlite_file_is_bad_input_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"this is not a database, just text\n" * 20)
    before = path.read_bytes()
    with pytest.raises(BadInput, match="not a bsprof store"):
        Store(path, create=True)
    assert path.read_bytes() == before


def test_foreign_sqlite_file_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(BadInput, match="not a bsprof store"):
        Store(path, create=True)
    con = sqlite3.connect(path)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        con.close()
    assert tables == {"people"}


def test_other_schema_version_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path, create=True).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(BadInput, match="schema version 99"):
        Store(path)
