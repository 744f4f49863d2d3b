"""Fixtures shared by the tests: the CLI run in-process, and short CLI throughput trials.

Plain helpers (paths, :class:`~helpers.CliResult`, the subprocess command) are in ``helpers.py``; import them
from there, never from this file.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import CliResult, quick_timing

from bsprof.cli import main

pytest_plugins = ["pytester"]  # tests/test_benchmark_suite.py runs the benchmark suite's plugin in pytester

# One intra-op thread: the tests' models are tiny, and on a shared two-core host a second OpenMP thread
# that is not scheduled makes every small op wait for it (tens of milliseconds per step).
torch.set_num_threads(1)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run ``bsprof.cli.main(args)`` in this process; argparse's ``SystemExit`` becomes the exit code."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def fast_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the CLI's throughput trials take milliseconds (see :func:`helpers.quick_timing`).

    The CLI builds ``TimingSettings`` from ``--min-time/--min-steps/--timing-warmup-steps`` (use
    :data:`helpers.FAST`) and leaves the other knobs at their defaults (0.2 s warm-up, 7 blocks); this shortens
    those. Tests that use it still run every trial through the real engine and store.
    """
    quick_timing(monkeypatch)
