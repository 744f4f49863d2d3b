"""Data-parallel trials: one trial across the ranks of a ``torchrun`` job, its model under DDP.

A trial's batch size is the *global* batch: each of the ``world_size`` ranks trains on ``batch_size /
world_size`` samples per step and :class:`~torch.nn.parallel.DistributedDataParallel` averages the ranks'
gradients. The batches are the single-process batches cut into rank slices (every rank draws the same
seeded index stream at the global batch size and keeps its slice), so with a mean-reduced loss a
data-parallel trial follows, up to float rounding in the all-reduce, the single-process trial at the same
global batch.

Rank 0 is the driver (:class:`DataParallelDriver`, an :class:`~bsprof.engine.sweep.Executor`): it runs
the sweep, broadcasts each trial's spec to the other ranks (:func:`follow`), runs its share, gathers every
rank's figures and alone writes the store. Throughput is global samples/s; memory and telemetry are per
rank: the column holds the largest rank's value and ``<column>_sum`` the sum over ranks.

The share of step time spent in all-reduce is measured by timing the trial's step a second time under
DDP's ``no_sync()`` (``allreduce_share``, the communication not hidden behind the backward pass).

Decisions every rank must take alike use agreed values, never a rank's own clock or loss: the throughput
timer reads :class:`CollectiveClock` (the slowest rank's elapsed time), and the convergence trial's
divergence and time-budget checks go through :meth:`DataParallelStep.agree`. Evaluation runs on every
rank over the whole validation set with the (identical) replicated model, so its result is the
single-process one.

Convergence trials also record, per evaluation interval, the ranks' local squared gradient norms (taken
in a DDP communication hook before the all-reduce) beside the all-reduced one: the two batch sizes of the
gradient-noise-scale estimator; rank 0 stores the estimate over the trial (:func:`with_noise_scale`).

Nothing here is imported on the local path.

Size (about 450 lines, above the ~400 guideline): the data-parallel context, the DDP step, the per-rank merge and
the launcher, which only make sense together.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from bsprof.engine.step import TrainingStep
from bsprof.engine.timing import StepTimes, time_steps

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from bsprof.engine.sweep import Runner
    from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec
    from bsprof.workload import Workload

__all__ = [
    "PER_RANK_COLUMNS",
    "CollectiveClock",
    "DataParallel",
    "DataParallelDriver",
    "DataParallelStep",
    "DataParallelTimer",
    "context_from_env",
    "follow",
    "launch",
    "merge_ranks",
    "with_noise_scale",
]

log = logging.getLogger(__name__)

PER_RANK_COLUMNS = (
    "peak_mem_bytes",
    "peak_mem_reserved_bytes",
    "mem_baseline_bytes",
    "gpu_util_pct",
    "power_w",
    "energy_j",
)
"""Per-rank measurements: stored as the largest rank's value, and summed over ranks as ``<column>_sum``."""

_TIMEOUT_S = float(os.environ.get("BSPROF_DIST_TIMEOUT_S", "600"))


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel job (from the variables ``torchrun`` sets).

    Attributes:
        rank: Global rank (0 drives the sweep and writes the store).
        world_size: Number of ranks.
        local_rank: Rank on this node (the CUDA device index).
    """

    rank: int
    world_size: int
    local_rank: int

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda:<local_rank>`` for CUDA, else ``device``."""
        if device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group (NCCL on CUDA, gloo elsewhere), unless already joined."""
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=_TIMEOUT_S))

    def stop(self) -> None:
        """Leave the process group together: a barrier, then destroy it (unless not joined). A rank that exits
        while another still talks to it, or with its group alive, can abort in gloo's threads at exit
        ("terminate called without an active exception"), failing the launch after every trial was stored."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def per_rank_batch(self, batch_size: int) -> int:
        """Samples per rank per step at global ``batch_size``.

        Raises:
            ValueError: ``batch_size`` is not a multiple of the world size.
        """
        if batch_size % self.world_size:
            raise ValueError(f"global batch size {batch_size} is not a multiple of the world size {self.world_size}")
        return batch_size // self.world_size

    def build_step(self, workload: Workload, kind: str, **kwargs: Any) -> TrainingStep:
        """The training step of one data-parallel trial of ``kind``, built from
        :meth:`TrainingStep.for_trial`'s arguments (``batch_size`` is the global batch)."""
        return DataParallelStep(workload, world=self, norms=kind == "convergence", **kwargs)


