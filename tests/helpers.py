"""Helpers the test modules import (``from helpers import ...``): paths of the fixture workloads, the CLI's
result and subprocess command, and short timing for CLI trials. Fixtures live in ``conftest.py``.

The fixture workloads in ``tests/fixtures/`` are plain files loaded the way users load plug-ins,
``path/file.py:factory``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bsprof.engine.timing import TimingSettings

__all__ = [
    "FAST",
    "FIXTURES",
    "QUICK_TIMING",
    "REPO",
    "TESTS",
    "THROUGHPUT",
    "CliResult",
    "cli_command",
    "cli_env",
    "quick_timing",
    "quick_timing_settings",
    "ref",
    "run_cli_subprocess",
]

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"

FAST = ("--min-time", "0.001", "--min-steps", "2", "--timing-warmup-steps", "1")
"""CLI options for short throughput trials (with :func:`quick_timing`, the ``fast_timing`` fixture)."""

THROUGHPUT = ("--kind", "throughput", "--seeds", "1", "--repeats", "1")
"""CLI options for a throughput-only sweep, one trial per batch size."""

QUICK_TIMING: dict[str, Any] = {"warmup_s": 0.0, "block_min_s": 0.0, "min_blocks": 2}
"""The timing knobs the CLI has no option for, shortened: no warm-up time floor, no block length floor, 2 blocks."""


def ref(file: str, attr: str = "factory") -> str:
    """``/abs/tests/fixtures/<file>:<attr>``, a workload reference for ``--workload``."""
    return f"{FIXTURES / file}:{attr}"


@dataclass
class CliResult:
    """Exit code and captured output of one ``bsprof`` command."""

    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: this one, one torch thread (two sweeps share two cores)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def cli_command(*args: str) -> list[str]:
    """The ``python -m bsprof.cli ...`` command line (run it from :data:`REPO`)."""
    return [sys.executable, "-m", "bsprof.cli", *[str(a) for a in args]]


def run_cli_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a real process from the repository root."""
    return subprocess.run(
        cli_command(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def quick_timing_settings(**kwargs: Any) -> TimingSettings:
    """``TimingSettings`` with :data:`QUICK_TIMING`'s defaults; values passed explicitly win."""
    return TimingSettings(**{**QUICK_TIMING, **kwargs})


def quick_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give every :class:`~bsprof.engine.timing.TimingSettings` made from now on :data:`QUICK_TIMING`'s defaults.

    The class itself is patched (its ``__init__``), so this holds wherever the CLI or the engine builds its
    settings, however they import the class; values passed explicitly (the CLI's ``--min-time`` ...) win.
    """
    init = TimingSettings.__init__

    def quick_init(self: TimingSettings, **kwargs: Any) -> None:
        init(self, **{**QUICK_TIMING, **kwargs})

    monkeypatch.setattr(TimingSettings, "__init__", quick_init)
