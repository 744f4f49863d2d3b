"""The one training step, and the on-device index batcher that feeds it.

:class:`TrainingStep` is built fresh for every trial from the workload's factory (model, optimizer,
data), never mutated and restored. Calling it runs one whole step — gather a batch by index, forward,
loss, backward, optimizer step, zero_grad — and returns the loss tensor *without* synchronising, so the
timer decides when to wait for the device. The CLI, the convergence trial and the pytest-benchmark suite
all call this same object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bsprof.engine.device import autocast_context

if TYPE_CHECKING:
    from bsprof.engine.trial import EngineSettings, TrialSpec
    from bsprof.workload import Split, Workload

__all__ = ["IndexBatcher", "TrainingStep"]

# Epochs drawn ahead per refill: enough for this many indices, but at most _REFILL_MAX_EPOCHS permutations. A refill
# costs tens of microseconds beyond the permutations themselves, which at one epoch per refill (every few steps
# of a small dataset) is a few percent of a sub-millisecond step.
_REFILL_MIN_INDICES = 1 << 16
_REFILL_MAX_EPOCHS = 64


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
        compile: Wrap the model with ``torch.compile``.
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
    ) -> None:
        self.workload = workload
        self.batch_size = batch_size
        self.device = device
        self.model = workload.build_model(seed).to(device)
        self.model.train()
        self._forward = torch.compile(self.model) if compile else self.model
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
        precision (``compile`` overrides ``settings.compile``)."""
        return cls(
            workload,
            batch_size=spec.batch_size,
            seed=spec.seed,
            lr=spec.lr,
            device=settings.device,
            amp=settings.amp,
            compile=settings.compile if compile is None else compile,
        )

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every parameter group (for warm-up schedules)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self) -> torch.Tensor:
        """Run one training step; returns the unsynchronised loss tensor.

        The loss is returned as is (``detach()`` would cost ~1% of a 0.2 ms step): its graph was freed by
        ``backward()``, but detach it before accumulating it across steps.
        """
        idx = self.batcher.next()
        inputs = self.train.inputs[idx]
        targets = self.train.targets[idx]
        if self._autocast is None:
            loss = self.workload.loss(self._forward(inputs), targets)
        else:
            with self._autocast():
                loss = self.workload.loss(self._forward(inputs), targets)
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
