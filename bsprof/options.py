"""Option values shared by bsprof's two front doors: the ``bsprof`` command line and the pytest suite's plugin.

Each ``parse_*`` function turns one option's text into a value or raises :class:`~bsprof.errors.BadInput`
with a one-line message (naming the option when given ``option=``; argparse names it itself), so both doors
accept and reject the same inputs with the same words. :mod:`bsprof.cli` wraps them as argparse types
(:func:`arg_type`); :mod:`bsprof.pytest_plugin` resolves the suite's ``--bsprof-*`` options through
:func:`parse_suite_options`.

The sweep's settings are assembled from the parsed options here too, once for every kind of sweep (a
workload's, a script's, ``predict``): :func:`timing_settings` and :func:`convergence_settings`. This module
imports neither door, nor torch (the engine's settings types are imported when those are called).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bsprof.errors import BadInput

if TYPE_CHECKING:
    from bsprof.engine.convergence import ConvergenceSettings
    from bsprof.engine.timing import TimingSettings

__all__ = [
    "DEVICE_CHOICES",
    "SUITE_OPTIONS",
    "BsprofOptions",
    "arg_type",
    "convergence_settings",
    "parse_batch_sizes",
    "parse_device",
    "parse_float",
    "parse_fraction",
    "parse_int",
    "parse_suite_options",
    "timing_settings",
]

T = TypeVar("T")

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
"""The device specifications both doors accept (resolved later by :func:`bsprof.engine.device.resolve_device`)."""


def _named(option: str | None, text: str) -> str:
    return f"{option} {text!r}" if option else repr(text)


def parse_int(text: str, *, option: str | None = None, minimum: int = 1) -> int:
    """An integer of at least ``minimum``.

    Raises:
        BadInput: Not an integer, or below ``minimum``.
    """
    try:
        value = int(text.strip())
    except ValueError:
        raise BadInput(f"{_named(option, text)}: not an integer") from None
    if value < minimum:
        raise BadInput(f"{_named(option, text)}: must be >= {minimum}")
    return value


def parse_float(text: str, *, option: str | None = None, minimum: float | None = None, positive: bool = False) -> float:
    """A finite number, ``> 0`` when ``positive``, ``>= minimum`` when given (durations in seconds, rates in Hz).

    Raises:
        BadInput: Not a finite number, or out of range.
    """
    try:
        value = float(text.strip())
    except ValueError:
        raise BadInput(f"{_named(option, text)}: not a number") from None
    if not math.isfinite(value):
        raise BadInput(f"{_named(option, text)}: must be a finite number")
    if positive and value <= 0:
        raise BadInput(f"{_named(option, text)}: must be a finite number > 0")
    if minimum is not None and value < minimum:
        raise BadInput(f"{_named(option, text)}: must be >= {minimum:g}")
    return value


def parse_batch_sizes(text: str, *, option: str | None = None) -> tuple[int, ...]:
    """Parse ``8,16,32`` or ``8..1024`` (the powers of two in that range), or a mix, into ascending sizes.

    Raises:
        BadInput: Empty, non-integer, zero or negative sizes, or a range with no power of two.
    """
    sizes: set[int] = set()
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise BadInput(f"{_named(option, text)}: empty item; give e.g. 8,16,32 or 8..1024")

    def size(s: str) -> int:
        try:
            value = int(s.strip())
        except ValueError:
            raise BadInput(f"{_named(option, text)}: {s.strip()!r} is not an integer") from None
        if value <= 0:
            raise BadInput(f"{_named(option, text)}: batch sizes must be positive, got {value}")
        return value

    for item in items:
        if ".." in item:
            lo_text, _, hi_text = item.partition("..")
            lo, hi = size(lo_text), size(hi_text)
            if lo > hi:
                raise BadInput(f"{_named(option, text)}: range {item} is empty (start > end)")
            powers = [1 << k for k in range(0, hi.bit_length() + 1) if lo <= (1 << k) <= hi]
            if not powers:
                raise BadInput(f"{_named(option, text)}: no power of two in {item}")
            sizes.update(powers)
        else:
            sizes.add(size(item))
    return tuple(sorted(sizes))


def parse_device(text: str, *, option: str | None = None) -> str:
    """A device specification, lower-cased: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Only the form is checked here; whether the device exists is decided when it is resolved.

    Raises:
        BadInput: Any other text.
    """
    spec = text.strip().lower()
    index = spec.partition(":")[2]
    if spec in ("auto", "cpu", "cuda") or (spec.startswith("cuda:") and index.isdigit()):
        return spec
    raise BadInput(f"{_named(option, text)}: bad device, expected {DEVICE_CHOICES}")


def parse_fraction(text: str, *, option: str | None = None) -> float:
    """``10%`` or ``0.1`` -> 0.1. A bare number of 1 or more is refused as ambiguous (write ``150%``).

    Raises:
        BadInput: Not a number, negative, or a bare number >= 1.
    """
    t = text.strip()
    percent = t.endswith("%")
    try:
        value = float(t[:-1] if percent else t)
    except ValueError:
        raise BadInput(f"{_named(option, text)}: expected e.g. 10% or 0.1") from None
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"{_named(option, text)}: must be a finite number >= 0")
    if not percent and value >= 1:
        raise BadInput(f"{_named(option, text)}: ambiguous; write {value:g}% or {value / 100:g}")
    return value / 100 if percent else value


def arg_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type=``: its :class:`~bsprof.errors.BadInput` becomes argparse's one-line error
    (``bsprof sweep: error: argument --seeds: '0': must be >= 1``, exit code 2)."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except BadInput as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


# --- the pytest suite's options ----------------------------------------------------------------------------

SUITE_OPTIONS: dict[str, tuple[str, str | None, str]] = {
    # option suffix: (environment variable, default, help)
    "workload": ("BSPROF_WORKLOAD", "digits-mlp", "built-in name, package.module:factory or file.py:factory"),
    "batch-sizes": ("BSPROF_BATCH_SIZES", "8..1024", "8,16,32 or 8..1024 (powers of two), or a mix"),
    "device": ("BSPROF_DEVICE", "auto", "auto, cpu, cuda or cuda:N (cuda without CUDA: skipped)"),
    "seeds": ("BSPROF_SEEDS", "3", "seeds per convergence benchmark (one round each)"),
    "target": ("BSPROF_TARGET", None, "validation metric to reach (default: the workload's)"),
    "store": ("BSPROF_STORE", None, "also write every trial into this bsprof SQLite store (a new run per session)"),
    "min-time": ("BSPROF_MIN_TIME", "1.0", "timed seconds per throughput benchmark, at least (sizes the rounds)"),
    "min-rounds": (
        "BSPROF_MIN_ROUNDS",
        "20",
        "timed rounds (one training step each) per throughput benchmark, at least",
    ),
    "warmup-rounds": ("BSPROF_WARMUP_ROUNDS", "10", "untimed training steps before the timed rounds"),
    "max-time": ("BSPROF_MAX_TIME", "120", "training seconds per convergence trial, at most"),
    "threads": ("BSPROF_THREADS", "auto", "torch CPU intra-op threads; auto: 1 on the CPU, torch's choice on a GPU"),
}
"""The pytest suite's ``--bsprof-<suffix>`` options: (environment variable, default, help)."""


