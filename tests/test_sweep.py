"""Sweeps through the engine API with an injected trial runner: planning, resume, OOM skipping, retries."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import FAST, THROUGHPUT, CliResult, ref

from bsprof.engine.result import TrialExtra
from bsprof.engine.sweep import SweepConfig, SweepOutcome, plan_trials, run_sweep
from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec
from bsprof.store import Store
from bsprof.workload import Workload, load_workload

SETTINGS = EngineSettings(device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny() -> Workload:
    return load_workload(ref("tiny.py"))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    with Store(tmp_path / "s.db", create=True) as s:
        yield s


class FakeRunner:
    """Records the trials it is asked to run; ``status(spec)`` decides each outcome."""

    def __init__(self, status: Callable[[TrialSpec], str] = lambda spec: "ok") -> None:
        self.status = status
        self.calls: list[TrialSpec] = []

    def __call__(self, workload: Workload, spec: TrialSpec, settings: EngineSettings) -> TrialResult:
        self.calls.append(spec)
        status = self.status(spec)
        return TrialResult(
            spec=spec,
            status=status,
            device="cpu",
            metrics={"samples_per_s": 1000.0 + spec.batch_size} if status == "ok" else {},
            error=None if status == "ok" else f"injected {status}",
            started_at=time.time(),
        )

    @property
    def sizes(self) -> list[int]:
        return [s.batch_size for s in self.calls]


def _config(sizes: tuple[int, ...], **kw: object) -> SweepConfig:
    kw = {"kinds": ("throughput",), "seeds": 1, "repeats": 3, **kw}
    return SweepConfig(workload_ref="tiny", batch_sizes=sizes, **kw)  # type: ignore[arg-type]


def _sweep(config: SweepConfig, workload: Workload, store: Store, runner: FakeRunner, **kw: Any) -> SweepOutcome:
    """``run_sweep`` with the fake throughput runner and no priming step."""
    return run_sweep(config, workload, SETTINGS, store, runners={"throughput": runner}, prime=False, **kw)


def test_plan_rotates_rounds_then_seeds_then_batch_sizes(tiny: Workload) -> None:
    specs = plan_trials(_config((8, 16, 32), seeds=2, repeats=2), tiny)
    assert [(s.repeat, s.seed, s.batch_size) for s in specs] == [
        (r, seed, b) for r in range(2) for seed in range(2) for b in (8, 16, 32)
    ]
    # linear LR rule from base_lr 0.1 at base batch 8
    assert {s.batch_size: s.lr for s in specs} == {8: 0.1, 16: 0.2, 32: 0.4}
    assert len({s.key() for s in specs}) == len(specs)


def test_sweep_runs_and_stores_every_trial(tiny: Workload, store: Store) -> None:
    runner = FakeRunner()
    progress: list[tuple[int, str | None, int, int]] = []
    out = _sweep(
        _config((8, 16), repeats=2),
        tiny,
        store,
        runner,
        progress=lambda spec, res, done, total: progress.append(
            (spec.batch_size, None if res is None else res.status, done, total)
        ),
    )
    assert runner.sizes == [8, 16, 8, 16]
    assert [r.status for r in out.results] == ["ok"] * 4
    assert len(store.trial_rows([out.run.run_id])) == 4
    assert progress[:2] == [(8, None, 0, 4), (8, "ok", 1, 4)]
    assert progress[-1] == (16, "ok", 4, 4)


def test_same_sweep_twice_skips_everything(tiny: Workload, store: Store) -> None:
    first = _sweep(_config((8, 16, 32)), tiny, store, FakeRunner())
    runner = FakeRunner()
    second = _sweep(_config((8, 16, 32)), tiny, store, runner)
    assert second.run.run_id == first.run.run_id
    assert runner.calls == []
    assert second.skipped == 9
    assert len(store.trial_rows()) == 9


def test_adding_a_batch_size_resumes_the_same_run(tiny: Workload, store: Store) -> None:
    first = _sweep(_config((8, 16), repeats=1), tiny, store, FakeRunner())
    runner = FakeRunner()
    second = _sweep(_config((8, 16, 64), repeats=1), tiny, store, runner)
    assert second.run.run_id == first.run.run_id
    assert runner.sizes == [64]
    assert sorted(r["batch_size"] for r in store.trial_rows()) == [8, 16, 64]


def test_fresh_starts_a_new_run(tiny: Workload, store: Store) -> None:
    first = _sweep(_config((8,), repeats=1), tiny, store, FakeRunner())
    runner = FakeRunner()
    second = _sweep(_config((8,), repeats=1), tiny, store, runner, fresh=True)
    assert second.run.run_id != first.run.run_id
    assert runner.sizes == [8]
    assert len(store.trial_rows([first.run.run_id])) == len(store.trial_rows([second.run.run_id])) == 1


def test_error_trials_are_retried_on_resume_and_replaced(tiny: Workload, store: Store) -> None:
    failing = FakeRunner(lambda spec: "error" if spec.batch_size == 16 else "ok")
    first = _sweep(_config((8, 16, 32), repeats=1), tiny, store, failing)
    assert [r.status for r in first.results] == ["ok", "error", "ok"]
    assert failing.sizes == [8, 16, 32]  # the sweep went on after the error
    (err,) = [r for r in store.trial_rows() if r["status"] == "error"]
    assert err["error"] == "injected error"
    healed = FakeRunner()
    second = _sweep(_config((8, 16, 32), repeats=1), tiny, store, healed)
    assert second.run.run_id == first.run.run_id
    assert healed.sizes == [16]
    rows = store.trial_rows()
    assert sorted((r["batch_size"], r["status"]) for r in rows) == [(8, "ok"), (16, "ok"), (32, "ok")]


def test_oom_skips_larger_sizes_without_trying_them(tiny: Workload, store: Store) -> None:
    runner = FakeRunner(lambda spec: "oom" if spec.batch_size >= 256 else "ok")
    out = _sweep(_config((64, 128, 256, 512, 1024), repeats=2), tiny, store, runner)
    assert runner.sizes == [64, 128, 256, 64, 128]
    by_size = {(r.spec.batch_size, r.spec.repeat): r for r in out.results}
    for key in [(512, 0), (1024, 0), (256, 1), (512, 1), (1024, 1)]:
        assert by_size[key].status == "oom"
        assert by_size[key].extra == TrialExtra(skipped_after_oom=True)
        assert "not tried" in (by_size[key].error or "")
    assert by_size[(256, 0)].error == "injected oom"
    assert len(store.trial_rows()) == 10


def test_oom_floor_survives_resume(tiny: Workload, store: Store) -> None:
    _sweep(_config((64, 128), repeats=1), tiny, store, FakeRunner(lambda s: "oom"))
    runner = FakeRunner()
    _sweep(_config((32, 64, 128, 256), repeats=1), tiny, store, runner)
    assert runner.sizes == [32]  # 256 is above the stored OOM at 64
    statuses = {r["batch_size"]: r["status"] for r in store.trial_rows()}
    assert statuses == {64: "oom", 128: "oom", 32: "ok", 256: "oom"}


def test_no_skip_larger_tries_every_size(tiny: Workload, store: Store) -> None:
    runner = FakeRunner(lambda spec: "oom" if spec.batch_size >= 256 else "ok")
    out = _sweep(_config((64, 128, 256, 512, 1024), repeats=1, skip_larger_after_oom=False), tiny, store, runner)
    assert runner.sizes == [64, 128, 256, 512, 1024]
    assert [r.status for r in out.results] == ["ok", "ok", "oom", "oom", "oom"]
    assert all(not r.extra.skipped_after_oom for r in out.results)


# --- the same through the CLI (in-process, real trials on the tiny workload) ----------------------------


def _cli_sweep(cli: Callable[..., CliResult], store: Path, sizes: str, *extra: str, workload: str = "factory") -> int:
    return cli("sweep", "-w", ref("tiny.py", workload), "-b", sizes, "--store", store, *THROUGHPUT, *FAST, *extra).code


def _rows(store: Path) -> list[dict[str, Any]]:
    with Store(store) as s:
        return s.trial_rows()


def _ids(rows: list[dict[str, Any]]) -> list[tuple[int, str, int, float]]:
    return [(r["trial_id"], r["run_id"], r["batch_size"], r["started_at"]) for r in rows]


@pytest.mark.usefixtures("fast_timing")
def test_cli_same_command_twice_adds_nothing(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    assert _cli_sweep(cli, store, "8,16") == 0
    first = _rows(store)
    assert sorted(r["batch_size"] for r in first) == [8, 16]
    assert _cli_sweep(cli, store, "8,16") == 0
    assert _ids(_rows(store)) == _ids(first)


@pytest.mark.usefixtures("fast_timing")
def test_cli_added_batch_size_resumes_same_run(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    assert _cli_sweep(cli, store, "8,16") == 0
    first = _rows(store)
    assert _cli_sweep(cli, store, "8,16,32") == 0
    rows = _rows(store)
    assert _ids(rows[:2]) == _ids(first)
    assert len(rows) == 3
    assert rows[2]["batch_size"] == 32
    assert {r["run_id"] for r in rows} == {first[0]["run_id"]}


@pytest.mark.usefixtures("fast_timing")
def test_cli_fresh_makes_new_run(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    assert _cli_sweep(cli, store, "8") == 0
    assert _cli_sweep(cli, store, "8", "--fresh") == 0
    rows = _rows(store)
    assert len(rows) == 2
    assert len({r["run_id"] for r in rows}) == 2
    with Store(store) as s:
        assert len(s.runs()) == 2


@pytest.mark.usefixtures("fast_timing")
def test_cli_error_trial_retried_and_replaced(
    cli: Callable[..., CliResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "s.db"
    monkeypatch.setenv("BSPROF_TEST_FAIL_AT", "16")
    assert _cli_sweep(cli, store, "8,16,32", workload="flaky") == 1
    first = {r["batch_size"]: r for r in _rows(store)}
    assert {b: r["status"] for b, r in first.items()} == {8: "ok", 16: "error", 32: "ok"}
    assert "flaky failure at 16" in first[16]["error"]
    monkeypatch.delenv("BSPROF_TEST_FAIL_AT")
    assert _cli_sweep(cli, store, "8,16,32", workload="flaky") == 0
    rows = _rows(store)
    assert sorted((r["batch_size"], r["status"]) for r in rows) == [(8, "ok"), (16, "ok"), (32, "ok")]
    after = {r["batch_size"]: r for r in rows}
    assert after[8]["trial_id"] == first[8]["trial_id"]
    assert after[32]["trial_id"] == first[32]["trial_id"]
    assert after[16]["error"] is None
    assert len({r["run_id"] for r in rows}) == 1
