"""The nightly GPU workflow: actionlint accepts it (with shellcheck on its ``run:`` scripts when installed), and
it keeps the gate's essentials. actionlint comes with the ``lint`` extra (``pip install -e '.[lint]'``)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "nightly-gpu.yml"
CONFIG = REPO / ".github" / "actionlint.yaml"


def test_actionlint_accepts_the_workflow() -> None:
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed (pip install -e '.[lint]')")
    run = subprocess.run(
        [actionlint, "-config-file", str(CONFIG), str(WORKFLOW)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_workflow_runs_the_suite_and_the_gate() -> None:
    text = WORKFLOW.read_text(encoding="utf-8")
    for needle in (
        "schedule:",
        "workflow_dispatch:",
        "runs-on: [self-hosted, linux, gpu]",
        "pip install torch --index-url",
        "pip install -e '.[test,gpu]'",
        "--benchmark-only",
        "--benchmark-json reports/bench.json --benchmark-save-data",
        "bsprof report --store reports/bsprof.db --benchmark-json reports/bench.json",
        "actions/upload-artifact@",
        "bsprof compare baseline/bench.json reports/bench.json --fail-above 10%",
        "no baseline yet",
    ):
        assert needle in text, needle
    assert "gpu" in CONFIG.read_text(encoding="utf-8")  # the custom runner label, declared for actionlint