def context_from_env(environ: dict[str, str] | None = None) -> DataParallel | None:
    """The data-parallel job this process belongs to, from ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; ``None``
    when not launched by ``torchrun`` (or the elastic launcher)."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    return DataParallel(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))


class _SlicedBatcher:
    """The single-process index stream at the global batch size, of which this rank keeps its slice."""

    def __init__(self, inner: Any, rank: int, per_rank: int) -> None:
        self._inner = inner
        self._lo = rank * per_rank
        self._hi = self._lo + per_rank
        self.n = inner.n
        self.batch_size = per_rank

    def next(self) -> torch.Tensor:
        return self._inner.next()[self._lo : self._hi]

    @property
    def samples_drawn(self) -> int:
        """Global samples drawn (all ranks)."""
        return self._inner.samples_drawn

    @property
    def epochs(self) -> float:
        return self._inner.epochs


class _NormHook:
    """DDP communication hook: all-reduce (average) each bucket, and add up the squared norms of the local
    gradient before it and of the averaged one after it (sums over the steps since the last :meth:`take`)."""

    def __init__(self) -> None:
        self.local_sq = 0.0
        self.reduced_sq = 0.0
        self.steps = 0

    def __call__(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        self.local_sq += float(buf.detach().double().pow(2).sum())
        if bucket.is_last():
            self.steps += 1
        world = dist.get_world_size()
        fut = dist.all_reduce(buf.div_(world), async_op=True).get_future()

        def done(f: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            out = f.value()[0]
            self.reduced_sq += float(out.detach().double().pow(2).sum())
            return out

        return fut.then(done)

    def take(self) -> tuple[float, float, int]:
        """(mean local |g|², mean all-reduced |g|², steps) since the last call; resets the sums."""
        out = (self.local_sq / max(self.steps, 1), self.reduced_sq / max(self.steps, 1), self.steps)
        self.local_sq = self.reduced_sq = 0.0
        self.steps = 0
        return out


class DataParallelStep(TrainingStep):
    """The one training step with its model under DDP and the rank's slice of the global batch.

    Args:
        workload, batch_size, seed, lr, device, amp, compile, compile_backend: As for
            :class:`TrainingStep`; ``batch_size`` is the global batch.
        world: This rank's place in the job.
        norms: Record the local and all-reduced squared gradient norms (:meth:`gradient_norms`).
    """

    def __init__(self, workload: Workload, *, world: DataParallel, norms: bool = False, **kwargs: Any) -> None:
        compile_model = kwargs.pop("compile", False)
        backend = kwargs.pop("compile_backend", "inductor")
        super().__init__(workload, compile=False, **kwargs)
        if self._general:  # the rank's slice is cut from the in-memory index stream only
            raise ValueError("data-parallel trials need an in-memory Split of tensors, no accumulation or LR schedule")
        per_rank = world.per_rank_batch(self.batch_size)
        self.world = world
        self.global_batch_size = self.batch_size
        self.batch_size = per_rank
        self.batcher = _SlicedBatcher(self.batcher, world.rank, per_rank)  # type: ignore[assignment]
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self._hook = _NormHook() if norms and world.world_size > 1 else None  # one rank: b = B, no sample
        if self._hook is not None:
            hook = self._hook  # torch checks the hook's annotations as objects; a lambda has none
            self.ddp.register_comm_hook(None, lambda state, bucket: hook(state, bucket))
        self._forward = torch.compile(self.ddp, dynamic=False, backend=backend) if compile_model else self.ddp

    def agree(self, means: tuple[float, ...], maxima: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``means`` averaged and ``maxima`` maximised over the ranks (two small all-reduces)."""
        m = torch.tensor(means, dtype=torch.float64)
        x = torch.tensor(maxima, dtype=torch.float64)
        dist.all_reduce(m)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return tuple((m / self.world.world_size).tolist()), tuple(x.tolist())

    def gradient_norms(self) -> dict[str, float | int] | None:
        """The noise-scale sample since the last call: the ranks' mean local |g_b|² and the all-reduced |g_B|²
        (b = per-rank batch, B = global batch), averaged over the steps in between; ``None`` without norms."""
        if self._hook is None:
            return None
        local, reduced, steps = self._hook.take()
        (local_mean,), _ = self.agree((local,), ())
        return {
            "dp_small_batch": self.batch_size,
            "dp_big_batch": self.global_batch_size,
            "dp_small_sq_norm": local_mean,
            "dp_big_sq_norm": reduced,
            "dp_norm_steps": steps,
            "dp_population": len(self.train),
        }


