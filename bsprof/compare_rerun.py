"""The nightly gate's second look: re-run the benchmarks it would fail or cannot judge, then judge once.

``bsprof compare BASE NEW --rerun CMD`` runs the suite command ``CMD`` again for the benchmarks of ``NEW`` that

* regressed (a ``regression`` verdict of :func:`~bsprof.compare.compare_results`), or
* were measured on a busy host (``host_busy``, :mod:`bsprof.engine.host_load`),

up to ``reruns`` times, and judges the re-measured figures with the same :func:`~bsprof.compare.compare_results`
(the one place verdicts are computed). A re-run benchmark's figures *replace* its first ones:

* a regression fails the gate only when a re-measurement on a quiet host still shows it (a regression measured
  once on a quiet host is re-run once; one measured on a busy host is re-run until a quiet measurement comes);
* a benchmark still busy after ``reruns`` re-runs is refused (:class:`~bsprof.errors.BusyHost`, exit 3) unless
  ``allow_busy``;
* a baseline measured on a busy host is refused at once: the gate re-runs only the results under test.

``CMD`` is split like a shell line (no shell runs it) and may hold two placeholders: ``{json}``, required, the
path of the pytest-benchmark JSON (or bsprof store) the command must write, and ``{tests}``, the re-run
benchmarks' names (pytest node ids for pytest-benchmark JSON, e.g.
``benchmarks/test_throughput.py::test_throughput[digits-mlp-B64]``), one argument each when ``{tests}`` stands
alone. A command that cannot start, exits non-zero, writes no results or misses a re-run benchmark is
:class:`~bsprof.errors.BadInput` (exit 2): the gate never passes on a re-run it could not make.

``write_judged`` writes ``NEW`` as judged, each re-run benchmark's entry replaced by its last re-measurement
(pytest-benchmark JSON only): the file the nightly job keeps as the next baseline, so a night that passed
through its re-runs does not leave a busy baseline behind (a busy baseline is refused).
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bsprof.compare import Comparison, compare_results, environment_mismatch
from bsprof.compare_inputs import Result, load_result
from bsprof.errors import BadInput, BusyHost
from bsprof.files import write_atomic

__all__ = ["DEFAULT_RERUNS", "GateResult", "Rerun", "compare_with_reruns", "rerun_argv", "run_rerun"]

log = logging.getLogger(__name__)

DEFAULT_RERUNS = 2
"""Re-runs of a flagged benchmark before the gate judges it as it stands."""


@dataclass(frozen=True)
class Rerun:
    """One re-run of the suite command.

    Attributes:
        attempt: 1 for the first re-run.
        names: The benchmarks re-run.
        busy_before: Those of them re-run because their last measurement was on a busy host (the others had
            regressed).
        still_busy: Those measured on a busy host again.
    """

    attempt: int
    names: tuple[str, ...]
    busy_before: tuple[str, ...]
    still_busy: tuple[str, ...]


@dataclass(frozen=True)
class GateResult:
    """The gate's verdicts after its re-runs.

    Attributes:
        comparisons: The verdicts on the re-measured results (:func:`~bsprof.compare.compare_results`).
        warnings: Its warnings.
        reruns: The re-runs made, in order (empty: nothing was flagged).
    """

    comparisons: list[Comparison]
    warnings: list[str]
    reruns: tuple[Rerun, ...]


def rerun_argv(command: str, json_path: str | Path, tests: Sequence[str]) -> list[str]:
    """The argument vector of ``command`` with ``{json}`` and ``{tests}`` filled in.

    Raises:
        BadInput: A command that does not split like a shell line, is empty, or has no ``{json}``.
    """
    try:
        parts = shlex.split(command)
    except ValueError as e:
        raise BadInput(f"--rerun: cannot split the command ({e}): {command}") from None
    if not parts:
        raise BadInput("--rerun: empty command")
    if not any("{json}" in p for p in parts):
        raise BadInput("--rerun: the command must name its output with {json} (e.g. --benchmark-json {json})")
    argv: list[str] = []
    for part in parts:
        if part == "{tests}":
            argv.extend(tests)
        else:
            argv.append(part.replace("{json}", str(json_path)).replace("{tests}", " ".join(tests)))
    return argv


def run_rerun(command: str, tests: Sequence[str], out: Path) -> Result:
    """Run the suite ``command`` for ``tests`` with ``{json}`` = ``out`` and read what it wrote there.

    The command's output is captured; on failure its last line is quoted.

    Raises:
        BadInput: The command cannot start, exits non-zero or writes no readable results.
    """
    argv = rerun_argv(command, out, tests)
    log.info("re-running %d benchmark(s): %s", len(tests), shlex.join(argv))
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as e:
        raise BadInput(f"--rerun: cannot run {argv[0]}: {e.strerror or e}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        last = f": {lines[-1][:200]}" if lines else ""
        raise BadInput(f"--rerun command failed (exit {proc.returncode}){last}")
    if not out.is_file():
        raise BadInput(f"--rerun command exited 0 but wrote no results to {{json}} ({shlex.join(argv)})")
    return load_result(out)


def _is_store(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(16).startswith(b"SQLite format 3")


def _write_judged(new: Path, reruns: Sequence[tuple[Sequence[str], Path]], out: Path) -> None:
    """``new`` (pytest-benchmark JSON) with each re-run benchmark's entry taken from its last re-run file."""
    doc = json.loads(new.read_text(encoding="utf-8"))
    latest: dict[str, dict[str, object]] = {}
    for names, path in reruns:
        entries = {b.get("fullname"): b for b in json.loads(path.read_text(encoding="utf-8"))["benchmarks"]}
        latest.update({n: entries[n] for n in names})
    doc["benchmarks"] = [latest.get(b.get("fullname"), b) for b in doc["benchmarks"]]
    text = json.dumps(doc, indent=4)
    write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"), "--write-judged")


