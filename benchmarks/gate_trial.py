"""Does the nightly gate survive a busy host? Issue 11's experiment, end to end (run it on an idle host).

For each of ``--pairs`` pairs, from the repository root, this runs the throughput suite
(``benchmarks/test_throughput.py``, one torch thread, ``--benchmark-save-data``) three times:

1. the **baseline**, on the host as it is (idle, for the experiment to mean anything; measured again, up to
   ``--baseline-attempts`` times, while a benchmark of it is marked busy: the gate never re-runs a baseline);
2. an **unchanged rerun**, with a spinning process (``python -c "while True: pass"``) started at ``--spin-at``
   of the baseline's wall time and killed when the run ends;
3. a **slowed rerun**: the same workload with ``tests/fixtures/slowdown.py`` busy-waiting ``--slowdown`` (20%) of
   every training step (``BSPROF_TEST_SLOWDOWN``), with the same spinner (``--no-spin-slowed``: without).

and judges 2 and 3 against 1 with the gate as the nightly job runs it: ``bsprof compare BASE NEW
--fail-above 10% --rerun '<the same suite command> {tests}'`` (re-runs of the slowed rerun stay slowed). Exit 1 of
the unchanged pair is a **false regression**; exit 3 is a refusal (still busy after the re-runs), not a
regression; exit 1 of the slowed pair is a **caught** slowdown. It prints one line per pair and the counts, and
writes every JSON file, the gate's output and ``summary.json`` under ``--out``.

    python benchmarks/gate_trial.py --pairs 10 --out reports/gate_trial

About 1 minute per pair with the defaults (2 batch sizes, 1 s each, plus pytest's start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLOWED_WORKLOAD = "tests/fixtures/slowdown.py:factory"
SPINNER = [sys.executable, "-c", "while True: pass"]

__all__ = ["PairOutcome", "main", "parse_args", "rerun_command", "suite_argv"]


@dataclass(frozen=True)
class PairOutcome:
    """One pair's gate exits (0 pass, 1 regression, 2 bad input, 3 refused) and what was marked busy."""

    pair: int
    baseline_busy: int
    unchanged_exit: int
    slowed_exit: int
    unchanged_busy: int
    slowed_busy: int
    unchanged_gate: str
    slowed_gate: str


def suite_argv(json_path: str, opts: argparse.Namespace, *, slowed: bool, rerun: bool = False) -> list[str]:
    """The suite command writing ``json_path``; for the gate's re-runs (``rerun``) ``{json}`` and ``{tests}``
    (the re-run benchmarks' node ids) instead of the file."""
    tests = "{tests}" if rerun else "benchmarks/test_throughput.py"
    argv = [sys.executable, "-m", "pytest", tests, "--benchmark-only", "-q",
            "-p", "no:cacheprovider", "--benchmark-save-data", "--benchmark-json", json_path,
            "--bsprof-batch-sizes", opts.batch_sizes, "--bsprof-min-time", str(opts.min_time)]  # fmt: skip
    return [*argv, "--bsprof-workload", SLOWED_WORKLOAD] if slowed else argv


def _env(opts: argparse.Namespace, *, slowed: bool) -> dict[str, str]:
    return {**os.environ, "BSPROF_TEST_SLOWDOWN": str(opts.slowdown if slowed else 0.0), "PYTHONPATH": str(REPO)}


def _run_suite(out: Path, opts: argparse.Namespace, *, slowed: bool, spin_after_s: float | None) -> float:
    """Run the suite into ``out`` (a spinner from ``spin_after_s`` seconds on); its wall time, seconds."""
    t0 = time.perf_counter()
    argv = suite_argv(str(out), opts, slowed=slowed)
    proc = subprocess.Popen(argv, cwd=REPO, env=_env(opts, slowed=slowed), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    spinner = None
    try:
        if spin_after_s is not None:
            try:
                proc.wait(timeout=spin_after_s)
            except subprocess.TimeoutExpired:
                spinner = subprocess.Popen(SPINNER)
        output, _ = proc.communicate()
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in output.splitlines() if ln.strip()]
        raise SystemExit(f"gate_trial: the suite failed (exit {proc.returncode}): {lines[-1] if lines else ''}")
    return time.perf_counter() - t0


def _busy(path: Path) -> int:
    doc = json.loads(path.read_text())
    return sum(1 for b in doc["benchmarks"] if (b.get("extra_info") or {}).get("host_busy") is True)


def rerun_command(opts: argparse.Namespace, *, slowed: bool) -> str:
    """The gate's ``--rerun`` command: the suite command for ``{tests}`` into ``{json}``."""
    argv = suite_argv("{json}", opts, slowed=slowed, rerun=True)
    return " ".join(a if a in ("{json}", "{tests}") else shlex.quote(a) for a in argv)