class CollectiveClock:
    """A clock every rank reads alike: seconds since construction on the slowest rank (one all-reduce per read,
    made only at the timer's block boundaries)."""

    def __init__(self) -> None:
        dist.barrier()
        self._t0 = time.perf_counter()

    def __call__(self) -> float:
        t = torch.tensor([time.perf_counter() - self._t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)


@dataclass(frozen=True)
class DataParallelTimer:
    """The engine's timer (:func:`~bsprof.engine.timing.time_steps`) on a :class:`CollectiveClock`, so that
    every rank times the same number of steps."""

    settings: Any
    source: str = "engine"

    def __call__(
        self,
        step: Callable[[], object],
        *,
        batch_size: int,
        sync: Callable[[], None],
        reset: Callable[[], None] | None = None,
    ) -> StepTimes:
        clock = CollectiveClock()
        return time_steps(step, batch_size=batch_size, settings=self.settings, sync=sync, clock=clock, reset=reset)


def _settings_for(settings: EngineSettings, world: DataParallel) -> EngineSettings:
    return replace(settings, data_parallel=world)


def _run_here(spec: TrialSpec, workload: Workload, settings: EngineSettings, runners: dict[str, Runner]) -> TrialResult:
    if spec.kind == "throughput":
        from bsprof.engine.trial import run_throughput_trial

        result = run_throughput_trial(workload, spec, settings, timer=DataParallelTimer(settings.timing))
        return _with_allreduce_share(result, workload, spec, settings) if result.status == "ok" else result
    return runners[spec.kind](workload, spec, settings)


def _with_allreduce_share(
    result: TrialResult, workload: Workload, spec: TrialSpec, settings: EngineSettings
) -> TrialResult:
    """``result`` with the share of its step time spent in (exposed) all-reduce: a fresh step of the same trial
    timed again under ``no_sync()`` (no gradient communication), ``allreduce_share = 1 - t_no_sync / t_step``.

    DDP overlaps the all-reduce with the backward pass; only what is not hidden shows in the step time, and only
    that is counted. A second timing's noise can make the difference negative: it is clipped at 0.
    """
    from bsprof.engine.device import synchronizer

    try:
        step = TrainingStep.for_trial(workload, spec, settings)
        if not isinstance(step, DataParallelStep):
            raise TypeError(f"expected a data-parallel step, got {type(step).__name__}")
        initial = step.snapshot()  # timed from the initial state, as the trial's own blocks
        timer = DataParallelTimer(settings.timing)
        with step.ddp.no_sync():
            sync = synchronizer(settings.device)
            alone = timer(step, batch_size=spec.batch_size, sync=sync, reset=lambda: step.restore(initial))
    except Exception as e:  # noqa: BLE001 - a by-product: its failure leaves the share empty, the trial stands
        why = f"no_sync timing failed: {type(e).__name__}: {e}"[:300]
        log.warning("B=%d: %s", spec.batch_size, why)
        return replace(result, reasons={**result.reasons, "allreduce_share": why})
    with_comm = result.metrics.get("step_time_s")
    metrics = dict(result.metrics, step_time_no_allreduce_s=alone.median_s)
    if isinstance(with_comm, float) and with_comm > 0:
        metrics["allreduce_share"] = max(0.0, 1.0 - alone.median_s / with_comm)
    return replace(result, metrics=metrics)


def _summary(result: TrialResult) -> dict[str, Any]:
    return {
        "status": result.status,
        "error": result.error,
        "per_rank": {k: result.metrics.get(k) for k in PER_RANK_COLUMNS},
        "step_time_s": result.metrics.get("step_time_s"),
    }


def merge_ranks(result: TrialResult, ranks: list[dict[str, Any]], world: DataParallel) -> TrialResult:
    """Rank 0's result with every rank's figures: per-rank columns as max and ``_sum``, world size and
    per-rank batch recorded, and the first failing rank's status when rank 0 did not fail."""
    metrics = dict(result.metrics)
    for key in PER_RANK_COLUMNS:
        values = [r["per_rank"].get(key) for r in ranks]
        if any(v is not None for v in values) and key in metrics:
            known = [v for v in values if v is not None]
            metrics[key] = max(known)
            metrics[f"{key}_sum"] = sum(known) if len(known) == len(values) else None
    times = [r["step_time_s"] for r in ranks if r["step_time_s"] is not None]
    if times:
        metrics["step_time_max_rank_s"] = max(times)
    metrics["world_size"] = world.world_size
    metrics["per_rank_batch_size"] = result.spec.batch_size // world.world_size
    status, error = result.status, result.error
    if status in ("ok", "budget_exhausted"):
        for r, info in enumerate(ranks):
            if info["status"] in ("oom", "error"):
                status, error = info["status"], f"rank {r}: {info['error']}"
                break
    return replace(result, metrics=metrics, status=status, error=error)


def with_noise_scale(result: TrialResult) -> TrialResult:
    """A data-parallel convergence result with the gradient noise scale B_simple (McCandlish et al. 2018) of its
    learning curve's samples (per-rank |g_b|² beside all-reduced |g_B|²): ``dp_b_simple`` and its bootstrap
    interval ``dp_b_simple_ci_low`` / ``_high`` (examples). Unchanged when the curve holds no samples."""
    from bsprof.noise_scale import GradientNormSample, estimate_noise_scale

    samples = [
        GradientNormSample(
            r["dp_small_batch"],
            r["dp_big_batch"],
            r["dp_small_sq_norm"],
            r["dp_big_sq_norm"],
            population_size=r.get("dp_population"),
            step=r.get("step"),
        )
        for r in result.curve
        if r.get("dp_norm_steps")
    ]
    if not samples:
        return result
    est = estimate_noise_scale(samples)
    metrics = dict(result.metrics, dp_b_simple=est.b_simple, dp_b_simple_ci_low=est.ci_low)
    metrics["dp_b_simple_ci_high"] = est.ci_high
    return replace(result, metrics=metrics)


class DataParallelDriver:
    """Rank 0's :class:`~bsprof.engine.sweep.Executor`: each trial is broadcast to the other ranks, run on all,
    and rank 0's result, merged with every rank's figures (:func:`merge_ranks`), is yielded for the store.
    Call :meth:`close` when the sweep ends (it releases the other ranks)."""

    def __init__(self, world: DataParallel) -> None:
        self.world = world

    def run(
        self, specs: Iterable[TrialSpec], workload: Workload, settings: EngineSettings, runners: dict[str, Runner]
    ) -> Iterator[TrialResult]:
        settings = _settings_for(settings, self.world)
        for spec in specs:
            if spec.batch_size % self.world.world_size:
                from bsprof.engine.trial import ended

                msg = f"global batch size {spec.batch_size} is not a multiple of the world size {self.world.world_size}"
                yield ended(spec, "error", settings.device, time.time(), error=msg)
                continue
            dist.broadcast_object_list([spec], src=0)
            result = _run_here(spec, workload, settings, runners)
            ranks: list[Any] = [None] * self.world.world_size
            dist.gather_object(_summary(result), ranks, dst=0)
            yield with_noise_scale(merge_ranks(result, ranks, self.world))

    def close(self) -> None:
        """Tell the other ranks the sweep is over, and leave the process group with them."""
        dist.broadcast_object_list([None], src=0)
        self.world.stop()


def follow(world: DataParallel, workload: Workload, settings: EngineSettings, runners: dict[str, Runner]) -> int:
    """A rank other than 0: run each trial rank 0 broadcasts, send back the figures, until told to stop.

    Returns:
        The number of trials run.
    """
    settings = _settings_for(settings, world)
    n = 0
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        spec = box[0]
        if spec is None:
            world.stop()
            return n
        result = _run_here(spec, workload, settings, runners)
        dist.gather_object(_summary(result), None, dst=0)
        n += 1


def launch(nproc_per_node: int, argv: list[str]) -> int:
    """Run ``bsprof <argv>`` in ``nproc_per_node`` processes through torch's elastic launcher (as ``torchrun
    --standalone --nproc-per-node N -m bsprof.cli <argv>`` does).

    Returns:
        0 when every rank succeeded, else the first failing rank's exit code (1 if unknown).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc_per_node}", "--module", "bsprof.cli", *argv]
    )
    try:
        run(args)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values() if f.exitcode]
        return codes[0] if codes else 1
    return 0
