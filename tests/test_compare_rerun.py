"""``bsprof compare --rerun``: the gate re-runs the benchmarks it would fail or cannot judge, then judges once.

Inputs are constructed pytest-benchmark JSON files; the suite is ``tests/fixtures/fake_suite.py``, a script that
writes the figures its plan says (slower by a factor, busy or not) for the benchmarks it is asked to re-run, and
logs what it was asked.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

from bsprof.compare_inputs import load_result
from bsprof.compare_rerun import compare_with_reruns, rerun_argv
from bsprof.errors import BadInput

FAKE = Path(__file__).parent / "fixtures" / "fake_suite.py"
A, B = "benchmarks/test_x.py::test_throughput[w-B8]", "benchmarks/test_x.py::test_throughput[w-B64]"


def _bench(name: str, factor: float, seed: int, busy: bool = False) -> dict[str, Any]:
    rng = random.Random(seed)
    data = [1e-4 * factor * (0.97 + 0.06 * rng.random()) for _ in range(50)]
    extra: dict[str, Any] = {"device": "cpu", "device_name": "cpu", "host_busy": busy}
    if busy:
        extra["host_busy_reason"] = "other processes used 1.8 of 2 cores"
    stats = {"median": sorted(data)[25], "rounds": 50, "data": data}
    return {"name": name.split("::")[-1], "fullname": name, "stats": stats, "extra_info": extra}


def _write(path: Path, **factors: Any) -> Path:
    """``factors``: ``a``/``b`` -> factor, or (factor, busy)."""
    benches = []
    for key, name in (("a", A), ("b", B)):
        f = factors.get(key, 1.0)
        factor, busy = f if isinstance(f, tuple) else (f, False)
        benches.append(_bench(name, factor, seed=len(path.name) + len(key), busy=busy))
    path.write_text(json.dumps({"machine_info": {"node": "ci"}, "benchmarks": benches}))
    return path


class Suite:
    """The fake suite: its plan (one step per call) and what it was asked to re-run."""

    def __init__(self, tmp: Path, *steps: dict[str, Any]) -> None:
        self.plan = tmp / "plan.json"
        self.plan.write_text(json.dumps(list(steps)))
        self.command = shlex.join([sys.executable, str(FAKE), str(self.plan), "--json", "{json}"]) + " {tests}"

    @property
    def calls(self) -> list[list[str]]:
        log = Path(f"{self.plan}.calls")
        return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


def _gate(cli: Any, base: Path, new: Path, suite: Suite, *extra: object) -> Any:
    return cli("compare", base, new, "--rerun", suite.command, *extra)


def test_a_regression_that_persists_in_the_rerun_fails(tmp_path: Path, cli: Any) -> None:
    suite = Suite(tmp_path, {"factor": 1.2})
    r = _gate(cli, _write(tmp_path / "base.json"), _write(tmp_path / "new.json", a=1.2), suite)
    assert r.code == 1, r.out + r.err
    assert suite.calls == [[A]]  # only the regressed benchmark, once: its quiet re-run confirmed it
    assert "re-run 1/2: 1 benchmark(s) (0 busy, 1 regressed), 0 still busy" in r.err
    assert "1 failure(s), first: " + A in r.err


def test_a_transient_regression_cleared_by_the_rerun_passes(tmp_path: Path, cli: Any) -> None:
    suite = Suite(tmp_path, {"factor": 1.0})
    r = _gate(cli, _write(tmp_path / "base.json"), _write(tmp_path / "new.json", a=1.3), suite)
    assert r.code == 0, r.out + r.err
    assert suite.calls == [[A]]
    assert cli("compare", tmp_path / "base.json", tmp_path / "new.json").code == 1  # without --rerun it fails


@pytest.mark.parametrize(("rerun_factor", "code"), [(1.0, 0), (1.2, 1)])
def test_a_busy_benchmark_is_judged_on_its_quiet_rerun(tmp_path: Path, cli: Any, rerun_factor: float, code: int):
    suite = Suite(tmp_path, {"factor": 1.5, "busy": True}, {"factor": rerun_factor})
    r = _gate(cli, _write(tmp_path / "base.json"), _write(tmp_path / "new.json", b=(1.4, True)), suite)
    assert r.code == code, r.out + r.err
    assert suite.calls == [[B], [B]]  # busy again on the first re-run, quiet on the second
    assert "re-run 1/2: 1 benchmark(s) (1 busy, 0 regressed), 1 still busy" in r.err
    assert "re-run 2/2: 1 benchmark(s) (1 busy, 0 regressed), 0 still busy" in r.err


def test_a_benchmark_busy_after_all_reruns_is_refused_with_exit_3(tmp_path: Path, cli: Any) -> None:
    suite = Suite(tmp_path, {"factor": 1.0, "busy": True})
    base, new = _write(tmp_path / "base.json"), _write(tmp_path / "new.json", a=(1.0, True))
    r = _gate(cli, base, new, suite, "--reruns", "3")
    assert r.code == 3, r.out + r.err
    assert len(suite.calls) == 3
    error = [ln for ln in r.err_lines if "error" in ln]
    assert len(error) == 1 and "still busy after 3 re-run(s)" in error[0] and A in error[0]
    assert _gate(cli, base, new, Suite(tmp_path / "..", {"factor": 1.0, "busy": True}), "--allow-busy").code == 0


def test_reruns_0_runs_nothing_and_refuses_busy_input(tmp_path: Path, cli: Any) -> None:
    suite = Suite(tmp_path, {"factor": 1.0})
    r = _gate(cli, _write(tmp_path / "base.json"), _write(tmp_path / "new.json", a=(1.0, True)), suite, "--reruns", "0")
    assert r.code == 3 and suite.calls == []


def test_a_busy_baseline_is_refused_without_running_the_suite(tmp_path: Path, cli: Any) -> None:
    suite = Suite(tmp_path, {"factor": 1.0})
    r = _gate(cli, _write(tmp_path / "base.json", a=(1.0, True)), _write(tmp_path / "new.json"), suite)
    assert r.code == 3 and suite.calls == []
    assert "baseline" in r.err and "re-runs only the new results" in r.err


def test_nothing_flagged_runs_nothing(tmp_path: Path, cli: Any) -> None:
    suite = Suite(tmp_path, {"factor": 1.0})
    r = _gate(cli, _write(tmp_path / "base.json"), _write(tmp_path / "new.json"), suite)
    assert r.code == 0 and suite.calls == [] and "re-run" not in r.err


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"exit": 4}, "--rerun command failed (exit 4): fake suite: collection error in call 1"),
        ({"factor": 1.0, "skip": [A]}, f"--rerun: the command did not measure {A}"),
    ],
)
def test_a_failed_rerun_is_one_line_and_exit_2(tmp_path: Path, cli: Any, step: dict[str, Any], message: str) -> None:
    suite = Suite(tmp_path, step)
    r = _gate(cli, _write(tmp_path / "base.json"), _write(tmp_path / "new.json", a=1.3), suite)
    assert r.code == 2, r.out + r.err
    assert len(r.err_lines) == 1 and message in r.err_lines[0], r.err


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("pytest benchmarks", "must name its output with {json}"),
        ("pytest 'unclosed --benchmark-json {json}", "cannot split the command"),
        ("/nonexistent/suite --json {json}", "cannot run /nonexistent/suite"),
    ],
)
def test_bad_rerun_commands_exit_2(tmp_path: Path, cli: Any, command: str, message: str) -> None:
    r = cli("compare", _write(tmp_path / "base.json"), _write(tmp_path / "new.json", a=1.3), "--rerun", command)
    assert r.code == 2 and len(r.err_lines) == 1 and message in r.err_lines[0], r.err


def test_placeholders() -> None:
    argv = rerun_argv("pytest {tests} --benchmark-json={json} --only={tests}", "/t/o.json", ["a::x[1]", "b::y"])
    assert argv == ["pytest", "a::x[1]", "b::y", "--benchmark-json=/t/o.json", "--only=a::x[1] b::y"]


def test_the_rerun_replaces_only_the_flagged_benchmarks(tmp_path: Path) -> None:
    """The new result keeps every other benchmark's figures; the re-run benchmark's busy mark goes with it."""
    base = _write(tmp_path / "base.json")
    new = _write(tmp_path / "new.json", a=(1.0, True), b=1.0)
    seen: list[list[str]] = []

    def run(command: str, tests: Any, out: Path) -> Any:
        seen.append(list(tests))
        return load_result(_write(out, a=2.0, b=5.0))

    gate = compare_with_reruns(base, new, command="x {json}", run=run)
    assert seen == [[A]] and [r.still_busy for r in gate.reruns] == [()]
    by_name = {c.name: c.verdict for c in gate.comparisons}
    assert by_name == {A: "regression", B: "unchanged"}  # B's 5x in the re-run output was not taken
    with pytest.raises(BadInput, match="--reruns must be >= 0"):
        compare_with_reruns(base, new, command="x {json}", reruns=-1, run=run)


def test_the_gate_trial_reruns_the_suite_it_measured_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/gate_trial.py`` hands the gate its own suite command, node ids and output as placeholders."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "gate_trial.py"
    spec = importlib.util.spec_from_file_location("gate_trial", path)
    assert spec is not None and spec.loader is not None
    gate_trial = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gate_trial", gate_trial)  # its dataclass looks its module up
    spec.loader.exec_module(gate_trial)
    opts = gate_trial.parse_args(["--batch-sizes", "64,256"])
    for slowed in (False, True):
        argv = rerun_argv(gate_trial.rerun_command(opts, slowed=slowed), "/t/o.json", [A, B])
        measured = gate_trial.suite_argv("/t/o.json", opts, slowed=slowed)
        assert argv == [measured[0], *measured[1:3], A, B, *measured[4:]]  # the file's place taken by the node ids
        assert ("--bsprof-workload" in argv) == slowed


def test_write_judged_keeps_the_remeasured_entries_as_the_next_baseline(tmp_path: Path, cli: Any) -> None:
    """A night that passed through its re-runs leaves a quiet file behind: the next night can judge against it."""
    suite = Suite(tmp_path, {"factor": 1.0, "busy": True}, {"factor": 1.0})
    base, new = _write(tmp_path / "base.json"), _write(tmp_path / "new.json", a=(1.0, True), b=1.0)
    judged = tmp_path / "judged.json"
    r = _gate(cli, base, new, suite, "--write-judged", judged)
    assert r.code == 0, r.out + r.err
    entries = {b["fullname"]: b for b in json.loads(judged.read_text())["benchmarks"]}
    before = {b["fullname"]: b for b in json.loads(new.read_text())["benchmarks"]}
    assert entries[A]["extra_info"]["host_busy"] is False and entries[A] != before[A]  # the second re-run's
    assert entries[B] == before[B]  # never re-run: as measured
    assert cli("compare", judged, new, "--allow-busy").code == 0
    assert cli("compare", judged, _write(tmp_path / "next.json")).code == 0  # not refused as a busy baseline


def test_write_judged_needs_rerun(tmp_path: Path, cli: Any) -> None:
    r = cli("compare", _write(tmp_path / "a.json"), _write(tmp_path / "b.json"), "--write-judged", tmp_path / "j.json")
    assert r.code == 2 and "--write-judged needs --rerun" in r.err
