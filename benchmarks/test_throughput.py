"""Throughput per batch size: pytest-benchmark times the engine's one training step.

Each benchmark builds a fresh :class:`~bsprof.engine.step.TrainingStep` (the object the CLI's throughput
and convergence trials call) and hands ``benchmark.pedantic`` a callable that runs exactly one step and
returns only after the device synchronised, so pytest-benchmark's timer measures finished work (on CUDA
the launches are asynchronous; on the CPU the sync is a no-op). There is no other training loop and no
other timer: the per-round times pytest-benchmark records *are* the step times.

Around the timed rounds the engine's :class:`~bsprof.engine.monitors.Monitor` window polls the host and
(through NVML) the GPU at 20 Hz. ``extra_info`` holds, in SI units: ``samples_per_s`` (batch size / median
round), ``step_time_s``, ``peak_mem_bytes`` (CUDA: ``max_memory_allocated``; CPU: peak RSS growth, a lower
bound), ``gpu_util_pct``, ``power_w``, ``energy_j``, ``energy_per_sample_j`` — ``None`` with a
``<field>_reason`` where not measured — and ``step_times_s``, every round's time, which ``bsprof compare``
tests for significance.

Rounds: first the engine's one timer warms the step up (``--bsprof-warmup-rounds`` steps) and estimates
it over about 0.1 s; that estimate sizes the rounds to last ``--bsprof-min-time`` seconds (at least
``--bsprof-min-rounds``), so a benchmark spans the same wall-clock time whatever its step costs. A short
window would catch a shared host in one state (idle, or with a neighbour on the sibling core) and a rerun in
another; a second of rounds averages over them.

Options: ``--bsprof-workload``, ``--bsprof-batch-sizes``, ``--bsprof-device``, ``--bsprof-min-time``,
``--bsprof-store`` ... (``pytest benchmarks --help``; :mod:`bsprof.pytest_plugin`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
import torch

from bsprof.benchmark_results import throughput_extra_info, throughput_result
from bsprof.engine.device import synchronizer
from bsprof.engine.monitors import Monitor
from bsprof.engine.oom import free_memory, is_oom
from bsprof.engine.step import TrainingStep
from bsprof.engine.trial import default_gpu_sampler, failure_result
from bsprof.pytest_plugin import BsprofSession

MONITOR_HZ = 20.0
ITERATIONS = 1  # one training step per round: the round times are step times


def test_throughput(benchmark: Any, bsprof: BsprofSession, throughput_batch_size: int) -> None:
    b = throughput_batch_size
    bsprof.check_runnable(b)
    o = bsprof.options
    spec = bsprof.spec("throughput", b)
    device = bsprof.settings.device
    sync = synchronizer(device)
    started = time.time()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gpu = default_gpu_sampler(device)
    closing = contextlib.closing(gpu) if hasattr(gpu, "close") else contextlib.nullcontext()
    try:
        with closing, Monitor(gpu, hz=MONITOR_HZ).window() as window:
            step = TrainingStep(bsprof.workload, batch_size=b, seed=spec.seed, lr=spec.lr, device=device)
            rounds, probe_steps = bsprof.size_rounds(step, batch_size=b, sync=sync)

            def one_step() -> None:
                step()
                sync()

            benchmark.pedantic(one_step, rounds=rounds, iterations=ITERATIONS, warmup_rounds=o.warmup_rounds)
    except Exception as exc:
        if not is_oom(exc):
            raise
        bsprof.record(failure_result(spec, exc, device, started))
        bsprof.note_oom(b)
        free_memory(device)
        pytest.skip(f"out of memory at batch size {b} on {device}")
    if benchmark.disabled:  # --benchmark-disable: the step ran once, as a plain test
        return
    expected = probe_steps + (o.warmup_rounds + rounds) * ITERATIONS
    assert step.steps_done >= expected, f"engine bug: {step.steps_done} steps ran, {expected} were asked for"
    round_times_s = list(benchmark.stats.stats.data)  # seconds per step, per round (pytest-benchmark's timer)
    result = throughput_result(
        device,
        spec,
        round_times_s=round_times_s,
        iterations=ITERATIONS,
        warmup_steps=probe_steps + o.warmup_rounds * ITERATIONS,
        telemetry=window.telemetry,
        started=started,
        duration_s=time.time() - started,
    )
    benchmark.extra_info.update(
        throughput_extra_info(
            result, rounds=rounds, iterations=ITERATIONS, warmup_rounds=o.warmup_rounds, step_times_s=round_times_s
        )
    )
    bsprof.record(result)
