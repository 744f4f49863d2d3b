"""The command line's door to script trials: ``bsprof sweep --cmd '...'``, ``--cmd-file F`` or ``-- cmd ...``.

It turns the options into a :class:`~bsprof.engine.script.ScriptJob` and the sweep's settings; the sweep,
the store, the summary and the report are the built-in workloads' (:func:`bsprof.commands.cmd_sweep`).
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import replace
from pathlib import Path
from typing import Any

from bsprof.errors import BadInput

__all__ = ["add_script_options", "script_command", "script_job", "split_command", "with_log_dir"]

_NOT_FOR_SCRIPTS = (
    ("amp", "off", "--amp"),
    ("compile", False, "--compile"),
    ("profile", False, "--profile"),
    ("measure_gns", False, "--measure-gns"),
    ("nproc_per_node", None, "--nproc-per-node"),
)


def add_script_options(p: argparse.ArgumentParser) -> None:
    """The sweep's options for a user's own training command."""
    g = p.add_argument_group(
        "your own training script (README: 'Sweep your own training script')",
        "Sweep a training command instead of a workload; it reports through bsprof.track() or a callback. "
        "Placeholders: {batch_size} {lr} {seed} {kind} {repeat} {trial_dir} and your --param names. "
        "The command may also follow `--` at the end of the command line.",
    )
    g.add_argument("--cmd", metavar="COMMAND", help="the training command, e.g. 'python train.py --bs {batch_size}'")
    g.add_argument("--cmd-file", metavar="FILE", help="a file holding the command (shell quoting, # comments)")
    g.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="a placeholder of your own")
    g.add_argument("--name", help="the job's name in the store and report (default: the script's file name)")
    g.add_argument(
        "--base-batch-size",
        type=int,
        help="batch size at which --base-lr holds; {lr} = the LR rule's scaling from there (default: smallest -b)",
    )
    g.add_argument(
        "--trial-timeout",
        type=float,
        metavar="S",
        help="kill a trial's process group after S seconds and store it budget_exhausted (default: no limit)",
    )
    g.add_argument("--lower-is-better", action="store_true", help="the reported metric improves downwards (a loss)")


def split_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``bsprof sweep [options] -- cmd ...`` -> (the options, the command tokens); no ``--``: (argv, None)."""
    if "--" not in argv:
        return argv, None
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def script_command(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The command tokens from ``--cmd``, ``--cmd-file`` or ``--`` (at most one of them), or ``None``.

    Raises:
        BadInput: Two forms at once, an unreadable file, unbalanced quotes or an empty command.
    """
    given = [(name, v) for name, v in (("--cmd", args.cmd), ("--cmd-file", args.cmd_file)) if v]
    if getattr(args, "command_tokens", None) is not None:
        given.append(("--", args.command_tokens))
    if not given:
        return None
    if len(given) > 1:
        raise BadInput(f"give the command once: {' and '.join(n for n, _ in given)} both given")
    name, value = given[0]
    if name == "--":
        tokens = list(value)
    else:
        text = value
        if name == "--cmd-file":
            try:
                text = Path(value).read_text()
            except OSError as e:
                raise BadInput(f"--cmd-file {value}: {e.strerror or e}") from None
        try:
            tokens = shlex.split(text, comments=name == "--cmd-file")
        except ValueError as e:
            raise BadInput(f"{name}: {e} (check the quotes)") from None
    if not tokens:
        raise BadInput(f"{name}: the command is empty")
    return tuple(tokens)


def _params(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise BadInput(f"--param {item!r}: expected NAME=VALUE with NAME a Python identifier")
        out[key.strip()] = value
    return out


def _default_name(command: tuple[str, ...]) -> str:
    scripts = [t for t in command if t.endswith(".py")]
    return Path(scripts[0] if scripts else command[0]).stem or "script"


def script_job(args: argparse.Namespace, command: tuple[str, ...], batch_sizes: tuple[int, ...]) -> Any:
    """The :class:`~bsprof.engine.script.ScriptJob` of the options.

    Without an ``{lr}`` placeholder the script picks its own learning rate and trials record LR 0.

    Raises:
        BadInput: Options that only apply to built-in workloads, a missing ``--base-lr`` for ``{lr}``,
            a bad ``--param``, timeout or base batch size.
    """
    from bsprof.engine.script import ScriptJob

    for attr, default, flag in _NOT_FOR_SCRIPTS:
        if getattr(args, attr, default) != default:
            raise BadInput(f"{flag} does not apply to --cmd: your script decides how it trains")
    if args.trial_timeout is not None and args.trial_timeout <= 0:
        raise BadInput(f"--trial-timeout must be > 0 seconds, got {args.trial_timeout:g}")
    if args.base_batch_size is not None and args.base_batch_size <= 0:
        raise BadInput(f"--base-batch-size must be > 0, got {args.base_batch_size}")
    uses_lr = any("{lr}" in t for t in command)
    if uses_lr and args.base_lr is None:
        raise BadInput("the command uses {lr}: give --base-lr (the LR at --base-batch-size) for the LR rule to scale")
    return ScriptJob(
        name=args.name or _default_name(command),
        command=command,
        params=_params(args.param),
        base_lr=args.base_lr if uses_lr else 0.0,
        base_batch_size=args.base_batch_size or min(batch_sizes),
        target=args.target,
        higher_is_better=not args.lower_is_better,
        trial_timeout_s=args.trial_timeout,
    )


def with_log_dir(job: Any, store_path: Path, run_id: str) -> Any:
    """``job`` writing its trials' logs under ``<store folder>/script-logs/<run>``."""
    return replace(job, log_dir=str(store_path.parent / "script-logs" / run_id))
