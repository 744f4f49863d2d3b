"""Shared test helpers: paths of the fixture workloads, the CLI run in-process or as a subprocess.

The fixture workloads in ``tests/fixtures/`` are plain files loaded the way users load plug-ins,
``path/file.py:factory``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import bsprof.engine.timing as timing_module

pytest_plugins = ["pytester"]  # tests/test_benchmark_suite.py runs the benchmark suite's plugin in pytester

# One intra-op thread: the tests' models are tiny, and on a shared two-core host a second OpenMP thread
# that is not scheduled makes every small op wait for it (tens of milliseconds per step).
torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FIXTURES = TESTS / "fixtures"


def ref(file: str, attr: str = "factory") -> str:
    """``/abs/tests/fixtures/<file>:<attr>``, a workload reference for ``--workload``."""
    return f"{FIXTURES / file}:{attr}"


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``bsprof.cli.main(args)`` in this process; argparse's ``SystemExit`` becomes the exit code."""
    from bsprof.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: this one, one torch thread (two sweeps share two cores)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bsprof.cli", *[str(a) for a in args]]


def run_cli_subprocess(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a real process from the repository root."""
    return subprocess.run(
        cli_command(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


_REAL_TIMING_SETTINGS = timing_module.TimingSettings


def quick_timing_settings(**kwargs: Any) -> timing_module.TimingSettings:
    """``TimingSettings`` with no minimum warm-up time, no minimum block length and two blocks by default."""
    kwargs.setdefault("warmup_s", 0.0)
    kwargs.setdefault("block_min_s", 0.0)
    kwargs.setdefault("min_blocks", 2)
    return _REAL_TIMING_SETTINGS(**kwargs)


@pytest.fixture
def fast_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI's throughput trials take milliseconds.

    The CLI builds ``TimingSettings`` from ``--min-time/--min-steps/--timing-warmup-steps`` and leaves the
    other knobs at their defaults (0.2 s warm-up, 7 blocks); this shortens those. Tests that use it still
    run every trial through the real engine and store.
    """
    monkeypatch.setattr(timing_module, "TimingSettings", quick_timing_settings)


FAST = ("--min-time", "0.001", "--min-steps", "2", "--timing-warmup-steps", "1")
"""CLI options for short throughput trials (with :func:`fast_timing`)."""

THROUGHPUT = ("--kind", "throughput", "--seeds", "1", "--repeats", "1")
"""CLI options for a throughput-only sweep, one trial per batch size."""
