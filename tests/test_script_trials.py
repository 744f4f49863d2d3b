"""Script trials (``bsprof sweep --cmd``): a real child process per trial, faults included.

Every test runs real subprocesses of ``tests/fixtures/scripts/fault.py`` (sleeping steps, the tracker inside),
so the statuses, messages and the store are checked end to end: a crash, a printed CUDA OOM, a hang ended by the
trial timeout, a script that never calls the tracker and one killed with SIGKILL mid-trial.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES

from bsprof.engine.convergence import ConvergenceSettings
from bsprof.engine.script import NEVER_TRACKED, ScriptJob, command_for, run_script_trial, trial_dir
from bsprof.engine.sweep import SweepConfig, run_sweep
from bsprof.engine.timing import TimingSettings
from bsprof.engine.trial import EngineSettings, TrialSpec
from bsprof.errors import BadInput
from bsprof.store import Store

SCRIPT = FIXTURES / "scripts" / "fault.py"
TIMING = TimingSettings(warmup_steps=2, warmup_s=0.0, min_time_s=0.02, min_steps=4, block_min_s=0.003, min_blocks=3)
SETTINGS = EngineSettings(device=torch.device("cpu"), timing=TIMING)


def _job(tmp_path: Path, faults: str = "", timeout: float | None = 60.0, **kw: object) -> ScriptJob:
    cmd = f"{shlex.quote(sys.executable)} {SCRIPT} {{batch_size}} {{seed}} --faults {faults or '-'} --count {{count}}"
    return ScriptJob(
        name="fault",
        command=tuple(shlex.split(cmd)),
        params={"count": str(tmp_path / "starts.txt")},
        target=0.5,
        trial_timeout_s=timeout,
        log_dir=str(tmp_path / "logs"),
        **kw,  # type: ignore[arg-type]
    )


def _sweep(tmp_path: Path, job: ScriptJob, sizes: tuple[int, ...], kinds: tuple[str, ...] = ("throughput",)) -> object:
    conv = ConvergenceSettings(target=0.5, max_time_s=30)
    config = SweepConfig(workload_ref="fault.py", batch_sizes=sizes, kinds=kinds, seeds=1, convergence=conv)
    runners = {k: (lambda w, s, e: run_script_trial(job, s, e, conv)) for k in ("throughput", "convergence")}
    with Store(tmp_path / "s.db", create=True) as store:
        return run_sweep(config, job, SETTINGS, store, runners=runners, prime=False)  # type: ignore[arg-type]


def _rows(tmp_path: Path) -> dict[tuple[str, int], dict[str, object]]:
    with Store(tmp_path / "s.db") as store:
        return {(r["kind"], r["batch_size"]): r for r in store.trial_rows()}


def _starts(tmp_path: Path) -> list[str]:
    path = tmp_path / "starts.txt"
    return path.read_text().splitlines() if path.exists() else []


def test_faults_are_stored_with_their_status_and_the_sweep_goes_on(tmp_path: Path) -> None:
    job = _job(tmp_path, "16:crash,32:sigkill,64:never,128:hang", timeout=8.0)
    outcome = _sweep(tmp_path, job, (8, 16, 32, 64, 128, 256))
    rows = _rows(tmp_path)
    status = {b: rows[("throughput", b)]["status"] for b in (8, 16, 32, 64, 128, 256)}
    assert status == {8: "ok", 16: "error", 32: "error", 64: "error", 128: "budget_exhausted", 256: "ok"}
    err = {b: str(rows[("throughput", b)]["error"]) for b in (16, 32, 64, 128)}
    assert err[16].startswith("exit code 1: ValueError: boom at step 3")
    assert err[32].startswith("killed by signal SIGKILL")
    assert err[64] == NEVER_TRACKED
    assert "timed out after 8 s" in err[128]
    for b in (8, 256):  # the good trials around the faults are intact
        row = rows[("throughput", b)]
        assert row["samples_per_s"] > 0 and row["step_time_s"] > 0 and row["measured_steps"] >= 4
        assert row["peak_mem_bytes"] is not None
    assert len(outcome.results) == 6  # type: ignore[attr-defined]
    # the crash's log tail is kept for the report
    with Store(tmp_path / "s.db") as store:
        crash = next(r for r in store.trial_rows() if r["batch_size"] == 16)
        assert "Traceback" in crash["extra"]["script_log_tail"]


def test_resume_skips_finished_trials_and_retries_errors(tmp_path: Path) -> None:
    job = _job(tmp_path, "16:crash")
    _sweep(tmp_path, job, (8, 16, 32))
    assert len(_starts(tmp_path)) == 3
    _sweep(tmp_path, job, (8, 16, 32))
    # ok trials are finished and skipped; the error trial is retried (as for built-in workloads)
    assert [line.split()[0] for line in _starts(tmp_path)[3:]] == ["16"]
    assert len(_rows(tmp_path)) == 3


@pytest.mark.parametrize("mode", ["oom_print", "oom_raise"])
def test_oom_is_recognised_and_larger_sizes_are_skipped(tmp_path: Path, mode: str) -> None:
    job = _job(tmp_path, f"16:{mode}")
    _sweep(tmp_path, job, (8, 16, 32))
    rows = _rows(tmp_path)
    assert rows[("throughput", 8)]["status"] == "ok"
    assert rows[("throughput", 16)]["status"] == "oom"
    assert "CUDA out of memory" in str(rows[("throughput", 16)]["error"])
    assert rows[("throughput", 32)]["status"] == "oom"
    assert "not tried" in str(rows[("throughput", 32)]["error"])
    assert [line.split()[0] for line in _starts(tmp_path)] == ["8", "16"]  # 32 never started


def test_convergence_trial_reports_steps_to_target_with_the_bracket(tmp_path: Path) -> None:
    job = _job(tmp_path)
    spec = TrialSpec("fault", "convergence", 8, 0, 0.1)
    result = run_script_trial(job, spec, SETTINGS, ConvergenceSettings(target=0.5, patience=2))
    assert result.status == "ok", result.error
    # the metric is step/20, evaluated every 2 steps: 0.5 first at step 10, patience 2 confirms it at 12
    assert result.metrics["steps_to_target"] == 10
    assert result.metrics["bracket_steps"] == 8
    assert result.metrics["samples_to_target"] == 80
    assert result.metrics["steps_run"] == 12  # should_stop() ended the script once the target was confirmed
    assert [r["step"] for r in result.curve] == [2, 4, 6, 8, 10, 12]
    assert 0 < result.metrics["time_to_target_s"] < result.metrics["train_time_s"] + 1e-9


def test_diverging_script_is_stored_diverged(tmp_path: Path) -> None:
    job = _job(tmp_path, "8:diverge")
    spec = TrialSpec("fault", "convergence", 8, 0, 0.1)
    result = run_script_trial(job, spec, SETTINGS, ConvergenceSettings(target=2))
    assert result.status == "diverged"
    assert result.error is not None and result.error.startswith("training loss 1e+06 at step 8")


def test_command_placeholders_are_filled_per_token(tmp_path: Path) -> None:
    job = ScriptJob(
        name="j",
        command=("python", "t.py", "--b={batch_size}", "--lr", "{lr}", "--tag", "{tag}"),
        params={"tag": "a b"},
    )
    argv = command_for(job, TrialSpec("j", "throughput", 64, 1, 0.025), tmp_path)
    assert argv == ["python", "t.py", "--b=64", "--lr", "0.025", "--tag", "a b"]
    assert trial_dir(job, TrialSpec("j", "throughput", 64, 1, 0.025)).name == "throughput-B64-seed1-lr0.025-r0"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (("python", "t.py", "--b", "{bs}"), "placeholder {bs} is unknown"),
        (("python", "t.py"), "no {batch_size} placeholder"),
        (("python", "t.py", "{batch_size", "x"), "literal braces"),
        ((), "empty training command"),
    ],
)
def test_bad_commands_are_bad_input(command: tuple[str, ...], message: str) -> None:
    with pytest.raises(BadInput, match=message.replace("{", r"\{").replace("}", r"\}")):
        ScriptJob(name="j", command=command)


@pytest.mark.slow
def test_torchrun_command_is_one_trial_reported_by_rank_0(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.run", reason="torchrun is part of torch.distributed")
    script = FIXTURES / "scripts" / "ddp.py"
    cmd = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script))
    cmd += ("--batch-size", "{batch_size}")
    job = ScriptJob(name="ddp", command=cmd, target=0.5, trial_timeout_s=240, log_dir=str(tmp_path))
    for kind in ("throughput", "convergence"):
        spec = TrialSpec("ddp", kind, 16, 0, 0.1)
        result = run_script_trial(job, spec, SETTINGS, ConvergenceSettings(target=0.5))
        assert result.status == "ok", (result.error, result.extra.script)
        events = (trial_dir(job, spec) / "events.jsonl").read_text()
        assert events.count('"event": "start"') == 1  # rank 0 only
        log = (trial_dir(job, spec) / "output.log").read_text()
        # the two ranks write to one log: their lines can run together ("...step 8rank 0/2 stopped at step 8")
        stops = sorted(re.findall(r"stopped at step (\d+)", log))
        assert len(stops) == 2 and stops[0] == stops[1], log[-2000:]  # should_stop() was agreed
    assert result.metrics["steps_to_target"] == 20
