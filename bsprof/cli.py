"""The ``bsprof`` command line: parses, calls the engine / store / analysis, prints.

Exit codes: 0 success; 1 the measurement itself failed; 2 bad input (one line on stderr, no traceback);
130 interrupted (finished trials are kept).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from bsprof.errors import BadInput, BsprofError

__all__ = ["main", "parse_batch_sizes", "parse_fraction"]

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
    p.add_argument(
        "--threads",
        type=_positive(int),
        help="torch CPU threads (default: torch's choice; on a shared host fewer threads than cores is steadier)",
    )
    p.add_argument("--store", "-s", default=None, help="SQLite results store (default: reports/bsprof.db)")


def _add_telemetry_options(p: argparse.ArgumentParser, *, profile_flag: bool = True) -> None:
    tm = p.add_argument_group("telemetry and profiling")
    tm.add_argument(
        "--monitor-hz", type=_positive(float), default=20.0, help="telemetry polls per second (default: 20)"
    )
    tm.add_argument(
        "--peak-tflops",
        type=_positive(float),
        help="peak TFLOP/s of the device for MFU (default: NVIDIA datasheet table by GPU name and dtype)",
    )
    if profile_flag:
        tm.add_argument(
            "--profile",
            action="store_true",
            help="after timing, a torch.profiler pass per batch size: TensorBoard trace and top operators",
        )


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
    sw.add_argument(
        "--kind",
        default="both",
        choices=["throughput", "convergence", "both"],
        help="throughput (speed, memory), convergence (steps/samples/time to target) or both (default: both)",
    )
    sw.add_argument("--seeds", type=_positive(int), default=3, help="seeds per batch size (default: 3)")
    sw.add_argument(
        "--repeats",
        type=_positive(int),
        default=1,
        help="throughput rounds over all batch sizes and seeds, in rotation (default: 1)",
    )
    sw.add_argument("--fresh", action="store_true", help="start a new run instead of resuming the stored one")
    sw.add_argument("--report", action="store_true", help="write the HTML report of this run at the end")
    sw.add_argument(
        "--report-out", metavar="FILE", help="where --report writes (default: reports/index.html; implies --report)"
    )
    sw.add_argument(
        "--no-skip-larger",
        dest="skip_larger",
        action="store_false",
        help="after an OOM, still try the larger batch sizes",
    )
    tg = sw.add_argument_group("throughput trials")
    tg.add_argument(
        "--min-time",
        type=_positive(float),
        default=1.0,
        help="measured seconds per throughput trial, at least (default: 1.0)",
    )
    tg.add_argument(
        "--min-steps",
        type=_positive(int),
        default=20,
        help="measured steps per throughput trial, at least (default: 20)",
    )
    tg.add_argument("--timing-warmup-steps", type=int, default=5, help="untimed steps first (default: 5)")
    _add_telemetry_options(sw)
    cg = sw.add_argument_group("convergence trials")
    cg.add_argument("--target", type=float, help="validation metric to reach (default: the workload's)")
    cg.add_argument(
        "--target-patience",
        type=_positive(int),
        default=1,
        help="consecutive evaluations at or above target that count as reaching it (default: 1, first crossing)",
    )
    cg.add_argument("--max-steps", type=_positive(int), help="step budget per trial (default: none)")
    cg.add_argument("--max-epochs", type=_positive(float), default=100.0, help="epoch budget per trial (default: 100)")
    cg.add_argument(
        "--max-time", type=_positive(float), default=120.0, help="training seconds per trial (default: 120)"
    )
    cg.add_argument(
        "--eval-every",
        type=_positive(int),
        help="evaluate every N steps (default: a schedule keeping the steps-to-target bracket within 5%%)",
    )
    cg.add_argument("--continue-after-target", action="store_true", help="train on to the budget for complete curves")
    cg.add_argument(
        "--lr-rule",
        default="linear",
        choices=["fixed", "linear", "sqrt"],
        help="LR scaling from the workload's base LR at its base batch size (default: linear, capped)",
    )
    cg.add_argument(
        "--base-lr",
        type=_positive(float),
        help="override the workload's base LR (at its base batch size) that the LR rule scales from",
    )
    cg.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps (default: 0)")
    cg.add_argument("--warmup-epochs", type=float, default=0.0, help="linear LR warm-up epochs (default: 0)")
    cg.add_argument(
        "--tune-lr",
        type=int,
        default=0,
        metavar="K",
        help="try K LRs on a log2 grid around the rule's LR per batch size, keep the best, re-run it on fresh "
        "seeds (default: 0, no tuning)",
    )

    pf = sub.add_parser(
        "profile",
        help="throughput sweep with a torch.profiler pass per batch size",
        description="A throughput sweep (as `bsprof sweep --kind throughput --profile`): per batch size, a "
        "TensorBoard trace under <store folder>/traces/<run>/<workload>-B<batch>/ and the top operators.",
    )
    _add_engine_options(pf)
    pf.add_argument("--batch-sizes", "-b", default="8..1024", help="as for sweep (default: 8..1024)")
    pf.add_argument("--seeds", type=_positive(int), default=1, help="seeds per batch size (default: 1)")
    pf.add_argument("--repeats", type=_positive(int), default=1, help="throughput rounds (default: 1)")
    pf.add_argument("--min-time", type=_positive(float), default=1.0, help="measured seconds per trial (default: 1)")
    pf.add_argument("--min-steps", type=_positive(int), default=20, help="measured steps per trial (default: 20)")
    pf.add_argument("--fresh", action="store_true", help="start a new run (a resumed, finished run profiles nothing)")
    _add_telemetry_options(pf, profile_flag=False)

    ex = sub.add_parser(
        "export",
        help="export trials as csv, json or parquet",
        description="One tidy row per trial (DESIGN.md columns first, SI units).",
    )
    ex.add_argument("--store", "-s", default=None, help="SQLite results store (default: reports/bsprof.db)")
    ex.add_argument("--format", "-f", default="csv", choices=["csv", "json", "parquet"], help="(default: csv)")
    ex.add_argument("--run", action="append", help="only this run id (repeatable)")
    ex.add_argument("-o", "--output", help="file to write (default: standard output)")

    sm = sub.add_parser(
        "summary",
        help="per-batch-size table and recommendations",
        description="The trade-off table (throughput and time-to-target per batch size), regimes, the "
        "noise-scale fit and the recommended batch sizes, for the latest run per workload (or --run).",
    )
    sm.add_argument("--store", "-s", default=None, help="SQLite results store (default: reports/bsprof.db)")
    sm.add_argument("--run", action="append", help="this run id (repeatable; default: latest run per workload)")

    rp = sub.add_parser(
        "report",
        help="self-contained HTML report (charts and tables, works offline)",
        description="One HTML file with every chart of the compute/accuracy trade-off, for the latest run per "
        "workload (or --run, repeatable: runs are compared in the same charts). It requests nothing from the network.",
    )
    rp.add_argument("--store", "-s", default=None, help="SQLite results store (default: reports/bsprof.db)")
    rp.add_argument("-o", "--output", default=None, help="HTML file to write (default: reports/index.html)")
    rp.add_argument("--run", action="append", help="this run id (repeatable; default: latest run per workload)")
    rp.add_argument(
        "--benchmark-json",
        action="append",
        default=[],
        metavar="FILE",
        help="pytest-benchmark JSON results to include (repeatable)",
    )

    cp = sub.add_parser(
        "compare",
        help="regression gate: compare two benchmark results",
        description="Compare two pytest-benchmark JSON files (or two stores) benchmark by benchmark: step time "
        "and steps-to-target. Exit 1 when one got worse by more than --fail-above and the one-sided Mann-Whitney "
        "test says so at --alpha; 0 otherwise; 2 on bad input.",
    )
    cp.add_argument("baseline", help="the reference: pytest-benchmark JSON (--benchmark-json) or a bsprof store")
    cp.add_argument("new", help="the results under test, of the same kind")
    cp.add_argument(
        "--fail-above", default="10%", metavar="X", help="regression threshold: 10%% or 0.1 (default: 10%%)"
    )
    cp.add_argument("--alpha", type=float, default=0.05, help="significance level (default: 0.05)")

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
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    timing_kwargs = {}
    if getattr(args, "min_time", None) is not None:
        from bsprof.engine.timing import TimingSettings

        if args.timing_warmup_steps < 0:
            raise BadInput(f"--timing-warmup-steps must be >= 0, got {args.timing_warmup_steps}")
        timing_kwargs["timing"] = TimingSettings(
            warmup_steps=args.timing_warmup_steps, min_time_s=args.min_time, min_steps=args.min_steps
        )
    engine_kwargs: dict[str, Any] = {
        k: getattr(args, k) for k in ("monitor_hz", "peak_tflops", "profile") if getattr(args, k, None) is not None
    }
    return workload, EngineSettings(device=device, amp=args.amp, compile=args.compile, **timing_kwargs, **engine_kwargs)


def _store_path(args: argparse.Namespace) -> Path:
    from bsprof.store import DEFAULT_STORE

    return Path(args.store) if args.store else DEFAULT_STORE


def cmd_workloads(args: argparse.Namespace) -> int:
    from bsprof.workloads import BUILTINS

    width = max(len(n) for n in BUILTINS)
    for name, b in BUILTINS.items():
        print(f"{name:<{width}}  {b.description}")
    return 0


def _convergence_settings(args: argparse.Namespace, workload: Any) -> Any:
    from bsprof.engine.convergence import ConvergenceSettings

    if args.warmup_steps < 0 or args.warmup_epochs < 0:
        raise BadInput("--warmup-steps and --warmup-epochs must be >= 0")
    if args.tune_lr < 0 or args.tune_lr == 1:
        raise BadInput(f"--tune-lr {args.tune_lr}: give 0 (no tuning) or at least 2 learning rates")
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
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from bsprof.console import Progress, print_summary
    from bsprof.engine.sweep import SweepConfig, run_sweep
    from bsprof.store import Store

    batch_sizes = parse_batch_sizes(args.batch_sizes)
    workload, settings = _load(args)
    config = SweepConfig(
        workload_ref=args.workload,
        batch_sizes=batch_sizes,
        kinds=("throughput", "convergence") if args.kind == "both" else (args.kind,),
        seeds=args.seeds,
        repeats=args.repeats,
        lr_rule=args.lr_rule,
        base_lr=args.base_lr,
        tune_lr=args.tune_lr,
        skip_larger_after_oom=args.skip_larger,
        convergence=_convergence_settings(args, workload),
    )
    with Store(_store_path(args), create=True) as store, Progress() as progress:
        fresh = args.fresh
        if settings.profile:
            settings = _with_trace_dir(settings, store, config, workload, fresh=fresh)
            fresh = False  # the run was just opened (fresh if asked); run_sweep resumes it
        try:
            outcome = run_sweep(config, workload, settings, store, fresh=fresh, progress=progress.update)
        except KeyboardInterrupt:
            progress.close()
            print("bsprof: interrupted; finished trials are stored, run the same command to resume", file=sys.stderr)
            return 130
        progress.close()
        log.info("run %s: %d trials run, %d already stored", outcome.run.run_id, len(outcome.results), outcome.skipped)
        print_summary(store, [outcome.run.run_id])
        if settings.profile:
            _print_profile_note(outcome, settings.trace_dir)
        errors = [r for r in outcome.results if r.status == "error"]
        if args.report or args.report_out:
            _print_report_info(_write_report(store, args.report_out, [outcome.run.run_id]))
    if errors:
        print(f"bsprof: {len(errors)} trial(s) failed with an error (first: {errors[0].error})", file=sys.stderr)
        return 1
    return 0


def _with_trace_dir(settings: Any, store: Any, config: Any, workload: Any, *, fresh: bool) -> Any:
    """Settings whose ``trace_dir`` is ``<store folder>/traces/<run>``; opens (or resumes) the run to learn its id.

    ``trace_dir`` is not part of the run's config hash, so ``run_sweep`` then resumes this same run.
    """
    from dataclasses import replace

    from bsprof.environment import collect_environment

    run = store.open_run(
        workload.name, config.hashed(workload, settings), collect_environment(settings.device), fresh=fresh
    )
    return replace(settings, trace_dir=str(Path(store.path).parent / "traces" / run.run_id))


def _print_profile_note(outcome: Any, trace_dir: str) -> None:
    profiled = sorted({r.spec.batch_size for r in outcome.results if r.extra.get("trace_dir")})
    failed = [r for r in outcome.results if r.extra.get("profile_error")]
    root = Path(trace_dir).parent
    if profiled:
        sizes = ", ".join(map(str, profiled))
        print(f"profiler traces for batch sizes {sizes} in {trace_dir}")
        print(f"view them: tensorboard --logdir {root}   (needs: pip install 'bsprof[tensorboard]'; or Perfetto UI)")
    else:
        print("no trial was profiled: every throughput trial of this run was already stored (use --fresh)")
    if failed:
        first = failed[0].extra["profile_error"]
        print(f"bsprof: profiling failed for {len(failed)} trial(s) (first: {first})", file=sys.stderr)


def cmd_profile(args: argparse.Namespace) -> int:
    """``bsprof profile``: ``bsprof sweep --kind throughput --profile`` with the options given here."""
    options = vars(_build_parser().parse_args(["sweep"]))  # every sweep option at its default
    options.update(vars(args), kind="throughput", profile=True)
    return cmd_sweep(argparse.Namespace(**options))


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


def _write_report(store: Any, out: str | None, run_ids: list[str] | None, benchmark_json: Sequence[str] = ()) -> Any:
    from bsprof.report import DEFAULT_REPORT, write_report

    return write_report(store, Path(out) if out else DEFAULT_REPORT, run_ids, benchmark_json)


def _print_report_info(info: Any) -> None:
    print(f"report: {info.path} ({info.charts} charts, {info.bytes / 2**20:.1f} MiB, {info.seconds:.1f} s)")


def cmd_report(args: argparse.Namespace) -> int:
    """``bsprof report``: the HTML report of the latest run per workload (or ``--run``)."""
    _print_report_info(_write_report(_store_path(args), args.output, args.run, args.benchmark_json))
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from bsprof.console import print_summary
    from bsprof.store import Store

    with Store(_store_path(args)) as store:
        run_ids = args.run or store.latest_run_ids()
        for r in run_ids:
            store.run(r)  # raises BadInput for an unknown run
        if not run_ids:
            raise BadInput(f"store {store.path} holds no runs yet: run `bsprof sweep` first")
        print_summary(store, run_ids)
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


def parse_fraction(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1. A bare number of 1 or more is refused as ambiguous (write ``150%``).

    Raises:
        BadInput: Not a number, negative, or a bare number >= 1.
    """
    t = text.strip()
    percent = t.endswith("%")
    try:
        value = float(t[:-1] if percent else t)
    except ValueError:
        raise BadInput(f"--fail-above {text!r}: expected e.g. 10% or 0.1") from None
    if not math.isfinite(value) or value < 0:
        raise BadInput(f"--fail-above {text!r}: must be a finite number >= 0")
    if not percent and value >= 1:
        raise BadInput(f"--fail-above {text!r}: ambiguous; write {value:g}% or {value / 100:g}")
    return value / 100 if percent else value


def cmd_compare(args: argparse.Namespace) -> int:
    """``bsprof compare``: 1 on a significant regression beyond the threshold, else 0."""
    from bsprof.compare import compare_paths
    from bsprof.console import print_comparison

    threshold = parse_fraction(args.fail_above)
    comparisons, warnings = compare_paths(args.baseline, args.new, threshold=threshold, alpha=args.alpha)
    print_comparison(comparisons, threshold=threshold, alpha=args.alpha)
    for w in warnings:
        print(f"bsprof compare: warning: {w}", file=sys.stderr)
    regressions = [c for c in comparisons if c.verdict == "regression"]
    if regressions:
        print(f"bsprof compare: {len(regressions)} regression(s), first: {regressions[0].name}", file=sys.stderr)
        return 1
    print(f"bsprof compare: no regression in {len(comparisons)} comparison(s)")
    return 0


COMMANDS = {
    "workloads": cmd_workloads,
    "sweep": cmd_sweep,
    "profile": cmd_profile,
    "export": cmd_export,
    "summary": cmd_summary,
    "find-max-batch": cmd_find_max_batch,
    "report": cmd_report,
    "compare": cmd_compare,
}


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
