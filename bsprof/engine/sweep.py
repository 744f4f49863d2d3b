"""A sweep: the trials of one configuration, planned in rotation, run one by one, stored as they end.

Throughput trials are planned round by round (``repeats`` x ``seeds`` rounds over all batch sizes) rather
than one batch size at a time, so that slow drifts of a shared machine spread over every batch size
instead of biasing one. Convergence trials follow, one per (batch size, seed) at the LR rule's value, or,
with ``tune_lr = K``, in two phases (Shallue et al. 2018): *tune* tries K learning rates on a log2 grid
centred on the rule's value for every batch size and seed, the LR with the lowest median steps-to-target
is chosen per batch size, and *final* re-runs that LR on fresh seeds (picking the best of K noisy medians
is optimistic; the fresh seeds give the figures reported).

Trials already in the store are skipped (resume). Several sweeps of one run may run at once: each claims a
trial in the store before running it (a lease it renews while it lives, :meth:`Store.claim_trial`) and
leaves trials claimed by another to that one, so no trial runs twice. After an OOM at batch size B, batch sizes >= B are
recorded ``oom`` without being tried unless ``skip_larger_after_oom`` is off.

Size (about 470 lines, above the ~400 guideline): planning, the executor seam with the local loop, resume, trial
claims and the LR-tuning phases; the executors other than local live in their own modules.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from bsprof.engine.convergence import ConvergenceSettings, run_convergence_trial
from bsprof.engine.host_load import remeasure_busy
from bsprof.engine.lr import scaled_lr
from bsprof.engine.result import TrialExtra
from bsprof.engine.sampler_process import SamplerProcess
from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec, ended, run_throughput_trial
from bsprof.engine.validate import validate_workload
from bsprof.environment import collect_environment

if TYPE_CHECKING:
    from bsprof.store import RunRecord, Store
    from bsprof.workload import Workload

__all__ = [
    "FINAL_SEED_OFFSET",
    "Executor",
    "LocalExecutor",
    "SweepConfig",
    "SweepOutcome",
    "lr_grid",
    "plan_trials",
    "prime_process",
    "run_sweep",
    "trial_runners",
]

log = logging.getLogger(__name__)

FINAL_SEED_OFFSET = 1000
"""Seeds of the *final* phase of LR tuning start here, apart from the tuning seeds 0..seeds-1."""


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep.

    Attributes:
        workload_ref: How the workload was named (built-in name or ``module:factory``).
        batch_sizes: Batch sizes to try, ascending (samples).
        kinds: Trial kinds to run: ``throughput`` and/or ``convergence``.
        seeds: Seeds 0 .. seeds-1 (per batch size, and per LR when tuning).
        repeats: Rounds of throughput trials over all batch sizes (each round runs every seed).
        lr_rule: LR scaling rule (see :mod:`bsprof.engine.lr`).
        base_lr: Override of the workload's base LR (at its base batch size), ``None`` to keep it.
        tune_lr: Learning rates tried per batch size (0: no tuning, use the rule's LR).
        skip_larger_after_oom: Record batch sizes at and above an OOM as ``oom`` without trying them.
        auto_micro_batch: Find the largest micro-batch that fits (:func:`auto_micro_batch_size`) and accumulate
            gradients over micro-batches of that size at larger batch sizes (else ``settings.micro_batch_size``).
        convergence: Budgets, schedule and target of convergence trials.
        convergence_batch_sizes: Batch sizes of the convergence trials, ``None``: all of ``batch_sizes``.
        mode: ``sweep``, or ``predict`` for a ``bsprof predict`` run (a throughput pass and one short
            convergence trial measuring the noise scale); part of the run's identity.
        remeasure_busy: Times a throughput trial measured on a busy host is measured again
            (:func:`~bsprof.engine.host_load.remeasure_busy`).
    """

    workload_ref: str
    batch_sizes: tuple[int, ...]
    kinds: tuple[str, ...] = ("throughput", "convergence")
    seeds: int = 3
    repeats: int = 1
    lr_rule: str = "linear"
    base_lr: float | None = None
    tune_lr: int = 0
    skip_larger_after_oom: bool = True
    auto_micro_batch: bool = False
    convergence: ConvergenceSettings = field(default_factory=ConvergenceSettings)
    convergence_batch_sizes: tuple[int, ...] | None = None
    mode: str = "sweep"
    remeasure_busy: int = 2

    @property
    def convergence_sizes(self) -> tuple[int, ...]:
        """The batch sizes of the convergence trials."""
        return self.convergence_batch_sizes or self.batch_sizes

    def hashed(self, workload: Workload, settings: EngineSettings) -> dict[str, Any]:
        """The part of the configuration that identifies a run (batch sizes, seeds and repeats are left
        out: extending a sweep with more of them resumes the same run)."""
        hashed: dict[str, Any] = {
            "workload": workload.config(),
            "workload_ref": self.workload_ref,
            "kinds": sorted(self.kinds),
            "lr_rule": self.lr_rule,
            "base_lr": self.base_lr,
            "tune_lr": self.tune_lr,
            "convergence": self.convergence.config() if "convergence" in self.kinds else None,
            "engine": settings.config(),
        }
        if self.mode != "sweep":
            hashed |= {"mode": self.mode, "convergence_batch_sizes": list(self.convergence_sizes)}
        if self.auto_micro_batch:  # only when set: runs stored before the option keep their identity
            hashed["auto_micro_batch"] = True
        return hashed


