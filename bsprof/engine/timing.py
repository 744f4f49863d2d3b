"""The one timer: whole training steps, timed in blocks after a warm-up.

This is the only place in bsprof that reads a clock around training steps. The method follows
``torch.utils.benchmark.Timer.blocked_autorange``: warm up, size a block of steps so that clock and
synchronisation overhead is negligible, then time consecutive blocks until both a minimum measured time
and a minimum number of steps are reached. The device is synchronised once per block boundary, *before*
the clock is read, so asynchronous CUDA launches are never mistaken for finished work; steps inside a
block are not synchronised, which would distort short steps.

Clock and synchronisation are injected so tests can drive the timer with fakes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

__all__ = ["StepTimes", "TimingSettings", "time_steps"]


@dataclass(frozen=True)
class TimingSettings:
    """How long to warm up and measure.

    Attributes:
        warmup_steps: Steps run before timing, at least (also sizes the blocks).
        warmup_s: Seconds of warm-up, at least.
        min_time_s: Measured seconds, at least.
        min_steps: Measured steps, at least.
        block_min_s: Target duration of one block (seconds); a block holds at least one step.
        min_blocks: Blocks, at least, so that the spread can be estimated.
        max_time_s: Stop measuring after this many seconds even if ``min_steps`` is not reached
            (``None``: no limit). The trial records how many steps it measured.
    """

    warmup_steps: int = 5
    warmup_s: float = 0.2
    min_time_s: float = 1.0
    min_steps: int = 20
    block_min_s: float = 0.02
    min_blocks: int = 7
    max_time_s: float | None = None

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.min_steps < 1 or self.min_blocks < 1:
            raise ValueError("warmup_steps >= 0, min_steps >= 1 and min_blocks >= 1 are required")
        if self.min_time_s < 0 or self.warmup_s < 0 or self.block_min_s < 0:
            raise ValueError("times must be >= 0")


@dataclass(frozen=True)
class StepTimes:
    """Raw timings of consecutive blocks of training steps; statistics are derived on read.

    Attributes:
        block_times_s: Wall-clock seconds of each block.
        steps_per_block: Training steps in every block.
        batch_size: Samples per step.
        warmup_steps: Steps run before the first block (not timed).
    """

    block_times_s: tuple[float, ...]
    steps_per_block: int
    batch_size: int
    warmup_steps: int = 0

    @cached_property
    def step_times_s(self) -> tuple[float, ...]:
        """Mean seconds per step within each block."""
        return tuple(t / self.steps_per_block for t in self.block_times_s)

    @cached_property
    def median_s(self) -> float:
        """Median seconds per step over blocks."""
        return statistics.median(self.step_times_s)

    @cached_property
    def iqr_s(self) -> float:
        """Interquartile range of seconds per step over blocks (0 with fewer than two blocks)."""
        if len(self.step_times_s) < 2:
            return 0.0
        q = statistics.quantiles(self.step_times_s, n=4, method="inclusive")
        return q[2] - q[0]

    @cached_property
    def rel_iqr(self) -> float:
        """IQR relative to the median; above 0.1 the measurement is noisy."""
        return self.iqr_s / self.median_s if self.median_s > 0 else math.nan

    @cached_property
    def samples_per_s(self) -> float:
        """Throughput at the median step time (samples per second)."""
        return self.batch_size / self.median_s if self.median_s > 0 else math.inf

    @property
    def measured_steps(self) -> int:
        """Timed steps (warm-up excluded)."""
        return self.steps_per_block * len(self.block_times_s)

    @property
    def measured_s(self) -> float:
        """Timed seconds (warm-up excluded)."""
        return math.fsum(self.block_times_s)


def time_steps(
    step: Callable[[], object],
    *,
    batch_size: int,
    settings: TimingSettings | None = None,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> StepTimes:
    """Warm up, then time blocks of ``step()`` calls.

    Args:
        step: One whole training step (forward, backward, optimizer step, zero_grad). Its return value
            is ignored.
        batch_size: Samples per step, for ``samples_per_s``.
        settings: Warm-up and measurement lengths.
        sync: Waits for queued device work; called before every clock read.
        clock: Monotonic clock in seconds.

    Returns:
        The raw block timings.
    """
    s = settings or TimingSettings()
    sync()
    start = clock()
    warm = 0
    while warm < s.warmup_steps or (clock() - start) < s.warmup_s:
        step()
        warm += 1
        if warm >= s.warmup_steps:
            sync()
    sync()
    warm_time = clock() - start
    per_step = warm_time / warm if warm else 0.0
    steps_per_block = 1
    if per_step > 0:
        # Long enough that clock and sync overhead vanish, short enough for min_blocks in min_time_s.
        longest = max(1, math.floor(s.min_time_s / (s.min_blocks * per_step)))
        steps_per_block = max(1, min(math.ceil(s.block_min_s / per_step), longest))

    blocks: list[float] = []
    sync()
    t_prev = clock()
    t_first = t_prev
    while True:
        for _ in range(steps_per_block):
            step()
        sync()
        t = clock()
        blocks.append(t - t_prev)
        t_prev = t
        elapsed = t - t_first
        done = elapsed >= s.min_time_s and len(blocks) * steps_per_block >= s.min_steps and len(blocks) >= s.min_blocks
        if done or (s.max_time_s is not None and elapsed >= s.max_time_s):
            break
    return StepTimes(tuple(blocks), steps_per_block, batch_size, warm)
