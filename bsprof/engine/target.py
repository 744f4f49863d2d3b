"""When a sequence of evaluations reaches the target: the one rule of every convergence trial.

A pure accumulator over evaluations in step order. The target counts as reached at the first of
``patience`` consecutive evaluations at or above it (below it when lower is better); that evaluation's
step, samples and training seconds are the trial's ``*_to_target``, and the evaluation before it is the
bracket (``bracket_steps``): the target was crossed somewhere in between. A fall back below the target
after having been above it is counted (``target_fallbacks``). Whether one value meets the target is
:func:`meets_target`: in float64, within a relative :data:`TARGET_RTOL` (so a metric computed in float32
that equals the target reaches it: 342/360 in float32 is 0.949999988).

It is the same object whether bsprof owns the training loop (:mod:`bsprof.engine.convergence`, which passes
the workload's own :meth:`~bsprof.workload.Workload.has_reached_target`) or a user's script reports its
evaluations through the tracker, and it is used on both sides of a script trial (the child, to know when it
may stop; the parent, to store the result), so none of them can disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TARGET_RTOL", "TargetWatch", "meets_target"]

TARGET_RTOL = 1e-6
"""Relative tolerance of :func:`meets_target`: absorbs float32 rounding of user metrics, far below any real
difference."""


def meets_target(value: float, target: float, higher_is_better: bool = True) -> bool:
    """Whether a metric value meets the target in the metric's direction, in float64 and within a relative
    :data:`TARGET_RTOL` of it."""
    slack = TARGET_RTOL * abs(target)
    return value >= target - slack if higher_is_better else value <= target + slack


@dataclass
class TargetWatch:
    """Feed evaluations with :meth:`observe`; read :attr:`reached` and :attr:`fallbacks`.

    Attributes:
        target: The metric value to reach.
        patience: Consecutive evaluations at or above target that count (1 = the first crossing).
        higher_is_better: Direction of the metric.
        rule: ``rule(value, target)``: whether a value meets the target (``None``: :func:`meets_target` in
            ``higher_is_better``'s direction; native trials pass the workload's ``has_reached_target``).
        reached: The evaluation row where the target counts as reached (the first of the streak), or ``None``.
        fallbacks: Times the metric fell back below target after having been at or above it.
        evaluations: Evaluations observed.
    """

    target: float
    patience: int = 1
    higher_is_better: bool = True
    rule: Callable[[float, float], bool] | None = field(default=None, repr=False)
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
        if self.rule is not None:
            return self.rule(value, self.target)
        return meets_target(value, self.target, self.higher_is_better)

    def observe(self, row: dict[str, Any]) -> bool:
        """Take one evaluation (``step`` and ``val_metric`` required); sets ``row["bracket_step"]`` to the
        previous evaluation's step (0 before the first). Returns whether the target has been reached (now or
        before)."""
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

    def to_target(self) -> dict[str, Any]:
        """The trial's target metrics: ``reached_target``, ``steps_to_target``, ``samples_to_target``,
        ``time_to_target_s`` (the reached row's ``train_s``), ``bracket_steps`` and ``target_fallbacks``
        (``None`` where not reached)."""
        r = self.reached
        return {
            "reached_target": r is not None,
            "steps_to_target": r["step"] if r else None,
            "samples_to_target": r["samples"] if r else None,
            "time_to_target_s": r["train_s"] if r else None,
            "bracket_steps": r["bracket_step"] if r else None,
            "target_fallbacks": self.fallbacks,
        }
