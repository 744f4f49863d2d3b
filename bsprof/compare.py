"""Regression comparison of two benchmark results: the nightly gate.

Inputs are two pytest-benchmark JSON files (``--benchmark-json``) or two bsprof stores. For each benchmark
present in both, two quantities are compared where available:

* **time per step** (throughput): the per-round times in ``stats["data"]`` (written by pytest-benchmark with
  ``--benchmark-save-data``) or ``extra_info["step_times_s"]``; for stores, the throughput trials' step times;
* **steps-to-target** (convergence): one value per seed, ``extra_info["steps_to_target_per_seed"]``; a seed
  that missed the target counts as infinitely many steps.

A change counts as a **regression** only when the median got worse by more than the threshold *and* the
difference is significant: a one-sided Mann-Whitney U test (the rank test asv uses when it has samples;
``scipy.stats.mannwhitneyu``) of "new is worse than baseline" gives p < ``alpha``. Both conditions are
needed: on a noisy shared machine a large drift between two runs is common (the threshold alone cries wolf on
few rounds), and with hundreds of rounds a tiny real shift is "significant" (the test alone flags 1%
changes). Note that with n seeds per side the smallest attainable p is 1 / C(2n, n): 3 vs 3 seeds can never
reach p < 0.05 (0.05 = 1/20), so steps-to-target needs at least 4 seeds per side to ever be flagged.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsprof.errors import BadInput

__all__ = ["Comparison", "compare_paths", "compare_samples", "load_samples"]

Samples = dict[tuple[str, str], list[float]]  # (benchmark name, metric) -> values (lower is better)


@dataclass(frozen=True)
class Comparison:
    """One benchmark's metric in both runs.

    Attributes:
        name: Benchmark name (pytest-benchmark fullname, or ``workload-B<batch>`` for stores).
        metric: ``step_time_s`` or ``steps_to_target`` (lower is better for both).
        base_median, new_median: Medians of the two samples.
        change: new_median / base_median - 1 (positive = worse).
        p_value: One-sided Mann-Whitney U p-value of "new is worse" (``nan`` with too few values).
        n_base, n_new: Sample sizes.
        verdict: ``regression``, ``improvement``, ``unchanged`` (within threshold) or ``not significant``.
    """

    name: str
    metric: str
    base_median: float
    new_median: float
    change: float
    p_value: float
    n_base: int
    n_new: int
    verdict: str


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def compare_samples(base: list[float], new: list[float], *, threshold: float, alpha: float) -> tuple[str, float, float]:
    """(verdict, change, p) for two samples of a lower-is-better quantity."""
    from scipy.stats import mannwhitneyu

    mb, mn = _median(base), _median(new)
    if math.isinf(mb) and math.isinf(mn):
        change = 0.0
    elif math.isinf(mn):
        change = math.inf
    elif math.isinf(mb):
        change = -1.0
    else:
        change = mn / mb - 1 if mb > 0 else math.nan
    p_worse = p_better = math.nan
    if len(base) >= 2 and len(new) >= 2 and len(set(base) | set(new)) > 1:
        big = 1e300  # ranks only: infinities (missed targets) as the largest values
        b = [min(x, big) for x in base]
        n = [min(x, big) for x in new]
        p_worse = float(mannwhitneyu(n, b, alternative="greater").pvalue)
        p_better = float(mannwhitneyu(n, b, alternative="less").pvalue)
    if abs(change) <= threshold:
        return "unchanged", change, p_worse
    if change > threshold:
        return ("regression" if p_worse < alpha else "not significant"), change, p_worse
    return ("improvement" if p_better < alpha else "not significant"), change, p_better


def _load_benchmark_json(path: Path) -> tuple[Samples, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"{path} is not a text file") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise BadInput(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    samples: Samples = {}
    for bench in doc["benchmarks"]:
        if not isinstance(bench, dict) or "name" not in bench or not isinstance(bench.get("stats"), dict):
            raise BadInput(f"{path}: a benchmark entry lacks 'name' or 'stats'")
        name = str(bench.get("fullname") or bench["name"])
        extra = bench.get("extra_info") or {}
        steps = extra.get("steps_to_target_per_seed")
        if isinstance(steps, list) and steps:
            samples[(name, "steps_to_target")] = [math.inf if s is None else float(s) for s in steps]
            continue
        data = bench["stats"].get("data") or extra.get("step_times_s")
        if isinstance(data, list) and data:
            samples[(name, "step_time_s")] = [float(x) for x in data]
        elif "median" in bench["stats"]:
            samples[(name, "step_time_s")] = [float(bench["stats"]["median"])]
    return samples, {"machine_info": doc.get("machine_info"), "commit_info": doc.get("commit_info")}


def _load_store(path: Path) -> tuple[Samples, dict[str, Any]]:
    from bsprof.store import Store

    samples: Samples = {}
    with Store(path) as store:
        run_ids = store.latest_run_ids()
        envs = {r: store.run(r).environment for r in run_ids}
        for row in store.trial_rows(run_ids):
            name = f"{row['workload']}-B{row['batch_size']}"
            if row["kind"] == "throughput" and row["status"] == "ok":
                samples.setdefault((name, "step_time_s"), []).append(float(row["step_time_s"]))
            elif row["kind"] == "convergence" and row.get("phase", "main") in ("main", "final"):
                steps = row.get("steps_to_target") if row["status"] == "ok" else None
                samples.setdefault((name, "steps_to_target"), []).append(math.inf if steps is None else float(steps))
    return samples, {"machine_info": {r: e.get("device_name") for r, e in envs.items()}}


def load_samples(path: str | Path) -> tuple[Samples, dict[str, Any]]:
    """Samples per (benchmark, metric) from a pytest-benchmark JSON file or a bsprof store."""
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"not found: {p}")
    with p.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"SQLite format 3"):
        return _load_store(p)
    return _load_benchmark_json(p)


def compare_paths(
    baseline: str | Path, new: str | Path, *, threshold: float = 0.10, alpha: float = 0.05
) -> tuple[list[Comparison], list[str]]:
    """Compare every benchmark present in both inputs; returns the comparisons and warnings.

    Raises:
        BadInput: Unreadable inputs, or no benchmark in common.
    """
    base_s, base_meta = load_samples(baseline)
    new_s, new_meta = load_samples(new)
    common = sorted(set(base_s) & set(new_s))
    if not common:
        raise BadInput(f"{baseline} and {new} have no benchmark in common: nothing to compare")
    warnings = []
    if base_meta.get("machine_info") != new_meta.get("machine_info"):
        warnings.append("the two inputs come from different machines or devices: differences may not be regressions")
    only = sorted({k[0] for k in set(base_s) ^ set(new_s)})
    if only:
        warnings.append(f"{len(only)} benchmark(s) present in only one input were skipped: {', '.join(only[:5])}")
    out = []
    for name, metric in common:
        b, n = base_s[(name, metric)], new_s[(name, metric)]
        verdict, change, p = compare_samples(b, n, threshold=threshold, alpha=alpha)
        out.append(Comparison(name, metric, _median(b), _median(n), change, p, len(b), len(n), verdict))
    return out, warnings
