"""What each ``bsprof`` subcommand does: load, call the engine / store / analysis / report, print.

:mod:`bsprof.cli` parses the command line and maps subcommands here; bad input raises
:class:`~bsprof.errors.BadInput` (exit code 2) before anything is written.

Size (about 490 lines, above the ~400 guideline): one short function per subcommand and the option-to-settings
helpers they share; splitting it per subcommand group is the next step.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bsprof.cli_script import script_command, script_job, with_log_dir
from bsprof.errors import BadInput
from bsprof.options import convergence_settings, timing_settings

if TYPE_CHECKING:
    from bsprof.engine.trial import EngineSettings
    from bsprof.workload import Workload

__all__ = [
    "cmd_check",
    "cmd_compare",
    "cmd_export",
    "cmd_find_max_batch",
    "cmd_predict",
    "cmd_report",
    "cmd_runs",
    "cmd_summary",
    "cmd_sweep",
    "cmd_workloads",
]

log = logging.getLogger("bsprof")


def _workload_and_settings(args: argparse.Namespace) -> tuple[Workload, EngineSettings]:
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
    threads = args.threads or (1 if device.type == "cpu" else None)  # README, "Noisy hosts"
    if threads:
        import torch

        torch.set_num_threads(threads)
    engine_kwargs: dict[str, Any] = {
        k: getattr(args, k) for k in ("monitor_hz", "peak_tflops", "profile") if getattr(args, k, None) is not None
    }
    timing = timing_settings(args)
    if timing is not None:
        engine_kwargs["timing"] = timing
    engine_kwargs.update(_data_settings(args))
    return workload, EngineSettings(device=device, amp=args.amp, compile=args.compile, **engine_kwargs)


def _data_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``micro_batch_size`` and ``lr_schedule`` from ``--micro-batch-size`` and ``--lr-schedule``."""
    from bsprof.engine.schedules import LRSchedule

    out: dict[str, Any] = {}
    micro = getattr(args, "micro_batch_size", None)
    if micro is not None and micro != "auto":
        if not micro.isdigit() or int(micro) < 1:
            raise BadInput(f"--micro-batch-size {micro!r}: give a positive integer or 'auto'")
        out["micro_batch_size"] = int(micro)
    if getattr(args, "lr_schedule", None):
        if args.warmup_steps or args.warmup_epochs:
            raise BadInput("--lr-schedule has its own warm-up (warmup=...): drop --warmup-steps/--warmup-epochs")
        out["lr_schedule"] = LRSchedule.parse(args.lr_schedule)
    return out


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
    """``bsprof sweep`` (and ``bsprof profile``, whose parser fills in the sweep options it does not take)."""
    from bsprof.console import Progress, print_summary
    from bsprof.engine.sweep import SweepConfig, run_sweep
    from bsprof.store import Store

    batch_sizes = args.batch_sizes  # parsed by the CLI (bsprof.options.parse_batch_sizes)
    command = script_command(args)
    if command is not None:
        workload, settings = _load_script(args, command, batch_sizes)
    else:
        workload, settings = _workload_and_settings(args)
    config = SweepConfig(
        workload_ref=args.workload if command is None else f"cmd: {shlex.join(command)}",
        batch_sizes=batch_sizes,
        kinds=("throughput", "convergence") if args.kind == "both" else (args.kind,),
        seeds=args.seeds,
        repeats=args.repeats,
        lr_rule=args.lr_rule,
        base_lr=args.base_lr,
        tune_lr=args.tune_lr,
        skip_larger_after_oom=args.skip_larger,
        remeasure_busy=max(0, getattr(args, "remeasure", 2)),
        auto_micro_batch=args.micro_batch_size == "auto",
        convergence=convergence_settings(args, workload),
    )
    executor, settings, follower_done = _executor(args, config, settings, workload, script=command is not None)
    if follower_done is not None:  # a data-parallel rank other than 0 (or the launcher): no store, no output
        return follower_done
    if command is None:
        _warn_batches_above_training_set(workload, batch_sizes)
    with Store(_store_path(args), create=True) as store, Progress() as progress:
        fresh = args.fresh
        runners = None
        if settings.profile:
            settings = _with_trace_dir(settings, store, config, workload, fresh=fresh)
            fresh = False  # the run was just opened (fresh if asked); run_sweep resumes it
        if command is not None:
            workload, runners = _script_runners(store, config, workload, settings, fresh=fresh)
            fresh = False  # likewise: the run was opened to name the trials' log folder
        try:
            outcome = run_sweep(
                config, workload, settings, store, fresh=fresh, progress=progress.update, runners=runners,
                prime=command is None, executor=executor,
            )  # fmt: skip
        except KeyboardInterrupt:
            progress.close()
            print("bsprof: interrupted; finished trials are stored, run the same command to resume", file=sys.stderr)
            return 130
        finally:
            if executor is not None:
                executor.close()
        progress.close()
        elsewhere = (
            f", {outcome.claimed_elsewhere} run by another sweep of this run at the same time"
            if outcome.claimed_elsewhere
            else ""
        )
        log.info(
            "run %s: %d trials run by this sweep, %d already stored%s",
            outcome.run.run_id,
            len(outcome.results),
            outcome.skipped,
            elsewhere,
        )
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


