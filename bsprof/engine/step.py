"""The one training step, and the on-device index batcher that feeds it.

:class:`TrainingStep` is built fresh for every trial from the workload's factory (model, optimizer,
data), never mutated and restored. Calling it runs one whole step — gather a batch by index, forward,
loss, backward, optimizer step, zero_grad — and returns the loss tensor *without* synchronising, so the
timer decides when to wait for the device. The CLI, the convergence trial and the pytest-benchmark suite
all call this same object.

A throughput trial times its steps from the trial's initial state: :meth:`TrainingStep.snapshot` keeps a copy
of the model's and the optimizer's state before the first step, and :meth:`TrainingStep.restore` puts it back
before every timed block (outside the timed region). Without it, a trial of ``--min-time`` seconds trains
for hundreds of epochs at the rule's learning rate into a state no convergence trial reaches (on the CPU,
weights and gradients drift into subnormal floats and the step slows down up to 2x).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bsprof.engine.device import autocast_context

if TYPE_CHECKING:
    from bsprof.engine.trial import EngineSettings, TrialSpec
    from bsprof.workload import Split, Workload

__all__ = ["IndexBatcher", "StepState", "TrainingStep", "flush_denormal"]

# Epochs drawn ahead per refill: enough for this many indices, but at most _REFILL_MAX_EPOCHS permutations. A refill
# costs tens of microseconds beyond the permutations themselves, which at one epoch per refill (every few steps
# of a small dataset) is a few percent of a sub-millisecond step.
_REFILL_MIN_INDICES = 1 << 16
_REFILL_MAX_EPOCHS = 64


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


class IndexBatcher:
    """Seeded batches of exactly ``batch_size`` indices, drawn on ``device`` without host copies.

    The index stream is a concatenation of seeded random permutations of ``range(n)`` (one per epoch), cut
    into consecutive batches: no example is dropped and every batch has the same size, even when
    ``batch_size`` does not divide ``n`` or exceeds it. Permutations are drawn on the CPU with a private
    generator (reproducible across devices) and moved to the device several epochs at a time (about 65,536
    indices, at most 64 epochs), so that refills do not show in the step time; the stream is the same.

    Args:
        n: Number of examples.
        batch_size: Samples per batch.
        seed: Seed of the permutations.
        device: Where the index tensors live.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n = n
        self.batch_size = batch_size
        self.device = device
        self._generator = torch.Generator().manual_seed(seed)
        self._buffer = torch.empty(0, dtype=torch.long, device=device)
        self._pos = 0
        self.samples_drawn = 0

    def _refill(self) -> None:
        rest = self._buffer[self._pos :]
        need = self.batch_size - rest.numel()
        ahead = min(-(-_REFILL_MIN_INDICES // self.n), _REFILL_MAX_EPOCHS)
        epochs = max(1, -(-need // self.n), ahead)
        perms = [torch.randperm(self.n, generator=self._generator) for _ in range(epochs)]
        self._buffer = torch.cat([rest, torch.cat(perms).to(self.device)])
        self._pos = 0

    def next(self) -> torch.Tensor:
        """The next batch of indices (a view into the current epoch's permutation where possible)."""
        if self._pos + self.batch_size > self._buffer.numel():
            self._refill()
        idx = self._buffer[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        self.samples_drawn += self.batch_size
        return idx

    @property
    def epochs(self) -> float:
        """Passes over the data so far (samples drawn / n)."""
        return self.samples_drawn / self.n


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
    ) -> None:
        self.workload = workload
        self.batch_size = batch_size
        self.device = device
        self.model = workload.build_model(seed).to(device)
        self.model.train()
        self._forward = torch.compile(self.model, dynamic=False, backend=compile_backend) if compile else self.model
        self.optimizer = workload.make_optimizer(self.model.parameters(), lr)
        self.train: Split = workload.train_split().to(device)
        self.batcher = IndexBatcher(len(self.train), batch_size, seed, device)
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
        idx = torch.arange(self.batch_size, device=self.device) % len(self.train)
        buffers = {k: v.detach().clone() for k, v in self.model.named_buffers()}
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        loss = self._loss(self.train.inputs[idx], self.train.targets[idx])
        (loss if self._scaler is None else self._scaler.scale(loss)).backward()
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
        ``backward()``, but detach it before accumulating it across steps.
        """
        idx = self.batcher.next()
        loss = self._loss(self.train.inputs[idx], self.train.targets[idx])
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

    @property
    def samples_done(self) -> int:
        """Training samples consumed so far."""
        return self.batcher.samples_drawn