@dataclass
class SweepOutcome:
    """What a sweep did: its run, the trials it ran now, and how many it skipped as already stored."""

    run: RunRecord
    results: list[TrialResult] = field(default_factory=list)
    skipped: int = 0
    claimed_elsewhere: int = 0
    chosen_lr: dict[int, float] = field(default_factory=dict)


def lr_grid(center: float, k: int) -> list[float]:
    """``k`` learning rates on a log2 grid centred on ``center``: center x 2^(i - (k-1)/2)."""
    return [float(f"{center * 2 ** (i - (k - 1) / 2):.6g}") for i in range(k)]


def plan_trials(config: SweepConfig, workload: Workload, phase: str = "main") -> list[TrialSpec]:
    """The trials of one phase, in the order they run.

    Phases: ``main`` (throughput rounds, then convergence at the rule's LR when not tuning), ``tune``
    (convergence at every grid LR). The ``final`` phase needs the tuning results: see :func:`run_sweep`.
    """
    specs = []
    rule_lr = {
        b: scaled_lr(workload, b, config.lr_rule, base_lr=config.base_lr)
        for b in {*config.batch_sizes, *config.convergence_sizes}
    }
    if phase == "main":
        if "throughput" in config.kinds:
            for repeat in range(config.repeats):
                for seed in range(config.seeds):
                    for b in config.batch_sizes:
                        specs.append(TrialSpec(workload.name, "throughput", b, seed, rule_lr[b], repeat))
        if "convergence" in config.kinds and config.tune_lr <= 0:
            for b in config.convergence_sizes:
                for seed in range(config.seeds):
                    specs.append(TrialSpec(workload.name, "convergence", b, seed, rule_lr[b], 0, "main"))
    elif phase == "tune" and "convergence" in config.kinds and config.tune_lr > 0:
        for b in config.convergence_sizes:
            for lr in lr_grid(rule_lr[b], config.tune_lr):
                for seed in range(config.seeds):
                    specs.append(TrialSpec(workload.name, "convergence", b, seed, lr, 0, "tune"))
    return specs


def choose_lr(rows: list[dict[str, Any]], batch_size: int) -> float | None:
    """The tuning LR with the lowest median steps-to-target at ``batch_size`` (a missed target counts as
    infinitely many steps); ``None`` when no LR reached the target with a finite median."""
    from bsprof import analysis

    by_lr: dict[float, list[float | None]] = {}
    for r in rows:
        if r["kind"] == "convergence" and r.get("phase") == "tune" and r["batch_size"] == batch_size:
            by_lr.setdefault(r["lr"], []).append(r.get("steps_to_target") if r["status"] == "ok" else None)
    medians = {lr: analysis.median_to_target(v) for lr, v in by_lr.items() if v}
    finite = {lr: m for lr, m in medians.items() if math.isfinite(m)}
    if not finite:
        return None
    return min(finite, key=lambda lr: (finite[lr], lr))


