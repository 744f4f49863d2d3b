"""Taking the gradient norms that the noise-scale estimator (:mod:`bsprof.noise_scale`) needs.

:class:`GradientNoiseProbe` measures, at the model's current parameters, the squared gradient norms at a small
and a big batch size, *beside* training: it draws its own batches with a private seeded generator (the
training batch stream is untouched), computes gradients with :func:`torch.autograd.grad` (``.grad`` and the
optimizer are untouched), runs the model through :func:`torch.func.functional_call` on copies of its buffers
(BatchNorm running statistics are untouched) and inside :func:`torch.random.fork_rng` (dropout draws do not
shift the training's random stream). A trial with a probe therefore trains exactly as one without.

Two paths:

- ``micro`` (default, any model): a batch of B examples drawn *with replacement* is split into B/b micro-batches
  of b; the mean of their squared gradient norms is |G_b|² and the squared norm of the mean of their gradients
  is |G_B|² (exact for a mean-reduced loss over equal micro-batches). Cost: about one forward and backward
  over B examples, in B/b calls.
- ``per_example`` (small models, a cross-check): per-example gradients with ``torch.func`` (``vmap`` over
  ``grad`` of a ``functional_call``); b = 1. Models whose forward couples examples (BatchNorm in training
  mode) cannot be split per example and raise.

Sampling with replacement makes E|G_b|² = |G|² + tr(Σ)/b exact for the training set's population covariance,
so no finite-population correction is needed. Batches taken from training itself (without replacement within
an epoch) carry ``population_size`` instead; so do data-parallel trials, where the per-rank gradients are the
small batches and DDP's all-reduced gradient — the *average* of the ranks' gradients — is the big one
(:func:`data_parallel_sample`).

Caveats: a model whose loss couples examples (BatchNorm) has no per-example gradient; the micro path then
measures the noise of micro-batch-normalised gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch.func import functional_call, grad, vmap

from bsprof.noise_scale import GradientNormSample

__all__ = ["GradientNoiseProbe", "data_parallel_sample", "squared_norm"]

Method = Literal["micro", "per_example"]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sq(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares of ``t``, accumulated in at least float32 (float64 stays float64)."""
    t = t.detach()
    return (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).pow(2).sum()


def squared_norm(tensors: Sequence[torch.Tensor]) -> float:
    """Sum of squares over all elements of ``tensors`` (one device sync)."""
    if not tensors:
        return 0.0
    return float(torch.stack([_sq(t).double() for t in tensors]).sum())


def data_parallel_sample(
    rank_sq_norms: Sequence[float],
    reduced_sq_norm: float,
    *,
    per_rank_batch_size: int,
    population_size: int | None = None,
    step: int | None = None,
) -> GradientNormSample:
    """The sample of one data-parallel step: per-rank gradients are the small batches, the all-reduced one the big.

    DDP averages the ranks' gradients, so with a mean-reduced loss over equal per-rank batches the all-reduced
    gradient is the mean gradient over world_size × per-rank batch examples. Each rank's squared norm must be
    taken *before* the all-reduce (e.g. in a DDP communication hook) and gathered (one scalar all-reduce).

    Args:
        rank_sq_norms: |g_r|² of every rank's local gradient (world size = its length, at least 2).
        reduced_sq_norm: |mean_r g_r|², the squared norm of the all-reduced gradient.
        per_rank_batch_size: Examples per rank per step.
        population_size: Training-set size when the ranks' batches are drawn without replacement from it.
        step: Training step of the sample.

    Returns:
        A :class:`~bsprof.noise_scale.GradientNormSample` with b = per-rank batch and B = global batch.
    """
    world_size = len(rank_sq_norms)
    if world_size < 2:
        raise ValueError("a data-parallel sample needs at least two ranks")
    return GradientNormSample(
        small_batch_size=per_rank_batch_size,
        big_batch_size=per_rank_batch_size * world_size,
        small_sq_norm=sum(rank_sq_norms) / world_size,
        big_sq_norm=reduced_sq_norm,
        population_size=population_size,
        step=step,
    )


