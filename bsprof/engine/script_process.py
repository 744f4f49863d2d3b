"""The child process of a script trial: its environment, start, wait, timeout kill and log tail.

The child runs in its own process group (``start_new_session``), so ending a trial ends every process the
command started (e.g. the ranks of ``torchrun``): SIGTERM, then SIGKILL after a grace period. Its standard
output and error go to the trial's log file; on failure the result carries the log's last lines.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import IO

from bsprof.engine.result import TrialSpec
from bsprof.engine.script_protocol import ENV_VAR, TrialOrder

__all__ = ["child_env", "exit_text", "last_line", "log_says_oom", "log_tail", "start_child", "wait_child"]

_KILL_GRACE_S = 5.0
_BSPROF_ROOT = str(Path(__file__).resolve().parents[2])
"""The folder holding this ``bsprof`` package: first on the child's ``PYTHONPATH``, so that the tracker the
script imports speaks this sweep's protocol."""
_TAIL_LINES = 20


def child_env(order: TrialOrder, spec: TrialSpec) -> dict[str, str]:
    """This process's environment plus the trial's order (and its plain ``BSPROF_*`` values for scripts)."""
    env = {**os.environ, ENV_VAR: order.to_env(), "BSPROF_BATCH_SIZE": str(spec.batch_size)}
    env.update(BSPROF_LR=f"{spec.lr:g}", BSPROF_SEED=str(spec.seed), BSPROF_KIND=spec.kind)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_BSPROF_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def start_child(argv: list[str], env: dict[str, str], cwd: str | None, out: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start the command in its own process group, output and error to ``out``, no input.

    Raises:
        OSError: The command cannot be started (e.g. no such program).
    """
    return subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
    )


def wait_child(proc: subprocess.Popen[bytes], timeout_s: float | None) -> tuple[int, bool]:
    """(exit code, timed out): wait for the child; past ``timeout_s`` (seconds) end its process group."""
    try:
        returncode, timed_out = proc.wait(timeout=timeout_s), False
    except subprocess.TimeoutExpired:
        returncode, timed_out = _kill_group(proc), True
    except BaseException:
        _kill_group(proc)
        raise
    _kill_group(proc, quiet=True)  # strays of the group (e.g. ranks a launcher left behind)
    return returncode, timed_out


def _kill_group(proc: subprocess.Popen[bytes], *, quiet: bool = False) -> int:
    """End the child's process group: SIGTERM, then SIGKILL after a grace period. Returns the exit code."""
    try:
        os.killpg(proc.pid, signal.SIGTERM if not quiet else signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone
    try:
        return proc.wait(timeout=_KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it ended in between
        return proc.wait()


def log_tail(path: Path) -> str:
    """The last lines of the child's log (a note instead when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError as e:
        return f"(log unreadable: {e})"
    return "\n".join(lines[-_TAIL_LINES:])


def log_says_oom(tail: str) -> bool:
    """Whether the log's tail holds an out-of-memory message (:data:`~bsprof.engine.oom.OOM_MESSAGES`)."""
    from bsprof.engine.oom import OOM_MESSAGES

    low = tail.lower()
    return any(m in low for m in OOM_MESSAGES) or "outofmemoryerror" in low


def exit_text(returncode: int) -> str:
    """How the child ended, in words (``exit code 1``, ``killed by signal SIGKILL``)."""
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def last_line(tail: str) -> str:
    """The log's last non-empty line (at most 500 characters)."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"
