"""What a trial is and what it produced: the types every trial runner returns and the store keeps.

A :class:`TrialSpec` names the measurement (its key in the store), a :class:`TrialResult` holds its
outcome: a status from :data:`STATUSES`, the export columns it measured (``metrics``, SI units in the
names), why the missing ones are missing, and :class:`TrialExtra`, the typed by-products (telemetry
series, profiler output, flags). This module needs no torch: the store and the analysis read it too.

The store keeps :class:`TrialExtra` in its ``extra_json`` column as a flat JSON object
(:meth:`TrialExtra.to_json`), the layout stores written before the type existed already have, so
:meth:`TrialExtra.from_json` reads old and new rows alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bsprof.engine.host_load import HostLoad

if TYPE_CHECKING:
    from bsprof.engine.timing import StepTimes

__all__ = ["KINDS", "STATUSES", "ProfileInfo", "ScriptInfo", "TrialExtra", "TrialResult", "TrialSpec"]

KINDS = ("throughput", "convergence")
"""Trial kinds (DESIGN.md: a trial's ``kind``)."""

STATUSES = ("ok", "oom", "diverged", "budget_exhausted", "error")
"""How a trial can end; every trial, failed or not, ends in one of these and is stored."""


@dataclass(frozen=True)
class TrialSpec:
    """What a trial measures; its identity in the store.

    Attributes:
        workload: Workload name.
        kind: One of :data:`KINDS`.
        batch_size: Samples per step.
        seed: Seeds model initialisation and batch order.
        lr: Learning rate.
        repeat: Round of a throughput sweep's rotation (0-based); 0 for convergence.
        phase: ``main``; with LR tuning, ``tune`` or ``final`` (not part of the key: seeds differ).
    """

    workload: str
    kind: str
    batch_size: int
    seed: int
    lr: float
    repeat: int = 0
    phase: str = "main"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"trial kind {self.kind!r} is not one of {KINDS}")

    def key(self) -> tuple[str, int, int, float, int]:
        """The store's key: kind, batch size, seed, LR (rounded to 12 digits) and repeat."""
        return (self.kind, self.batch_size, self.seed, round(self.lr, 12), self.repeat)


@dataclass(frozen=True)
class ProfileInfo:
    """The profiler pass of a throughput trial (see :mod:`bsprof.engine.profiling`).

    Attributes:
        trace_dir: Folder of the trace files (``None`` when the pass failed).
        trace_files: Trace files the pass wrote.
        top_ops: Operator rows, heaviest first (keys in :mod:`bsprof.engine.profiling`'s docstring).
        top_ops_sort: The key ``top_ops`` is sorted by.
        active_steps: Training steps the profile covers.
        error: Why the pass failed (``None`` when it ran).
    """

    trace_dir: str | None = None
    trace_files: tuple[str, ...] = ()
    top_ops: tuple[dict[str, Any], ...] = ()
    top_ops_sort: str | None = None
    active_steps: int = 0
    error: str | None = None


@dataclass(frozen=True)
class ScriptInfo:
    """The child process of a script trial (see :mod:`bsprof.engine.script`).

    Attributes:
        command: The trial's command line, placeholders filled.
        log: Path of the child's output log.
        exit_code: The child's exit code (negative: killed by that signal); ``None`` if it never started.
        log_tail: The log's last lines, kept when the trial failed.
    """

    command: str
    log: str
    exit_code: int | None = None
    log_tail: str | None = None


_SCRIPT_KEYS = {  # ScriptInfo field -> key in the store's flat JSON
    "command": "script_command",
    "log": "script_log",
    "exit_code": "script_exit_code",
    "log_tail": "script_log_tail",
}

_PROFILE_KEYS = {  # ProfileInfo field -> key in the store's flat JSON
    "trace_dir": "trace_dir",
    "trace_files": "trace_files",
    "top_ops": "top_ops",
    "top_ops_sort": "top_ops_sort",
    "active_steps": "profile_active_steps",
    "error": "profile_error",
}