def cmd_predict(args: argparse.Namespace) -> int:
    """``bsprof predict``: one throughput pass over the batch sizes and one short convergence trial at a small
    batch size measuring the gradient noise scale; prints the predicted critical batch size and S(B)."""
    from dataclasses import replace

    from bsprof.console import Progress, print_prediction
    from bsprof.engine.noise_scale import GnsSettings
    from bsprof.engine.sweep import SweepConfig, run_sweep
    from bsprof.store import Store

    workload, settings = _workload_and_settings(args)
    sizes = args.batch_sizes  # parsed by the CLI (bsprof.options.parse_batch_sizes)
    at = args.at_batch_size or min(sizes)
    conv = replace(
        convergence_settings(args, workload),
        max_steps=args.budget_steps,
        max_time_s=args.budget_time,
        max_epochs=None,
        gns=GnsSettings(probes=2, spacing=1.5),  # a sparser curve; the target's value still gets 16 probes
    )
    config = SweepConfig(
        workload_ref=args.workload,
        batch_sizes=tuple(sorted({*sizes, at})),
        kinds=("throughput", "convergence"),
        seeds=1,
        lr_rule=args.lr_rule,
        base_lr=args.base_lr,
        convergence=conv,
        convergence_batch_sizes=(at,),
        mode="predict",
    )
    with Store(_store_path(args), create=True) as store, Progress() as progress:
        try:
            outcome = run_sweep(config, workload, settings, store, fresh=args.fresh, progress=progress.update)
        except KeyboardInterrupt:
            progress.close()
            print("bsprof: interrupted; finished trials are stored, run the same command to resume", file=sys.stderr)
            return 130
        progress.close()
        print_prediction(store, outcome.run.run_id)
    errors = [r for r in outcome.results if r.status == "error"]
    if errors:
        print(f"bsprof: {len(errors)} trial(s) failed with an error (first: {errors[0].error})", file=sys.stderr)
        return 1
    return 0