@dataclass(frozen=True)
class BsprofOptions:
    """The pytest suite's settings, validated.

    Attributes:
        workload_ref: How the workload is named.
        batch_sizes: Batch sizes, ascending (samples).
        device_spec: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seeds: Convergence seeds 0 .. seeds-1 (one benchmark round each).
        target: Target metric, or ``None`` for the workload's.
        store: bsprof store to write the trials into, or ``None``.
        min_time_s: Timed seconds of a throughput benchmark, at least: the rounds are sized from the engine
            timer's estimate of a step (:class:`~bsprof.pytest_session.PedanticTimer`).
        min_rounds: Timed rounds of a throughput benchmark (one training step each), at least.
        warmup_rounds: Untimed steps before them.
        max_time_s: Training seconds per convergence trial, at most.
        threads: torch CPU intra-op threads; ``None`` (``auto``): 1 when the trials run on the CPU (steady
            figures on a shared host, where an OpenMP worker waiting for a busy core stalls small steps by
            tens of milliseconds), torch's choice on a GPU.
    """

    workload_ref: str = "digits-mlp"
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024)
    device_spec: str = "auto"
    seeds: int = 3
    target: float | None = None
    store: Path | None = None
    min_time_s: float = 1.0
    min_rounds: int = 20
    warmup_rounds: int = 10
    max_time_s: float = 120.0
    threads: int | None = None


