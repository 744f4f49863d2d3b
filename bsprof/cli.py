"""The ``bsprof`` command line: parses, calls the engine / store / analysis, prints.

Exit codes: 0 success; 1 the measurement itself failed; 2 bad input (one line on stderr, no traceback);
130 interrupted (finished trials are kept).

Size (about 460 lines, above the ~400 guideline): argparse declarations of every subcommand's options and nothing
else; long because the options are many.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from functools import partial
from typing import NoReturn

from bsprof.cli_script import add_script_options, split_command
from bsprof.commands import (
    cmd_check,
    cmd_compare,
    cmd_export,
    cmd_find_max_batch,
    cmd_predict,
    cmd_report,
    cmd_runs,
    cmd_summary,
    cmd_sweep,
    cmd_workloads,
)
from bsprof.errors import BsprofError
from bsprof.options import arg_type, parse_batch_sizes, parse_device, parse_float, parse_fraction, parse_int

__all__ = ["COMMANDS", "build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_POSITIVE_INT = arg_type(parse_int)
_POSITIVE_FLOAT = arg_type(partial(parse_float, positive=True))
_COUNT = arg_type(partial(parse_int, minimum=0))
_NON_NEGATIVE_FLOAT = arg_type(partial(parse_float, minimum=0.0))
_FLOAT = arg_type(parse_float)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        "-w",
        default="digits-mlp",
        help="built-in name (see `bsprof workloads`), package.module:factory or file.py:factory (default: digits-mlp)",
    )
    p.add_argument("--data-dir", help="dataset folder for workloads that read files (sets BSPROF_CIFAR10_DIR)")
    p.add_argument(
        "--device", type=arg_type(parse_device), default="auto", help="auto, cpu, cuda or cuda:N (default: auto)"
    )
    p.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="mixed precision (default: off)")
    p.add_argument("--compile", action="store_true", help="wrap the model with torch.compile")
    p.add_argument(
        "--threads",
        type=_POSITIVE_INT,
        help="torch CPU threads (default: 1 on the CPU, steady when other processes run: README, 'Noisy hosts')",
    )
    _add_store_option(p)


def _add_telemetry_options(p: argparse.ArgumentParser, *, profile_flag: bool = True) -> None:
    tm = p.add_argument_group("telemetry and profiling")
    tm.add_argument("--monitor-hz", type=_POSITIVE_FLOAT, default=20.0, help="telemetry polls per second (default: 20)")
    tm.add_argument(
        "--peak-tflops",
        type=_POSITIVE_FLOAT,
        help="peak TFLOP/s of the device for MFU (default: NVIDIA datasheet table by GPU name and dtype)",
    )
    if profile_flag:
        tm.add_argument(
            "--profile",
            action="store_true",
            help="after timing, a torch.profiler pass per batch size: TensorBoard trace and top operators",
        )


def _add_store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", "-s", default=None, help="SQLite results store (default: reports/bsprof.db)")


def _add_run_option(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--run", action="append", help=text)


def build_parser() -> argparse.ArgumentParser:
    """The ``bsprof`` parser: every subcommand and option; option values are parsed by :mod:`bsprof.options`."""
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
        type=arg_type(parse_batch_sizes),
        default="8..1024",
        help="comma list and/or ranges: 8,16,32 or 8..1024 = powers of two (default: 8..1024)",
    )
    sw.add_argument(
        "--kind",
        default="both",
        choices=["throughput", "convergence", "both"],
        help="throughput (speed, memory), convergence (steps/samples/time to target) or both (default: both)",
    )
    sw.add_argument("--seeds", type=_POSITIVE_INT, default=3, help="seeds per batch size (default: 3)")
    sw.add_argument(
        "--repeats",
        type=_POSITIVE_INT,
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
    sw.add_argument(
        "--remeasure",
        type=int,
        default=2,
        metavar="N",
        help="measure a throughput trial taken on a busy host again, up to N times (default: 2; README, 'Noisy hosts')",
    )
    sw.add_argument(
        "--micro-batch-size",
        metavar="M",
        help="samples per forward/backward pass; larger batch sizes accumulate gradients over ceil(B/M) passes per "
        "optimizer step; 'auto': the largest that fits (max-batch finder) (default: none, one pass)",
    )
    tg = sw.add_argument_group("throughput trials")
    tg.add_argument(
        "--min-time",
        type=_POSITIVE_FLOAT,
        default=1.0,
        help="measured seconds per throughput trial, at least (default: 1.0)",
    )
    tg.add_argument(
        "--min-steps",
        type=_POSITIVE_INT,
        default=20,
        help="measured steps per throughput trial, at least (default: 20)",
    )
    tg.add_argument("--timing-warmup-steps", type=_COUNT, default=5, help="untimed steps first (default: 5)")
    _add_telemetry_options(sw)
    add_script_options(sw)
    cg = sw.add_argument_group("convergence trials")
    cg.add_argument("--target", type=_FLOAT, help="validation metric to reach (default: the workload's)")
    cg.add_argument(
        "--target-patience",
        type=_POSITIVE_INT,
        default=1,
        help="consecutive evaluations at or above target that count as reaching it (default: 1, first crossing)",
    )
    cg.add_argument("--max-steps", type=_POSITIVE_INT, help="step budget per trial (default: none)")
    cg.add_argument("--max-epochs", type=_POSITIVE_FLOAT, default=100.0, help="epoch budget per trial (default: 100)")
    cg.add_argument("--max-time", type=_POSITIVE_FLOAT, default=120.0, help="training seconds per trial (default: 120)")
    cg.add_argument(
        "--eval-every",
        type=_POSITIVE_INT,
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
        type=_POSITIVE_FLOAT,
        help="override the workload's base LR (at its base batch size) that the LR rule scales from",
    )
    cg.add_argument(
        "--lr-schedule",
        metavar="SPEC",
        help="LR schedule in samples or epochs, the same in data terms at every batch size, e.g. "
        "cosine:warmup=2048,total=65536 or linear:warmup=0.5,total=10,unit=epochs,final=0.1 (default: constant)",
    )
    cg.add_argument("--warmup-steps", type=_COUNT, default=0, help="linear LR warm-up steps (default: 0)")
    cg.add_argument(
        "--warmup-epochs", type=_NON_NEGATIVE_FLOAT, default=0.0, help="linear LR warm-up epochs (default: 0)"
    )
    cg.add_argument(
        "--tune-lr",
        type=_COUNT,
        default=0,
        metavar="K",
        help="try K LRs on a log2 grid around the rule's LR per batch size, keep the best, re-run it on fresh "
        "seeds (default: 0, no tuning)",
    )
    cg.add_argument(
        "--measure-gns",
        action="store_true",
        help="measure the gradient noise scale B_simple at evaluations (McCandlish et al. 2018; probe time is "
        "kept out of the training time)",
    )

    so = sw.add_argument_group("scale out (see README: Scale out)")
    so.add_argument(
        "--nproc-per-node",
        type=_POSITIVE_INT,
        metavar="N",
        help="data-parallel trials: run in N processes (torch's elastic launcher, as torchrun), model under DDP; "
        "batch sizes are global (N x per-rank)",
    )
    so.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="where trials run: local (in this process, default) or ray (Ray tasks; pip install 'bsprof[ray]')",
    )
    so.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local Ray instance)")

    pf = sub.add_parser(
        "profile",
        help="throughput sweep with a torch.profiler pass per batch size",
        description="A throughput sweep (as `bsprof sweep --kind throughput --profile`): per batch size, a "
        "TensorBoard trace under <store folder>/traces/<run>/<workload>-B<batch>/ and the top operators.",
    )
    _add_engine_options(pf)
    pf.add_argument(
        "--batch-sizes",
        "-b",
        type=arg_type(parse_batch_sizes),
        default="8..1024",
        help="as for sweep (default: 8..1024)",
    )
    pf.add_argument("--seeds", type=_POSITIVE_INT, default=1, help="seeds per batch size (default: 1)")
    pf.add_argument("--repeats", type=_POSITIVE_INT, default=1, help="throughput rounds (default: 1)")
    pf.add_argument("--min-time", type=_POSITIVE_FLOAT, default=1.0, help="measured seconds per trial (default: 1)")
    pf.add_argument("--min-steps", type=_POSITIVE_INT, default=20, help="measured steps per trial (default: 20)")
    pf.add_argument("--fresh", action="store_true", help="start a new run (a resumed, finished run profiles nothing)")
    _add_telemetry_options(pf, profile_flag=False)
    own = vars(pf.parse_args([]))  # the profile options, at their defaults; the other sweep options at sweep's
    sweep_defaults = {k: v for k, v in vars(sw.parse_args([])).items() if k not in own}
    pf.set_defaults(**{**sweep_defaults, "kind": "throughput", "profile": True})

    pr = sub.add_parser(
        "predict",
        help="predict the critical batch size from the gradient noise scale in a short run",
        description="A throughput pass over the batch sizes and one short convergence trial at a small batch size "
        "measuring the gradient noise scale B_simple (McCandlish et al. 2018): the predicted critical batch size, "
        "steps-to-target curve S(B) and the batch size predicted fastest on this hardware, in a fraction of a "
        "sweep's time.",
    )
    _add_engine_options(pr)
    pr.add_argument(
        "--batch-sizes",
        "-b",
        type=arg_type(parse_batch_sizes),
        default="8..1024",
        help="as for sweep (default: 8..1024)",
    )
    pr.add_argument(
        "--at-batch-size", type=_POSITIVE_INT, help="batch size of the short convergence trial (default: smallest)"
    )
    pr.add_argument(
        "--budget-time",
        type=_POSITIVE_FLOAT,
        default=30.0,
        help="training seconds of the short convergence trial; it stops earlier at the target (default: 30)",
    )
    pr.add_argument("--budget-steps", type=_POSITIVE_INT, help="step budget of the short trial (default: none)")
    pr.add_argument(
        "--min-time", type=_POSITIVE_FLOAT, default=0.1, help="measured seconds per throughput trial (default: 0.1)"
    )
    pr.add_argument(
        "--min-steps", type=_POSITIVE_INT, default=10, help="measured steps per throughput trial (default: 10)"
    )
    pr.add_argument("--fresh", action="store_true", help="start a new run instead of resuming the stored one")
    own = vars(pr.parse_args([]))
    pr.set_defaults(**{k: v for k, v in vars(sw.parse_args([])).items() if k not in own})

    ex = sub.add_parser(
        "export",
        help="export trials as csv, json or parquet",
        description="One tidy row per trial (the documented columns first, SI units; see the README's export section).",
    )
    _add_store_option(ex)
    ex.add_argument("--format", "-f", default="csv", choices=["csv", "json", "parquet"], help="(default: csv)")
    _add_run_option(ex, "only this run id (repeatable)")
    ex.add_argument("-o", "--output", help="file to write (default: standard output)")
    ex.add_argument(
        "--curves", action="store_true", help="one row per evaluation of the convergence trials (learning curves)"
    )

    sm = sub.add_parser(
        "summary",
        help="per-batch-size table and recommendations",
        description="The trade-off table (throughput and time-to-target per batch size), regimes, the "
        "noise-scale fit and the recommended batch sizes, for the latest run per workload (or --run).",
    )
    _add_store_option(sm)
    _add_run_option(sm, "this run id (repeatable; default: latest run per workload)")
    sm.add_argument("--wide", action="store_true", help="every column, with spreads and intervals (needs ~220 columns)")

    rn = sub.add_parser(
        "runs",
        help="list the runs in a store",
        description="One line per run: id, workload, when it was created, trials stored, and its settings. "
        "summary/report/export take --run ID to pick one.",
    )
    _add_store_option(rn)

    rp = sub.add_parser(
        "report",
        help="self-contained HTML report (charts and tables, works offline)",
        description="One HTML file with every chart of the compute/accuracy trade-off, for the latest run per "
        "workload (or --run, repeatable: runs are compared in the same charts). It requests nothing from the network.",
    )
    _add_store_option(rp)
    rp.add_argument("-o", "--output", default=None, help="HTML file to write (default: reports/index.html)")
    _add_run_option(rp, "this run id (repeatable; default: latest run per workload)")
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
        "steps-to-target and peak memory. Exit 1 when one got worse by more than --fail-above and the one-sided "
        "Mann-Whitney test says so at --alpha, when peak memory grew by more than --mem-fail-above, or when a "
        "baseline benchmark is missing or out of memory in NEW; 0 otherwise; 2 on bad or corrupt input and on "
        "results from a different torch/CUDA/device (unless --allow-env-mismatch); 3 when a benchmark was measured on "
        "a busy host (unless --allow-busy). With --rerun CMD, a benchmark that regressed or was measured on a busy "
        "host is re-run first (up to --reruns times): a regression fails only if a quiet re-run still shows it, and a "
        "benchmark still busy after its re-runs is exit 3.",
    )
    cp.add_argument("baseline", help="the reference: pytest-benchmark JSON (--benchmark-json) or a bsprof store")
    cp.add_argument("new", help="the results under test, of the same kind")
    cp.add_argument(
        "--fail-above",
        type=arg_type(parse_fraction),
        default="10%",
        metavar="X",
        help="regression threshold: 10%% or 0.1 (default: 10%%)",
    )
    cp.add_argument("--alpha", type=_POSITIVE_FLOAT, default=0.05, help="significance level (default: 0.05)")
    cp.add_argument(
        "--mem-fail-above",
        type=arg_type(parse_fraction),
        default="10%",
        metavar="X",
        help="peak-memory growth that fails (default: 10%%)",
    )
    cp.add_argument(
        "--allow-env-mismatch",
        action="store_true",
        help="compare results from a different torch/CUDA version or device (refused by default: exit 2)",
    )
    cp.add_argument(
        "--allow-busy",
        action="store_true",
        help="judge benchmarks measured on a busy host (refused by default: exit 3; README, 'Noisy hosts')",
    )
    cp.add_argument(
        "--rerun",
        metavar="CMD",
        help="before failing, re-run the benchmarks of NEW that regressed or were measured on a busy host with this "
        "suite command and judge the re-measured figures; {json}: the results file it must write, {tests}: the "
        "benchmarks' names (README, 'Nightly GPU CI')",
    )
    cp.add_argument(
        "--reruns",
        type=_COUNT,
        default=2,
        metavar="N",
        help="most re-runs of --rerun before judging (default: 2)",
    )
    cp.add_argument(
        "--write-judged",
        metavar="FILE",
        help="with --rerun: write NEW as judged, each re-run benchmark replaced by its last re-measurement "
        "(pytest-benchmark JSON; keep it as the next baseline)",
    )

    ck = sub.add_parser(
        "check",
        help="the host's state before a sweep, and what to change",
        description="Sample the host for a moment: other processes' CPU use, the run queue, steal time, the CPU "
        "frequency governor and, per GPU, persistence mode, clocks, throttle reasons and other processes; print "
        "what to change before a sweep. Exit 3 when the host is busy for a trial of --threads threads, else 0.",
    )
    ck.add_argument("--threads", type=_POSITIVE_INT, default=1, help="threads a trial would use (default: 1)")
    ck.add_argument("--interval", type=_POSITIVE_FLOAT, default=1.0, help="seconds to sample the host (default: 1)")

    fm = sub.add_parser(
        "find-max-batch",
        help="largest batch size that fits in memory",
        description="Double the batch size until it runs out of memory, then bisect.",
    )
    _add_engine_options(fm)
    fm.add_argument("--start", type=_POSITIVE_INT, default=1, help="first batch size (default: 1)")
    fm.add_argument(
        "--cap",
        type=_POSITIVE_INT,
        default=65536,
        help="largest batch size tried (default: 65536; guards a CPU host against swapping)",
    )
    return parser


def _version() -> str:
    from bsprof import __version__

    return f"bsprof {__version__}"


COMMANDS = {
    "workloads": cmd_workloads,
    "sweep": cmd_sweep,
    "profile": cmd_sweep,  # with the sweep options' defaults, --kind throughput and --profile (build_parser)
    "export": cmd_export,
    "summary": cmd_summary,
    "runs": cmd_runs,
    "find-max-batch": cmd_find_max_batch,
    "predict": cmd_predict,
    "report": cmd_report,
    "compare": cmd_compare,
    "check": cmd_check,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bsprof`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    options, command_tokens = split_command(argv)
    args = build_parser().parse_args(options)
    args.argv = argv  # a data-parallel sweep relaunches it
    if command_tokens is not None:
        if args.command != "sweep":
            build_parser().error(f"`-- COMMAND` is for `bsprof sweep` only, not `bsprof {args.command}`")
        args.command_tokens = command_tokens
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        code = COMMANDS[args.command](args)
    except BsprofError as e:
        print(f"bsprof {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("bsprof: interrupted", file=sys.stderr)
        code = 130
    if code == 130:
        _interrupt_handled()
    return code


def _interrupt_handled() -> None:
    """Make ``python -m bsprof.cli`` exit 130 after a Ctrl-C it handled, not by the signal (-2).

    CPython remembers a ``KeyboardInterrupt`` that ended a string ``exec``/``eval``
    (``_PyRuntime.signals.unhandled_keyboard_interrupt``, set in ``run_eval_code_obj``) even when a caller caught
    it, and under ``python -m`` ``Py_RunMain`` then re-sends SIGINT to the process instead of exiting with the
    code returned. A Ctrl-C lands in such an ``exec`` now and then (``dataclasses`` and ``namedtuple`` build their
    methods with one, e.g. in a module imported lazily during a trial). Any string eval that ends normally resets
    the flag, so one is run here, after the interrupt was handled. (The ``bsprof`` console script runs as a file
    and is not affected.)
    """
    exec("None")  # a string, not a code object: only the string path resets the flag


if __name__ == "__main__":
    raise SystemExit(main())
