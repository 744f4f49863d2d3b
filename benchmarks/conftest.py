"""The benchmark suite's plugin: ``--bsprof-*`` options, the ``bsprof`` session fixture and the batch-size
parametrization (see :mod:`bsprof.pytest_plugin`). Registered here only, so ``pytest tests/`` never loads it.

Run from the repository root: ``python -m pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from bsprof.engine.host_load import HostWindow, measure_on_quiet_host

QUIET_ATTEMPTS = 3
"""Measurements of a verdict benchmark on a busy host before it is skipped."""

pytest_plugins = ["bsprof.pytest_plugin"]


@pytest.fixture
def torch_threads() -> Iterator[int]:
    """torch on one thread for the test, restored afterwards: on a small shared host, OpenMP workers that spin
    while another process holds a core swing step times by far more than the few percent compared here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def quiet_host_verdict(benchmark: Any) -> Callable[[Callable[[HostWindow], dict[str, Any]], int], dict[str, Any]]:
    """``verdict(measure, threads)``: run ``measure(host_window)`` once under ``benchmark.pedantic``, again while the
    host was busy (:func:`~bsprof.engine.host_load.measure_on_quiet_host`, up to :data:`QUIET_ATTEMPTS` in all),
    record its figures and ``attempts``/``host_busy``/``host_busy_reasons`` in ``extra_info``, and skip the test
    ("host busy: <why>") when no attempt was quiet: only a quiet measurement may fail a verdict.

    ``measure`` calls ``host_window.mark()`` at its round boundaries (outside the timed parts); a measurement is
    busy when its whole window, or more than a quarter of its rounds, ran on a busy host
    (:func:`~bsprof.engine.host_load.assess_host_load`: other processes on the cores it needs, a long run queue,
    steal)."""

    def verdict(measure: Callable[[HostWindow], dict[str, Any]], threads: int) -> dict[str, Any]:
        kwargs = {"attempts": QUIET_ATTEMPTS, "threads": threads}
        measured = benchmark.pedantic(measure_on_quiet_host, args=(measure,), kwargs=kwargs, rounds=1, iterations=1)
        benchmark.extra_info.update(measured.value)
        busy = measured.busy_reason is not None
        benchmark.extra_info.update(attempts=measured.attempts, host_busy=busy, host_busy_reasons=measured.busy_reasons)
        if busy:
            pytest.skip(f"host busy: {measured.busy_reason} ({measured.attempts} attempt(s))")
        return measured.value

    return verdict


@pytest.fixture
def assert_verdict() -> Callable[[str, str], None]:
    """``assert_verdict(outcome, line)`` for a :class:`~bsprof.interleaved.Verdict`'s outcome: print the line,
    skip with it when the run could not judge (``unresolved``: too noisy for the tolerance), fail unless
    ``within``."""

    def check(outcome: str, line: str) -> None:
        print(line)
        if outcome == "unresolved":
            pytest.skip(line)
        assert outcome == "within", line

    return check
