"""``bsprof compare``, the nightly gate: thresholds, the significance rule and exit codes, on constructed
pytest-benchmark JSON files and stores.

A regression needs both a change beyond ``--fail-above`` and a one-sided Mann-Whitney U p < ``--alpha``.
With n values per side the smallest p an exact test can give is 1 / C(2n, n): 2 vs 2 rounds -> 1/6, 3 vs 3
seeds -> 1/20 = 0.05 (never < 0.05), 4 vs 4 seeds -> 1/70. So a 20% slowdown over 2 rounds, or a doubling
of steps-to-target over 3 seeds, is "not significant" by construction, never a failed night.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, CliResult, cli_command, cli_env, run_cli_subprocess

from bsprof.compare import compare_paths, compare_samples, p_worse
from bsprof.engine.timing import StepTimes
from bsprof.engine.trial import TrialResult, TrialSpec
from bsprof.errors import BadInput
from bsprof.options import parse_fraction
from bsprof.store import Store

MACHINE = {"node": "ci", "machine": "x86_64", "processor": "", "system": "Linux", "python_version": "3.11.7"}


def _rounds(median_s: float, n: int, seed: int, spread: float = 0.03) -> list[float]:
    """``n`` round times around ``median_s``: a floor at 97% of it plus positive noise (interference adds time)."""
    rng = random.Random(seed)
    return [median_s * (1 - spread + 2 * spread * rng.random()) for _ in range(n)]


def _bench(name: str, data: list[float] | None = None, steps: list[int | None] | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"device": "cpu", "device_name": "cpu"}
    if steps is not None:
        extra["steps_to_target_per_seed"] = steps
    stats: dict[str, Any] = {"median": sorted(data)[len(data) // 2] if data else 1.0, "rounds": len(data or [1])}
    if data is not None:
        stats["data"] = data
    return {"name": name, "fullname": f"benchmarks/test_x.py::{name}", "stats": stats, "extra_info": extra}


def _write(path: Path, *benches: dict[str, Any], machine: dict[str, Any] | None = None) -> Path:
    doc = {"machine_info": machine or MACHINE, "benchmarks": list(benches), "datetime": "2025-01-01T00:00:00"}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture
def pair(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    """Write a baseline and a new JSON file: step times of 0.1 ms scaled by ``slower``, over ``rounds`` rounds."""

    def make(slower: float = 1.0, rounds: int = 200, base_steps=None, new_steps=None) -> tuple[Path, Path]:
        def benches(factor: float, seed: int, steps: list[int | None] | None) -> list[dict[str, Any]]:
            out = [_bench("test_throughput[w-B8]", _rounds(1e-4 * factor, rounds, seed))]
            if steps is not None:
                out.append(_bench("test_convergence[w-B8-convergence]", _rounds(0.5, len(steps), seed), steps))
            return out

        return (
            _write(tmp_path / "base.json", *benches(1.0, 1, base_steps)),
            _write(tmp_path / "new.json", *benches(slower, 2, new_steps)),
        )

    return make


# --- the statistics -----------------------------------------------------------------------------------------


def test_the_smallest_exact_p_is_one_over_the_number_of_splits() -> None:
    assert p_worse([1, 2], [3, 4]) == pytest.approx(1 / 6)
    assert p_worse([1, 2, 3], [4, 5, 6]) == pytest.approx(1 / 20)
    assert p_worse([1, 2, 3, 4], [5, 6, 7, 8]) == pytest.approx(1 / 70)
    # ties stay exact (the normal approximation would say 0.036 here and flag 3 seeds)
    assert p_worse([10, 10, 12], [15, 15, 16]) == pytest.approx(0.05)
    assert math.isnan(p_worse([1.0], [2.0])) and math.isnan(p_worse([3, 3], [3, 3]))


def test_missed_targets_rank_above_everything() -> None:
    assert p_worse([10, 11, 12, 13], [math.inf] * 4) == pytest.approx(1 / 70)
    verdict, change, _ = compare_samples([10, 11, 12, 13], [math.inf] * 4, threshold=0.1, alpha=0.05)
    assert (verdict, change) == ("regression", math.inf)
    verdict, change, _ = compare_samples([math.inf] * 4, [10, 11, 12, 13], threshold=0.1, alpha=0.05)
    assert (verdict, change) == ("improvement", -1.0)


@pytest.mark.parametrize(
    ("base", "new", "statistic", "verdict"),
    [
        ([1.0, 1.01, 1.02, 1.03] * 10, [1.2, 1.21, 1.22, 1.23] * 10, "median", "regression"),
        ([1.0, 1.01, 1.02, 1.03] * 10, [1.05, 1.06, 1.07, 1.08] * 10, "median", "unchanged"),  # < threshold
        ([1.0, 1.01, 1.02, 1.03] * 10, [0.8, 0.81, 0.82, 0.83] * 10, "median", "improvement"),
        ([1.0, 1.1], [1.2, 1.3], "median", "not significant"),  # 2 rounds: p >= 1/6
        ([10, 12, 14], [20, 24, 28], "median", "not significant"),  # 3 seeds: p >= 1/20
        ([10, 12, 14, 16], [20, 24, 28, 32], "median", "regression"),  # 4 seeds: p = 1/70
        # the minimum ignores a contended stretch that only added time
        ([1.0] * 50 + [1.01] * 50, [1.0] * 20 + [2.0] * 80, "min", "unchanged"),
    ],
)
def test_verdicts(base: list[float], new: list[float], statistic: str, verdict: str) -> None:
    assert compare_samples(base, new, threshold=0.1, alpha=0.05, statistic=statistic)[0] == verdict


@pytest.mark.parametrize(("text", "value"), [("10%", 0.1), ("0.1", 0.1), (" 5 %", 0.05), ("0", 0.0), ("150%", 1.5)])
def test_fail_above_parsing(text: str, value: float) -> None:
    assert parse_fraction(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["10", "abc", "-5%", "inf", ""])
def test_fail_above_rejects(text: str) -> None:
    with pytest.raises(BadInput, match="--fail-above"):
        parse_fraction(text, option="--fail-above")


# --- the command ------------------------------------------------------------------------------------------


def test_a_20_percent_slowdown_over_many_rounds_fails(pair: Callable[..., tuple[Path, Path]], cli: Any) -> None:
    base, new = pair(slower=1.2)
    r = cli("compare", base, new, "--fail-above", "10%")
    assert r.code == 1, r.out + r.err
    assert "regression" in r.out and "+20" in r.out
    assert "1 failure(s)" in r.err and "(regression)" in r.err


def test_an_unchanged_rerun_passes(pair: Callable[..., tuple[Path, Path]], cli: Any) -> None:
    base, new = pair(slower=1.0)
    r = cli("compare", base, new, "--fail-above", "0.1")
    assert r.code == 0, r.out + r.err
    assert "unchanged" in r.out and "no regression in 1 comparison(s)" in r.out


def test_a_higher_threshold_lets_a_20_percent_slowdown_pass(pair: Callable[..., tuple[Path, Path]], cli: Any) -> None:
    base, new = pair(slower=1.2)
    assert cli("compare", base, new, "--fail-above", "25%").code == 0


def test_two_rounds_cannot_be_significant(pair: Callable[..., tuple[Path, Path]], cli: Any) -> None:
    base, new = pair(slower=1.2, rounds=2)
    r = cli("compare", base, new, "--fail-above", "10%")
    assert r.code == 0, r.out + r.err
    assert "not significant" in r.out


def test_steps_to_target_three_seeds_cannot_fail_four_can(pair: Callable[..., tuple[Path, Path]], cli: Any) -> None:
    base, new = pair(base_steps=[20, 22, 25], new_steps=[40, 44, None])
    r = cli("compare", base, new)
    assert r.code == 0 and "not significant" in r.out and "steps to target (median)" in r.out
    base, new = pair(base_steps=[20, 22, 25, 21], new_steps=[40, 44, None, 41])
    r = cli("compare", base, new, "--alpha", "0.05")
    assert r.code == 1 and "regression" in r.out


def test_machine_mismatch_is_a_warning(tmp_path: Path, cli: Any) -> None:
    base = _write(tmp_path / "a.json", _bench("t", _rounds(1e-4, 50, 1)))
    new = _write(tmp_path / "b.json", _bench("t", _rounds(1e-4, 50, 2)), machine={**MACHINE, "node": "other"})
    r = cli("compare", base, new)
    assert r.code == 0 and "different machines" in r.err


def test_stores_compare_trial_by_trial(tmp_path: Path, cli: Any) -> None:
    def store(path: Path, step_s: float, steps: list[int]) -> Path:
        with Store(path, create=True) as st:
            run = st.open_run("w", {"x": 1}, {"hostname": "ci", "device_name": "cpu"})
            for seed in range(3):
                blocks = tuple(_rounds(step_s * 10, 20, seed))
                times = StepTimes(blocks, 10, 8)
                spec = TrialSpec("w", "throughput", 8, seed, 0.1)
                metrics = {"step_time_s": times.median_s, "samples_per_s": times.samples_per_s}
                st.add_trial(run.run_id, TrialResult(spec, "ok", "cpu", "cpu", metrics, step_times=times))
            for seed, s in enumerate(steps):
                spec = TrialSpec("w", "convergence", 8, seed, 0.1)
                st.add_trial(run.run_id, TrialResult(spec, "ok", "cpu", "cpu", {"steps_to_target": s}))
        return path

    base = store(tmp_path / "a.db", 1e-3, [20, 21, 22, 23])
    same = store(tmp_path / "b.db", 1e-3, [21, 20, 23, 22])
    slow = store(tmp_path / "c.db", 1.3e-3, [21, 20, 23, 22])
    r = cli("compare", base, same)
    assert r.code == 0, r.out + r.err
    assert "60/60" in r.out  # every block of the three throughput trials
    assert cli("compare", base, slow).code == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"benchmarks": 3}', "is not a pytest-benchmark JSON file"),
        ('{"benchmarks": [{"name": "x"}]}', "benchmark #0 lacks 'name' or 'stats'"),
        ('{"benchmarks": [{"name": "x", "stats": {"data": [1, "a"]}}]}', "'a' is not a number"),
        ('{"benchmarks": [{"name": "other", "stats": {"median": 1}}]}', "no benchmark in common"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    pair: Callable[..., tuple[Path, Path]], tmp_path: Path, cli: Any, content: str, message: str
) -> None:
    base, _ = pair()
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    r: CliResult = cli("compare", base, bad)
    assert r.code == 2
    assert len(r.err_lines) == 1 and message in r.err_lines[0] and r.err_lines[0].startswith("bsprof compare: error:")
    assert r.out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("missing.json",), "not found: "),
        ((".",), "not a file: "),
        (("NEW", "--fail-above", "10"), "ambiguous"),
        (("NEW", "--alpha", "1.5"), "alpha must be in (0, 1)"),
    ],
)
def test_bad_arguments_exit_2(pair: Callable[..., tuple[Path, Path]], cli: Any, args: tuple[str, ...], message: str):
    base, new = pair()
    r = cli("compare", base, *[str(new) if a == "NEW" else a for a in args])
    assert r.code == 2 and len(r.err_lines) == 1 and message in r.err_lines[0]


def test_exit_codes_of_the_real_command(pair: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    base, new = pair(slower=1.2)
    run = subprocess.run(
        cli_command("compare", base, new, "--fail-above", "10%"), cwd=REPO, env=cli_env(), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    run = subprocess.run(
        cli_command("compare", base, tmp_path / "nope.json"), cwd=REPO, env=cli_env(), capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr


def test_compare_paths_warns_about_benchmarks_only_in_the_new_result(tmp_path: Path) -> None:
    base = _write(tmp_path / "a.json", _bench("t", _rounds(1e-4, 50, 1)))
    new = _write(tmp_path / "b.json", _bench("t", _rounds(1e-4, 50, 2)), _bench("only-here", [1.0, 1.1]))
    comparisons, warnings = compare_paths(base, new)
    assert [c.name for c in comparisons] == ["benchmarks/test_x.py::t"]
    assert not any(c.failed for c in comparisons)
    assert any("only in the new result" in w for w in warnings)


# --- issue 9.5: what fails the gate, and what it refuses ---------------------------------------------------


def _with(bench: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**bench, "extra_info": {**bench["extra_info"], **extra}}


def _gate_case(case: str, tmp_path: Path) -> tuple[Path, Path, tuple[str, ...]]:
    """A baseline and a new JSON file (step times unchanged) that differ only in what ``case`` names."""
    t = _bench("test_throughput[w-B8]", _rounds(1e-4, 60, 1))
    t2 = _bench("test_throughput[w-B16]", _rounds(2e-4, 60, 1))
    same_t, same_t2 = _bench(t["name"], _rounds(1e-4, 60, 2)), _bench(t2["name"], _rounds(2e-4, 60, 2))
    env = {**MACHINE, "bsprof": {"torch_version": "2.5.1", "cuda_version": "12.4", "threads": 1,
                                 "config_hash": "abc"}}  # fmt: skip
    base = [_with(t, peak_mem_bytes=1_000_000), _with(t2, peak_mem_bytes=2_000_000)]
    new = [_with(same_t, peak_mem_bytes=1_000_000), _with(same_t2, peak_mem_bytes=2_000_000)]
    new_env, args = env, ()
    if case == "missing":
        new = new[:1]  # B=16 ran out of memory: pytest skipped it, so it is absent from the JSON
    elif case == "oom":
        new[1] = _with(new[1], status="oom")
    elif case == "memory":
        new[1] = _with(new[1], peak_mem_bytes=2_300_000)  # +15% > 10%
    elif case in ("memory-cuda", "memory-rss"):  # the same +50% growth, measured exactly vs as CPU RSS growth
        source = "cuda_allocator" if case == "memory-cuda" else "rss_vmhwm"
        base = [_with(b, peak_mem_source=source) for b in base]
        new = [_with(b, peak_mem_source=source) for b in new]
        new[1] = _with(new[1], peak_mem_bytes=3_000_000)
    elif case == "memory-allowed":
        new[1] = _with(new[1], peak_mem_bytes=2_300_000)
        args = ("--mem-fail-above", "20%")
    elif case in ("torch", "torch-allowed"):
        new_env = {**env, "bsprof": {**env["bsprof"], "torch_version": "2.6.0"}}
        args = ("--allow-env-mismatch",) if case == "torch-allowed" else ()
    elif case == "gpu":
        new = [_with(b, device_name="NVIDIA A100-SXM4-80GB") for b in new]
    elif case == "nan":
        new[0]["stats"]["data"] = [math.nan, *new[0]["stats"]["data"][1:]]
    elif case == "malformed":
        new[0] = {"name": t["name"], "fullname": t["fullname"], "stats": {"min": "fast", "median": 1e-4},
                  "extra_info": {"step_times_s": "oops"}}  # fmt: skip
    elif case == "threads":
        new_env = {**env, "bsprof": {**env["bsprof"], "threads": 2}}
    return (
        _write(tmp_path / "base.json", *base, machine=env),
        _write(tmp_path / "new.json", *new, machine=new_env),
        args,
    )


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("unchanged", 0, "no regression"),
        ("missing", 1, "test_throughput[w-B16] (missing)"),
        ("oom", 1, "test_throughput[w-B16] (oom)"),
        ("memory", 1, "test_throughput[w-B16] (regression)"),
        ("memory-allowed", 0, "no regression"),
        ("memory-cuda", 1, "test_throughput[w-B16] (regression)"),
        ("memory-rss", 0, "peak memory measured as RSS growth (CPU) is shown, not judged"),
        ("torch", 2, "torch version 2.5.1 vs 2.6.0"),
        ("torch-allowed", 0, "different environments (torch version 2.5.1 vs 2.6.0)"),
        ("gpu", 2, "device cpu vs NVIDIA A100-SXM4-80GB"),
        ("nan", 2, "stats.data: nan is not a finite number"),
        ("malformed", 2, "stats.min: 'fast' is not a number"),
        ("threads", 0, "torch threads differ (1 vs 2)"),
    ],
)
def test_the_gate_fails_on_missing_oom_and_memory_and_refuses_bad_or_foreign_input(
    tmp_path: Path, case: str, code: int, message: str
) -> None:
    base, new, args = _gate_case(case, tmp_path)
    run = run_cli_subprocess("compare", base, new, *args, timeout=60)
    assert run.returncode == code, run.stdout + run.stderr
    assert message in run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    if code == 2:
        assert len(run.stderr.strip().splitlines()) == 1 and run.stdout == ""


def test_a_store_whose_batch_size_ran_out_of_memory_fails(tmp_path: Path, cli: Any) -> None:
    def store(path: Path, oom_at_16: bool, peak_16: int = 2_000_000) -> Path:
        with Store(path, create=True) as st:
            run = st.open_run("w", {"x": 1}, {"hostname": "ci", "device_name": "cpu", "torch_version": "2.5.1"})
            for b in (8, 16):
                for seed in range(3):
                    spec = TrialSpec("w", "throughput", b, seed, 0.1)
                    if b == 16 and oom_at_16:
                        st.add_trial(run.run_id, TrialResult(spec, "oom", "cpu", "cpu", {}))
                        continue
                    times = StepTimes(tuple(_rounds(b * 1e-3, 20, seed)), 10, 8)
                    metrics = {"step_time_s": times.median_s, "samples_per_s": times.samples_per_s,
                               "peak_mem_bytes": 1_000_000 if b == 8 else peak_16}  # fmt: skip
                    st.add_trial(run.run_id, TrialResult(spec, "ok", "cpu", "cpu", metrics, step_times=times))
        return path

    base = store(tmp_path / "a.db", False)
    assert cli("compare", base, store(tmp_path / "b.db", False)).code == 0
    r = cli("compare", base, store(tmp_path / "c.db", True))
    assert r.code == 1 and "w-B16 (oom)" in r.err
    r = cli("compare", base, store(tmp_path / "d.db", False, peak_16=3_000_000))
    assert r.code == 1 and "w-B16 (regression)" in r.err and "peak memory" in r.out


def test_a_store_from_another_torch_is_refused(tmp_path: Path, cli: Any) -> None:
    def store(path: Path, torch_version: str) -> Path:
        with Store(path, create=True) as st:
            run = st.open_run("w", {"x": 1}, {"hostname": "ci", "device_name": "cpu", "torch_version": torch_version})
            times = StepTimes(tuple(_rounds(1e-2, 20, 0)), 10, 8)
            spec = TrialSpec("w", "throughput", 8, 0, 0.1)
            metrics = {"step_time_s": times.median_s, "samples_per_s": times.samples_per_s}
            st.add_trial(run.run_id, TrialResult(spec, "ok", "cpu", "cpu", metrics, step_times=times))
        return path

    r = cli("compare", store(tmp_path / "a.db", "2.5.1"), store(tmp_path / "b.db", "2.6.0"))
    assert r.code == 2 and len(r.err_lines) == 1 and "torch version 2.5.1 vs 2.6.0" in r.err