@dataclass(frozen=True)
class TrialExtra:
    """A trial's by-products beside its export columns.

    Attributes:
        source: Who timed the rounds: ``engine`` (the engine's timer), ``pytest-benchmark``, or ``script`` (the
            tracker inside a user's script, :mod:`bsprof.engine.script`).
        rel_iqr: Step-time IQR over its median (throughput); above 0.1 the measurement is noisy.
        cpu_pct_mean: Mean process CPU use over the telemetry window (percent of one core).
        telemetry: The window's polls, downsampled: dicts with ``t_s`` and the sampler keys.
        gpu_sampler: The GPU sampler's class name, or why no GPU was read.
        monitor_mode: ``process`` or ``thread`` (how the telemetry was polled).
        profile: The profiler pass, when one ran.
        skipped_after_oom: Recorded ``oom`` without running: a smaller batch size already ran out of memory.
        host_load: What else the host did during the trial (:mod:`bsprof.engine.host_load`); ``busy`` marks
            a trial measured on a busy host.
        remeasures: How many times the trial was measured again because its host was busy.
        script: The child process of a script trial (``source == "script"``).
    """

    source: str = "engine"
    rel_iqr: float | None = None
    cpu_pct_mean: float | None = None
    telemetry: tuple[dict[str, float | None], ...] = ()
    gpu_sampler: str | None = None
    monitor_mode: str | None = None
    profile: ProfileInfo | None = None
    skipped_after_oom: bool = False
    host_load: HostLoad | None = None
    remeasures: int = 0
    script: ScriptInfo | None = None

    def to_json(self) -> dict[str, Any]:
        """The store's flat JSON object (fields at their defaults are left out)."""
        out: dict[str, Any] = {}
        if self.source != "engine":
            out["source"] = self.source
        for key in ("rel_iqr", "cpu_pct_mean", "gpu_sampler", "monitor_mode"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.telemetry:
            out["telemetry"] = list(self.telemetry)
        if self.profile is not None:
            for name, key in _PROFILE_KEYS.items():
                value = getattr(self.profile, name)
                if value not in (None, (), 0):
                    out[key] = list(value) if isinstance(value, tuple) else value
        if self.skipped_after_oom:
            out["skipped_after_oom"] = True
        if self.host_load is not None:
            out["host_load"] = self.host_load.to_json()
        if self.remeasures:
            out["remeasures"] = self.remeasures
        if self.script is not None:
            for name, key in _SCRIPT_KEYS.items():
                if getattr(self.script, name) is not None:
                    out[key] = getattr(self.script, name)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> TrialExtra:
        """Read a store row's ``extra`` (written by :meth:`to_json`, or by bsprof 0.1 as a free dict).

        Keys this type does not know are ignored; values of the wrong type become the field's default.
        """
        d = data if isinstance(data, dict) else {}

        def number(key: str) -> float | None:
            v = d.get(key)
            return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

        def text(key: str) -> str | None:
            v = d.get(key)
            return v if isinstance(v, str) else None

        def rows(key: str) -> tuple[Any, ...]:
            v = d.get(key)
            return tuple(x for x in v if isinstance(x, dict)) if isinstance(v, list) else ()

        profile = None
        if any(key in d for key in _PROFILE_KEYS.values()):
            files = d.get("trace_files")
            steps = d.get("profile_active_steps")
            profile = ProfileInfo(
                trace_dir=text("trace_dir"),
                trace_files=tuple(str(f) for f in files) if isinstance(files, list) else (),
                top_ops=rows("top_ops"),
                top_ops_sort=text("top_ops_sort"),
                active_steps=steps if isinstance(steps, int) else 0,
                error=text("profile_error"),
            )
        script = None
        if isinstance(d.get("script_command"), str):
            code = d.get("script_exit_code")
            script = ScriptInfo(
                command=d["script_command"],
                log=text("script_log") or "",
                exit_code=code if isinstance(code, int) and not isinstance(code, bool) else None,
                log_tail=text("script_log_tail"),
            )
        return cls(
            source=text("source") or "engine",
            rel_iqr=number("rel_iqr"),
            cpu_pct_mean=number("cpu_pct_mean"),
            telemetry=rows("telemetry"),
            gpu_sampler=text("gpu_sampler"),
            monitor_mode=text("monitor_mode"),
            profile=profile,
            skipped_after_oom=d.get("skipped_after_oom") is True,
            host_load=HostLoad.from_json(d.get("host_load")),
            remeasures=d["remeasures"] if isinstance(d.get("remeasures"), int) else 0,
            script=script,
        )


@dataclass
class TrialResult:
    """What a trial produced. Metric names carry their units (``step_time_s``, ``peak_mem_bytes``).

    Attributes:
        spec: The trial's identity.
        status: One of :data:`STATUSES`.
        device: Device string, e.g. ``cpu`` or ``cuda:0``.
        device_name: e.g. ``NVIDIA A100-SXM4-80GB``.
        metrics: Export columns measured by this trial (missing ones are absent or ``None``).
        reasons: Why a metric is ``None`` (column -> reason).
        step_times: Raw block timings (throughput trials).
        error: Message of a failed trial.
        started_at: Unix time (seconds) when the trial began.
        duration_s: Wall-clock seconds of the whole trial, set-up included.
        curve: Learning-curve rows (convergence trials).
        extra: The typed by-products (telemetry series, profile, flags).
    """

    spec: TrialSpec
    status: str
    device: str
    device_name: str = ""
    metrics: dict[str, float | int | bool | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    step_times: StepTimes | None = None
    error: str | None = None
    started_at: float = 0.0
    duration_s: float = 0.0
    curve: list[dict[str, float | None]] = field(default_factory=list)
    extra: TrialExtra = field(default_factory=TrialExtra)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"trial status {self.status!r} is not one of {STATUSES}")
