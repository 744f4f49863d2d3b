"""Tracker overhead: a user's training loop must run within 1% of its samples/s without bsprof's tracker.

The loop is the one of ``examples/train_digits.py`` (digits, ``Linear(64, 256) - ReLU - Linear(256, 10)``,
SGD with Nesterov momentum, batches sliced from a permutation), written twice: once with nothing else in it,
once with the tracker's calls a user adds (``tracker.step(samples=...)`` and ``tracker.should_stop()`` after
every optimizer step). The tracker is a live one, writing its events to a temporary file, in either kind of
trial: ``throughput`` (the block timer keeps timing blocks for the whole run: a counter per step, a clock
read per ~20 ms block) or ``convergence`` (a clock read per step).

Interleaving: the loops alternate chunk by chunk (~40 ms each) for ``TRIPLES`` triples (without, with,
without again; each takes every position in turn); a shared host drifts between load regimes within seconds,
and the three chunks of a triple see the same regime. A triple's ratio is (with tracker) over the geometric
mean of its two chunks without. Batch 8 (a step of ~0.2 ms) is the worst case for per-step bookkeeping.

The verdict is built for a noisy host, where single chunks swing by +-20% (other processes take the core):
a 1% cost is far below one chunk's noise, so two figures are judged, both recorded in ``extra_info``:

* ``tracker_step_fraction``: the tracker's own cost per step measured in isolation (20,000 calls to
  ``step`` and ``should_stop`` timed alone) over the loop's step time; it hardly depends on the host's
  load, and must be below ``TOLERANCE``;
* ``ratio`` with its distribution-free 95% interval (``ratio_ci_low``, ``ratio_ci_high``, from the order
  statistics of the per-triple ratios), against the A/A control (``control_ratio``: the loop without the
  tracker against itself, in the same triples, with its interval): the ratio's upper end must reach the
  control's lower end (or 1, if lower) minus ``TOLERANCE``. The test fails when the measurement shows the
  tracker slower by more than 1% beyond what the host's noise does to identical loops at that moment, and
  not merely when the host is too noisy to resolve 1%; the intervals' widths say how finely it resolved
  (on the 2-core CI host shared with other jobs, +-3-6%: there only the isolated cost resolves 1%).

Also recorded, not judged: ``ratio_best``, the ratio at the 90th percentile of the chunks'
samples/s (interference only slows chunks down, so the fastest ones approach the code's cost).

torch runs on one thread here (restored afterwards), as in the other overhead benchmarks.

Run: ``python -m pytest benchmarks/test_tracker_overhead.py --benchmark-only``.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bsprof.engine.script_protocol import TrialOrder
from bsprof.tracker import Tracker
from bsprof.workloads.digits import digits_splits

TRIPLES = 120
CHUNK_S = 0.04
WARMUP_STEPS = 50
ISOLATED_CALLS = 20_000
TOLERANCE = 0.01


class _Loop:
    """The example script's training loop, without and with the tracker's two calls per step."""

    def __init__(self, batch_size: int) -> None:
        train = digits_splits()[0]
        self.x, self.y = train.inputs, train.targets
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        self.order = torch.cat(
            [torch.randperm(len(self.y), generator=torch.Generator().manual_seed(e)) for e in range(4)]
        )
        self.b = batch_size
        self.pos = 0

    def _batch(self) -> torch.Tensor:
        if self.pos + self.b > self.order.numel():
            self.pos = 0
        idx = self.order[self.pos : self.pos + self.b]
        self.pos += self.b
        return idx

    def plain(self, steps: int) -> None:
        model, opt, x, y = self.model, self.opt, self.x, self.y
        for _ in range(steps):
            idx = self._batch()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def tracked(self, steps: int, tracker: Tracker) -> None:
        model, opt, x, y = self.model, self.opt, self.x, self.y
        for _ in range(steps):
            idx = self._batch()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tracker.step(samples=len(idx))
            if tracker.should_stop():
                break


def _tracker(kind: str, report: Path, batch_size: int) -> Tracker:
    # a timed window that never completes: the block timer keeps working for the whole run
    timing = {"warmup_steps": 5, "warmup_s": 0.0, "min_time_s": 1e9, "min_steps": 10**9}
    order = TrialOrder(str(report), "digits", kind, batch_size=batch_size, seed=0, lr=0.01, timing=timing, target=2.0)
    return Tracker(order, device="cpu", install_hooks=False)


def _isolated_step_s(kind: str, report: Path, batch_size: int) -> float:
    tracker = _tracker(kind, report, batch_size)
    t0 = time.perf_counter()
    for _ in range(ISOLATED_CALLS):
        tracker.step(samples=batch_size)
        tracker.should_stop()
    cost = (time.perf_counter() - t0) / ISOLATED_CALLS
    tracker.close()
    return cost


def _compare(kind: str, batch_size: int, tmp: Path) -> dict[str, Any]:
    loop = _Loop(batch_size)
    tracker = _tracker(kind, tmp / f"{kind}-{batch_size}.jsonl", batch_size)
    loop.plain(WARMUP_STEPS)
    loop.tracked(WARMUP_STEPS, tracker)
    t0 = time.perf_counter()
    loop.plain(WARMUP_STEPS)
    step_s = (time.perf_counter() - t0) / WARMUP_STEPS
    chunk = max(1, round(CHUNK_S / step_s))
    ratios: list[float] = []
    control: list[float] = []
    plain_rates: list[float] = []
    tracked_rates: list[float] = []
    sides = ("plain", "tracked", "plain again")
    for i in range(TRIPLES):
        rate = {}
        for side in sides[i % 3 :] + sides[: i % 3]:  # each side first, second and third in turn
            t0 = time.perf_counter()
            loop.tracked(chunk, tracker) if side == "tracked" else loop.plain(chunk)
            rate[side] = chunk * batch_size / (time.perf_counter() - t0)
        plain_rates.append(rate["plain"])
        tracked_rates.append(rate["tracked"])
        # against both loops without the tracker of the same triple: a lucky or unlucky chunk of one of them
        # moves the ratio half as much, and the control alone shows it
        ratios.append(rate["tracked"] / math.sqrt(rate["plain"] * rate["plain again"]))
        control.append(rate["plain again"] / rate["plain"])
    tracker.close()
    isolated = _isolated_step_s(kind, tmp / f"{kind}-{batch_size}-isolated.jsonl", batch_size)
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    plain_median = statistics.median(plain_rates)
    low, high = _median_ci(ratios)
    p90 = [statistics.quantiles(r, n=10, method="inclusive")[8] for r in (tracked_rates, plain_rates)]
    return {
        "kind": kind,
        "batch_size": batch_size,
        "triples": TRIPLES,
        "steps_per_chunk": chunk,
        "torch_threads": torch.get_num_threads(),
        "plain_samples_per_s": plain_median,
        "tracked_samples_per_s": statistics.median(tracked_rates),
        "ratio": statistics.median(ratios),
        "ratio_p25": q[0],
        "ratio_p75": q[2],
        "ratio_ci_low": low,
        "ratio_ci_high": high,
        "ratio_best": p90[0] / p90[1],
        "control_ratio": statistics.median(control),
        "control_ci_low": _median_ci(control)[0],
        "control_ci_high": _median_ci(control)[1],
        "tracker_step_s": isolated,
        "tracker_step_fraction": isolated * plain_median / batch_size,
        "tolerance": TOLERANCE,
    }


def _median_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """Distribution-free ~95% interval of the median: order statistics n/2 -+ z*sqrt(n)/2 (binomial ranks)."""
    v = sorted(values)
    n = len(v)
    half = z * n**0.5 / 2
    return v[max(0, int(n / 2 - half))], v[min(n - 1, int(n / 2 + half + 1))]


@pytest.mark.parametrize("kind", ["throughput", "convergence"])
@pytest.mark.parametrize("batch_size", [8, 128], ids=["digits-script-B8", "digits-script-B128"])
def test_tracker_overhead(benchmark: Any, torch_threads: int, tmp_path: Path, kind: str, batch_size: int) -> None:
    out = benchmark.pedantic(_compare, args=(kind, batch_size, tmp_path), rounds=1, iterations=1)
    benchmark.extra_info.update(out)
    summary = (
        f"{kind} B={batch_size}: with tracker {out['tracked_samples_per_s']:.0f} samples/s, without "
        f"{out['plain_samples_per_s']:.0f} (median ratio {out['ratio']:.4f}, 95% CI {out['ratio_ci_low']:.4f}-"
        f"{out['ratio_ci_high']:.4f}; A/A control {out['control_ratio']:.4f}, CI {out['control_ci_low']:.4f}-"
        f"{out['control_ci_high']:.4f}; fastest chunks {out['ratio_best']:.4f}); the tracker alone costs "
        f"{out['tracker_step_s'] * 1e6:.2f} us per step ({out['tracker_step_fraction']:.3%} of a step)"
    )
    print(summary)
    assert out["tracker_step_fraction"] < TOLERANCE, summary
    assert out["ratio_ci_high"] >= min(1.0, out["control_ci_low"]) - TOLERANCE, summary
