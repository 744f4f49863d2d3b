"""A user's training command as a sweepable job: the command template and how one trial fills it.

The command is a template (``python train.py --batch-size {batch_size} --lr {lr} --seed {seed}``): each
trial fills the placeholders (:data:`PLACEHOLDERS` and the user's own ``--param`` values) token by token, so
a value never splits a token. Running it is :mod:`bsprof.engine.script`'s job.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

from bsprof.engine.result import TrialSpec
from bsprof.engine.target import meets_target
from bsprof.errors import BadInput

__all__ = ["PLACEHOLDERS", "ScriptJob", "command_for", "trial_dir"]

PLACEHOLDERS = ("batch_size", "lr", "seed", "kind", "repeat", "trial_dir")
"""Placeholders every trial fills: global batch size, learning rate (the LR rule's), seed, trial kind,
throughput round, and the trial's folder (its log and events live there)."""


@dataclass(frozen=True)
class ScriptJob:
    """A user's training command, swept like a workload.

    Attributes:
        name: Name of the job in the store and the report (default: the script's file name).
        command: The command's tokens, with placeholders (:data:`PLACEHOLDERS` and ``params``' keys).
        params: The user's own placeholders and their values.
        base_lr: Learning rate at ``base_batch_size``, scaled by the LR rule (``{lr}``).
        base_batch_size: Batch size (samples) at which ``base_lr`` holds.
        max_lr: Cap of the LR rule (``None``: no cap).
        target: Validation metric to reach in convergence trials.
        higher_is_better: Direction of the metric.
        trial_timeout_s: Seconds after which a trial's process group is killed (``None``: no limit).
        log_dir: Folder of the trials' folders (logs and events).
        cwd: Working directory of the command (``None``: this process's).
        metric_name: What the script's evaluations report (for messages).
        metric_range: The metric's possible values, when known (``None``: unbounded).
    """

    name: str
    command: tuple[str, ...]
    params: dict[str, str] = field(default_factory=dict)
    base_lr: float = 0.1
    base_batch_size: int = 32
    max_lr: float | None = None
    target: float | None = None
    higher_is_better: bool = True
    trial_timeout_s: float | None = None
    log_dir: str = "reports/script-logs"
    cwd: str | None = None
    metric_name: str = "metric"
    metric_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not self.command:
            raise BadInput("empty training command: give e.g. --cmd 'python train.py --batch-size {batch_size}'")
        names = set(PLACEHOLDERS) | set(self.params)
        for token in self.command:
            for name in _placeholders(token):
                if name not in names:
                    known = ", ".join("{" + n + "}" for n in sorted(names))
                    raise BadInput(f"command placeholder {{{name}}} is unknown: use {known} or --param {name}=V")
        if not any("batch_size" in _placeholders(t) for t in self.command):
            raise BadInput("the command has no {batch_size} placeholder: every trial would run the same batch size")

    def config(self) -> dict[str, object]:
        """What identifies the job in a run's config hash (the log folder and timeout do not)."""
        return {
            "name": self.name,
            "command": list(self.command),
            "params": dict(sorted(self.params.items())),
            "base_lr": self.base_lr,
            "base_batch_size": self.base_batch_size,
            "target": self.target,
            "higher_is_better": self.higher_is_better,
            "cwd": self.cwd,
        }

    def has_reached_target(self, value: float, target: float) -> bool:
        """Whether ``value`` meets ``target`` in the metric's direction (:func:`~bsprof.engine.target.meets_target`)."""
        return meets_target(value, target, self.higher_is_better)


def _placeholders(token: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(token) if name is not None]
    except ValueError as e:
        raise BadInput(f"command token {token!r}: {e} (write {{{{ and }}}} for literal braces)") from None


def trial_dir(job: ScriptJob, spec: TrialSpec) -> Path:
    """The trial's own folder under the job's log folder."""
    return Path(job.log_dir) / f"{spec.kind}-B{spec.batch_size}-seed{spec.seed}-lr{spec.lr:g}-r{spec.repeat}"


def command_for(job: ScriptJob, spec: TrialSpec, folder: Path) -> list[str]:
    """The command of one trial: every token with its placeholders filled (a value never splits a token)."""
    values = {
        **job.params,
        "batch_size": spec.batch_size,
        "lr": f"{spec.lr:g}",
        "seed": spec.seed,
        "kind": spec.kind,
        "repeat": spec.repeat,
        "trial_dir": str(folder),
    }
    return [token.format_map(values) for token in job.command]
