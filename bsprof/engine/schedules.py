"""Learning-rate schedules defined in data terms (samples or epochs), so every batch size sees the same one.

A schedule is a multiplier of the trial's peak LR (the LR of the scaling rule, see :mod:`bsprof.engine.lr`)
as a function of the number of training samples *consumed including the current step's batch*, ``c``:

* warm-up, ``c < W``: ``c / W`` (linear from ~0 to 1; the first step never gets LR 0);
* then ``constant``: 1; ``cosine``: ``r + (1 - r) (1 + cos(pi p)) / 2``; ``linear``: ``1 - (1 - r) p``, with
  progress ``p = min(1, (c - W) / (T - W))``, ``T`` the total length and ``r`` the final LR ratio.

Because the rule depends only on samples, a step at B=256 that ends at sample 2,048 gets exactly the LR that
the eighth step at B=32 gets. ``W`` and ``T`` may be given in epochs, converted with the training set's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["SCHEDULES", "UNITS", "LRSchedule"]

SCHEDULES = ("constant", "cosine", "linear")
UNITS = ("samples", "epochs")


@dataclass(frozen=True)
class LRSchedule:
    """Warm-up then constant, cosine or linear decay, lengths in samples or epochs.

    Attributes:
        kind: One of :data:`SCHEDULES`.
        warmup: Warm-up length ``W`` (in ``unit``); 0 for none.
        total: Length ``T`` at which the decay ends (in ``unit``, from the start of training, warm-up
            included); required by ``cosine`` and ``linear``; after it the factor stays at ``final_ratio``.
        unit: ``samples`` or ``epochs``.
        final_ratio: LR at the end of the decay as a fraction of the peak LR.
    """

    kind: str = "constant"
    warmup: float = 0.0
    total: float | None = None
    unit: str = "samples"
    final_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown LR schedule {self.kind!r}: expected one of {', '.join(SCHEDULES)}")
        if self.unit not in UNITS:
            raise ValueError(f"unknown schedule unit {self.unit!r}: expected one of {', '.join(UNITS)}")
        if self.warmup < 0:
            raise ValueError(f"warm-up must be >= 0, got {self.warmup}")
        if self.kind != "constant":
            if self.total is None:
                raise ValueError(f"a {self.kind} schedule needs its total length")
            if self.total <= self.warmup:
                raise ValueError(f"the schedule's total length {self.total} must exceed its warm-up {self.warmup}")
        if not 0 <= self.final_ratio <= 1:
            raise ValueError(f"final LR ratio must be in [0, 1], got {self.final_ratio}")

    def in_samples(self, n_train: int | None) -> LRSchedule:
        """The same schedule with lengths in samples (``n_train``: examples per epoch, needed for epochs)."""
        if self.unit == "samples":
            return self
        if not n_train:
            raise ValueError("a schedule in epochs needs the size of the training set")
        total = None if self.total is None else self.total * n_train
        return replace(self, warmup=self.warmup * n_train, total=total, unit="samples")

    @property
    def is_identity(self) -> bool:
        """Whether the factor is 1 throughout (no warm-up, constant)."""
        return self.kind == "constant" and self.warmup == 0

    def factor(self, samples: float) -> float:
        """The multiplier of the peak LR for the step whose batch brings consumption to ``samples``."""
        if self.unit != "samples":
            raise ValueError("convert the schedule with in_samples(n_train) first")
        w = self.warmup
        if samples < w:
            return samples / w
        if self.kind == "constant":
            return 1.0
        assert self.total is not None
        p = min(1.0, (samples - w) / (self.total - w))
        r = self.final_ratio
        if self.kind == "cosine":
            return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p))
        return 1 - (1 - r) * p

    @classmethod
    def parse(cls, text: str) -> LRSchedule:
        """A schedule from ``KIND[:key=value,...]``, keys ``warmup``, ``total``, ``unit`` and ``final``, e.g.
        ``cosine:warmup=2048,total=65536`` or ``linear:warmup=0.5,total=10,unit=epochs,final=0.1``.

        Raises:
            BadInput: Unknown kind or key, a value that is not a number, an inconsistent schedule.
        """
        from bsprof.errors import BadInput

        kind, _, rest = text.strip().partition(":")
        fields: dict[str, object] = {"kind": kind}
        names = {"warmup": "warmup", "total": "total", "unit": "unit", "final": "final_ratio"}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key.strip() not in names:
                raise BadInput(f"--lr-schedule {text!r}: expected key=value with keys {', '.join(names)}, got {item!r}")
            key = key.strip()
            try:
                fields[names[key]] = value.strip() if key == "unit" else float(value)
            except ValueError:
                raise BadInput(f"--lr-schedule {text!r}: {key} must be a number, got {value!r}") from None
        try:
            return cls(**fields)  # type: ignore[arg-type]
        except ValueError as e:
            raise BadInput(f"--lr-schedule {text!r}: {e}") from None

    def describe(self) -> str:
        """One line, e.g. ``cosine, warm-up 2048 samples, total 60000 samples``."""
        out = self.kind
        if self.warmup:
            out += f", warm-up {self.warmup:g} {self.unit}"
        if self.total is not None:
            out += f", total {self.total:g} {self.unit}"
        if self.final_ratio:
            out += f", final ratio {self.final_ratio:g}"
        return out
