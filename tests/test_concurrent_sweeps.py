"""Two sweeps of ONE run at the same time split its trials (issue 12.2): each trial is claimed in the store
before it runs, so every trial runs exactly once in total, and each sweep says how many it ran."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, cli_command, cli_env, ref

from bsprof.engine.sweep import SweepConfig, SweepOutcome, run_sweep
from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec
from bsprof.errors import BadInput
from bsprof.store import Store
from bsprof.workload import Workload, load_workload

SETTINGS = EngineSettings(device=torch.device("cpu"))
CONFIG = SweepConfig(workload_ref="tiny", batch_sizes=(1, 2, 4, 8), kinds=("throughput",), seeds=2, repeats=2)
TOTAL = 4 * 2 * 2


class SleepingRunner:
    """A trial that sleeps 0.05 s; records every execution (shared by both sweeps, so duplicates show)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, TrialSpec]] = []
        self._lock = threading.Lock()

    def __call__(self, workload: Workload, spec: TrialSpec, settings: EngineSettings) -> TrialResult:
        time.sleep(0.05)
        with self._lock:
            self.calls.append((threading.current_thread().name, spec))
        return TrialResult(spec=spec, status="ok", device="cpu", metrics={"samples_per_s": 1.0}, started_at=0.0)


def test_two_sweeps_of_one_run_execute_every_trial_once(tmp_path: Path) -> None:
    workload = load_workload(ref("tiny.py"))
    path = tmp_path / "s.db"
    Store(path, create=True).close()
    runner = SleepingRunner()
    outcomes: dict[str, SweepOutcome] = {}
    failures: list[BaseException] = []

    def sweep(name: str) -> None:
        try:
            with Store(path) as store:
                outcomes[name] = run_sweep(
                    CONFIG, workload, SETTINGS, store, runners={"throughput": runner}, prime=False
                )
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread below
            failures.append(e)

    threads = [threading.Thread(target=sweep, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    keys = [spec.key() for _, spec in runner.calls]
    assert len(keys) == TOTAL and len(set(keys)) == TOTAL  # every trial executed exactly once in total
    ran = {n: len(o.results) for n, o in outcomes.items()}
    assert ran["a"] + ran["b"] == TOTAL and min(ran.values()) > 0  # both did part of the work
    for name, o in outcomes.items():
        assert len(o.results) + o.claimed_elsewhere + o.skipped == TOTAL, name
        assert {s.key() for n, s in runner.calls if n == name} == {r.spec.key() for r in o.results}
    assert outcomes["a"].run.run_id == outcomes["b"].run.run_id
    with Store(path) as store:
        assert len(store.trial_rows()) == TOTAL
        assert store.integrity_check() == "ok"


def test_a_dead_sweeps_claim_expires_and_a_live_one_is_respected(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db", create=True) as store:
        run = store.open_run("tiny", {"x": 1}, {})
        key = ("throughput", 8, 0, 0.1, 0)
        assert store.claim_trial(run.run_id, key, "dead", lease_s=0.05)
        assert not store.claim_trial(run.run_id, key, "other")  # held and unexpired
        time.sleep(0.1)
        assert store.claim_trial(run.run_id, key, "other")  # the dead owner's lease expired
        store.release_claims("other")
        assert store.claim_trial(run.run_id, key, "third")


def test_one_trial_key_names_the_same_trial_in_claim_release_and_finished_checks(tmp_path: Path) -> None:
    """Claiming, releasing and the "already stored" check all name a trial by the same key (lr within 1e-12)."""
    with Store(tmp_path / "s.db", create=True) as store:
        run = store.open_run("tiny", {"x": 1}, {})
        key, near = ("throughput", 8, 0, 0.1, 0), ("throughput", 8, 0, 0.1 + 1e-15, 0)
        assert store.claim_trial(run.run_id, key, "a", lease_s=600)
        assert not store.claim_trial(run.run_id, near, "b")  # the same trial
        assert store.claim_trial(run.run_id, ("throughput", 8, 0, 0.1, 1), "b")  # another repeat: another trial
        store.release_claim(run.run_id, near, "b")  # b does not hold this one: a's claim stays
        assert not store.claim_trial(run.run_id, key, "c")
        store.release_claim(run.run_id, near, "a")
        assert store.claim_trial(run.run_id, key, "c")
        store.release_claims("c")
        spec = TrialSpec("tiny", "throughput", 8, 0, 0.1)
        store.add_trial(run.run_id, TrialResult(spec, "ok", "cpu", "cpu"))
        assert not store.claim_trial(run.run_id, near, "d")  # stored: nobody runs it again


def test_a_claim_of_a_killed_sweep_on_this_host_is_taken_at_once(tmp_path: Path) -> None:
    """``kill -9`` then the same command: the dead process's claims must not hold its trials for a lease."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid of this host that no longer runs
    host = socket.gethostname()
    with Store(tmp_path / "s.db", create=True) as store:
        run = store.open_run("tiny", {"x": 1}, {})
        key = ("throughput", 8, 0, 0.1, 0)
        assert store.claim_trial(run.run_id, key, f"{host}:{dead.pid}:aaaa", lease_s=600)
        assert store.claim_trial(run.run_id, key, f"{host}:{os.getpid()}:bbbb")  # its owner is gone
        assert not store.claim_trial(run.run_id, key, f"{host}:{os.getpid()}:cccc")  # a live owner holds it
        assert store.claim_trial(run.run_id, ("throughput", 16, 0, 0.1, 0), f"other-host:{dead.pid}:dddd")
        assert not store.claim_trial(run.run_id, ("throughput", 16, 0, 0.1, 0), f"{host}:{os.getpid()}:bbbb")


@pytest.mark.slow
def test_two_cli_sweeps_of_one_run_say_how_many_they_ran(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    args = cli_command(
        "sweep", "--workload", "tests/fixtures/slow.py:factory", "--batch-sizes", "1,2,4", "--kind", "throughput",
        "--seeds", "1", "--repeats", "2", "--min-time", "0.1", "--min-steps", "1", "--timing-warmup-steps", "1",
        "--store", str(store),
    )  # fmt: skip
    procs = [
        subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    ran = []
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        m = re.search(r"(\d+) trials run by this sweep", err)
        assert m, err
        ran.append(int(m.group(1)))
    print("trials run by each sweep:", ran)
    assert sum(ran) == 6
    with Store(store) as s:
        rows = s.trial_rows()
        assert len(s.runs()) == 1
    assert len(rows) == 6
    assert len({(r["batch_size"], r["repeat"]) for r in rows}) == 6


def test_processes_creating_one_new_store_at_once_all_open_it(tmp_path: Path) -> None:
    """Sweeps started together on a new store: SQLite refuses a concurrent WAL switch at once (no busy wait).

    Before the retry, about one round in six of six racing processes failed with "database is locked".
    """
    script = str(REPO / "tests/fixtures/open_new_store.py")
    failures = []
    for i in range(10):
        start_at = time.time() + 1.5
        procs = [
            subprocess.Popen(
                [sys.executable, script, str(tmp_path / f"s{i}.db"), str(start_at)],
                env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            for _ in range(4)
        ]  # fmt: skip
        failures += [out.strip() for out, _ in (p.communicate(timeout=120) for p in procs) if out.strip() != "ok"]
    assert not failures, failures


def test_a_store_locked_too_long_is_reported_as_locked_not_as_a_foreign_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def locked(self: Store, create: bool) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Store, "_check_or_init", locked)
    with pytest.raises(BadInput, match="stayed locked by another process") as info:
        Store(tmp_path / "s.db", create=True)
    assert "not an SQLite file" not in str(info.value)