Runner = Callable[["Workload", TrialSpec, EngineSettings], TrialResult]
ProgressFn = Callable[[TrialSpec, "TrialResult | None", int, int], None]


class Executor(Protocol):
    """Where a sweep's trials run. The sweep hands it the trials to run, lazily, and stores each result the
    executor yields (in any order): the driver alone writes the store, whoever ran the trial.

    Executors: :class:`LocalExecutor` (the default: in this process, one after another),
    :class:`bsprof.engine.distributed.DataParallelDriver` (each trial across the ranks of a ``torchrun``
    job), :class:`bsprof.engine.ray_executor.RayExecutor` (trials as Ray tasks).
    """

    def run(
        self, specs: Iterable[TrialSpec], workload: Workload, settings: EngineSettings, runners: dict[str, Runner]
    ) -> Iterator[TrialResult]:
        """Run every trial of ``specs`` with ``runners[spec.kind]``; yield each result as it ends."""
        ...


class LocalExecutor:
    """Each trial in this process, one after another; the next trial is drawn only after the last one is
    stored (so an OOM is known before the larger batch sizes are tried)."""

    def run(
        self, specs: Iterable[TrialSpec], workload: Workload, settings: EngineSettings, runners: dict[str, Runner]
    ) -> Iterator[TrialResult]:
        for spec in specs:
            yield runners[spec.kind](workload, spec, settings)


def trial_runners(config: SweepConfig) -> dict[str, Runner]:
    """The trial runner of each kind for ``config``."""
    return {
        "throughput": run_throughput_trial,
        "convergence": lambda w, s, e: run_convergence_trial(w, s, e, config.convergence),
    }


def _remeasuring(run: Runner, attempts: int) -> Runner:
    """``run``, measured again up to ``attempts`` times while its host was busy
    (:func:`~bsprof.engine.host_load.remeasure_busy`)."""

    def measure(workload: Workload, spec: TrialSpec, settings: EngineSettings) -> TrialResult:
        calls = iter([settings])  # the profiler pass runs with the first measurement only: one trace per trial
        return remeasure_busy(lambda: run(workload, spec, next(calls, replace(settings, profile=False))), attempts)

    return measure


def run_sweep(
    config: SweepConfig,
    workload: Workload,
    settings: EngineSettings,
    store: Store,
    *,
    fresh: bool = False,
    progress: ProgressFn | None = None,
    runners: dict[str, Runner] | None = None,
    prime: bool = True,
    executor: Executor | None = None,
) -> SweepOutcome:
    """Run the sweep's unfinished trials, storing each when it ends.

    Args:
        config: What to sweep.
        workload: The loaded workload.
        settings: Device, precision, timing.
        store: Where trials go; the run resumes unless ``fresh``.
        fresh: Start a new run even if one with the same configuration exists.
        progress: Called as ``progress(spec, result_or_None, done, total)`` before (``None``) and after each trial.
        runners: Trial runner per kind (tests inject fakes).
        prime: Run a few untimed, unstored steps first, so that one-time process costs (lazy library
            initialisation, first allocations, data loading) do not land on the first trial's time and memory.
        executor: Where the trials run (default: :class:`LocalExecutor`, in this process).

    Returns:
        The run, the trials run now, and the LR chosen per batch size when tuning.
    """
    chosen = executor if executor is not None else LocalExecutor()
    if settings.sampler_process is not None or not isinstance(chosen, LocalExecutor):
        return _run_sweep(config, workload, settings, store, fresh, progress, runners, prime, chosen)
    # One telemetry sampler process for the whole sweep: its start is paid once, not per trial.
    with SamplerProcess() as sampler:
        settings = replace(settings, sampler_process=sampler)
        return _run_sweep(config, workload, settings, store, fresh, progress, runners, prime, chosen)


