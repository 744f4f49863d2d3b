"""The nightly GPU workflow: actionlint accepts it (with shellcheck on its ``run:`` scripts when installed), and,
read as YAML, it keeps the gate's essentials: its ``bsprof`` commands parse with the real CLI parser and its
``BSPROF_*`` settings with the suite's option parser. actionlint comes with the ``lint`` extra
(``pip install -e '.[lint]'``)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from helpers import REPO

from bsprof.cli import build_parser
from bsprof.options import SUITE_OPTIONS, parse_suite_options

WORKFLOW = REPO / ".github" / "workflows" / "nightly-gpu.yml"
CONFIG = REPO / ".github" / "actionlint.yaml"


def _load(path: Any) -> dict[Any, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    return _load(WORKFLOW)["jobs"]["benchmarks"]


def _commands(job: dict[str, Any], program: str) -> list[list[str]]:
    """Every simple ``program ...`` command of the job's ``run:`` scripts, split as the shell would (no expansion),
    up to the first shell operator (``>``, ``|``, ``&&`` ...)."""
    found = []
    for step in job["steps"]:
        script = step.get("run", "").replace("\\\n", " ")
        for line in script.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
            end = next((i for i, w in enumerate(words) if set(w) <= set("();<>|&")), len(words))
            if words[:1] == [program]:
                found.append(words[:end])
    return found


def test_actionlint_accepts_the_workflow() -> None:
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed (pip install -e '.[lint]')")
    run = subprocess.run(
        [actionlint, "-config-file", str(CONFIG), str(WORKFLOW)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_nightly_and_by_hand_on_a_gpu_runner(job: dict[str, Any]) -> None:
    workflow = _load(WORKFLOW)
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert triggers["schedule"][0]["cron"]
    assert "accept_baseline" in triggers["workflow_dispatch"]["inputs"]
    assert job["runs-on"] == ["self-hosted", "linux", "gpu"]
    assert "gpu" in _load(CONFIG)["self-hosted-runner"]["labels"]  # the custom label, declared for actionlint


def test_the_suite_settings_are_valid_suite_options(job: dict[str, Any]) -> None:
    env = {k: v for k, v in job["env"].items() if k.startswith("BSPROF_") and "${{" not in str(v)}
    known = {var for var, _, _ in SUITE_OPTIONS.values()}
    assert set(env) - known <= {"BSPROF_CIFAR10_DIR"}
    options = parse_suite_options(lambda suffix: None, {k: str(v) for k, v in env.items()})
    assert options.device_spec == "cuda" and options.store is not None


def test_the_suite_runs_with_json_output(job: dict[str, Any]) -> None:
    installs = [" ".join(c) for c in _commands(job, "pip")]
    assert any(c.startswith("pip install torch --index-url") for c in installs)
    assert "pip install -e .[test,gpu]" in installs
    (pytest_run,) = [c for c in _commands(job, "python") if c[1:3] == ["-m", "pytest"]]
    assert "--benchmark-only" in pytest_run and "--benchmark-save-data" in pytest_run
    assert pytest_run[pytest_run.index("--benchmark-json") + 1] == "reports/bench.json"


def test_every_bsprof_command_parses_and_the_gate_compares_with_the_baseline(job: dict[str, Any]) -> None:
    commands = _commands(job, "bsprof")
    parsed = [build_parser().parse_args(c[1:]) for c in commands]  # SystemExit (exit 2) on a stale option
    (report,) = [a for a in parsed if a.command == "report"]
    assert report.benchmark_json == ["reports/bench.json"] and report.store == "reports/bsprof.db"
    (compare,) = [a for a in parsed if a.command == "compare"]
    assert (compare.baseline, compare.new, compare.fail_above) == ("baseline/bench.json", "reports/bench.json", 0.1)
    rerun = shlex.split(compare.rerun)  # the gate re-runs flagged benchmarks with the suite's own command
    assert rerun[:3] == ["python", "-m", "pytest"] and "{tests}" in rerun and "{json}" in rerun
    assert "--benchmark-save-data" in rerun and "--benchmark-only" in rerun
    assert compare.write_judged == "reports/bench.json"  # the kept baseline holds the figures judged
    names = [s.get("name", "") for s in job["steps"]]
    assert names.index("Upload the benchmark JSON") > next(i for i, n in enumerate(names) if n.startswith("Compare"))
    uploads = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert any(s["with"]["path"] == "reports/bench.json" for s in uploads)
    finder = next(s for s in job["steps"] if s.get("id") == "baseline")
    assert "no baseline yet" in finder["with"]["script"]
    (gate,) = [s for s in job["steps"] if "bsprof compare" in s.get("run", "")]
    assert gate["if"] == "steps.baseline.outputs.run-id != ''"  # skipped, not failed, without a baseline
