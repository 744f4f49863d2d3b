"""What a script trial's parent asks of the child, and how the child reports back.

The parent (:mod:`bsprof.engine.script`) passes a :class:`TrialOrder` to the child in the environment
variable :data:`ENV_VAR` (JSON). The child's tracker (:mod:`bsprof.tracker`) appends one JSON object per
line to the order's ``report`` file, which the parent created and owns; each line is written with a
single ``write`` on a file opened in append mode, so a child killed at any moment leaves at most one
incomplete last line, which :func:`read_events` ignores. The child never touches the store.

Events (``event`` key): ``start`` (the tracker is live), ``throughput`` (the timed window: block times and
memory), ``eval`` (one evaluation), ``diverged``, ``exception`` (an uncaught exception, with ``oom``),
``end`` (the tracker closed: totals and memory).

This module imports nothing heavy: the child imports it inside the user's script.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "PROTOCOL_VERSION", "TrialOrder", "append_event", "read_events"]

ENV_VAR = "BSPROF_TRIAL"
"""Environment variable holding the JSON :class:`TrialOrder` of the trial a child runs."""

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class TrialOrder:
    """One trial as the child sees it.

    Attributes:
        report: Path of the events file (JSON lines) the parent reads.
        workload: The sweep's name for the script.
        kind: ``throughput`` or ``convergence``.
        batch_size: Global samples per optimizer step.
        seed: The trial's seed.
        lr: The trial's learning rate.
        repeat: Throughput round.
        timing: :class:`~bsprof.engine.timing.TimingSettings` fields (throughput trials).
        target: Metric to reach (convergence trials; ``None``: report evaluations only).
        patience: Consecutive evaluations at or above target that count.
        higher_is_better: Direction of the metric.
        max_steps: Step budget of a convergence trial (``None``: the script's own).
        max_time_s: Training seconds budget of a convergence trial (``None``: the script's own).
        continue_after_target: Do not ask the script to stop at the target.
        explode_factor: A loss above this multiple of the first step's loss counts as diverged.
        version: :data:`PROTOCOL_VERSION`.
    """

    report: str
    workload: str
    kind: str
    batch_size: int
    seed: int
    lr: float
    repeat: int = 0
    timing: dict[str, Any] = field(default_factory=dict)
    target: float | None = None
    patience: int = 1
    higher_is_better: bool = True
    max_steps: int | None = None
    max_time_s: float | None = None
    continue_after_target: bool = False
    explode_factor: float = 10.0
    version: int = PROTOCOL_VERSION

    def to_env(self) -> str:
        """The JSON value of :data:`ENV_VAR`."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env(cls, text: str) -> TrialOrder:
        """Parse :data:`ENV_VAR`; raises ``ValueError`` on anything bsprof did not write."""
        try:
            data = json.loads(text)
            order = cls(**data)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{ENV_VAR} is not a bsprof trial order: {e}") from None
        if order.version != PROTOCOL_VERSION:
            raise ValueError(f"{ENV_VAR} has protocol version {order.version}, this bsprof speaks {PROTOCOL_VERSION}")
        return order


def append_event(fd: int, event: dict[str, Any]) -> None:
    """Append ``event`` as one JSON line with a single ``write`` (``fd`` opened with ``O_APPEND``)."""
    data = (json.dumps(event, allow_nan=True) + "\n").encode()
    written = os.write(fd, data)
    if written != len(data):  # regular files write everything or raise; a short write would corrupt a line
        raise OSError(f"short write to the bsprof report ({written} of {len(data)} bytes)")


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The complete events of a report file, in order; an incomplete or garbled last line (a child killed
    mid-write) is left out. A missing file has no events."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    events = []
    for line in raw.split(b"\n")[:-1]:  # the part after the last newline is incomplete
        try:
            event = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events