class GradientNoiseProbe:
    """Measures |G_b|² and |G_B|² beside training, leaving the training step's result unchanged.

    Args:
        model: The trained model (not a ``torch.compile`` wrapper); its parameters are read, never written.
        loss: The workload's loss ``loss(outputs, targets)``, reduced by the mean over the batch.
        inputs: Training inputs (first dimension indexes examples), on the model's device.
        targets: Training targets, on the same device.
        batch_size: B, examples per measurement (at least 2).
        micro_batch_size: b for the ``micro`` path (divides B, smaller than B); ignored by ``per_example``.
        seed: Seed of the probe's private batch generator.
        method: ``micro`` or ``per_example``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss: LossFn,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        batch_size: int,
        micro_batch_size: int | None = None,
        seed: int = 0,
        method: Method = "micro",
    ) -> None:
        if method not in ("micro", "per_example"):
            raise ValueError(f"method must be 'micro' or 'per_example', got {method!r}")
        if batch_size < 2:
            raise ValueError(f"the probe's batch size must be >= 2, got {batch_size}")
        b = 1 if method == "per_example" else (micro_batch_size or max(1, batch_size // 8))
        if method == "micro" and (b >= batch_size or batch_size % b):
            raise ValueError(f"micro_batch_size must divide batch_size and be smaller: b={b}, B={batch_size}")
        self.model = model
        self.loss = loss
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.micro_batch_size = b
        self.method = method
        self._generator = torch.Generator().manual_seed(seed)
        self.measurements = 0

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, self.inputs.shape[0], (self.batch_size,), generator=self._generator)
        idx = idx.to(self.inputs.device)
        return self.inputs[idx], self.targets[idx]

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}  # BatchNorm updates these copies
        return params, buffers

    def _micro(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        params, buffers = self._state()
        names = list(params)
        total: list[torch.Tensor] | None = None
        small_sq: list[torch.Tensor] = []
        b = self.micro_batch_size
        for start in range(0, self.batch_size, b):
            out = functional_call(self.model, (params, buffers), (x[start : start + b],))
            grads = torch.autograd.grad(self.loss(out, y[start : start + b]), [params[n] for n in names])
            small_sq.append(torch.stack([_sq(g).double() for g in grads]).sum())
            total = [g.detach().clone() for g in grads] if total is None else [t + g for t, g in zip(total, grads)]
        assert total is not None
        k = self.batch_size // b
        big = squared_norm([t / k for t in total])
        return float(torch.stack(small_sq).mean()), big

    def _per_example(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        params, buffers = self._state()
        detached = {n: p.detach() for n, p in params.items()}

        def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            out = functional_call(self.model, (p, buffers), (xi.unsqueeze(0),))
            return self.loss(out, yi.unsqueeze(0))

        per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))(detached, x, y)
        flat = torch.cat([g.detach().reshape(self.batch_size, -1).double() for g in per_example.values()], dim=1)
        small = float(flat.pow(2).sum(dim=1).mean())
        big = float(flat.mean(dim=0).pow(2).sum())
        return small, big

    def measure(self, step: int | None = None) -> GradientNormSample:
        """One sample at the model's current parameters, from a freshly drawn batch.

        Args:
            step: Training step to record with the sample.

        Returns:
            The :class:`~bsprof.noise_scale.GradientNormSample` (sampling with replacement: no population).
        """
        devices = [self.inputs.device] if self.inputs.device.type == "cuda" else []
        x, y = self._draw()
        with torch.random.fork_rng(devices=devices):
            small, big = self._per_example(x, y) if self.method == "per_example" else self._micro(x, y)
        self.measurements += 1
        return GradientNormSample(self.micro_batch_size, self.batch_size, small, big, None, step)