def _run_sweep(
    config: SweepConfig,
    workload: Workload,
    settings: EngineSettings,
    store: Store,
    fresh: bool,
    progress: ProgressFn | None,
    runners: dict[str, Runner] | None,
    prime: bool,
    executor: Executor,
) -> SweepOutcome:
    run_fns = trial_runners(config)
    run_fns.update(runners or {})
    if not runners:  # injected runners (tests) may not run the workload at all
        validate_workload(workload, settings.device)
    if config.auto_micro_batch:
        settings = replace(settings, micro_batch_size=auto_micro_batch_size(workload, settings, config.batch_sizes))
    if config.remeasure_busy > 0 and "throughput" in run_fns:
        run_fns["throughput"] = _remeasuring(run_fns["throughput"], config.remeasure_busy)
    run = store.open_run(
        workload.name, config.hashed(workload, settings), collect_environment(settings.device), fresh=fresh
    )
    outcome = SweepOutcome(run)
    phases = plan_trials(config, workload, "main") + plan_trials(config, workload, "tune")
    n_final = (
        len(config.convergence_sizes) * config.seeds if config.tune_lr > 0 and "convergence" in config.kinds else 0
    )
    state = _State(store, run.run_id, config.skip_larger_after_oom, outcome, progress, len(phases) + n_final)
    with _ClaimKeeper(store, state.owner):
        return _run_phases(config, workload, settings, store, run_fns, executor, state, phases, n_final, prime)


def _run_phases(
    config: SweepConfig,
    workload: Workload,
    settings: EngineSettings,
    store: Store,
    run_fns: dict[str, Runner],
    executor: Executor,
    state: _State,
    phases: list[TrialSpec],
    n_final: int,
    prime: bool,
) -> SweepOutcome:
    outcome, run = state.outcome, state.outcome.run
    if prime and any(spec.key() not in state.done_keys for spec in phases):
        prime_process(workload, settings, min(config.batch_sizes))
    for result in executor.run(state.admit(phases, settings), workload, settings, run_fns):
        state.record(result)
    if n_final and outcome.claimed_elsewhere:
        log.warning(
            "%d tuning trial(s) are being run by another sweep of this run; run the same command again when it "
            "ends to choose the LRs and run the final trials",
            outcome.claimed_elsewhere,
        )
        n_final = 0
    if n_final:
        rows = store.trial_rows([run.run_id])
        finals = []
        for b in config.convergence_sizes:
            lr = choose_lr(rows, b)
            if lr is None:
                log.warning("batch size %d: no tuning LR reached the target; no final trials", b)
                state.done += config.seeds
                continue
            outcome.chosen_lr[b] = lr
            for seed in range(config.seeds):
                finals.append(TrialSpec(workload.name, "convergence", b, FINAL_SEED_OFFSET + seed, lr, 0, "final"))
        for result in executor.run(state.admit(finals, settings), workload, settings, run_fns):
            state.record(result)
    return outcome


def auto_micro_batch_size(workload: Workload, settings: EngineSettings, batch_sizes: tuple[int, ...]) -> int | None:
    """The largest micro-batch that fits on the device, up to the largest batch size (max-batch finder, without
    accumulation); ``None`` when every batch size fits whole.

    Raises:
        MeasurementFailed: Even a micro-batch of one example does not fit.
    """
    from bsprof.engine.maxbatch import find_max_batch
    from bsprof.errors import MeasurementFailed

    largest = max(batch_sizes)
    found = find_max_batch(workload, replace(settings, micro_batch_size=None), start=min(batch_sizes), cap=largest)
    if found.max_batch_size is None:
        raise MeasurementFailed(f"not even a batch of {min(batch_sizes)} fits: no micro-batch size to accumulate with")
    log.info("automatic micro-batch size: %d (largest batch size %d)", found.max_batch_size, largest)
    return None if found.max_batch_size >= largest else found.max_batch_size


