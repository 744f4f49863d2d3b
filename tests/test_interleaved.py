"""The interleaved paired comparison behind the overhead benchmarks (bsprof.interleaved), on fake clocks: ABBA order,
drift cancelling, the A/A control, and verdicts taken on the intervals."""

from __future__ import annotations

import numpy as np
import pytest

from bsprof.interleaved import PairedRatio, abba, judge, paired_ratio, pooled_ratio, ratio_interval, run_interleaved

LEAD_IN = 1
STEPS = 4


class _Host:
    """A fake clock and two variants of one chunk of work: B takes ``slowdown`` times A's seconds; every chunk's
    seconds drift linearly with the chunk's index (``drift`` per chunk) and carry lognormal noise (``noise``)."""

    def __init__(self, slowdown: float, *, drift: float = 0.0, noise: float = 0.0, seed: int = 0) -> None:
        self.now = 0.0
        self.chunks = 0
        self.slowdown, self.drift, self.noise = slowdown, drift, noise
        self.rng = np.random.default_rng(seed)
        self.log: list[str] = []

    def clock(self) -> float:
        return self.now

    def _work(self, factor: float, name: str, steps: int) -> None:
        if steps == LEAD_IN:  # the untimed lead-in: a switch of variant costs its first step dearly
            self.now += 1.0 if self.log and self.log[-1] != name else 0.001
            self.log.append(name)
            return
        jitter = float(np.exp(self.rng.normal(0.0, self.noise))) if self.noise else 1.0
        self.now += 0.001 * steps * factor * (1 + self.drift * self.chunks) * jitter
        self.chunks += 1

    def a(self, steps: int) -> None:
        self._work(1.0, "a", steps)

    def b(self, steps: int) -> None:
        self._work(self.slowdown, "b", steps)


def test_abba_alternates_and_balances_positions() -> None:
    assert abba(0) == ("a", "b", "b", "a") and abba(1) == ("b", "a", "a", "b") and abba(2) == abba(0)
    first = [abba(i)[0] for i in range(10)]
    assert first.count("a") == first.count("b") == 5


def test_linear_drift_cancels_in_every_block_and_the_control_reads_one() -> None:
    host = _Host(1.005, drift=0.01)  # chunks slow down by 1% each, far more than the difference measured
    # and a switch of variant costs a whole second, in the untimed lead-in
    runs = run_interleaved(host.a, host.b, steps=STEPS, blocks=10, clock=host.clock)
    test = paired_ratio(runs.test_a_s, runs.test_b_s)
    control = paired_ratio(runs.control_a_s, runs.control_b_s)
    assert test.ratios == pytest.approx([1 / 1.005] * 10, rel=1e-12)
    assert control.ratios == pytest.approx([1.0] * 10, rel=1e-12)
    assert (test.ci_low, test.ci_high) == pytest.approx((1 / 1.005, 1 / 1.005), rel=1e-12)
    # test and control blocks interleave: 10 of each, 8 chunks per pair, B only in test blocks, twice each
    assert len(host.log) == 80 and host.log.count("b") == 20
    assert host.log[:8] == ["a", "b", "b", "a", "a", "a", "a", "a"]  # block 0: test first, in ABBA order
    assert host.log[8:16] == ["a", "a", "a", "a", "b", "a", "a", "b"]  # block 1: control first, then BAAB


def test_between_runs_after_each_pair_of_blocks_outside_the_timed_chunks() -> None:
    host = _Host(1.0)
    seen: list[tuple[int, int]] = []
    mark = lambda i: seen.append((i, host.chunks))  # noqa: E731
    run_interleaved(host.a, host.b, steps=STEPS, blocks=3, clock=host.clock, between=mark)
    assert seen == [(0, 8), (1, 16), (2, 24)]


@pytest.mark.parametrize(
    ("slowdown", "noise", "outcome"),
    [(1.004, 0.01, "within"), (1.0, 0.01, "within"), (1.03, 0.01, "beyond"), (1.004, 0.05, "unresolved")],
    ids=["0.4%-slower", "equal", "3%-slower", "too-noisy"],
)
def test_verdict_on_noisy_chunks(slowdown: float, noise: float, outcome: str) -> None:
    host = _Host(slowdown, noise=noise, drift=0.0005)
    runs = run_interleaved(host.a, host.b, steps=STEPS, blocks=400, clock=host.clock)
    test = paired_ratio(runs.test_a_s, runs.test_b_s)
    control = paired_ratio(runs.control_a_s, runs.control_b_s, seed=1)
    verdict = judge(test, control, tolerance=0.01, resolution=0.005)
    assert verdict.outcome == outcome, verdict.reason
    if outcome != "unresolved":
        assert test.ci_low <= 1 / slowdown <= test.ci_high  # the interval covers the true ratio
        assert control.ci_low <= 1 <= control.ci_high


