"""Learning-rate scaling rules relative to a workload's base LR at its base batch size.

* ``fixed``: the base LR at every batch size.
* ``linear``: ``base_lr * B / base_B`` (Goyal et al. 2017), capped at the workload's ``max_lr``.
* ``sqrt``: ``base_lr * sqrt(B / base_B)`` (Hoffer et al. 2017), capped likewise.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from bsprof.errors import BadInput

if TYPE_CHECKING:
    from bsprof.workload import Workload

__all__ = ["LR_RULES", "scaled_lr"]

LR_RULES = ("fixed", "linear", "sqrt")


def scaled_lr(workload: Workload, batch_size: int, rule: str = "linear", *, base_lr: float | None = None) -> float:
    """The learning rate for ``batch_size`` under ``rule``.

    Args:
        workload: Supplies ``base_lr``, ``base_batch_size`` and the cap ``max_lr``.
        batch_size: Samples per step.
        rule: One of :data:`LR_RULES`.
        base_lr: Override of the workload's base LR.
    """
    if rule not in LR_RULES:
        raise BadInput(f"unknown --lr-rule {rule!r}: expected one of {', '.join(LR_RULES)}")
    lr = workload.base_lr if base_lr is None else base_lr
    ratio = batch_size / workload.base_batch_size
    if rule == "linear":
        lr *= ratio
    elif rule == "sqrt":
        lr *= math.sqrt(ratio)
    if rule != "fixed" and workload.max_lr is not None:
        lr = min(lr, workload.max_lr)
    return float(f"{lr:.6g}")
