"""The one timer: whole training steps, timed in blocks after a warm-up and a calibration.

This is the only place in bsprof that reads a clock around training steps. The method follows
``torch.utils.benchmark.Timer.blocked_autorange``: warm up, size a block of steps so that clock and
synchronisation overhead is negligible, then time consecutive blocks until both a minimum measured time
and a minimum number of steps are reached. The device is synchronised once per block boundary, *before*
the clock is read, so asynchronous CUDA launches are never mistaken for finished work; steps inside a
block are not synchronised, which would distort short steps.

The block is sized *after* the warm-up, never from it: the first steps pay for ``torch.compile``, cuDNN
autotuning, lazy kernel loading and first allocations (0.1-2 s on a GPU), and a block sized from their mean
would hold one step, synchronising after every step. Calibration times blocks of 1, 2, 4, ... steps with one
synchronisation each until one lasts ``block_min_s`` (as ``blocked_autorange`` grows its block until timer
overhead vanishes); its steps are untimed and count as warm-up.

An optional ``reset`` runs before every calibration and measured block, outside the timed region: the
throughput trial uses it to put the model and optimizer back into their initial state, so the blocks time
the steps training actually runs, not a model trained for hundreds of epochs (see :attr:`StepTimes.drift_rel`
for the check that the blocks did not drift).

Clock and synchronisation are injected so tests can drive the timer with fakes.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

__all__ = ["DRIFT_REL_THRESHOLD", "BlockTimer", "StepTimes", "TimingSettings", "time_steps"]

# Relative change of the step time between a trial's first and last blocks above which the trial is flagged
# as drifting: block-to-block noise on a shared 2-core host is a few percent (see README, "How bsprof
# measures"), a state or thermal drift is tens of percent.
DRIFT_REL_THRESHOLD = 0.10
# Blocks compared at each end: a quarter of the blocks, at least this many (and drift needs twice as many).
_DRIFT_MIN_END_BLOCKS = 2
_FOREVER = 2**62  # more steps than any run takes


@dataclass(frozen=True)
class TimingSettings:
    """How long to warm up and measure.

    Attributes:
        warmup_steps: Steps run before calibration, at least.
        warmup_s: Seconds of warm-up, at least.
        min_time_s: Measured seconds, at least.
        min_steps: Measured steps, at least.
        block_min_s: Target duration of one block (seconds); a block holds at least one step. Calibration
            doubles a block from one step until it lasts this long.
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
        warmup_steps: Steps run before the first block (not timed): warm-up and calibration.
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

    @cached_property
    def drift_rel(self) -> float | None:
        """Median step time of the last quarter of the blocks over that of the first quarter, minus 1
        (``0.25``: the step got 25% slower during the trial); ``None`` with fewer than 4 blocks."""
        n = len(self.step_times_s)
        k = max(_DRIFT_MIN_END_BLOCKS, n // 4)
        if n < 2 * k:
            return None
        first = statistics.median(self.step_times_s[:k])
        last = statistics.median(self.step_times_s[-k:])
        return last / first - 1 if first > 0 else None

    @property
    def drifted(self) -> bool:
        """Whether the step time changed by more than :data:`DRIFT_REL_THRESHOLD` within the trial."""
        return self.drift_rel is not None and abs(self.drift_rel) > DRIFT_REL_THRESHOLD

    @property
    def measured_steps(self) -> int:
        """Timed steps (warm-up excluded)."""
        return self.steps_per_block * len(self.block_times_s)

    @property
    def measured_s(self) -> float:
        """Timed seconds (warm-up excluded)."""
        return math.fsum(self.block_times_s)


def _block_size(per_step_s: float, s: TimingSettings) -> int:
    """Steps per block: long enough that clock and sync overhead vanish (``block_min_s``), short enough for
    ``min_blocks`` in ``min_time_s``."""
    if per_step_s <= 0:
        return 1
    longest = max(1, math.floor(s.min_time_s / (s.min_blocks * per_step_s)))
    return max(1, min(math.ceil(s.block_min_s / per_step_s), longest))


def _calibrate(
    step: Callable[[], object],
    s: TimingSettings,
    sync: Callable[[], None],
    clock: Callable[[], float],
    reset: Callable[[], None] | None,
) -> tuple[int, int]:
    """Time blocks of 1, 2, 4, ... steps (one sync each) until one lasts ``block_min_s`` or reaches the
    longest block ``min_time_s`` allows; returns (steps per block, steps run)."""
    k, ran = 1, 0
    while True:
        if reset is not None:
            reset()
        sync()
        t0 = clock()
        for _ in range(k):
            step()
        sync()
        dt = clock() - t0
        ran += k
        size = _block_size(dt / k, s)
        if dt >= s.block_min_s or k >= size:
            return size, ran
        k *= 2


def time_steps(
    step: Callable[[], object],
    *,
    batch_size: int,
    settings: TimingSettings | None = None,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
    reset: Callable[[], None] | None = None,
) -> StepTimes:
    """Warm up, calibrate the block size, then time blocks of ``step()`` calls.

    Args:
        step: One whole training step (forward, backward, optimizer step, zero_grad). Its return value
            is ignored.
        batch_size: Samples per step, for ``samples_per_s``.
        settings: Warm-up and measurement lengths.
        sync: Waits for queued device work; called before every clock read.
        clock: Monotonic clock in seconds.
        reset: Called before every calibration and measured block, outside the timed region (e.g. restore
            the model's initial state); ``None``: blocks run back to back.

    Returns:
        The raw block timings; ``warmup_steps`` counts the warm-up and calibration steps.
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
    steps_per_block, calibration_steps = _calibrate(step, s, sync, clock, reset)
    warm += calibration_steps

    blocks: list[float] = []
    timed_s = 0.0
    sync()
    t_prev = clock()
    t_first = t_prev
    while True:
        if reset is not None:
            reset()
            sync()
            t_prev = clock()
        for _ in range(steps_per_block):
            step()
        sync()
        t = clock()
        blocks.append(t - t_prev)
        timed_s += t - t_prev
        t_prev = t
        if _measured_enough(s, timed_s, len(blocks), steps_per_block, t - t_first):
            break
    return StepTimes(tuple(blocks), steps_per_block, batch_size, warm)


def _measured_enough(s: TimingSettings, timed_s: float, blocks: int, steps_per_block: int, elapsed_s: float) -> bool:
    """Whether ``blocks`` timed blocks of ``timed_s`` seconds in all meet ``min_time_s``, ``min_steps`` and
    ``min_blocks``, or ``max_time_s`` has passed since the first block started (constant time: the callers keep
    the running sum, so that the check after a block costs the same after 10 blocks as after 10,000)."""
    done = timed_s >= s.min_time_s and blocks * steps_per_block >= s.min_steps
    return (done and blocks >= s.min_blocks) or (s.max_time_s is not None and elapsed_s >= s.max_time_s)


class BlockTimer:
    """The discipline of :func:`time_steps`, driven from outside: the caller runs its own training loop and
    calls :meth:`step_done` after every whole step (bsprof's tracker inside a user's script does).

    The first call only starts the clock (the step before it ran at an unknown time, set-up included); the
    warm-up goes on until ``warmup_steps`` steps and ``warmup_s`` seconds have been seen (the clock is read after
    ``warmup_steps``, then each time after the steps that fill half the warm-up left at the pace so far: a
    handful of reads, the last within a step of ``warmup_s``); calibration then
    times blocks of 1, 2, 4, ... steps until one lasts ``block_min_s`` (as :func:`time_steps` does, its
    steps count as warm-up); then consecutive blocks of that size are timed until ``min_time_s``,
    ``min_steps`` and ``min_blocks`` are met (or ``max_time_s`` has passed). The device is synchronised before
    every clock read, and only at block boundaries: between them :meth:`step_done` costs a counter increment.
    There is no ``reset`` between blocks: the loop is the caller's. :meth:`interrupt` drops a block that an
    evaluation (or anything else but training steps) ran into.

    Args:
        batch_size: Samples per step (for :attr:`StepTimes.samples_per_s`).
        settings: Warm-up and measurement lengths.
        sync: Waits for queued device work; called before every clock read.
        clock: Monotonic clock in seconds.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        settings: TimingSettings | None = None,
        sync: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.batch_size = batch_size
        self.settings = settings or TimingSettings()
        self._sync = sync
        self._clock = clock
        self._warm = 0  # steps before the first timed block: the first one, warm-up and calibration
        self._phase = "start"  # start -> warmup -> calibrate -> timed -> done
        self._t_prev = 0.0  # the clock at the last boundary (synchronised)
        self._in_block = 0
        self._block = 1  # steps in the current calibration or timed block
        self.steps_per_block = 0
        self._t_first = 0.0
        self.block_times_s: list[float] = []
        self._timed_s = 0.0  # the sum of block_times_s
        self._warm_next = self.settings.warmup_steps  # warm-up steps after which the clock is read next
        self.window_start_t: float | None = None
        self.window_end_t: float | None = None
        self.interrupted_blocks = 0
        self._steps = 0
        self._interrupted_at = 0
        self._cap = _FOREVER  # the fewest steps seen between two interruptions: no block may be longer
        self.done = False

    def _read(self) -> float:
        self._sync()
        return self._clock()

    def quiet_steps(self) -> int:
        """How many more steps can end before one needs the clock (a block boundary, the end of the minimum
        warm-up): a caller may count them itself and pass them all to the :meth:`step_done` after them (bsprof's
        tracker does, so that a user's step costs it a countdown in its own object). Very large once done."""
        if self.done:
            return _FOREVER
        if self._phase == "timed":
            return self.steps_per_block - self._in_block - 1
        if self._phase == "calibrate":
            return self._block - self._in_block - 1
        if self._phase == "warmup":
            return max(0, self._warm_next - self._in_block - 1)
        return 0

    def step_done(self, steps: int = 1) -> bool:
        """Record that ``steps`` whole training steps ended (more than one: the steps before the last were
        counted by the caller, at most :meth:`quiet_steps` of them); returns whether the measurement is complete.

        Raises:
            ValueError: ``steps`` is below 1, or it carries the steps past a block boundary (they would land in
                the wrong block).
        """
        if self.done:
            return True
        if steps != 1 and not 1 <= steps <= self.quiet_steps() + 1:
            raise ValueError(
                f"{steps} steps at once: at most {self.quiet_steps() + 1} may end before the clock is read"
            )
        s = self.settings
        self._steps += steps
        self._in_block += steps
        if self._phase == "timed":
            if self._in_block < self.steps_per_block:
                return False
            t = self._read()
            self.block_times_s.append(t - self._t_prev)
            self._timed_s += t - self._t_prev
            self._t_prev = self.window_end_t = t
            self._in_block = 0
            self.done = _measured_enough(
                s, self._timed_s, len(self.block_times_s), self.steps_per_block, t - self._t_first
            )
            return self.done
        self._warm += steps
        if self._phase == "start":
            self._t_prev, self._in_block, self._phase = self._read(), 0, "warmup"
            return False
        if self._phase == "warmup":
            if self._in_block < self._warm_next:
                return False
            t = self._read()
            elapsed = t - self._t_prev
            if elapsed < s.warmup_s:
                # the clock is read again after the steps that fill half the warm-up left at the pace so far:
                # a few reads in all, not one per step, and the warm-up ends within a step of warmup_s
                more = 0.5 * (s.warmup_s - elapsed) * self._in_block / elapsed if elapsed > 0 else 0.0
                self._warm_next = self._in_block + max(1, min(int(more), _FOREVER))
                return False
            self._t_prev, self._in_block, self._phase = t, 0, "calibrate"
            return False
        if self._in_block < self._block:  # calibrate
            return False
        t = self._read()
        dt = t - self._t_prev
        size = min(_block_size(dt / self._block, s), self._cap)
        self._t_prev, self._in_block = t, 0
        if dt >= s.block_min_s or self._block >= size:
            self.steps_per_block, self._phase = size, "timed"
            self._t_first = self.window_start_t = t
        else:
            self._block *= 2
        return False

    def interrupt(self) -> None:
        """Something other than training steps ran since the last boundary (an evaluation): drop the block in
        progress and start the next one now, so that no block holds that time (calibration likewise; the
        untimed warm-up goes on). Blocks are kept no longer than the fewest steps seen between
        two interruptions (a script evaluating every few steps gets short blocks rather than none)."""
        if self.done or self._phase == "start":
            return
        self._cap = min(self._cap, max(1, self._steps - self._interrupted_at))
        self._interrupted_at = self._steps
        if self._phase == "warmup":
            return  # warm-up is untimed: it may include evaluations
        self._t_prev = self._read()
        if self._phase == "timed" and self._in_block:
            self.interrupted_blocks += 1
        if self._phase == "timed" and self.steps_per_block > self._cap:
            # blocks this long never fit between two evaluations: calibrate again within the gap
            self._phase, self._block, self.block_times_s, self._timed_s = "calibrate", self._cap, [], 0.0
            self.window_start_t = self.window_end_t = None
        self._block = min(self._block, self._cap)
        self._in_block = 0

    def result(self) -> StepTimes | None:
        """The blocks timed so far (complete blocks only), or ``None`` before the first one ended."""
        if not self.block_times_s:
            return None
        return StepTimes(tuple(self.block_times_s), self.steps_per_block, self.batch_size, self._warm)