def _ratio(median: float, low: float, high: float) -> PairedRatio:
    return PairedRatio(median, low, high, 400)


@pytest.mark.parametrize(
    ("test", "control", "outcome", "words"),
    [
        (_ratio(0.995, 0.993, 0.997), _ratio(1.0, 0.999, 1.001), "within", "within 1%"),
        (_ratio(0.99, 0.990, 0.991), _ratio(1.0, 0.999, 1.001), "within", "within 1%"),  # the bound itself
        (_ratio(0.98, 0.978, 0.982), _ratio(1.0, 0.999, 1.001), "beyond", "slower by more than 1%"),
        (_ratio(0.99, 0.987, 0.993), _ratio(1.0, 0.999, 1.001), "unresolved", "straddles 0.9900"),
        (_ratio(0.98, 0.978, 0.982), _ratio(1.0, 0.994, 1.001), "unresolved", "too noisy to judge"),
        (_ratio(0.995, 0.993, 0.997), _ratio(1.006, 1.0055, 1.0065), "unresolved", "reaches 0.65% from 1"),
    ],
)
def test_judge_decides_on_the_intervals(test: PairedRatio, control: PairedRatio, outcome: str, words: str) -> None:
    verdict = judge(test, control, tolerance=0.01, resolution=0.005)
    assert verdict.outcome == outcome and words in verdict.reason
    assert f"{test.ci_low:.4f}-{test.ci_high:.4f}" in verdict.reason  # the figures travel with the verdict


def test_a_control_without_an_interval_cannot_judge() -> None:
    nan = float("nan")
    verdict = judge(_ratio(0.995, 0.993, 0.997), _ratio(nan, nan, nan), tolerance=0.01, resolution=0.005)
    assert verdict.outcome == "unresolved"


@pytest.mark.parametrize(
    ("test", "outcome", "words"),
    [
        (_ratio(1.01, 0.99, 1.03), "within", "within 3%"),
        (_ratio(0.975, 0.971, 0.979), "within", "within 3%"),
        (_ratio(0.94, 0.93, 0.95), "beyond", "slower by more than 3%"),
        (_ratio(1.06, 1.05, 1.07), "beyond", "faster by more than 3%"),
        (_ratio(1.02, 1.00, 1.04), "unresolved", "straddles 0.9700-1.0300"),
        (_ratio(0.97, 0.95, 0.99), "unresolved", "straddles 0.9700-1.0300"),
    ],
)
def test_two_sided_judge_without_a_control(test: PairedRatio, outcome: str, words: str) -> None:
    verdict = judge(test, None, tolerance=0.03, two_sided=True)
    assert verdict.outcome == outcome and words in verdict.reason, verdict.reason
    assert "control" not in verdict.reason


def test_one_sided_judge_accepts_a_faster_b() -> None:
    assert judge(_ratio(1.06, 1.05, 1.07), None, tolerance=0.03).outcome == "within"


def test_ratio_interval_of_rounds_covers_their_median() -> None:
    rng = np.random.default_rng(3)
    rounds = 0.95 * np.exp(rng.normal(0.0, 0.02, 41))
    ratio = ratio_interval(rounds)
    assert ratio.median == pytest.approx(float(np.median(rounds))) and ratio.blocks == 41
    assert ratio.ci_low < ratio.median < ratio.ci_high and ratio.ci_high - ratio.ci_low < 0.03
    assert judge(ratio, None, tolerance=0.03, two_sided=True).outcome != "within"  # 5% off: never within 3%


def test_pooled_ratio_widens_for_processes_that_disagree() -> None:
    """Eight processes of 2000 blocks each: alike, the pooled interval is about one process's over sqrt(8); each
    shifted by its own offset (a layout effect), the interval also holds the spread between processes."""
    rng = np.random.default_rng(7)
    alike = [0.992 * np.exp(rng.normal(0.0, 0.05, 2000)) for _ in range(8)]
    shifts = (-0.008, -0.006, -0.003, -0.001, 0.001, 0.003, 0.006, 0.008)
    apart = [0.992 * np.exp(s + rng.normal(0.0, 0.05, 2000)) for s in shifts]
    pooled_alike, pooled_apart = pooled_ratio(alike), pooled_ratio(apart)
    assert pooled_alike.blocks == 16_000 and pooled_alike.ci_low < 0.992 < pooled_alike.ci_high
    width = lambda r: r.ci_high - r.ci_low  # noqa: E731
    ideal = 2 * 1.96 * 1.2533 * 0.05 * 0.992 / np.sqrt(16_000)  # the 95% width of the median of 16,000 blocks
    assert 0.6 * ideal < width(pooled_alike) < 1.5 * ideal
    assert width(pooled_apart) > 2.5 * ideal  # the processes' spread (SD 0.55%) counts
    assert pooled_ratio([alike[0]]) == ratio_interval(alike[0], n_boot=2000)  # one process: the plain interval