def _executor(
    args: argparse.Namespace, config: Any, settings: Any, workload: Any, *, script: bool
) -> tuple[Any, Any, int | None]:
    """(executor or ``None`` for the local default, settings, exit code when this process is done already).

    ``--nproc-per-node N`` relaunches this command in N processes and returns their exit code; with ``--executor
    ray`` each trial's N ranks run in one Ray task instead. Under ``torchrun`` (``WORLD_SIZE`` and ``RANK`` set),
    rank 0 drives the sweep and the other ranks follow it. A script's command (``script``) runs its own launcher
    (torchrun) when it needs one; through Ray the job itself goes to the workers. Nothing is imported for the
    local default.
    """
    under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if under_torchrun and args.executor != "local":
        raise BadInput("--executor ray does not run under torchrun: use --nproc-per-node N --executor ray")
    if not script and (args.nproc_per_node is not None or under_torchrun):
        world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.nproc_per_node
        if settings.profile:
            raise BadInput("--profile is not supported with data-parallel trials")
        uneven = [b for b in config.batch_sizes if b % world_size]
        if uneven:
            raise BadInput(f"batch sizes {uneven} are not multiples of the world size {world_size} (global batches)")
        from bsprof.engine import distributed
        from bsprof.engine.sweep import trial_runners

        if args.executor == "ray":  # the driver is no rank: the job's shape names the run, each task forms a job
            settings = replace(settings, data_parallel=distributed.DataParallel(0, world_size, 0))
            return _ray_executor(args, settings, args.workload, nproc_per_node=world_size), settings, None
        if not under_torchrun:
            return None, settings, distributed.launch(args.nproc_per_node, args.argv)
        world = distributed.context_from_env()
        settings = replace(settings, device=world.device(settings.device), data_parallel=world)
        world.start(settings.device)
        if world.rank != 0:
            distributed.follow(world, workload, settings, trial_runners(config))
            return None, settings, 0
        return distributed.DataParallelDriver(world), settings, None
    if args.executor == "ray":
        return _ray_executor(args, settings, None if script else args.workload), settings, None
    return None, settings, None


def _ray_executor(args: argparse.Namespace, settings: Any, workload_ref: str | None, **kwargs: Any) -> Any:
    """The Ray executor (local instance, or ``--ray-address``), its packing plan printed."""
    from bsprof.engine.ray_executor import RayExecutor

    executor = RayExecutor.start(workload_ref, address=args.ray_address, **kwargs)
    print(executor.plan(settings), file=sys.stderr)
    return executor


def _warn_batches_above_training_set(workload: Any, batch_sizes: Sequence[int]) -> None:
    """Warn (one line) that batch sizes above the training set's size repeat examples within a batch."""
    try:
        n_train = len(workload.train_split())
    except TypeError:  # an iterable dataset has no length: nothing to compare with
        return
    except Exception:  # noqa: BLE001 - a broken train_split() is reported in one line by the pre-trial validation
        return
    over = [b for b in batch_sizes if b > n_train]
    if over:
        log.warning(
            "batch size(s) %s exceed the %d training examples of %s: each such batch repeats examples (the "
            "sweep measures them anyway)",
            ", ".join(map(str, over)),
            n_train,
            workload.name,
        )


def _load_script(args: argparse.Namespace, command: tuple[str, ...], batch_sizes: tuple[int, ...]) -> tuple[Any, Any]:
    """The script job and the engine settings of ``bsprof sweep --cmd`` (bad input raised before anything runs)."""
    from bsprof.engine.device import resolve_device
    from bsprof.engine.trial import EngineSettings

    job = script_job(args, command, batch_sizes)
    timing = timing_settings(args)
    engine_kwargs: dict[str, Any] = {"timing": timing} if timing is not None else {}
    return job, EngineSettings(device=resolve_device(args.device), monitor_hz=args.monitor_hz, **engine_kwargs)