def compare_with_reruns(
    baseline: str | Path,
    new: str | Path,
    *,
    command: str,
    reruns: int = DEFAULT_RERUNS,
    threshold: float = 0.10,
    alpha: float = 0.05,
    mem_threshold: float = 0.10,
    allow_env_mismatch: bool = False,
    allow_busy: bool = False,
    write_judged: str | Path | None = None,
    run: Callable[[str, Sequence[str], Path], Result] = run_rerun,
) -> GateResult:
    """Compare ``new`` with ``baseline``, re-running flagged benchmarks of ``new`` first (module docstring).

    Args:
        baseline: The reference results (a pytest-benchmark JSON file or a bsprof store); never re-run.
        new: The results under test, of the same kind.
        command: The suite command (``{json}``, ``{tests}`` placeholders; :func:`rerun_argv`).
        reruns: Most re-runs of the command (each re-runs every benchmark still flagged).
        threshold, alpha, mem_threshold, allow_env_mismatch, allow_busy: As for
            :func:`~bsprof.compare.compare_results`.
        write_judged: Write ``new`` as judged here (module docstring); pytest-benchmark JSON only.
        run: Runs the command for some benchmarks into a file and reads it (:func:`run_rerun`; tests swap it).

    Raises:
        BusyHost: The baseline, or a benchmark still busy after ``reruns`` re-runs, was measured on a busy
            host, and not ``allow_busy`` (exit code 3).
        BadInput: Bad inputs or options (as :func:`~bsprof.compare.compare_paths`), or a re-run that failed.
    """
    if reruns < 0:
        raise BadInput(f"--reruns must be >= 0, got {reruns}")
    rerun_argv(command, "{json}", [])  # a malformed command is refused before anything runs
    base_r, new_r = load_result(baseline), load_result(new)
    if write_judged is not None and _is_store(Path(new)):
        raise BadInput("--write-judged needs pytest-benchmark JSON results, not a store")
    if base_r.busy and not allow_busy:
        name, why = next(iter(base_r.busy.items()))
        raise BusyHost(
            f"refusing to judge: the baseline measured {len(base_r.busy)} benchmark(s) on a busy host, first {name} "
            f"({why}); the gate re-runs only the new results: measure the baseline again on a quiet host, or pass "
            "--allow-busy"
        )
    judge = {
        "threshold": threshold,
        "alpha": alpha,
        "mem_threshold": mem_threshold,
        "allow_env_mismatch": allow_env_mismatch,
        "names": (str(baseline), str(new)),
    }
    remeasured: set[str] = set()
    done: list[Rerun] = []
    with tempfile.TemporaryDirectory(prefix="bsprof-rerun-") as tmp:
        files: list[tuple[Sequence[str], Path]] = []
        for attempt in range(1, reruns + 1):
            comparisons, _ = compare_results(base_r, new_r, allow_busy=True, **judge)  # type: ignore[arg-type]
            regressed = {c.name for c in comparisons if c.verdict == "regression"}
            flagged = sorted(set(new_r.busy) | (regressed - remeasured))
            if not flagged:
                break
            out = Path(tmp) / f"rerun{attempt}.json"
            again = run(command, flagged, out)
            files.append((flagged, out))
            missing = [n for n in flagged if n not in again.status]
            if missing:
                raise BadInput(
                    f"--rerun: the command did not measure {missing[0]} ({len(missing)} of {len(flagged)} re-run "
                    "benchmark(s) missing from its results)"
                )
            mismatch = environment_mismatch(base_r, again)
            if mismatch and not allow_env_mismatch:
                raise BadInput(f"--rerun: the re-run's environment differs from the baseline's ({mismatch})")
            busy_before = tuple(n for n in flagged if n in new_r.busy)
            new_r = new_r.remeasured(flagged, again)
            remeasured |= set(flagged)
            done.append(Rerun(attempt, tuple(flagged), busy_before, tuple(n for n in flagged if n in new_r.busy)))
        if write_judged is not None:
            _write_judged(Path(new), files, Path(write_judged))
    if done:
        judge["busy_hint"] = f"still busy after {len(done)} re-run(s): run the suite on a quiet host or raise --reruns"
    comparisons, warnings = compare_results(base_r, new_r, allow_busy=allow_busy, **judge)  # type: ignore[arg-type]
    return GateResult(comparisons, warnings, tuple(done))
