"""Steps-, samples- and seconds-to-target per batch size: one benchmark round per seed.

Each round is one whole :func:`~bsprof.engine.convergence.run_convergence_trial` (the CLI's convergence
trial: fresh seeded model, the evaluation schedule with its bounded bracket, divergence checks), so the
round time pytest-benchmark reports is a trial's wall-clock, set-up and evaluations included. The figures
that matter are in ``extra_info``: ``steps_to_target_per_seed`` (``None`` for a seed that missed the target),
``samples_to_target_per_seed``, ``time_to_target_s_per_seed`` (training seconds, evaluation excluded), their
medians (a missed seed counts as infinitely slow), ``reached_fraction``, ``statuses``, ``lr`` and ``device``.
``bsprof compare`` tests ``steps_to_target_per_seed`` across runs (seeds vary by 15-50% on digits, so it is
never compared as a single number).

The learning rate follows the linear rule from the workload's base LR (as ``bsprof sweep``'s default);
``--bsprof-seeds`` sets the rounds, ``--bsprof-target`` the target, ``--bsprof-max-time`` the budget.
"""

from __future__ import annotations

from typing import Any

import pytest

from bsprof.benchmark_results import convergence_extra_info
from bsprof.engine.convergence import run_convergence_trial
from bsprof.engine.trial import TrialResult
from bsprof.pytest_session import BsprofSession


def test_convergence(benchmark: Any, bsprof: BsprofSession, convergence_batch_size: int) -> None:
    b = convergence_batch_size
    bsprof.check_runnable(b)
    if bsprof.target is None:
        pytest.skip(f"workload {bsprof.workload.name} has no target: pass --bsprof-target")
    seeds = iter(range(bsprof.options.seeds))
    results: list[TrialResult] = []

    def setup() -> tuple[tuple[int], dict[str, Any]]:
        return (next(seeds),), {}

    def run_one_seed(seed: int) -> None:
        spec = bsprof.spec("convergence", b, seed)
        results.append(run_convergence_trial(bsprof.workload, spec, bsprof.settings, bsprof.convergence))

    benchmark.pedantic(run_one_seed, setup=setup, rounds=bsprof.options.seeds, iterations=1)
    for r in results:
        bsprof.record(r)
    benchmark.extra_info.update(convergence_extra_info(results, target=bsprof.target))
    if all(r.status == "oom" for r in results):
        bsprof.note_oom(b)  # larger batch sizes are skipped; this one stays, every seed missed (oom)
    errors = [r for r in results if r.status == "error"]
    assert not errors, f"{len(errors)} seed(s) failed: {errors[0].error}"
