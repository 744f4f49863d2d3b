"""The benchmark suite's run state: one :class:`BsprofSession` per pytest session, on ``config.stash``.

As in pytest-benchmark (``plugin.py`` hooks and options, ``session.py`` state), :mod:`bsprof.pytest_plugin`
only declares options and hooks; this module holds what a session keeps — the workload, the device, the
one telemetry sampler process every throughput benchmark shares, the OOM floor, the store run — and runs
the engine's trials for the benchmark files. A throughput benchmark is the engine's
:func:`~bsprof.engine.trial.run_throughput_trial` with :class:`PedanticTimer`: pytest-benchmark's
``benchmark.pedantic`` times the rounds, everything else (memory reset, sampler, telemetry window, OOM
handling, clean-up, result) is the CLI's trial.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

if TYPE_CHECKING:
    import torch

    from bsprof.engine.convergence import ConvergenceSettings
    from bsprof.engine.timing import StepTimes
    from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec
    from bsprof.options import BsprofOptions
    from bsprof.store import Store
    from bsprof.workload import Workload

__all__ = ["ITERATIONS", "MAX_ROUNDS", "PROBE_S", "BsprofSession", "PedanticTimer"]

PROBE_S = 0.1
"""Seconds of blocks the engine's timer runs to estimate a step before the rounds are sized."""

MAX_ROUNDS = 20_000
"""Most timed rounds per throughput benchmark (keeps the JSON small: pytest-benchmark stores every round)."""

ITERATIONS = 1
"""Training steps per pytest-benchmark round: one, so the round times are step times."""


@dataclass
class PedanticTimer:
    """Times a throughput trial's rounds with pytest-benchmark's ``benchmark.pedantic``.

    The engine's one timer (:func:`~bsprof.engine.timing.time_steps`) first runs ``warmup_rounds`` steps,
    then blocks for about :data:`PROBE_S` seconds; its median step time sizes the rounds so that they last
    ``min_time_s`` seconds: at least ``min_rounds``, at most :data:`MAX_ROUNDS`. Its timings only size the
    rounds. pytest-benchmark then runs ``warmup_rounds`` untimed rounds and the timed ones; each round is one
    step followed by a device sync, so its timer measures finished work. The per-round times become the
    trial's blocks (one step each). With ``reset``, pedantic's untimed ``setup`` restores the trial's initial
    state every probe-sized block of rounds, as the engine's timer does before each block.

    Args:
        benchmark: pytest-benchmark's fixture.
        min_time_s: Timed seconds, at least.
        min_rounds: Timed rounds, at least.
        warmup_rounds: Untimed steps before the probe, and untimed rounds before the timed ones.
    """

    benchmark: Any
    min_time_s: float
    min_rounds: int
    warmup_rounds: int
    source: ClassVar[str] = "pytest-benchmark"

    def rounds_for(self, step_time_s: float) -> int:
        """Timed rounds for a step of ``step_time_s`` seconds."""
        wanted = math.ceil(self.min_time_s / step_time_s) if step_time_s > 0 else self.min_rounds
        return max(self.min_rounds, min(MAX_ROUNDS, wanted))

    def __call__(
        self,
        step: Callable[[], object],
        *,
        batch_size: int,
        sync: Callable[[], None],
        reset: Callable[[], None] | None = None,
    ) -> StepTimes:
        from bsprof.engine.timing import StepTimes, TimingSettings, time_steps

        probe = TimingSettings(
            warmup_steps=self.warmup_rounds, warmup_s=0.0, min_time_s=PROBE_S, min_steps=1,
            block_min_s=PROBE_S / 5, min_blocks=3,
        )  # fmt: skip
        sized = time_steps(step, batch_size=batch_size, settings=probe, sync=sync, reset=reset)
        done = [0]

        def restore_per_block() -> None:
            # untimed (pedantic's setup): back to the initial state every probe-sized block of rounds, so the
            # rounds time the same steps of training as the engine's blocks do
            if reset is not None and done[0] % sized.steps_per_block == 0:
                reset()
                sync()
            done[0] += 1

        def one_step() -> None:
            step()
            sync()

        rounds = self.rounds_for(sized.median_s)
        self.benchmark.pedantic(
            one_step,
            setup=restore_per_block,
            rounds=rounds,
            iterations=ITERATIONS,
            warmup_rounds=self.warmup_rounds,
        )
        round_times_s = tuple(self.benchmark.stats.stats.data)  # seconds per step, per round
        warmup = sized.warmup_steps + sized.measured_steps + self.warmup_rounds * ITERATIONS
        return StepTimes(tuple(t * ITERATIONS for t in round_times_s), ITERATIONS, batch_size, warmup)