def parse_suite_options(get: Callable[[str], str | None], environ: Mapping[str, str] | None = None) -> BsprofOptions:
    """Resolve every suite option: ``get(suffix)`` (the command line), else the environment variable, else the default.

    Args:
        get: The command-line value of ``--bsprof-<suffix>``, or ``None`` when not given.
        environ: The environment (default: ``os.environ``); empty variables count as unset.

    Raises:
        BadInput: A value that does not parse (the message names the option).
    """
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    for suffix, (var, default, _help) in SUITE_OPTIONS.items():
        value = get(suffix)
        raw[suffix] = (value if value is not None else (env.get(var) or default)) or ""

    def opt(suffix: str) -> str:
        return f"--bsprof-{suffix}"

    workload_ref = raw["workload"].strip()
    if not workload_ref:
        raise BadInput("--bsprof-workload: empty")
    threads = (raw["threads"] or "auto").strip().lower()
    return BsprofOptions(
        workload_ref=workload_ref,
        batch_sizes=parse_batch_sizes(raw["batch-sizes"], option=opt("batch-sizes")),
        device_spec=parse_device(raw["device"], option=opt("device")),
        seeds=parse_int(raw["seeds"], option=opt("seeds")),
        target=parse_float(raw["target"], option=opt("target")) if raw["target"] else None,
        store=Path(raw["store"]) if raw["store"] else None,
        min_time_s=parse_float(raw["min-time"], option=opt("min-time"), minimum=0.0),
        min_rounds=parse_int(raw["min-rounds"], option=opt("min-rounds")),
        warmup_rounds=parse_int(raw["warmup-rounds"], option=opt("warmup-rounds"), minimum=0),
        max_time_s=parse_float(raw["max-time"], option=opt("max-time"), positive=True),
        threads=None if threads == "auto" else parse_int(threads, option=opt("threads")),
    )


# --- the sweep's settings from the command line's options -------------------------------------------------


def timing_settings(args: argparse.Namespace) -> TimingSettings | None:
    """Throughput timing from ``--timing-warmup-steps``, ``--min-time`` (seconds) and ``--min-steps``; ``None``
    for a subcommand without them (the engine's default timing)."""
    if getattr(args, "min_time", None) is None:
        return None
    from bsprof.engine.timing import TimingSettings

    if args.timing_warmup_steps < 0:
        raise BadInput(f"--timing-warmup-steps must be >= 0, got {args.timing_warmup_steps}")
    return TimingSettings(warmup_steps=args.timing_warmup_steps, min_time_s=args.min_time, min_steps=args.min_steps)


def convergence_settings(args: argparse.Namespace, workload: Any) -> ConvergenceSettings:
    """Convergence budgets, target and patience from the sweep's options, checked against ``workload`` (a
    :class:`~bsprof.workload.Workload` or a script's :class:`~bsprof.engine.script_job.ScriptJob`: its
    ``name``, ``target``, ``metric_name`` and ``metric_range``).

    Raises:
        BadInput: ``--tune-lr 1``, a target outside the metric's range or not finite, or no target at all for
            convergence trials.
    """
    from bsprof.engine.convergence import ConvergenceSettings
    from bsprof.engine.noise_scale import GnsSettings

    if args.tune_lr == 1:
        raise BadInput(f"--tune-lr {args.tune_lr}: give 0 (no tuning) or at least 2 learning rates")
    if args.target is not None:
        if not math.isfinite(args.target):
            raise BadInput(f"--target {args.target}: must be a finite number")
        accuracy = (0.0, 1.0) if workload.metric_name.endswith("accuracy") else None
        lo, hi = workload.metric_range or accuracy or (-math.inf, math.inf)
        if not lo <= args.target <= hi:
            raise BadInput(
                f"--target {args.target:g} is outside the range of {workload.name}'s {workload.metric_name} "
                f"[{lo:g}, {hi:g}]: no trial could reach it"
            )
    if args.kind != "throughput" and args.target is None and workload.target is None:
        raise BadInput(f"workload {workload.name} has no default target: pass --target or use --kind throughput")
    return ConvergenceSettings(
        target=args.target,
        patience=args.target_patience,
        max_steps=args.max_steps,
        max_epochs=args.max_epochs,
        max_time_s=args.max_time,
        eval_every=args.eval_every,
        continue_after_target=args.continue_after_target,
        warmup_steps=args.warmup_steps,
        warmup_epochs=args.warmup_epochs,
        gns=GnsSettings() if getattr(args, "measure_gns", False) else None,
    )
