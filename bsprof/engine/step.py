"""The one training step.

:class:`TrainingStep` is built fresh for every trial from the workload's factory (model, optimizer,
data), never mutated and restored. Calling it runs one whole optimizer step — the next global batch from the
trial's batch source (:mod:`bsprof.engine.data`), forward, loss, backward, optimizer step, zero_grad — and
returns the loss tensor *without* synchronising, so the timer decides when to wait for the device. The CLI,
the convergence trial and the pytest-benchmark suite all call this same object.

Two paths, one step. The *fast path* — an in-memory :class:`~bsprof.workload.Split` of plain tensors, the
default ``compute_loss``, no accumulation and no LR schedule — gathers the batch by index on the device and
calls ``workload.loss(model(inputs), targets)`` inline (harness overhead matters at sub-millisecond steps).
The *general path* takes any batch source and structure: it moves the batch to the device as a whole, cuts
it into micro-batches when accumulating (:mod:`bsprof.engine.accumulation`), calls
``workload.compute_loss(model, batch)``, and sets the LR of the schedule (:mod:`bsprof.engine.schedules`) or
steps the workload's scheduler.

A throughput trial times its steps from the trial's initial state: :meth:`TrainingStep.snapshot` keeps a copy
of the model's and the optimizer's state before the first step, and :meth:`TrainingStep.restore` puts it back
before every timed block (outside the timed region). Without it, a trial of ``--min-time`` seconds trains
for hundreds of epochs at the rule's learning rate into a state no convergence trial reaches (on the CPU,
weights and gradients drift into subnormal floats and the step slows down up to 2x). The batch stream is not
part of the state: batches keep coming from the same source.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bsprof.engine.accumulation import AccumulationPlan, accumulate
from bsprof.engine.batches import slice_batch, split_batch, to_device
from bsprof.engine.data import IndexBatcher, SplitSource, make_source
from bsprof.engine.device import autocast_context
from bsprof.workload import Workload

if TYPE_CHECKING:
    from bsprof.engine.schedules import LRSchedule
    from bsprof.engine.trial import EngineSettings, TrialSpec
    from bsprof.workload import Split

__all__ = ["IndexBatcher", "StepState", "TrainingStep", "flush_denormal"]


@contextmanager
def flush_denormal(enabled: bool) -> Iterator[None]:
    """Within the block, flush subnormal floats to zero on the CPU if ``enabled`` (off again afterwards).

    ``torch.set_flush_denormal`` is process-wide and takes effect only on x86 CPUs with SSE3 (elsewhere torch
    returns ``False`` and nothing changes). bsprof leaves it off by default, as PyTorch does.
    """
    if not enabled:
        yield
        return
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


@dataclass(frozen=True)
class StepState:
    """A copy of a training step's model and optimizer state (and gradient scaler), for :meth:`TrainingStep.restore`.

    Attributes:
        model: ``model.state_dict()``, copied to the CPU.
        optimizer: ``optimizer.state_dict()``, deep-copied to the CPU.
        scaler: ``GradScaler.state_dict()``, or ``None`` without a scaler.
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any] | None


