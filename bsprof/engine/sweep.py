"""A sweep: the trials of one configuration, planned in rotation, run one by one, stored as they end.

Throughput trials are planned round by round (``repeats`` rounds over all batch sizes and seeds) rather
than one batch size at a time, so that slow drifts of a shared machine spread over every batch size
instead of biasing one. Trials already in the store are skipped (resume). After an OOM at batch size B,
larger batch sizes are recorded ``oom`` without being tried unless ``skip_larger_after_oom`` is off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bsprof.engine.lr import scaled_lr
from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec, run_throughput_trial
from bsprof.environment import collect_environment

if TYPE_CHECKING:
    from bsprof.store import RunRecord, Store
    from bsprof.workload import Workload

__all__ = ["SweepConfig", "SweepOutcome", "plan_trials", "run_sweep"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep.

    Attributes:
        workload_ref: How the workload was named (built-in name or ``module:factory``).
        batch_sizes: Batch sizes to try, ascending (samples).
        kinds: Trial kinds to run, e.g. ``("throughput",)``.
        seeds: Seeds 0 .. seeds-1.
        repeats: Rounds of throughput trials over all batch sizes.
        lr_rule: LR scaling rule (see :mod:`bsprof.engine.lr`).
        skip_larger_after_oom: Record batch sizes above an OOM as ``oom`` without trying them.
    """

    workload_ref: str
    batch_sizes: tuple[int, ...]
    kinds: tuple[str, ...] = ("throughput",)
    seeds: int = 1
    repeats: int = 3
    lr_rule: str = "linear"
    skip_larger_after_oom: bool = True

    def hashed(self, workload: Workload, settings: EngineSettings) -> dict[str, Any]:
        """The part of the configuration that identifies a run (batch sizes, seeds and repeats are left
        out: extending a sweep with more of them resumes the same run)."""
        return {
            "workload": workload.config(),
            "workload_ref": self.workload_ref,
            "kinds": list(self.kinds),
            "lr_rule": self.lr_rule,
            "engine": settings.config(),
        }


@dataclass
class SweepOutcome:
    """What a sweep did: its run, the trials it ran now, and how many it skipped as already stored."""

    run: RunRecord
    results: list[TrialResult] = field(default_factory=list)
    skipped: int = 0


def plan_trials(config: SweepConfig, workload: Workload) -> list[TrialSpec]:
    """Every trial of the sweep, in the order it runs: rounds, then seeds, then ascending batch size."""
    specs = []
    if "throughput" in config.kinds:
        for repeat in range(config.repeats):
            for seed in range(config.seeds):
                for b in config.batch_sizes:
                    lr = scaled_lr(workload, b, config.lr_rule)
                    specs.append(TrialSpec(workload.name, "throughput", b, seed, lr, repeat))
    return specs


ProgressFn = Callable[[TrialSpec, "TrialResult | None", int, int], None]


def run_sweep(
    config: SweepConfig,
    workload: Workload,
    settings: EngineSettings,
    store: Store,
    *,
    fresh: bool = False,
    progress: ProgressFn | None = None,
    runner: Callable[[Workload, TrialSpec, EngineSettings], TrialResult] = run_throughput_trial,
) -> SweepOutcome:
    """Run the sweep's unfinished trials, storing each when it ends.

    Args:
        config: What to sweep.
        workload: The loaded workload.
        settings: Device, precision, timing.
        store: Where trials go; the run resumes unless ``fresh``.
        fresh: Start a new run even if one with the same configuration exists.
        progress: Called as ``progress(spec, result_or_None, done, total)`` before (``None``) and after each trial.
        runner: Runs one trial (tests inject fakes).

    Returns:
        The run and the trials run now.
    """
    run = store.open_run(
        workload.name, config.hashed(workload, settings), collect_environment(settings.device), fresh=fresh
    )
    specs = plan_trials(config, workload)
    done_keys = store.finished_keys(run.run_id)
    outcome = SweepOutcome(run)
    oom_floor = _stored_oom_floor(store, run.run_id) if config.skip_larger_after_oom else None
    total = len(specs)
    for i, spec in enumerate(specs):
        if spec.key() in done_keys:
            outcome.skipped += 1
            continue
        if progress:
            progress(spec, None, i, total)
        if oom_floor is not None and spec.batch_size >= oom_floor:
            result = TrialResult(
                spec=spec,
                status="oom",
                device=str(settings.device),
                error=f"not tried: batch size {oom_floor} already ran out of memory (use --no-skip-larger)",
                started_at=time.time(),
                extra={"skipped_after_oom": True},
            )
        else:
            result = runner(workload, spec, settings)
        if result.status == "oom" and config.skip_larger_after_oom:
            oom_floor = spec.batch_size if oom_floor is None else min(oom_floor, spec.batch_size)
        store.add_trial(run.run_id, result)
        outcome.results.append(result)
        if progress:
            progress(spec, result, i + 1, total)
    return outcome


def _stored_oom_floor(store: Store, run_id: str) -> int | None:
    sizes = [r["batch_size"] for r in store.trial_rows([run_id]) if r["status"] == "oom"]
    return min(sizes) if sizes else None
