"""The largest batch that fits: doubling, then binary search (as Lightning's ``scale_batch_size`` does).

Every probe builds a fresh :class:`~bsprof.engine.step.TrainingStep` and runs a few whole training steps;
an out-of-memory failure means "does not fit", memory is freed, and the process stays usable. Any other
failure stops the search (it would not be a memory limit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bsprof.engine.device import synchronizer
from bsprof.engine.oom import free_memory, is_oom
from bsprof.engine.step import TrainingStep
from bsprof.engine.trial import begin_trial
from bsprof.errors import MeasurementFailed

if TYPE_CHECKING:
    from bsprof.engine.trial import EngineSettings
    from bsprof.workload import Workload

__all__ = ["MaxBatchResult", "find_max_batch"]

log = logging.getLogger(__name__)


@dataclass
class MaxBatchResult:
    """Outcome of the search.

    Attributes:
        max_batch_size: Largest batch size that ran (``None`` if even the first failed).
        first_oom_batch_size: Smallest batch size that ran out of memory (``None``: none did up to the cap).
        tried: (batch size, ``"ok"`` or ``"oom"``) in the order probed.
        hit_cap: The search stopped at ``max_batch_size`` cap without an OOM.
    """

    max_batch_size: int | None
    first_oom_batch_size: int | None
    tried: list[tuple[int, str]] = field(default_factory=list)
    hit_cap: bool = False


def probe_fits(
    workload: Workload, batch_size: int, settings: EngineSettings, *, steps: int = 2, lr: float | None = None
) -> bool:
    """Whether ``steps`` training steps at ``batch_size`` run without running out of memory."""
    step: TrainingStep | None = None
    try:
        begin_trial(settings)  # a clean allocator, and (compiling) no graphs of earlier probes
        step = TrainingStep(
            workload,
            batch_size=batch_size,
            seed=0,
            lr=lr or workload.base_lr,
            device=settings.device,
            amp=settings.amp,
            compile=settings.compile,
            compile_backend=settings.compile_backend,
            micro_batch_size=settings.micro_batch_size,
            schedule=settings.lr_schedule,
        )
        for _ in range(steps):
            step()
        synchronizer(settings.device)()
        return True
    except Exception as e:
        if not is_oom(e):
            raise MeasurementFailed(
                f"batch size {batch_size} failed (not out of memory): {type(e).__name__}: {e}"
            ) from e
        return False
    finally:
        if step is not None:
            step.close()
        del step
        free_memory(settings.device)


def find_max_batch(
    workload: Workload,
    settings: EngineSettings,
    *,
    start: int = 1,
    cap: int = 65536,
    probe: Callable[[int], bool] | None = None,
) -> MaxBatchResult:
    """Double from ``start`` until a batch does not fit or ``cap`` is reached, then bisect.

    Args:
        workload: The workload.
        settings: Device and precision of the probes.
        start: First batch size tried.
        cap: Largest batch size tried (keeps a CPU host from swapping or being OOM-killed).
        probe: ``probe(batch_size) -> fits`` (default: :func:`probe_fits`); tests inject fakes.
    """
    if start < 1 or cap < start:
        raise ValueError("need 1 <= start <= cap")
    fits = probe or (lambda b: probe_fits(workload, b, settings))
    result = MaxBatchResult(None, None)

    def attempt(b: int) -> bool:
        ok = fits(b)
        result.tried.append((b, "ok" if ok else "oom"))
        log.info("batch size %d: %s", b, "fits" if ok else "out of memory")
        return ok

    b = start
    while True:
        if not attempt(b):
            result.first_oom_batch_size = b
            break
        result.max_batch_size = b
        if b >= cap:
            result.hit_cap = True
            return result
        b = min(2 * b, cap)
    lo, hi = result.max_batch_size, result.first_oom_batch_size
    if lo is None:
        return result
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    result.max_batch_size, result.first_oom_batch_size = lo, hi
    return result
