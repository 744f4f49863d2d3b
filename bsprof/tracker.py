"""The tracker: three lines in a user's training script let ``bsprof sweep --cmd`` measure it.

.. code-block:: python

    import bsprof

    tracker = bsprof.track()                 # right before the training loop
    for x, y in loader:
        ...                                  # forward, backward, optimizer step
        tracker.step(samples=len(x))         # after each optimizer step
        if tracker.should_stop():            # optional: bsprof has what it needs
            break
        if time_to_evaluate:
            tracker.evaluate(metric=accuracy())

Outside bsprof (no :data:`~bsprof.engine.script_protocol.ENV_VAR` in the environment) :func:`track`
returns a :class:`NullTracker` whose methods do nothing and whose ``should_stop()`` is always ``False``:
the script runs exactly as without the tracker.

Inside a trial the tracker follows the engine's measurement discipline:

* **throughput** trials: :class:`~bsprof.engine.timing.BlockTimer` (the one timer's discipline, driven by
  :meth:`Tracker.step`): warm-up, then blocks of whole steps, the device synchronised only at block
  boundaries; an :meth:`Tracker.evaluate` drops the block it interrupted (evaluation is not training).
  When the window is complete it is reported and ``should_stop()`` turns ``True``.
* **convergence** trials: every :meth:`Tracker.evaluate` is reported with the step, samples and training
  seconds (evaluation excluded: the clock is read, after a device sync, when an evaluation is reported, and
  the time since the last step counts as evaluation; :meth:`Tracker.step` reads the clock every ~20 ms of steps
  and where the next evaluation is due, see :meth:`Tracker._read_step`); the target rule is the engine's
  :class:`~bsprof.engine.target.TargetWatch`, so ``should_stop()`` turns ``True`` when the target is reached
  (with the trial's patience), the loss diverged, or the trial's step or time budget is spent.
* **memory**: the engine's :func:`~bsprof.engine.trial.memory_metrics` (CUDA allocator peaks; on the CPU the
  growth of peak RSS after :func:`track`, the kernel's high-water mark).

Everything goes, one JSON line per event, to a file the parent owns; the child never writes the store.
Under ``torchrun`` every rank times its steps but only rank 0 reports, and ``should_stop()`` is agreed
across ranks (an all-reduce per call) so that no rank leaves the loop alone; a single process (no
``WORLD_SIZE`` above 1 in the environment, the way launchers tell ranks apart) reads its own flag only: a call
into ``torch.distributed`` after every step cost ~3 us there, with the caches cold from the training step.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from bsprof.engine.script_protocol import ENV_VAR, TrialOrder, append_event
from bsprof.engine.target import TargetWatch
from bsprof.engine.timing import BlockTimer, TimingSettings

__all__ = ["NullTracker", "Tracker", "track"]

log = logging.getLogger(__name__)

_active: Tracker | None = None
_READ_EVERY_S = 0.02  # convergence: seconds of steps between clock reads (see Tracker._read_step)


class NullTracker:
    """The tracker outside bsprof: every method does nothing."""

    active = False
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    kind: str | None = None

    def start(self) -> None:
        """Nothing to start."""

    def step(self, samples: int | None = None, loss: Any = None) -> None:
        """Nothing to record."""

    def evaluate(self, metric: float, step: int | None = None) -> None:
        """Nothing to record."""

    def should_stop(self) -> bool:
        """Never: the script decides alone."""
        return False

    def close(self) -> None:
        """Nothing to close."""


def track(*, device: Any = None) -> Tracker | NullTracker:
    """The tracker of the trial this process runs, or a :class:`NullTracker` outside bsprof.

    Call it right before the training loop: training seconds and host-memory growth count from here.
    Calling it again in the same process returns the same tracker (the integrations' callbacks call it too).

    Args:
        device: The training device (``torch.device`` or string); default: the current CUDA device when
            CUDA is initialised at the first step, else the CPU.

    Raises:
        ValueError: The environment holds a trial order this bsprof did not write.
    """
    global _active
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return NullTracker()
    if _active is None or _active.closed:
        _active = Tracker(TrialOrder.from_env(raw), device=device)
    return _active


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


class Tracker:
    """Measures one trial from inside the user's training loop (see the module docstring).

    Args:
        order: The trial, as the parent asked for it.
        device: The training device; ``None`` decides at the first step.
        clock: Monotonic clock in seconds (tests inject fakes).
        sync: Waits for queued device work; ``None``: the device's synchroniser.
        install_hooks: Report uncaught exceptions and close at interpreter exit.
    """

    active = True
    # Slots: a compact object whose fields a step reads without an attribute dict (35 attributes are past
    # CPython's shared-keys limit of 30, which would make every instance keep one).
    __slots__ = (
        "_clock", "_device", "_eval_steps", "_fd", "_first_loss", "_granted", "_last_step_t", "_loss", "_max_steps",
        "_memory", "_next_eval_steps", "_odd_samples", "_paced_steps", "_paced_t", "_peers", "_prev_read_steps",
        "_prev_read_t", "_previous_hook", "_quiet", "_read_steps", "_segment_t", "_steps", "_stop", "_sync",
        "_sync_ready", "_timer", "_watch", "batch_size", "closed", "eval_s", "kind", "lr", "order", "rank", "seed",
        "train_s",
    )  # fmt: skip

    def __init__(
        self,
        order: TrialOrder,
        *,
        device: Any = None,
        clock: Callable[[], float] = time.perf_counter,
        sync: Callable[[], None] | None = None,
        install_hooks: bool = True,
    ) -> None:
        self.order = order
        self.kind, self.batch_size, self.lr, self.seed = order.kind, order.batch_size, order.lr, order.seed
        self.rank = _rank()
        self._clock = clock
        self._sync: Callable[[], None] = sync or (lambda: None)
        self._sync_ready = sync is not None
        self._device: Any = device
        self._fd = os.open(order.report, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if self.rank == 0 else None
        self.closed = False
        self._steps = 0  # steps recorded, less the quiet steps not yet handed to the timer (see steps)
        self._odd_samples = 0  # samples beyond batch_size x steps (steps of another size than the trial's)
        self.train_s = 0.0
        self.eval_s = 0.0
        self._segment_t = self._last_step_t = 0.0
        # convergence: the clock read after some steps only (see _read_step); these place the last two reads
        self._read_steps = self._prev_read_steps = self._paced_steps = 0
        self._prev_read_t = self._paced_t = 0.0  # paced: the read after an evaluation's first step
        self._eval_steps = -1  # steps at the last evaluation (-1: none yet)
        self._next_eval_steps = 0  # where the next evaluation is expected (evaluations a period apart), or 0
        self._stop = False
        self._first_loss: float | None = None
        self._loss: Any = None
        self._timer: BlockTimer | None = None
        self._quiet = self._granted = 0  # steps left, and given, before the clock is needed (timer or read)
        self._max_steps = order.max_steps if order.max_steps is not None else math.inf
        self._watch: TargetWatch | None = None
        if order.kind == "throughput":
            timing = TimingSettings(**order.timing) if order.timing else TimingSettings()
            self._timer = BlockTimer(batch_size=order.batch_size, settings=timing, sync=self._sync_now, clock=clock)
        elif order.target is not None:
            self._watch = TargetWatch(order.target, order.patience, order.higher_is_better)
        self._memory = _MemoryWindow()
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self._peers = world_size > 1  # ranks launched as torchrun (and the launchers) do: should_stop() must agree
        self._emit({"event": "start", "pid": os.getpid(), "world_size": world_size})
        if install_hooks:
            self._previous_hook = sys.excepthook
            sys.excepthook = self._excepthook
            atexit.register(self.close)
        self._segment_t = self._last_step_t = self._prev_read_t = clock()  # training seconds count from here

    # -- the three calls ------------------------------------------------------------------------------
    def start(self) -> None:
        """Restart the training clock (the integrations call it when training begins)."""
        if self.steps == 0:
            self._segment_t = self._last_step_t = self._prev_read_t = self._clock()

    @property
    def steps(self) -> int:
        """Optimizer steps recorded by :meth:`step`."""
        return self._steps + self._granted - self._quiet

    @property
    def samples(self) -> int:
        """Global samples in the steps recorded by :meth:`step`."""
        return self.batch_size * self.steps + self._odd_samples

    def step(self, samples: int | None = None, loss: Any = None) -> None:
        """Record one optimizer step of ``samples`` samples (default: the trial's batch size).

        Args:
            samples: Global samples in this step (all ranks, all accumulated micro-batches).
            loss: The step's loss (a tensor or float), optional: checked for divergence at evaluations
                (not every step, so no device sync is added).
        """
        if samples is not None and samples != self.batch_size:
            self._odd_samples += int(samples) - self.batch_size
        if loss is not None:
            self._loss = loss
        if self._quiet:  # a step that needs no clock, counted by the countdown alone (see _timer_step)
            self._quiet -= 1
            return
        if self._timer is not None:
            self._timer_step()
        else:
            self._read_step()

    def evaluate(self, metric: float, step: int | None = None) -> None:
        """Record one evaluation of the validation metric (after the evaluation ran).

        Args:
            metric: The validation metric.
            step: Optimizer steps done; default: the steps recorded by :meth:`step`.
        """
        if self._timer is not None:
            self._hand_quiet_steps()
            self._timer.interrupt()  # the evaluation's time must not land in a timed block
            self._quiet = self._granted = self._timer.quiet_steps()
            return
        if self.kind != "convergence":
            return
        self._sync_now()
        now = self._clock()
        end = self._last_step_t  # the end of the last step: the clock read after it, or else its estimate
        unread = self._granted - self._quiet
        if unread:  # the steps since the last read, at the segment's pace past its first step
            # (unread steps follow a read 2+ steps after the evaluation, so the read after its first step is earlier)
            pace_s = (self._last_step_t - self._paced_t) / (self._read_steps - self._paced_steps)
            end = min(now, self._last_step_t + unread * pace_s)
            self._steps += unread
        self._quiet = self._granted = 0  # the next step is read: it starts the next segment's pace
        self.train_s += max(0.0, end - self._segment_t)
        self.eval_s += max(0.0, now - end)
        self._segment_t = self._last_step_t = self._prev_read_t = now
        self._read_steps = self._prev_read_steps = self._steps
        last = max(0, self._eval_steps)  # the first evaluation's period is counted from step 0
        self._next_eval_steps = 2 * self._steps - last if self._steps > last else 0
        self._eval_steps = self._steps
        steps = self.steps if step is None else int(step)
        row: dict[str, Any] = {"step": steps, "samples": self.samples, "train_s": self.train_s}
        row["val_metric"] = float(metric)
        loss = float(self._loss) if self._loss is not None else None
        row["train_loss"] = loss
        if loss is not None and self._first_loss is not None and _diverged(loss, self._first_loss, self.order):
            self._stop = True
            self._emit({"event": "diverged", "step": steps, "loss": loss, "first_loss": self._first_loss})
            return
        if self._watch is not None and self._watch.observe(row) and not self.order.continue_after_target:
            self._stop = True
        if self.order.max_time_s is not None and self.train_s >= self.order.max_time_s:
            self._stop = True
        self._emit({"event": "eval", **row})
        after = self._clock()  # the tracker's own work here (the event written, ~50 us) is not training either
        self.eval_s += after - now
        self._segment_t = self._last_step_t = self._prev_read_t = after

    def should_stop(self) -> bool:
        """Whether bsprof has what this trial needs (the timed window, the target, a spent budget, a
        divergence); the script may then end its loop. Agreed across ranks under ``torch.distributed``."""
        return _agree(self._stop) if self._peers else self._stop  # one process: no call into torch.distributed

    def close(self) -> None:
        """Report the totals and memory (once; also called at interpreter exit)."""
        if self.closed:
            return
        if self._timer is not None and not self._stop:
            self._hand_quiet_steps()
            self._report_throughput(complete=False)
        self._emit(
            {
                "event": "end",
                "steps": self.steps,
                "samples": self.samples,
                "train_s": self.train_s,
                "eval_s": self.eval_s,
                **self._memory.read(self._resolved_device()),
            }
        )
        self.closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- internals ------------------------------------------------------------------------------------
    def _timer_step(self) -> None:
        """A throughput step that may end a block: it goes to the timer with the quiet steps counted before it.

        Between the timer's clock reads, :meth:`step` only counts down the steps the timer said it needs no
        clock for (:meth:`~bsprof.engine.timing.BlockTimer.quiet_steps`): a call into the timer after every
        step cost the digits script ~0.7% of its samples/s at batch size 8 (``benchmarks/
        test_tracker_overhead.py``); one per ~20 ms block, its code cold from the training steps, ~15 us."""
        assert self._timer is not None
        counted = self._granted - self._quiet
        self._steps += counted + 1  # the quiet steps and this one
        done = self._timer.step_done(counted + 1)
        self._quiet = self._granted = self._timer.quiet_steps()
        if done and not self._stop:
            self._stop = True
            self._report_throughput(complete=True)

    def _read_step(self) -> None:
        """A step after which the clock is read (not a throughput trial), with the quiet steps counted before it.

        The clock is read after every step until the first evaluation (warm-up changes the pace, and no period
        is known yet: the first evaluation's training seconds are exact); then 1, 2, 4, 8, ... steps after each
        evaluation, the gap doubling up to ``_READ_EVERY_S`` seconds of steps (at the pace between the last two
        reads); at ``max_steps``; and at the step where the next evaluation is expected when evaluations come a
        period apart: that evaluation's training seconds are then exact, and any other's count its last unread
        steps (fewer than half the steps since the last evaluation, and than ``_READ_EVERY_S`` of them) at the
        pace since the read after the evaluation's first step, which leaves that slow step out. A read
        after every step cost the digits script ~0.7% of its samples/s at batch size 8, one every ~2 ms as much
        (a read whose code the training steps left cold costs ~15 us); one every ~20 ms, ~0.1%
        (``benchmarks/test_tracker_overhead.py``)."""
        self._steps += self._granted - self._quiet + 1
        now = self._clock()
        self._prev_read_t, self._last_step_t = self._last_step_t, now
        self._prev_read_steps, self._read_steps = self._read_steps, self._steps
        if self._steps == self._eval_steps + 1:  # the segment's pace is counted from here (see evaluate)
            self._paced_t, self._paced_steps = now, self._steps
        if self._first_loss is None and self._loss is not None:
            self._first_loss = float(self._loss)
        if self._steps >= self._max_steps:
            self._stop = True
        elapsed = now - self._prev_read_t
        quiet = int(_READ_EVERY_S * (self._steps - self._prev_read_steps) / elapsed) - 1 if elapsed > 0 else 0
        if self._eval_steps < 0:
            quiet = 0  # before the first evaluation: the pace still changes (warm-up) and no period is known
        else:  # reads 1, 2, 4, 8, ... steps after an evaluation: the pace is taken past its first, slow steps
            quiet = min(quiet, self._steps - self._eval_steps - 1)
        if self._next_eval_steps > self._steps:
            quiet = min(quiet, self._next_eval_steps - self._steps - 1)
        if self._max_steps != math.inf:
            quiet = min(quiet, int(self._max_steps) - self._steps - 1)
        self._quiet = self._granted = max(0, quiet)

    def _hand_quiet_steps(self) -> None:
        """Give the timer the quiet steps counted since its last clock read (before an interruption or a report)."""
        assert self._timer is not None
        counted = self._granted - self._quiet
        if counted:
            self._timer.step_done(counted)  # fewer than it allows before a clock read: none is read
            self._steps += counted
            self._granted = self._quiet

    def _resolved_device(self) -> Any:
        if self._device is None:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self._device = torch.device("cuda", torch.cuda.current_device())
            else:
                self._device = torch.device("cpu")
        elif isinstance(self._device, str):
            import torch

            self._device = torch.device(self._device)
        if not self._sync_ready:
            from bsprof.engine.device import synchronizer

            self._sync = synchronizer(self._device)
            self._sync_ready = True
        return self._device

    def _sync_now(self) -> None:
        if not self._sync_ready:
            self._resolved_device()
        self._sync()

    def _report_throughput(self, *, complete: bool) -> None:
        assert self._timer is not None
        times = self._timer.result()
        event: dict[str, Any] = {"event": "throughput", "complete": complete, "steps": self.steps}
        if times is not None:
            event.update(
                block_times_s=list(times.block_times_s),
                steps_per_block=times.steps_per_block,
                batch_size=times.batch_size,
                warmup_steps=times.warmup_steps,
                interrupted_blocks=self._timer.interrupted_blocks,
                window_start_t=self._timer.window_start_t,
                window_end_t=self._timer.window_end_t,
            )
        event.update(self._memory.read(self._resolved_device()))
        self._emit(event)

    def _emit(self, event: dict[str, Any]) -> None:
        if self._fd is not None:
            append_event(self._fd, event)

    def _excepthook(self, exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        try:
            from bsprof.engine.oom import is_oom

            message = f"{exc_type.__name__}: {exc}".strip().splitlines()[0][:500]
            self._emit({"event": "exception", "type": exc_type.__name__, "message": message, "oom": is_oom(exc)})
        finally:
            self._previous_hook(exc_type, exc, tb)


def _diverged(loss: float, first_loss: float, order: TrialOrder) -> bool:
    return not math.isfinite(loss) or loss > order.explode_factor * max(first_loss, 1e-12)


def _agree(flag: bool) -> bool:
    """``flag`` OR-ed over the ranks of an initialised ``torch.distributed`` group (else ``flag``)."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return flag
    import torch

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _MemoryWindow:
    """Peak memory from :func:`track` on, through the engine's memory path (see the module docstring)."""

    def __init__(self) -> None:
        from bsprof.engine.monitors import HostSampler

        self._host = HostSampler()
        self._t0 = time.perf_counter()
        self._baseline = self._host.rss_bytes()
        self._exact = self._host.reset_peak_rss()
        cuda = sys.modules.get("torch.cuda")
        if cuda is not None and cuda.is_available() and cuda.is_initialized():
            cuda.reset_peak_memory_stats()

    def read(self, device: Any) -> dict[str, Any]:
        from bsprof.engine.monitors import Telemetry
        from bsprof.engine.trial import memory_metrics

        peak = self._host.peak_rss_bytes() if self._exact else None
        now = self._host.rss_bytes()
        telemetry = Telemetry(
            duration_s=time.perf_counter() - self._t0,
            samples=1,
            rss_baseline_bytes=self._baseline,
            rss_peak_bytes=max(now, self._baseline, peak or 0),
            cpu_pct_mean=None,
            rss_peak_source="VmHWM" if peak is not None else "sampled",
        )
        metrics, reasons = memory_metrics(device, telemetry)
        return {"memory": metrics, "memory_reasons": reasons, "device": str(device)}
