"""Harness overhead: bsprof's samples/s for digits-mlp must be within 3% of a minimal hand-written loop.

The reference is plain PyTorch written independently of bsprof: its own copy of the DigitsMLP network
(``Linear(64, 256) - ReLU - Linear(256, 10)``, seeded the same), its own SGD with Nesterov momentum 0.9,
and a precomputed index permutation sliced batch by batch; only the digits data tensors are shared. Each
step does exactly the work of :class:`~bsprof.engine.step.TrainingStep` — gather a batch by index,
forward, cross-entropy, backward, optimizer step, ``zero_grad(set_to_none=True)`` — with nothing else in
the loop. The clock is read with ``time.perf_counter()`` around chunks of ~20 ms of steps, the size of the
engine's blocks, and the loop reports the median chunk, so that both sides report the same statistic
(the engine's ``samples_per_s`` is at the median block) and differ only by what the harness adds.

The bsprof side is the whole harness as users run it: :func:`~bsprof.engine.trial.run_throughput_trial`
with a fresh workload, warm-up, the one timer and the 20 Hz telemetry thread.

Per batch size, the two sides alternate for ``ROUNDS`` rounds of ~0.3 s each, the order flipping every
round. The figure, ``ratio``, is the median over rounds of bsprof / hand within a round: a shared host drifts
between load regimes within a run, and the two halves of a round see the same regime, whereas
``median(bsprof) / median(hand)`` (``ratio_of_medians``, also recorded) can pick its two medians from different
regimes and swing by ±10%. Batch 8 (a step of ~0.2 ms) exposes per-step bookkeeping, batch 256 the steady
state. ``extra_info`` also records both medians and every round's figures.

The verdict (:func:`~bsprof.interleaved.judge`, two-sided, on the percentile-bootstrap 95% interval of that
median): **within** ``TOLERANCE`` (pass) when the whole interval lies within 3% of 1; **beyond** (fail) when it
lies wholly outside; otherwise the run could not resolve 3% and the test skips with the figures rather than
fail on noise. (The point estimate alone failed 2 of ~5 runs at batch 8 on a shared 2-core host, 0.945 once;
the next run, with its interval, read 1.016, 95% CI 0.948-1.060: rounds swing by several percent there.)

torch runs on one thread here (restored afterwards): on a small shared host, OpenMP workers that spin
while another process holds a core swing step times by far more than 3%, for both sides alike.

Busy host: this verdict holds only on a quiet host; ``_compare`` marks the host's counters at every round and
the ``quiet_host_verdict`` fixture (benchmarks/conftest.py) measures again while the host was busy, then skips.

Run: ``python -m pytest benchmarks/test_harness_overhead.py --benchmark-only``.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import pytest
import torch
from torch import nn

from bsprof.engine.host_load import HostWindow
from bsprof.engine.sampler_process import SamplerProcess
from bsprof.engine.timing import TimingSettings
from bsprof.engine.trial import EngineSettings, TrialSpec, run_throughput_trial
from bsprof.interleaved import judge, ratio_interval
from bsprof.workloads.digits import DigitsMLP, digits_splits

ROUNDS = 25
SIDE_S = 0.3
CHUNK_S = 0.02
MIN_CHUNKS = 7
WARMUP_STEPS = 20
TOLERANCE = 0.03
SEED = 0
LR = 0.01


class _HandLoop:
    """digits-mlp trained by plain PyTorch; shares nothing with bsprof but the data tensors."""

    def __init__(self, batch_size: int, *, seed: int, lr: float) -> None:
        train = digits_splits()[0]
        self.x, self.y = train.inputs, train.targets
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, nesterov=True)
        n = len(self.y)
        generator = torch.Generator().manual_seed(seed)
        epochs = max(4, math.ceil(2 * batch_size / n))
        self.order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
        self.batch_size = batch_size
        self.pos = 0
        self.run(WARMUP_STEPS)
        t0 = time.perf_counter()
        self.run(WARMUP_STEPS)
        per_step_s = (time.perf_counter() - t0) / WARMUP_STEPS
        self.chunk = max(1, math.ceil(CHUNK_S / per_step_s))

    def run(self, steps: int) -> None:
        model, opt, x, y, order, b = self.model, self.opt, self.x, self.y, self.order, self.batch_size
        end = order.numel()
        p = self.pos
        for _ in range(steps):
            if p + b > end:
                p = 0
            idx = order[p : p + b]
            p += b
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.pos = p

    def samples_per_s(self, seconds: float) -> float:
        """Warm up briefly, then time chunks for ``seconds``; samples/s at the median chunk."""
        self.run(WARMUP_STEPS)
        chunk_s: list[float] = []
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            self.run(self.chunk)
            t1 = time.perf_counter()
            chunk_s.append(t1 - t0)
            if t1 - start >= seconds and len(chunk_s) >= MIN_CHUNKS:
                break
        return self.chunk * self.batch_size / statistics.median(chunk_s)


def _bsprof_samples_per_s(batch_size: int, repeat: int, sampler: SamplerProcess) -> float:
    spec = TrialSpec(workload="digits-mlp", kind="throughput", batch_size=batch_size, seed=SEED, lr=LR, repeat=repeat)
    # One telemetry sampler process for every trial, as a sweep shares one.
    settings = EngineSettings(
        device=torch.device("cpu"), timing=TimingSettings(min_time_s=SIDE_S), sampler_process=sampler
    )
    result = run_throughput_trial(DigitsMLP(), spec, settings)
    assert result.status == "ok", result.error
    return float(result.metrics["samples_per_s"])  # type: ignore[arg-type]


def _compare(batch_size: int, host: HostWindow) -> dict[str, Any]:
    hand_loop = _HandLoop(batch_size, seed=SEED, lr=LR)
    hand: list[float] = []
    ours: list[float] = []
    with SamplerProcess() as sampler:
        for r in range(ROUNDS):
            for side in ("hand", "bsprof") if r % 2 == 0 else ("bsprof", "hand"):
                if side == "hand":
                    hand.append(hand_loop.samples_per_s(SIDE_S))
                else:
                    ours.append(_bsprof_samples_per_s(batch_size, r, sampler))
            host.mark()  # a round boundary: the host's counters, read outside the timed sides
    hand_median = statistics.median(hand)
    ours_median = statistics.median(ours)
    ratio = ratio_interval([o / h for o, h in zip(ours, hand)])
    verdict = judge(ratio, None, tolerance=TOLERANCE, two_sided=True)
    return {
        "batch_size": batch_size,
        "rounds": ROUNDS,
        "torch_threads": torch.get_num_threads(),
        "hand_samples_per_s": hand_median,
        "bsprof_samples_per_s": ours_median,
        "ratio": ratio.median,
        "ratio_ci_low": ratio.ci_low,
        "ratio_ci_high": ratio.ci_high,
        "ratio_of_medians": ours_median / hand_median,
        "tolerance": TOLERANCE,
        "verdict": verdict.outcome,
        "verdict_reason": verdict.reason,
        "hand_round_samples_per_s": hand,
        "bsprof_round_samples_per_s": ours,
    }


@pytest.mark.parametrize("batch_size", [8, 256], ids=["digits-mlp-B8", "digits-mlp-B256"])
def test_harness_overhead(torch_threads: int, quiet_host_verdict: Any, assert_verdict: Any, batch_size: int) -> None:
    out = quiet_host_verdict(lambda host: _compare(batch_size, host), torch_threads)
    line = (
        f"B={batch_size}: bsprof {out['bsprof_samples_per_s']:.0f} samples/s vs hand loop "
        f"{out['hand_samples_per_s']:.0f} (ratio of medians {out['ratio_of_medians']:.4f}); verdict: "
        f"{out['verdict_reason']}"
    )
    assert_verdict(out["verdict"], line)
