"""``bsprof sweep --cmd / --cmd-file / -- COMMAND``: bad input is one line and exit code 2 before anything runs;
a real sweep of a script stores its trials, prints the summary and resumes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import FIXTURES, CliResult

from bsprof.store import Store

SCRIPT = str(FIXTURES / "scripts" / "fault.py")
QUICK = ("--min-time", "0.05", "--min-steps", "4", "--timing-warmup-steps", "2", "--seeds", "1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--cmd", "python t.py --bs 8"), "no {batch_size} placeholder"),
        (("--cmd", "python t.py --bs {batch_size} --lr {lr}"), "give --base-lr"),
        (("--cmd", "python t.py {batch_size} {nope}"), "placeholder {nope} is unknown"),
        (("--cmd", "python t.py {batch_size}", "--amp", "bf16"), "--amp does not apply to --cmd"),
        (("--cmd", "python t.py {batch_size}", "--nproc-per-node", "2"), "--nproc-per-node does not apply to --cmd"),
        (("--cmd", "python t.py {batch_size}", "--param", "x"), "expected NAME=VALUE"),
        (("--cmd", "python 't.py {batch_size}"), "check the quotes"),
        (("--cmd", "python t.py {batch_size}", "--cmd-file", "f"), "give the command once"),
        (("--cmd-file", "/no/such/file"), "--cmd-file /no/such/file"),
        (("--cmd", "python t.py {batch_size}", "--kind", "convergence"), "has no default target"),
        (("--cmd", "python t.py {batch_size}", "--trial-timeout", "0"), "--trial-timeout must be > 0"),
    ],
)
def test_bad_script_sweeps_are_one_line_and_exit_2(
    cli: Callable[..., CliResult], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    store = tmp_path / "s.db"
    kind = () if "--kind" in args else ("--kind", "throughput")
    r = cli("sweep", "--store", store, *kind, *args)
    assert r.code == 2, r.err
    assert len(r.err_lines) == 1 and message in r.err, r.err
    assert not store.exists()  # nothing written


def test_dash_dash_is_for_sweep_only(cli: Callable[..., CliResult]) -> None:
    r = cli("summary", "--", "python", "t.py")
    assert r.code == 2 and "for `bsprof sweep` only" in r.err


@pytest.mark.slow
def test_script_sweep_end_to_end_then_resume(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    starts = tmp_path / "starts.txt"
    cmd = (sys.executable, SCRIPT, "{batch_size}", "{seed}", "--count", str(starts))
    args = ("sweep", "--store", store, "-b", "8,16", "--kind", "both", "--target", "0.5", *QUICK, "--", *cmd)
    r = cli(*args)
    assert r.code == 0, r.err
    assert "fault" in r.out and "recommended" in r.out
    with Store(store) as s:
        rows = s.trial_rows()
    assert sorted((r["kind"], r["batch_size"], r["status"]) for r in rows) == [
        ("convergence", 8, "ok"), ("convergence", 16, "ok"), ("throughput", 8, "ok"), ("throughput", 16, "ok"),
    ]  # fmt: skip
    assert all(r["steps_to_target"] == 10 for r in rows if r["kind"] == "convergence")  # metric = step / 20
    logs = list((tmp_path / "script-logs").glob("*/*/output.log"))
    assert len(logs) == 4
    assert len(starts.read_text().splitlines()) == 4
    again = cli(*args)
    assert again.code == 0, again.err
    assert len(starts.read_text().splitlines()) == 4  # every trial was finished: none ran again
