"""Throughput per batch size: the engine's throughput trial, its rounds timed by pytest-benchmark.

Each benchmark is :func:`~bsprof.engine.trial.run_throughput_trial` — the CLI's trial: fresh
:class:`~bsprof.engine.step.TrainingStep`, memory reset, the session's one telemetry sampler process,
the telemetry window, OOM handling and clean-up — with one part swapped: the rounds are timed by
``benchmark.pedantic`` (:class:`~bsprof.pytest_session.PedanticTimer`), each round one training step
followed by a device sync, so pytest-benchmark's timer measures finished work (on CUDA the launches are
asynchronous; on the CPU the sync is a no-op). The per-round times pytest-benchmark records *are* the
step times.

``extra_info`` holds, in SI units: ``samples_per_s`` (batch size / median round), ``step_time_s``,
``peak_mem_bytes`` (CUDA: ``max_memory_allocated``; CPU: peak RSS growth, a lower bound),
``mem_baseline_bytes`` (memory in use when the trial started), ``gpu_util_pct``, ``power_w``, ``energy_j``,
``energy_per_sample_j`` — ``None`` with a ``<field>_reason`` where not measured — and ``step_times_s``,
every round's time, which ``bsprof compare`` tests for significance.

Rounds: first the engine's one timer warms the step up (``--bsprof-warmup-rounds`` steps) and estimates
it over about 0.1 s; that estimate sizes the rounds to last ``--bsprof-min-time`` seconds (at least
``--bsprof-min-rounds``), so a benchmark spans the same wall-clock time whatever its step costs. A short
window would catch a shared host in one state (idle, or with a neighbour on the sibling core) and a rerun in
another; a second of rounds averages over them.

Options: ``--bsprof-workload``, ``--bsprof-batch-sizes``, ``--bsprof-device``, ``--bsprof-min-time``,
``--bsprof-store`` ... (``pytest benchmarks --help``; :mod:`bsprof.pytest_plugin`).
"""

from __future__ import annotations

from typing import Any

import pytest

from bsprof.benchmark_results import throughput_extra_info
from bsprof.pytest_session import BsprofSession


def test_throughput(benchmark: Any, bsprof: BsprofSession, throughput_batch_size: int) -> None:
    b = throughput_batch_size
    bsprof.check_runnable(b)
    result = bsprof.run_throughput(benchmark, b)
    if benchmark.disabled:  # --benchmark-disable: one untimed step of the trial, as a plain test
        assert result.status == "ok", result.error
        return
    bsprof.record(result)
    if result.status == "oom":
        bsprof.note_oom(b)
        pytest.skip(f"out of memory at batch size {b} on {bsprof.device}")
    assert result.status == "ok", result.error
    benchmark.extra_info.update(throughput_extra_info(result, warmup_rounds=bsprof.options.warmup_rounds))