def _gate(base: Path, new: Path, opts: argparse.Namespace, *, slowed: bool) -> tuple[int, str]:
    """``bsprof compare`` as the nightly job runs it; (exit code, its output)."""
    rerun = rerun_command(opts, slowed=slowed)
    argv = [sys.executable, "-m", "bsprof.cli", "compare", str(base), str(new), "--fail-above", opts.fail_above,
            "--rerun", rerun, "--reruns", str(opts.reruns)]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, env=_env(opts, slowed=slowed), capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def _last(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The experiment's settings (``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--batch-sizes", default="64,256")
    p.add_argument("--min-time", type=float, default=1.0, help="--bsprof-min-time, seconds per benchmark")
    p.add_argument("--slowdown", type=float, default=0.2, help="injected slowdown of the slowed rerun (0.2 = 20%%)")
    p.add_argument("--spin-at", type=float, default=0.5, help="start the spinner at this share of the baseline's time")
    p.add_argument("--no-spin-slowed", action="store_true", help="measure the slowed rerun without the spinner")
    p.add_argument("--fail-above", default="10%")
    p.add_argument("--reruns", type=int, default=2)
    p.add_argument("--baseline-attempts", type=int, default=3, help="measure a busy baseline again, at most N times")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "gate_trial")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    outcomes: list[PairOutcome] = []
    for i in range(1, opts.pairs + 1):
        base, same, slow = (opts.out / f"pair{i:02d}-{k}.json" for k in ("base", "unchanged", "slowed"))
        for _ in range(max(1, opts.baseline_attempts)):  # the gate never re-runs a baseline: it must be quiet
            wall_s = _run_suite(base, opts, slowed=False, spin_after_s=None)
            if not _busy(base):
                break
        spin_s = opts.spin_at * wall_s
        _run_suite(same, opts, slowed=False, spin_after_s=spin_s)
        _run_suite(slow, opts, slowed=True, spin_after_s=None if opts.no_spin_slowed else spin_s)
        same_rc, same_out = _gate(base, same, opts, slowed=False)
        slow_rc, slow_out = _gate(base, slow, opts, slowed=True)
        (opts.out / f"pair{i:02d}-unchanged.gate.txt").write_text(same_out)
        (opts.out / f"pair{i:02d}-slowed.gate.txt").write_text(slow_out)
        o = PairOutcome(i, _busy(base), same_rc, slow_rc, _busy(same), _busy(slow), _last(same_out), _last(slow_out))
        outcomes.append(o)
        print(
            f"pair {i:2d}: baseline {o.baseline_busy} busy, {wall_s:.0f} s | unchanged exit {same_rc} "
            f"({o.unchanged_busy} busy) | slowed exit {slow_rc} ({o.slowed_busy} busy) | spinner from {spin_s:.0f} s",
            flush=True,
        )
    n = len(outcomes)
    counts = {
        "pairs": n,
        "false_regressions": sum(o.unchanged_exit == 1 for o in outcomes),
        "unchanged_refused_busy": sum(o.unchanged_exit == 3 for o in outcomes),
        "unchanged_passed": sum(o.unchanged_exit == 0 for o in outcomes),
        "slowdown_caught": sum(o.slowed_exit == 1 for o in outcomes),
        "slowdown_refused_busy": sum(o.slowed_exit == 3 for o in outcomes),
        "slowdown_missed": sum(o.slowed_exit == 0 for o in outcomes),
        "gate_errors": sum(2 in (o.unchanged_exit, o.slowed_exit) for o in outcomes),
        "unchanged_runs_marked_busy": sum(o.unchanged_busy > 0 for o in outcomes),
        "baselines_busy": sum(o.baseline_busy > 0 for o in outcomes),
    }
    summary = {"settings": {k: str(v) for k, v in vars(opts).items()}, "counts": counts,
               "pairs": [asdict(o) for o in outcomes]}  # fmt: skip
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=1))
    c = counts
    print(
        f"false regressions: {c['false_regressions']}/{n} (refused as busy: {c['unchanged_refused_busy']}, passed: "
        f"{c['unchanged_passed']}); {opts.slowdown:.0%} slowdown caught: {c['slowdown_caught']}/{n} (refused: "
        f"{c['slowdown_refused_busy']}, missed: {c['slowdown_missed']}); gate errors (exit 2): {c['gate_errors']}; "
        f"unchanged runs marked busy: {c['unchanged_runs_marked_busy']}/{n}; busy baselines (host not idle: the "
        f"gate refuses them): {c['baselines_busy']}/{n}"
    )
    print(f"details: {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
