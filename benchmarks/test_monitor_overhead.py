"""Telemetry overhead: sampling at 20 Hz must change digits-mlp throughput by less than 1%.

By default the monitor polls from a sampler process (``auto`` mode), which leaves the training loop's GIL
alone; the ``thread`` case measures the fallback (a daemon thread, which competes with the training loop
for the GIL and a core) for reference, without the 1% assertion. Both monitors of a case start their
process once, before the rounds.

The comparison is paired and interleaved: in each round the same training step is timed by the engine's
timer (:func:`~bsprof.engine.timing.time_steps`) once inside a window sampling at 20 Hz through the real
NVML sampler (backed by a fake NVML, :mod:`constant_nvml`, as there is no GPU here), and once inside a window whose
sampler is a :class:`NullGpu` polling every 1000 s (the window's open/close polls only); the order
alternates between rounds so that drifts of a shared machine hit both sides. The overhead is
``1 - median(samples/s with sampling) / median(samples/s without)``, recorded in ``extra_info`` with both
medians, their spread, and the median of the per-round paired ratios (more robust to drift).

torch runs on one thread here: on a small shared host, OpenMP worker threads that spin while another
process holds the second core swing step times by far more than 1%, which would drown the effect being
measured. As a noise-free cross-check, the cost of one poll is timed directly; ``poll_duty_fraction`` =
poll seconds x 20 Hz is the share of one core (and of the GIL) that sampling takes, and must stay below 1%.

A heavily shared host can swing round-to-round throughput by 10% or more, and then no number of rounds here
resolves 1%. The verdict (:func:`~bsprof.interleaved.judge`, as the other overhead benchmarks take it) is on the
percentile-bootstrap 95% interval of the median per-round ratio (samples/s sampling / not sampling): **within**
1% (pass) when the whole interval is at or above 0.99, **beyond** (fail) when it is wholly below, and otherwise
a skip with the figures ("the interval straddles 0.9900"): a point estimate under 1% with an interval reaching
below 0.99 is not a pass. (``resolution_fraction``, the standard error of the ratio of medians from the rounds'
IQRs, is still recorded.) Run it on a quiet machine for the acceptance figure.

Run: ``python -m pytest benchmarks/test_monitor_overhead.py``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from bsprof.engine.monitors import Monitor
from bsprof.engine.nvml import NvmlGpu, open_nvml_gpu
from bsprof.engine.samplers import NullGpu
from bsprof.engine.step import TrainingStep
from bsprof.engine.timing import TimingSettings, time_steps
from bsprof.interleaved import judge, ratio_interval
from bsprof.workloads.digits import DigitsMLP

BATCH = 64
ROUNDS = 41
HZ = 20.0
MAX_OVERHEAD = 0.01
TIMING = TimingSettings(warmup_steps=5, warmup_s=0.02, min_time_s=0.25, min_steps=20, min_blocks=5)


def _throughput(step: TrainingStep, monitor: Monitor) -> tuple[float, int]:
    with monitor.window() as window:
        times = time_steps(step, batch_size=BATCH, settings=TIMING)
    return times.samples_per_s, window.telemetry.samples


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["auto", "thread"])
def test_monitor_at_20hz_costs_under_one_percent(benchmark: Any, assert_verdict: Any, mode: str) -> None:
    step = TrainingStep(DigitsMLP(), batch_size=BATCH, seed=0, lr=0.01, device=torch.device("cpu"))
    gpu = open_nvml_gpu(0, nvml_factory="constant_nvml:constant_nvml", visible_devices=None)
    assert isinstance(gpu, NvmlGpu)
    sampling = Monitor(gpu, hz=HZ, mode=mode)
    quiet = Monitor(NullGpu("baseline: no GPU sampling"), hz=0.001, mode=mode)
    if mode == "auto":
        assert sampling.mode == quiet.mode == "process"
    _throughput(step, sampling)  # start the sampler processes (once per monitor), warm caches and the allocator
    _throughput(step, quiet)

    on: list[float] = []
    off: list[float] = []
    polls: list[int] = []
    for i in range(ROUNDS):
        for sampled in (True, False) if i % 2 == 0 else (False, True):
            rate, n = _throughput(step, sampling if sampled else quiet)
            (on if sampled else off).append(rate)
            if sampled:
                polls.append(n)

    # pytest-benchmark's own statistics: the engine's training step, inside a 20 Hz window.
    with sampling.window():
        benchmark.pedantic(step, rounds=30, iterations=10, warmup_rounds=2)

    # Noise-free cross-check: what one poll costs, and the share of a core it takes at 20 Hz.
    # (In process mode the sampler process pays it, the training loop does not.)
    in_process = Monitor(gpu, hz=HZ, mode="thread")
    n_polls = 200
    t0 = time.perf_counter()
    for _ in range(n_polls):
        in_process._poll(t0)
    poll_s = (time.perf_counter() - t0) / n_polls
    sampling.close()
    quiet.close()

    med_on, med_off = statistics.median(on), statistics.median(off)
    overhead = 1.0 - med_on / med_off
    ratio = ratio_interval([a / b for a, b in zip(on, off)])
    paired = 1.0 - ratio.median
    verdict = judge(ratio, None, tolerance=MAX_OVERHEAD)
    resolution = math.hypot(_median_rel_se(on), _median_rel_se(off))
    benchmark.extra_info.update(
        {
            "workload": "digits-mlp",
            "monitor_mode": sampling.mode,
            "batch_size": BATCH,
            "monitor_hz": HZ,
            "rounds": ROUNDS,
            "samples_per_s_sampling_median": med_on,
            "samples_per_s_baseline_median": med_off,
            "samples_per_s_sampling_iqr": _iqr(on),
            "samples_per_s_baseline_iqr": _iqr(off),
            "polls_per_window_median": statistics.median(polls),
            "overhead_fraction": overhead,
            "overhead_fraction_paired_median": paired,
            "ratio_ci_low": ratio.ci_low,
            "ratio_ci_high": ratio.ci_high,
            "verdict": verdict.outcome,
            "verdict_reason": verdict.reason,
            "resolution_fraction": resolution,
            "poll_s": poll_s,
            "poll_duty_fraction": poll_s * HZ,
            "torch_num_threads": torch.get_num_threads(),
        }
    )
    assert statistics.median(polls) >= HZ * TIMING.min_time_s * 0.8, "the monitor did not sample at 20 Hz"
    assert poll_s * HZ < MAX_OVERHEAD, f"one poll takes {poll_s * 1e6:.0f} us: {poll_s * HZ:.2%} of a core at 20 Hz"
    message = (
        f"20 Hz sampling ({sampling.mode}): throughput {paired:+.2%} lower (paired median; {med_on:.0f} vs "
        f"{med_off:.0f} samples/s, medians of {ROUNDS} interleaved rounds); verdict: {verdict.reason}"
    )
    if mode == "thread":
        print(message)
        return  # the fallback's figure, for reference: polling from a thread costs the GIL (1-2% here)
    assert_verdict(verdict.outcome, message)


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def _median_rel_se(values: list[float]) -> float:
    """Standard error of the median relative to it: 1.2533 sigma / sqrt(n), with sigma = IQR / 1.349."""
    return 1.2533 * (_iqr(values) / 1.349) / math.sqrt(len(values)) / statistics.median(values)
