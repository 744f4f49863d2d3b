"""Real processes against one store: ``kill -9`` in the middle of a sweep and the same command again; two
sweeps writing one store at the same time. Nothing finished is lost or duplicated and the file stays sound."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, cli_command, cli_env

from bsprof.store import Store

pytestmark = pytest.mark.slow

SLOW_SWEEP = (
    "sweep", "--workload", "tests/fixtures/slow.py:factory", "--batch-sizes", "1,2,4",
    "--kind", "throughput", "--seeds", "1", "--repeats", "2",
    "--min-time", "0.1", "--min-steps", "1", "--timing-warmup-steps", "1",
)  # fmt: skip
"""3 batch sizes x 2 rounds of a 0.02 s step: each trial takes about 0.4 s (0.2 s warm-up, 7 blocks)."""

KEY = ("kind", "batch_size", "seed", "lr", "repeat")


def _stored_trials(path: Path) -> int:
    """Rows in the store's trials table, read without creating or locking anything (0 while it is being set up)."""
    if not path.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
        try:
            return int(con.execute("SELECT COUNT(*) FROM trials").fetchone()[0])
        finally:
            con.close()
    except sqlite3.OperationalError:  # the writer is still creating the schema
        return 0


def _rows(path: Path) -> list[dict[str, Any]]:
    with Store(path) as s:
        return s.trial_rows()


def _integrity(path: Path) -> str:
    with Store(path) as s:
        return s.integrity_check()


def test_kill_9_during_sweep_then_resume(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    args = cli_command(*SLOW_SWEEP, "--store", str(store))
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while _stored_trials(store) < 2:
            assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read()!r}"
            assert time.monotonic() < deadline, "no trials stored within 90 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    assert _integrity(store) == "ok"
    before = _rows(store)
    assert 2 <= len(before) < 6, "the kill must land in the middle of the sweep"
    assert all(r["status"] == "ok" for r in before)

    again = subprocess.run(args, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120, check=False)
    assert again.returncode == 0, again.stderr

    after = _rows(store)
    assert len(after) == 6
    keys = [tuple(r[k] for k in KEY) for r in after]
    assert len(set(keys)) == 6, "a trial was stored twice"
    assert {(r["batch_size"], r["repeat"]) for r in after} == {(b, rep) for b in (1, 2, 4) for rep in (0, 1)}
    assert all(r["status"] == "ok" for r in after)
    assert len({r["run_id"] for r in after}) == 1
    # The trials finished before the kill are the same rows, untouched.
    first = {r["trial_id"]: (r["started_at"], tuple(r[k] for k in KEY), r["samples_per_s"]) for r in before}
    assert {
        r["trial_id"]: (r["started_at"], tuple(r[k] for k in KEY), r["samples_per_s"])
        for r in after
        if r["trial_id"] in first
    } == first
    assert _integrity(store) == "ok"


FAST_SWEEP = (
    "sweep", "--workload", "tests/fixtures/tiny.py:factory", "--kind", "throughput", "--seeds", "1",
    "--repeats", "2", "--min-time", "0.05", "--min-steps", "2", "--timing-warmup-steps", "1",
)  # fmt: skip


def test_two_sweeps_write_one_store_at_once(tmp_path: Path) -> None:
    store = tmp_path / "shared" / "s.db"
    sizes = {"a": "8,16,32", "b": "64,128,256"}
    procs = {
        name: subprocess.Popen(
            cli_command(*FAST_SWEEP, "--batch-sizes", b, "--store", str(store)),
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, b in sizes.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"sweep {name} failed: {err}"

    rows = _rows(store)
    assert sorted((r["batch_size"], r["repeat"]) for r in rows) == sorted(
        (b, rep) for b in (8, 16, 32, 64, 128, 256) for rep in (0, 1)
    )
    assert all(r["status"] == "ok" for r in rows)
    assert len({tuple(r[k] for k in KEY) for r in rows}) == len(rows)
    with Store(store) as s:
        runs = s.runs()
    # Same workload and settings: both processes resume one run (batch sizes are not part of its identity).
    assert len(runs) == 1
    assert {r["run_id"] for r in rows} == {runs[0].run_id}
    assert _integrity(store) == "ok"
