"""Gradient accumulation: one optimizer step over a global batch of B examples run as micro-batches.

A trial's batch size is the *global* batch B. With a micro-batch size m < B the step runs
``k = ceil(B / m)`` forward/backward passes over consecutive slices of the batch (the last one smaller when
m does not divide B), accumulating gradients, then one optimizer step.

Loss scaling makes the accumulated step equal the full-batch step. If the loss is a *mean* over the
examples of its batch (``reduction="mean"``, PyTorch's default), the full-batch loss is
``L = (1/B) sum_i l_i = sum_j (m_j / B) L_j`` where ``L_j`` is the mean loss of micro-batch j of ``m_j``
examples; so each micro-batch's loss is scaled by ``m_j / B`` before its backward pass, which also weights an
uneven last micro-batch correctly. If the loss is a *sum* over examples (``reduction="sum"``), the
full-batch loss is the plain sum of the micro-batch losses (weight 1). Equality is exact up to floating-point
summation order, except where the model itself couples the examples of a batch (batch normalisation
statistics are computed per micro-batch) or the loss is a mean over something other than examples (tokens of
padded sequences: weight by examples is then an approximation; return a sum and divide yourself for
exactness).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["REDUCTIONS", "AccumulationPlan", "accumulate"]

REDUCTIONS = ("mean", "sum")


@dataclass(frozen=True)
class AccumulationPlan:
    """How a global batch is cut into micro-batches.

    Attributes:
        batch_size: The global batch (samples per optimizer step).
        micro_batch_size: Samples per forward/backward pass (``batch_size`` when not accumulating).
    """

    batch_size: int
    micro_batch_size: int

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError(f"need batch_size >= 1 and micro_batch_size >= 1, got {self}")

    @classmethod
    def for_batch(cls, batch_size: int, micro_batch_size: int | None) -> AccumulationPlan:
        """The plan for ``batch_size`` with at most ``micro_batch_size`` samples per pass (``None``: one pass)."""
        m = batch_size if micro_batch_size is None else min(micro_batch_size, batch_size)
        return cls(batch_size, m)

    @property
    def steps(self) -> int:
        """Forward/backward passes per optimizer step (accumulation steps)."""
        return math.ceil(self.batch_size / self.micro_batch_size)

    @property
    def accumulating(self) -> bool:
        """Whether a step runs more than one pass."""
        return self.micro_batch_size < self.batch_size

    @property
    def sizes(self) -> tuple[int, ...]:
        """Samples of each micro-batch, in order (all ``micro_batch_size`` but possibly the last)."""
        full, rest = divmod(self.batch_size, self.micro_batch_size)
        return (self.micro_batch_size,) * full + ((rest,) if rest else ())

    def weights(self, reduction: str = "mean") -> tuple[float, ...]:
        """Factor applied to each micro-batch's loss so that the summed gradients equal the full batch's.

        Args:
            reduction: ``mean`` (the loss averages over its examples: weight ``m_j / B``) or ``sum``
                (weight 1).
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown loss reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
        if reduction == "sum":
            return (1.0,) * self.steps
        return tuple(m / self.batch_size for m in self.sizes)


def accumulate(
    micro_batches: Sequence[Any],
    loss_of: Callable[[Any], torch.Tensor],
    weights: Sequence[float],
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """Forward and backward every micro-batch with its loss scaled by its weight; gradients accumulate.

    Args:
        micro_batches: The slices of the global batch, in order.
        loss_of: The loss of one micro-batch (forward pass included).
        weights: One factor per micro-batch (see :meth:`AccumulationPlan.weights`).
        backward: Runs the backward pass of a scaled loss (e.g. through a gradient scaler).

    Returns:
        The loss of the whole global batch (the weighted sum of the micro-batch losses), detached.
    """
    if len(micro_batches) != len(weights):
        raise ValueError(f"{len(micro_batches)} micro-batches but {len(weights)} weights")
    total: torch.Tensor | None = None
    for piece, w in zip(micro_batches, weights):
        loss = loss_of(piece)
        scaled = loss * w if w != 1.0 else loss
        backward(scaled)
        part = scaled.detach()
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no micro-batches")
    return total