@dataclass
class BsprofSession:
    """The suite's state for one pytest session (on ``config.stash``, like pytest-benchmark's session).

    Attributes:
        options: The validated options.
        workload: The loaded workload.
        device: The trials' device, or ``None`` when it is not available here (see ``skip_reason``).
        skip_reason: Why every case is skipped (e.g. ``cuda`` asked for on a host without CUDA).
        oom_floor: Smallest batch size that ran out of memory; larger ones are skipped without trying.
        run_id: The store run of this session, opened at its first trial.
    """

    options: BsprofOptions
    workload: Workload
    device: torch.device | None
    skip_reason: str | None = None
    oom_floor: int | None = None
    run_id: str | None = None
    _store: Store | None = field(default=None, repr=False)
    _primed: bool = field(default=False, repr=False)
    _sampler: Any = field(default=None, repr=False)

    @classmethod
    def start(cls, options: BsprofOptions) -> BsprofSession:
        """Load the workload and resolve the device.

        Raises:
            BadInput: Unknown workload, or a device that cannot exist here (``cuda:3`` on a 1-GPU host).
        """
        import torch

        from bsprof.engine.device import resolve_device
        from bsprof.workload import load_workload

        workload = load_workload(options.workload_ref)
        if options.store is not None:  # a file that is not a store (or not writable) fails now, before measuring
            from bsprof.errors import BadInput
            from bsprof.store import Store

            try:
                Store(options.store, create=True).close()
            except BadInput as e:
                raise BadInput(f"--bsprof-store: {e}") from None
        device, skip = None, None
        if options.device_spec.startswith("cuda") and not torch.cuda.is_available():
            skip = f"--bsprof-device {options.device_spec}: CUDA is not available on this host"
        else:
            device = resolve_device(options.device_spec)
        return cls(options, workload, device, skip)

    @property
    def torch_threads(self) -> int | None:
        """torch intra-op threads while a benchmark runs (``None``: left at torch's choice)."""
        if self.options.threads is not None:
            return self.options.threads
        return 1 if self.device is not None and self.device.type == "cpu" else None

    @contextlib.contextmanager
    def thread_count(self) -> Iterator[None]:
        """Set :attr:`torch_threads` for the ``with`` body and restore the previous count afterwards."""
        import torch

        threads, before = self.torch_threads, torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    @property
    def settings(self) -> EngineSettings:
        """Engine settings of the trials (device; eager, full precision; the session's sampler process)."""
        from bsprof.engine.sampler_process import SamplerProcess
        from bsprof.engine.trial import EngineSettings

        if self.device is None:
            raise RuntimeError(self.skip_reason or "no device")
        if self._sampler is None:
            self._sampler = SamplerProcess()  # one telemetry sampler process for the session's trials
        return EngineSettings(device=self.device, sampler_process=self._sampler)

    @property
    def convergence(self) -> ConvergenceSettings:
        """Budgets and target of the convergence benchmarks (the engine's defaults otherwise)."""
        from bsprof.engine.convergence import ConvergenceSettings

        return ConvergenceSettings(target=self.options.target, max_time_s=self.options.max_time_s)

    @property
    def target(self) -> float | None:
        """The target metric of convergence benchmarks (``None``: the workload has none and none was given)."""
        return self.options.target if self.options.target is not None else self.workload.target

    def spec(self, kind: str, batch_size: int, seed: int = 0) -> TrialSpec:
        """The trial identity at ``batch_size``, with the linear LR rule's learning rate."""
        from bsprof.engine.lr import scaled_lr
        from bsprof.engine.trial import TrialSpec

        return TrialSpec(self.workload.name, kind, batch_size, seed, scaled_lr(self.workload, batch_size, "linear"))

    def check_runnable(self, batch_size: int) -> None:
        """Skip the calling test when the device is missing, or a smaller batch size already ran out of memory."""
        if self.skip_reason:
            pytest.skip(self.skip_reason)
        if self.oom_floor is not None and batch_size >= self.oom_floor:
            pytest.skip(f"not tried: batch size {self.oom_floor} already ran out of memory on {self.device}")

    def prime(self) -> None:
        """Once per session, a few untimed steps at the smallest batch size (as ``bsprof sweep`` does), so that
        one-time process costs (lazy initialisation, data loading, first allocations) do not land on the
        first benchmark's time and memory."""
        if self._primed or self.device is None:
            return
        from bsprof.engine.sweep import prime_process

        self._primed = True
        prime_process(self.workload, self.settings, self.options.batch_sizes[0])

    def run_throughput(self, benchmark: Any, batch_size: int) -> TrialResult:
        """The engine's throughput trial at ``batch_size``, its rounds timed by ``benchmark.pedantic``.

        Under ``--benchmark-disable`` the trial runs with the engine's timer for a single step instead (the
        benchmark is then a plain test of the trial).
        """
        from bsprof.engine.timing import TimingSettings
        from bsprof.engine.trial import EngineTimer, run_throughput_trial

        o = self.options
        timer: Any = PedanticTimer(benchmark, o.min_time_s, o.min_rounds, o.warmup_rounds)
        if benchmark.disabled:
            timer = EngineTimer(TimingSettings(warmup_steps=0, warmup_s=0.0, min_time_s=0.0, min_steps=1, min_blocks=1))
        return run_throughput_trial(self.workload, self.spec("throughput", batch_size), self.settings, timer=timer)

    def note_oom(self, batch_size: int) -> None:
        """Record that ``batch_size`` ran out of memory: larger batch sizes are skipped from now on."""
        self.oom_floor = batch_size if self.oom_floor is None else min(self.oom_floor, batch_size)

    def record(self, result: TrialResult) -> None:
        """Write ``result`` into the store given by ``--bsprof-store`` (nothing without one).

        The session's run is opened at its first trial, always a new run (``fresh``): a benchmark session is
        a measurement at one point in time, and ``bsprof report`` shows the latest run per workload.
        """
        if self.options.store is None:
            return
        if self._store is None:
            from bsprof.environment import collect_environment
            from bsprof.store import Store

            self._store = Store(self.options.store, create=True)
            run = self._store.open_run(
                self.workload.name, self._run_config(), collect_environment(self.settings.device),
                fresh=True,
            )  # fmt: skip
            self.run_id = run.run_id
        assert self.run_id is not None
        self._store.add_trial(self.run_id, result)

    def _run_config(self) -> dict[str, Any]:
        o = self.options
        engine = self.settings.config()
        engine["timing"] = {"pytest_benchmark": [o.min_time_s, o.min_rounds, o.warmup_rounds]}
        return {
            "source": "pytest-benchmark",
            "workload": self.workload.config(),
            "workload_ref": o.workload_ref,
            "kinds": ["convergence", "throughput"],
            "lr_rule": "linear",
            "tune_lr": 0,
            "convergence": self.convergence.config(),
            "engine": engine,
        }

    def close(self) -> None:
        """Close the store and end the session's sampler process."""
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None