def _host_copy(obj: Any) -> Any:
    """A deep copy of a state dict with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return copy.deepcopy(obj)


class TrainingStep:
    """One trial's model, optimizer and data, and the training step over them.

    Args:
        workload: Supplies model, data, loss and optimizer.
        batch_size: Samples per step.
        seed: Seeds the model initialisation and the batch order.
        lr: Learning rate given to the workload's optimizer factory.
        device: Where model and data live.
        amp: ``off``, ``bf16`` or ``fp16`` (fp16 on CUDA uses a gradient scaler).
        compile: Wrap the model with ``torch.compile`` (static shapes: every batch of a trial has one shape).
        compile_backend: ``torch.compile``'s ``backend``.
        micro_batch_size: Samples per forward/backward pass; below ``batch_size`` the step accumulates
            gradients over ``ceil(batch_size / micro_batch_size)`` passes (``None``: one pass).
        schedule: LR schedule in samples or epochs, a multiplier of ``lr`` (``None``: constant ``lr``).
    """

    def __init__(
        self,
        workload: Workload,
        *,
        batch_size: int,
        seed: int,
        lr: float,
        device: torch.device,
        amp: str = "off",
        compile: bool = False,
        compile_backend: Any = "inductor",
        micro_batch_size: int | None = None,
        schedule: LRSchedule | None = None,
    ) -> None:
        self.workload = workload
        self.batch_size = batch_size
        self.device = device
        self.model = workload.build_model(seed).to(device)
        self.model.train()
        self._forward = torch.compile(self.model, dynamic=False, backend=compile_backend) if compile else self.model
        self.optimizer = workload.make_optimizer(self.model.parameters(), lr)
        self.lr = lr
        self._seed = seed
        self.source = make_source(workload, batch_size, seed, device)
        self.plan = AccumulationPlan.for_batch(batch_size, micro_batch_size)
        self._weights = self.plan.weights(workload.loss_reduction)
        self._schedule = None if schedule is None or schedule.is_identity else schedule.in_samples(self.n_train)
        self._scheduler = workload.make_scheduler(self.optimizer, batch_size)
        self._non_blocking = device.type == "cuda"
        # The in-memory split (None for a Dataset or loader) and its batcher, used by the fast path.
        self.train: Split | None = self.source.split if isinstance(self.source, SplitSource) else None
        self.batcher: IndexBatcher | None = self.source.batcher if isinstance(self.source, SplitSource) else None
        self._general = not (
            self.train is not None
            and isinstance(self.train.inputs, torch.Tensor)
            and isinstance(self.train.targets, torch.Tensor)
            and type(workload).compute_loss is Workload.compute_loss
            and not self.plan.accumulating
            and self._schedule is None
            and self._scheduler is None
        )
        autocast = autocast_context(device, amp)  # also validates ``amp``
        # None when off: entering even a nullcontext every step costs ~0.5-1% of a 0.2 ms step.
        self._autocast = None if amp == "off" else autocast
        self._scaler = torch.amp.GradScaler(device.type) if amp == "fp16" and device.type == "cuda" else None
        self.steps_done = 0

    @classmethod
    def for_trial(
        cls, workload: Workload, spec: TrialSpec, settings: EngineSettings, *, compile: bool | None = None
    ) -> TrainingStep:
        """The training step of one trial: ``spec``'s batch size, seed and LR on ``settings``' device and
        precision (``compile`` overrides ``settings.compile``); under DDP when ``settings.data_parallel`` is set
        (:mod:`bsprof.engine.distributed`)."""
        kwargs: dict[str, Any] = {
            "batch_size": spec.batch_size,
            "seed": spec.seed,
            "lr": spec.lr,
            "device": settings.device,
            "amp": settings.amp,
            "compile": settings.compile if compile is None else compile,
            "compile_backend": settings.compile_backend,
            "micro_batch_size": settings.micro_batch_size,
            "schedule": settings.lr_schedule,
        }
        if settings.data_parallel is not None:
            return settings.data_parallel.build_step(workload, spec.kind, **kwargs)
        return cls(workload, **kwargs)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and loss, under autocast when mixed precision is on."""
        if self._autocast is None:
            return self.workload.loss(self._forward(inputs), targets)
        with self._autocast():
            return self.workload.loss(self._forward(inputs), targets)

    def warm_up_compiled(self) -> None:
        """Compile the forward and backward graphs now: one forward and backward on a batch of the trial's
        shape, with no optimizer step, after which parameters, buffers (e.g. batch-norm statistics),
        gradients, the RNG and the batch order are as they were. Nothing to do without ``compile``."""
        if self._forward is self.model:
            return
        buffers = {k: v.detach().clone() for k, v in self.model.named_buffers()}
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        if not self._general:
            idx = torch.arange(self.batch_size, device=self.device) % len(self.train)  # type: ignore[arg-type]
            loss = self._loss(self.train.inputs[idx], self.train.targets[idx])  # type: ignore[union-attr]
            (loss if self._scaler is None else self._scaler.scale(loss)).backward()
        else:
            # Every micro-batch shape of a step (the last one may be smaller), from a throwaway source.
            source = make_source(self.workload, self.plan.micro_batch_size, self._seed, self.device)
            try:
                first = source.next()
            finally:
                source.close()
            for size in sorted(set(self.plan.sizes)):
                self._backward(self._loss_of(slice_batch(first, 0, size)))
        self.model.zero_grad(set_to_none=True)
        with torch.no_grad():
            named = dict(self.model.named_buffers())
            for k, v in buffers.items():
                named[k].copy_(v)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    def agree(self, means: tuple[float, ...], maxima: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Values every process of the trial must decide on alike: ``means`` averaged and ``maxima`` maximised
        over the processes. One process: returned as they are (a data-parallel step reduces them over ranks)."""
        return means, maxima

    def gradient_norms(self) -> dict[str, float | int] | None:
        """The data-parallel noise-scale sample since the last call (see
        :class:`~bsprof.engine.distributed.DataParallelStep`); ``None`` in one process."""
        return None

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group (for warm-up schedules)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def snapshot(self) -> StepState:
        """A copy of the model's and optimizer's current state, in host memory (so a GPU trial's allocator
        peak is its training's own). The data order is not part of it: batches keep coming from the stream."""
        return StepState(
            model=_host_copy(self.model.state_dict()),
            optimizer=_host_copy(self.optimizer.state_dict()),
            scaler=None if self._scaler is None else copy.deepcopy(self._scaler.state_dict()),
        )

    def restore(self, state: StepState) -> None:
        """Put the model and optimizer back into ``state`` (in place for the weights; the optimizer's buffers
        are rebuilt as after :meth:`snapshot`, e.g. none before the first step)."""
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(state.model[k])
        self.optimizer.load_state_dict(copy.deepcopy(state.optimizer))
        if self._scaler is not None and state.scaler is not None:
            self._scaler.load_state_dict(state.scaler)

    def __call__(self) -> torch.Tensor:
        """Run one training step; returns the unsynchronised loss tensor.

        The loss is returned as is (``detach()`` would cost ~1% of a 0.2 ms step): its graph was freed by
        ``backward()``, but detach it before accumulating it across steps. With accumulation it is the loss of
        the whole global batch (the weighted sum of the micro-batch losses).
        """
        if self._general:
            return self._general_step()
        idx = self.batcher.next()  # type: ignore[union-attr]
        loss = self._loss(self.train.inputs[idx], self.train.targets[idx])  # type: ignore[union-attr]
        if self._scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self._scaler.scale(loss).backward()
            self._scaler.step(self.optimizer)
            self._scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        return loss

    def _general_step(self) -> torch.Tensor:
        batch = self.source.next()
        if self._schedule is not None:
            self.set_lr(self.lr * self._schedule.factor(self.source.samples_drawn))
        if self.plan.accumulating:
            pieces = split_batch(batch, self.plan.micro_batch_size)
            loss = accumulate(pieces, self._loss_of, self._weights, backward=self._backward)
        else:
            loss = self._loss_of(batch)
            self._backward(loss)
        if self._scaler is None:
            self.optimizer.step()
        else:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self._scheduler is not None:
            self._scheduler.step()
        self.steps_done += 1
        return loss

    def _loss_of(self, batch: Any) -> torch.Tensor:
        """Move ``batch`` to the device and compute its loss with the workload's ``compute_loss``."""
        batch = to_device(batch, self.device, non_blocking=self._non_blocking)
        if self._autocast is None:
            return self.workload.compute_loss(self._forward, batch)
        with self._autocast():
            return self.workload.compute_loss(self._forward, batch)

    def _backward(self, loss: torch.Tensor) -> None:
        if self._scaler is None:
            loss.backward()
        else:
            self._scaler.scale(loss).backward()

    @property
    def samples_done(self) -> int:
        """Training samples consumed so far."""
        return self.source.samples_drawn

    @property
    def epochs(self) -> float | None:
        """Passes over the training data so far (``None`` when its length is unknown)."""
        return self.source.epochs

    @property
    def n_train(self) -> int | None:
        """Training examples (``None`` for a loader over data of unknown length)."""
        return self.source.n_examples

    def close(self) -> None:
        """Release the batch source (loader workers)."""
        self.source.close()

    def batching_metrics(self) -> dict[str, int]:
        """``micro_batch_size`` (samples per forward/backward pass) and ``accumulation_steps`` (passes per
        optimizer step) of this trial."""
        return {"micro_batch_size": self.plan.micro_batch_size, "accumulation_steps": self.plan.steps}