def _script_runners(store: Any, config: Any, job: Any, settings: Any, *, fresh: bool) -> tuple[Any, Any]:
    """(job logging under ``<store folder>/script-logs/<run>``, the sweep's runners); opens (or resumes) the run
    to learn its id — the log folder is not part of the run's config hash, so ``run_sweep`` resumes this run."""
    from bsprof.engine.script import script_runners
    from bsprof.environment import collect_environment

    run = store.open_run(job.name, config.hashed(job, settings), collect_environment(settings.device), fresh=fresh)
    job = with_log_dir(job, Path(store.path), run.run_id)
    return job, script_runners(job, config.convergence)


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
    profiles = [(r.spec.batch_size, r.extra.profile) for r in outcome.results if r.extra.profile is not None]
    profiled = sorted({b for b, p in profiles if p.trace_dir})
    failed = [p.error for _, p in profiles if p.error]
    root = Path(trace_dir).parent
    if profiled:
        sizes = ", ".join(map(str, profiled))
        print(f"profiler traces for batch sizes {sizes} in {trace_dir}")
        print(f"view them: tensorboard --logdir {root}   (needs: pip install 'bsprof[tensorboard]'; or Perfetto UI)")
    else:
        print("no trial was profiled: every throughput trial of this run was already stored (use --fresh)")
    if failed:
        first = failed[0]
        print(f"bsprof: profiling failed for {len(failed)} trial(s) (first: {first})", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    from bsprof.export import curves_frame, export_frame, write_export
    from bsprof.files import check_output_path
    from bsprof.store import Store

    if args.output:
        check_output_path(args.output, "--output")  # before reading anything
    with Store(_store_path(args)) as store:
        if args.run:
            for r in args.run:
                store.run(r)  # raises BadInput for an unknown run
        frame = (curves_frame if getattr(args, "curves", False) else export_frame)(store, args.run)
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
    from bsprof.console import print_run_note, print_summary
    from bsprof.store import Store

    with Store(_store_path(args)) as store:
        run_ids = args.run or store.latest_run_ids()
        for r in run_ids:
            store.run(r)  # raises BadInput for an unknown run
        if not run_ids:
            raise BadInput(f"store {store.path} holds no runs yet: run `bsprof sweep` first")
        print_summary(store, run_ids, wide=args.wide)
        print_run_note(store, run_ids, chosen=bool(args.run))
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """``bsprof runs``: every run of the store, oldest first."""
    from bsprof.console import print_runs
    from bsprof.store import Store

    with Store(_store_path(args)) as store:
        if not store.runs():
            raise BadInput(f"store {store.path} holds no runs yet: run `bsprof sweep` first")
        print_runs(store)
    return 0


def cmd_find_max_batch(args: argparse.Namespace) -> int:
    from bsprof.engine.maxbatch import find_max_batch
    from bsprof.environment import collect_environment
    from bsprof.store import Store

    workload, settings = _workload_and_settings(args)
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


def cmd_compare(args: argparse.Namespace) -> int:
    """``bsprof compare``: 1 when a comparison fails the gate (regression, missing or OOM benchmark), 3 when a
    benchmark was measured on a busy host (:class:`~bsprof.errors.BusyHost`; with ``--rerun``, after its
    re-runs), else 0."""
    from bsprof.compare import compare_paths
    from bsprof.compare_rerun import compare_with_reruns
    from bsprof.console import print_comparison

    threshold, mem_threshold = args.fail_above, args.mem_fail_above
    judge = {
        "threshold": threshold,
        "alpha": args.alpha,
        "mem_threshold": mem_threshold,
        "allow_env_mismatch": args.allow_env_mismatch,
        "allow_busy": args.allow_busy,
    }
    if getattr(args, "rerun", None):
        gate = compare_with_reruns(
            args.baseline, args.new, command=args.rerun, reruns=args.reruns, write_judged=args.write_judged, **judge
        )
        comparisons, warnings = gate.comparisons, gate.warnings
        for r in gate.reruns:
            print(
                f"bsprof compare: re-run {r.attempt}/{args.reruns}: {len(r.names)} benchmark(s) "
                f"({len(r.busy_before)} busy, {len(r.names) - len(r.busy_before)} regressed), "
                f"{len(r.still_busy)} still busy",
                file=sys.stderr,
            )
    elif getattr(args, "write_judged", None):
        raise BadInput("--write-judged needs --rerun")
    else:
        comparisons, warnings = compare_paths(args.baseline, args.new, **judge)
    print_comparison(comparisons, threshold=threshold, alpha=args.alpha, mem_threshold=mem_threshold)
    for w in warnings:
        print(f"bsprof compare: warning: {w}", file=sys.stderr)
    failed = [c for c in comparisons if c.failed]
    if failed:
        print(
            f"bsprof compare: {len(failed)} failure(s), first: {failed[0].name} ({failed[0].verdict})", file=sys.stderr
        )
        return 1
    print(f"bsprof compare: no regression in {len(comparisons)} comparison(s)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """``bsprof check``: print the host's state and what to change; 3 when the host is busy, else 0."""
    from bsprof.console import print_host_state
    from bsprof.host_check import advice, read_host_state

    state = read_host_state(interval_s=args.interval, threads=args.threads)
    print_host_state(state, advice(state))
    return 3 if state.load is not None and state.load.busy else 0
