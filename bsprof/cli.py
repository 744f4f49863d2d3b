"""The ``bsprof`` command line: parses, calls the engine / store / analysis, prints.

Exit codes: 0 success; 1 the measurement itself failed; 2 bad input (one line on stderr, no traceback);
130 interrupted (finished trials are kept).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from bsprof.errors import BadInput, BsprofError

__all__ = ["main", "parse_batch_sizes"]

log = logging.getLogger("bsprof")


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """Parse ``8,16,32`` or ``8..1024`` (the powers of two in that range), or a mix, into ascending sizes.

    Raises:
        BadInput: Empty, non-integer, zero or negative sizes, or a range with no power of two.
    """
    sizes: set[int] = set()
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise BadInput(f"--batch-sizes {text!r}: empty item; give e.g. 8,16,32 or 8..1024")
    for item in items:
        if ".." in item:
            lo_text, _, hi_text = item.partition("..")
            lo, hi = _positive_int(lo_text, text), _positive_int(hi_text, text)
            if lo > hi:
                raise BadInput(f"--batch-sizes {text!r}: range {item} is empty (start > end)")
            powers = [1 << k for k in range(0, hi.bit_length() + 1) if lo <= (1 << k) <= hi]
            if not powers:
                raise BadInput(f"--batch-sizes {text!r}: no power of two in {item}")
            sizes.update(powers)
        else:
            sizes.add(_positive_int(item, text))
    return tuple(sorted(sizes))


def _positive_int(s: str, whole: str) -> int:
    try:
        value = int(s.strip())
    except ValueError:
        raise BadInput(f"--batch-sizes {whole!r}: {s.strip()!r} is not an integer") from None
    if value <= 0:
        raise BadInput(f"--batch-sizes {whole!r}: batch sizes must be positive, got {value}")
    return value


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        "-w",
        default="digits-mlp",
        help="built-in name (see `bsprof workloads`), package.module:factory or file.py:factory (default: digits-mlp)",
    )
    p.add_argument("--data-dir", help="dataset folder for workloads that read files (sets BSPROF_CIFAR10_DIR)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="mixed precision (default: off)")
    p.add_argument("--compile", action="store_true", help="wrap the model with torch.compile")
    p.add_argument("--store", "-s", default=None, help="SQLite results store (default: reports/bsprof.db)")


def _build_parser() -> _Parser:
    parser = _Parser(prog="bsprof", description="Batch-size benchmark and profiling for PyTorch training.")
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    sub.add_parser("workloads", help="list the built-in workloads", description="List the built-in workloads.")

    sw = sub.add_parser(
        "sweep",
        help="measure a workload across batch sizes",
        description="Sweep batch sizes: run every trial, store each as it ends, print a summary.",
    )
    _add_engine_options(sw)
    sw.add_argument(
        "--batch-sizes",
        "-b",
        default="8..1024",
        help="comma list and/or ranges: 8,16,32 or 8..1024 = powers of two (default: 8..1024)",
    )
    sw.add_argument("--kind", default="throughput", choices=["throughput"], help="trial kind (default: throughput)")
    sw.add_argument("--seeds", type=_positive(int), default=1, help="seeds per batch size (default: 1)")
    sw.add_argument(
        "--repeats",
        type=_positive(int),
        default=3,
        help="throughput rounds over all batch sizes, in rotation (default: 3)",
    )
    sw.add_argument(
        "--lr-rule",
        default="linear",
        choices=["fixed", "linear", "sqrt"],
        help="LR scaling from the workload's base LR (default: linear, capped)",
    )
    sw.add_argument(
        "--min-time",
        type=_positive(float),
        default=1.0,
        help="measured seconds per throughput trial, at least (default: 1.0)",
    )
    sw.add_argument(
        "--min-steps",
        type=_positive(int),
        default=20,
        help="measured steps per throughput trial, at least (default: 20)",
    )
    sw.add_argument("--warmup-steps", type=int, default=5, help="untimed steps first (default: 5)")
    sw.add_argument(
        "--no-skip-larger",
        dest="skip_larger",
        action="store_false",
        help="after an OOM, still try the larger batch sizes",
    )
    sw.add_argument("--fresh", action="store_true", help="start a new run instead of resuming the stored one")

    ex = sub.add_parser(
        "export",
        help="export trials as csv, json or parquet",
        description="One tidy row per trial (DESIGN.md columns first, SI units).",
    )
    ex.add_argument("--store", "-s", default=None, help="SQLite results store (default: reports/bsprof.db)")
    ex.add_argument("--format", "-f", default="csv", choices=["csv", "json", "parquet"], help="(default: csv)")
    ex.add_argument("--run", action="append", help="only this run id (repeatable)")
    ex.add_argument("-o", "--output", help="file to write (default: standard output)")

    fm = sub.add_parser(
        "find-max-batch",
        help="largest batch size that fits in memory",
        description="Double the batch size until it runs out of memory, then bisect.",
    )
    _add_engine_options(fm)
    fm.add_argument("--start", type=_positive(int), default=1, help="first batch size (default: 1)")
    fm.add_argument(
        "--cap",
        type=_positive(int),
        default=65536,
        help="largest batch size tried (default: 65536; guards a CPU host against swapping)",
    )
    return parser


def _version() -> str:
    from bsprof import __version__

    return f"bsprof {__version__}"


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """Workload and engine settings from the common options (bad input raised before anything is written)."""
    from bsprof.engine.device import resolve_device
    from bsprof.engine.trial import EngineSettings
    from bsprof.workload import load_workload

    if args.data_dir:
        if not Path(args.data_dir).is_dir():
            raise BadInput(f"--data-dir {args.data_dir}: no such folder")
        os.environ["BSPROF_CIFAR10_DIR"] = str(args.data_dir)
    workload = load_workload(args.workload)
    device = resolve_device(args.device)
    timing_kwargs = {}
    if getattr(args, "min_time", None) is not None:
        from bsprof.engine.timing import TimingSettings

        if args.warmup_steps < 0:
            raise BadInput(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
        timing_kwargs["timing"] = TimingSettings(
            warmup_steps=args.warmup_steps, min_time_s=args.min_time, min_steps=args.min_steps
        )
    return workload, EngineSettings(device=device, amp=args.amp, compile=args.compile, **timing_kwargs)


def _store_path(args: argparse.Namespace) -> Path:
    from bsprof.store import DEFAULT_STORE

    return Path(args.store) if args.store else DEFAULT_STORE


def cmd_workloads(args: argparse.Namespace) -> int:
    from bsprof.workloads import BUILTINS

    width = max(len(n) for n in BUILTINS)
    for name, b in BUILTINS.items():
        print(f"{name:<{width}}  {b.description}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from bsprof.console import Progress, print_throughput_summary
    from bsprof.engine.sweep import SweepConfig, run_sweep
    from bsprof.store import Store

    batch_sizes = parse_batch_sizes(args.batch_sizes)
    workload, settings = _load(args)
    config = SweepConfig(
        workload_ref=args.workload,
        batch_sizes=batch_sizes,
        kinds=(args.kind,),
        seeds=args.seeds,
        repeats=args.repeats,
        lr_rule=args.lr_rule,
        skip_larger_after_oom=args.skip_larger,
    )
    with Store(_store_path(args), create=True) as store, Progress() as progress:
        try:
            outcome = run_sweep(config, workload, settings, store, fresh=args.fresh, progress=progress.update)
        except KeyboardInterrupt:
            progress.close()
            print("bsprof: interrupted; finished trials are stored, run the same command to resume", file=sys.stderr)
            return 130
        progress.close()
        log.info("run %s: %d trials run, %d already stored", outcome.run.run_id, len(outcome.results), outcome.skipped)
        print_throughput_summary(store, outcome.run.run_id)
        errors = [r for r in outcome.results if r.status == "error"]
    if errors:
        print(f"bsprof: {len(errors)} trial(s) failed with an error (first: {errors[0].error})", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from bsprof.export import trials_frame, write_export
    from bsprof.store import Store

    with Store(_store_path(args)) as store:
        if args.run:
            for r in args.run:
                store.run(r)  # raises BadInput for an unknown run
        frame = trials_frame(store, args.run)
    text = write_export(frame, args.format, args.output)
    if text is not None:
        sys.stdout.write(text)
    return 0


def cmd_find_max_batch(args: argparse.Namespace) -> int:
    from bsprof.engine.maxbatch import find_max_batch
    from bsprof.environment import collect_environment
    from bsprof.store import Store

    workload, settings = _load(args)
    if args.cap < args.start:
        raise BadInput(f"--cap {args.cap} is below --start {args.start}")
    result = find_max_batch(workload, settings, start=args.start, cap=args.cap)
    with Store(_store_path(args), create=True) as store:
        store.add_max_batch(
            workload.name,
            str(settings.device),
            {"workload": workload.config(), "engine": settings.config(), "start": args.start, "cap": args.cap},
            collect_environment(settings.device),
            result.max_batch_size,
            result.first_oom_batch_size,
            result.tried,
        )
    tried = ", ".join(f"{b}:{s}" for b, s in result.tried)
    if result.max_batch_size is None:
        print(f"{workload.name} on {settings.device}: even batch size {args.start} ran out of memory (tried {tried})")
    elif result.hit_cap:
        print(
            f"{workload.name} on {settings.device}: largest batch that fits >= {result.max_batch_size} "
            f"(reached --cap without running out of memory; tried {tried})"
        )
    else:
        print(
            f"{workload.name} on {settings.device}: largest batch that fits = {result.max_batch_size} "
            f"(first out of memory at {result.first_oom_batch_size}; tried {tried})"
        )
    return 0


COMMANDS = {"workloads": cmd_workloads, "sweep": cmd_sweep, "export": cmd_export, "find-max-batch": cmd_find_max_batch}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bsprof`` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command](args)
    except BsprofError as e:
        print(f"bsprof {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bsprof: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