def prime_process(workload: Workload, settings: EngineSettings, batch_size: int) -> None:
    """A few untimed, unstored steps, so that one-time process costs don't land on the first trial."""
    from bsprof.engine.maxbatch import probe_fits
    from bsprof.errors import MeasurementFailed

    try:
        if not probe_fits(workload, batch_size, settings, steps=3):
            log.warning("priming at batch size %d ran out of memory; the trials will record it", batch_size)
        workload.val_split()
    except MeasurementFailed as e:
        log.warning("priming failed (%s); the trials will record it", e)


@dataclass
class _State:
    """The sweep's book-keeping: what is stored, the OOM floor, the progress count."""

    store: Store
    run_id: str
    skip_larger: bool
    outcome: SweepOutcome
    progress: ProgressFn | None
    total: int
    done: int = 0
    done_keys: set[tuple[str, int, int, float, int]] = field(init=False)
    oom_floor: int | None = field(init=False, default=None)
    owner: str = field(
        init=False, default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    )

    def __post_init__(self) -> None:
        self.done_keys = self.store.finished_keys(self.run_id)
        if self.skip_larger:
            sizes = [r["batch_size"] for r in self.store.trial_rows([self.run_id]) if r["status"] == "oom"]
            self.oom_floor = min(sizes) if sizes else None

    def admit(self, specs: list[TrialSpec], settings: EngineSettings) -> Iterator[TrialSpec]:
        """The trials of ``specs`` that must run, drawn lazily: stored ones are skipped, and those at or above
        the OOM floor (as known when drawn) are recorded ``oom`` without running."""
        for spec in specs:
            if spec.key() in self.done_keys:
                self.outcome.skipped += 1
                self.done += 1
                continue
            if not self.store.claim_trial(self.run_id, spec.key(), self.owner):
                # Finished meanwhile, or claimed by a concurrent sweep of this run: never run a trial twice.
                self.outcome.claimed_elsewhere += 1
                self.done += 1
                continue
            if self.oom_floor is not None and spec.batch_size >= self.oom_floor:
                error = f"not tried: batch size {self.oom_floor} already ran out of memory (use --no-skip-larger)"
                extra = TrialExtra(skipped_after_oom=True)
                self.record(ended(spec, "oom", settings.device, time.time(), error=error, extra=extra))
                continue
            if self.progress:
                self.progress(spec, None, self.done, self.total)
            yield spec

    def record(self, result: TrialResult) -> None:
        """Store one ended trial and count it."""
        spec = result.spec
        if result.status == "oom" and self.skip_larger:
            self.oom_floor = spec.batch_size if self.oom_floor is None else min(self.oom_floor, spec.batch_size)
        self.store.add_trial(self.run_id, result)
        self.store.release_claim(self.run_id, spec.key(), self.owner)
        self.done_keys.add(spec.key())
        self.outcome.results.append(result)
        self.done += 1
        if self.progress:
            self.progress(spec, result, self.done, self.total)


class _ClaimKeeper:
    """Renews ``owner``'s trial claims every quarter lease from a thread (own connection) and releases them at exit."""

    def __init__(self, store: Store, owner: str) -> None:
        from bsprof.store import CLAIM_LEASE_S

        self._store, self._owner, self._period_s = store, owner, CLAIM_LEASE_S / 4
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="bsprof-claims", daemon=True)

    def _renew(self) -> None:
        from bsprof.errors import BsprofError
        from bsprof.store import Store

        with Store(self._store.path) as own:
            while not self._stop.wait(self._period_s):
                try:
                    own.renew_claims(self._owner)
                except (BsprofError, sqlite3.Error) as e:  # the claim then lapses; another sweep may take it
                    log.warning("could not renew this sweep's trial claim: %s", e)

    def __enter__(self) -> _ClaimKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        from bsprof.errors import BsprofError

        self._stop.set()
        self._thread.join()
        try:
            self._store.release_claims(self._owner)
        except (BsprofError, sqlite3.Error) as e:  # the sweep is ending on this error already: claims lapse
            log.debug("could not release this sweep's trial claims (they expire by themselves): %s", e)
