"""When a sequence of evaluations reaches the target: the rule of every convergence trial.

A pure accumulator over evaluations in step order. The target counts as reached at the first of
``patience`` consecutive evaluations at or above it (below it when lower is better); that evaluation's
step, samples and training seconds are the trial's ``*_to_target``, and the evaluation before it is the
bracket (``bracket_steps``): the target was crossed somewhere in between. A fall back below the target
after having been above it is counted (``target_fallbacks``).

It is the same rule whether bsprof owns the training loop or a user's script reports its evaluations
through the tracker, and it is used on both sides of a script trial (the child, to know when it may stop;
the parent, to store the result), so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TargetWatch"]


@dataclass
class TargetWatch:
    """Feed evaluations with :meth:`observe`; read :attr:`reached` and :attr:`fallbacks`.

    Attributes:
        target: The metric value to reach.
        patience: Consecutive evaluations at or above target that count (1 = the first crossing).
        higher_is_better: Direction of the metric.
        reached: The evaluation row where the target counts as reached (the first of the streak), or ``None``.
        fallbacks: Times the metric fell back below target after having been at or above it.
        evaluations: Evaluations observed.
    """

    target: float
    patience: int = 1
    higher_is_better: bool = True
    reached: dict[str, Any] | None = None
    fallbacks: int = 0
    evaluations: int = 0
    _streak: int = field(default=0, repr=False)
    _streak_start: dict[str, Any] | None = field(default=None, repr=False)
    _above_before: bool = field(default=False, repr=False)
    _prev_step: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")

    def meets(self, value: float) -> bool:
        """Whether ``value`` is at or beyond the target in the metric's direction."""
        return value >= self.target if self.higher_is_better else value <= self.target

    def observe(self, row: dict[str, Any]) -> bool:
        """Take one evaluation (``step`` and ``val_metric`` required); sets ``row["bracket_step"]`` to the
        previous evaluation's step. Returns whether the target has been reached (now or before)."""
        row["bracket_step"] = self._prev_step
        self._prev_step = int(row["step"])
        self.evaluations += 1
        above = self.meets(float(row["val_metric"]))
        if self._above_before and not above:
            self.fallbacks += 1
        self._above_before = above
        if above:
            if self._streak == 0:
                self._streak_start = row
            self._streak += 1
            if self.reached is None and self._streak >= self.patience:
                self.reached = self._streak_start
        else:
            self._streak = 0
        return self.reached is not None
