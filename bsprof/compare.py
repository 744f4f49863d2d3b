"""Regression comparison of two benchmark results: the nightly gate.

Inputs are two pytest-benchmark JSON files (``--benchmark-json``) or two bsprof stores. For each benchmark
present in both, two quantities are compared where available:

* **time per step** (throughput): the per-round times in ``stats["data"]`` (written by pytest-benchmark with
  ``--benchmark-save-data``) or ``extra_info["step_times_s"]`` (written by ``benchmarks/test_throughput.py``);
  for stores, the per-step times of every timed block of the latest run's throughput trials;
* **steps-to-target** (convergence): one value per seed, ``extra_info["steps_to_target_per_seed"]``; a seed
  that missed the target counts as infinitely many steps.

The change is measured on a robust location of each sample: for step times the **minimum** over rounds, for
steps-to-target the **median** over seeds. Interference on a shared host only ever *adds* time to a step
(another process on the core, a stolen time slice), so the fastest rounds are the best estimate of what the
code costs (Chen & Revels 2016, *Robust benchmarking in noisy environments*; pytest-benchmark's own gate is
typically ``--benchmark-compare-fail=min:5%``). On this project's shared 2-core CI host, over 10 reruns of
unchanged code at the CPU defaults, a gate on medians failed 7 times and a gate on minima 2 times (whole
one-second windows at half speed), while an injected 20% slowdown moved every minimum by 16% or more. The
price: a regression that slows only some steps (say, an extra allocation every tenth step) moves the median
but not the minimum; the rank test below still sees it, but the gate needs both. Seeds differ in both
directions, so steps-to-target uses the median.

A change counts as a **regression** only when that statistic got worse by more than the threshold *and* the
difference is significant: a one-sided Mann-Whitney U test (the rank test asv uses when it has samples;
``scipy.stats.mannwhitneyu``) of "new is worse than baseline" gives p < ``alpha``. Both conditions are
needed: on a noisy shared machine a large drift between two runs is common (the threshold alone cries wolf on
few rounds), and with hundreds of rounds a tiny real shift is "significant" (the test alone flags 1%
changes). Rounds of one run are not independent draws (a busy spell slows a stretch of them), so the p-value
of many rounds is optimistic; the threshold is what keeps such drifts from failing the gate.

Small samples are tested exactly: when there are at most :data:`EXACT_LIMIT` ways to split the pooled values
into the two groups, the p-value comes from enumerating all of them (``scipy.stats.PermutationMethod``), which
stays exact when values tie (steps-to-target often does); larger samples use the normal approximation with
the tie correction. With n seeds per side the smallest attainable p is therefore 1 / C(2n, n): 3 vs 3 seeds
can never reach p < 0.05 (the best is 1/20 = 0.05), so steps-to-target needs at least 4 seeds per side
(1/70) to ever be flagged, and a benchmark compared on one value per side never is.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsprof.errors import BadInput

__all__ = [
    "EXACT_LIMIT",
    "METRICS",
    "STATISTICS",
    "Comparison",
    "compare_paths",
    "compare_samples",
    "load_samples",
    "p_worse",
]

Samples = dict[tuple[str, str], list[float]]  # (benchmark name, metric) -> values (lower is better)

METRICS = ("step_time_s", "steps_to_target")
"""Compared quantities; lower is better for both."""

STATISTICS = {"step_time_s": "min", "steps_to_target": "median"}
"""The statistic whose relative change is held against the threshold, per metric."""

EXACT_LIMIT = 20_000
"""Largest number of group assignments enumerated for an exact p-value (C(16, 8) = 12,870 fits)."""

_MACHINE_KEYS = ("node", "machine", "processor", "system", "python_version")


@dataclass(frozen=True)
class Comparison:
    """One benchmark's metric in both runs.

    Attributes:
        name: Benchmark name (pytest-benchmark fullname, or ``workload-B<batch>`` for stores).
        metric: ``step_time_s`` or ``steps_to_target`` (lower is better for both).
        statistic: ``min`` (step times) or ``median`` (steps-to-target): see :data:`STATISTICS`.
        base, new: That statistic of the two samples.
        change: new / base - 1 (positive = worse; ``inf`` when the new median seed missed the target).
        p_value: One-sided Mann-Whitney U p-value of "new is better" for a speed-up beyond the threshold,
            else of "new is worse"; ``nan`` with fewer than two values on a side or all values equal.
        n_base, n_new: Sample sizes.
        verdict: ``regression``, ``improvement``, ``unchanged`` (within threshold) or ``not significant``
            (beyond the threshold, but p >= alpha).
    """

    name: str
    metric: str
    statistic: str
    base: float
    new: float
    change: float
    p_value: float
    n_base: int
    n_new: int
    verdict: str


def _location(values: list[float], statistic: str) -> float:
    if not values:
        return math.nan
    return min(values) if statistic == "min" else statistics.median(values)


def p_worse(base: list[float], new: list[float]) -> float:
    """One-sided Mann-Whitney U p-value of "``new`` tends to be larger than ``base``" (larger = worse).

    Exact (every assignment of the pooled values to the groups, ties included) when there are at most
    :data:`EXACT_LIMIT` assignments, else the tie-corrected normal approximation. Infinite values (missed
    targets) rank above every finite one. ``nan`` with fewer than two values on a side or all values equal.
    """
    if len(base) < 2 or len(new) < 2 or len(set(base) | set(new)) < 2:
        return math.nan
    from scipy.stats import PermutationMethod, mannwhitneyu

    big = 1e300  # ranks only: infinities (missed targets) as the largest values
    b = [min(x, big) for x in base]
    n = [min(x, big) for x in new]
    exact = math.comb(len(b) + len(n), len(b)) <= EXACT_LIMIT
    method: Any = PermutationMethod(n_resamples=EXACT_LIMIT) if exact else "asymptotic"
    return float(mannwhitneyu(n, b, alternative="greater", method=method).pvalue)


def compare_samples(
    base: list[float], new: list[float], *, threshold: float, alpha: float, statistic: str = "median"
) -> tuple[str, float, float]:
    """(verdict, change, p) for two samples of a lower-is-better quantity (see :class:`Comparison`).

    Args:
        base, new: The samples (``inf`` = a missed target).
        threshold: Relative change of ``statistic`` beyond which a significant change counts.
        alpha: Significance level of the one-sided Mann-Whitney U test.
        statistic: ``median`` or ``min``.
    """
    mb, mn = _location(base, statistic), _location(new, statistic)
    if math.isinf(mb) and math.isinf(mn):
        change = 0.0
    elif math.isinf(mn):
        change = math.inf
    elif math.isinf(mb):
        change = -1.0
    else:
        change = mn / mb - 1 if mb > 0 else math.nan
    if math.isnan(change):
        return "not significant", change, math.nan
    if abs(change) <= threshold:
        return "unchanged", change, p_worse(base, new)
    if change > threshold:
        p = p_worse(base, new)
        return ("regression" if p < alpha else "not significant"), change, p
    p = p_worse(new, base)  # "new is better"
    return ("improvement" if p < alpha else "not significant"), change, p


def _numbers(values: list[Any], where: str) -> list[float]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadInput(f"{where}: {v!r} is not a number")
        out.append(float(v))
    return out


def _load_benchmark_json(path: Path) -> tuple[Samples, dict[str, Any]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BadInput(f"{path} is not a text file") from None
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise BadInput(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    samples: Samples = {}
    devices: dict[str, str] = {}
    for i, bench in enumerate(doc["benchmarks"]):
        if not isinstance(bench, dict) or "name" not in bench or not isinstance(bench.get("stats"), dict):
            raise BadInput(f"{path}: benchmark #{i} lacks 'name' or 'stats'")
        name = str(bench.get("fullname") or bench["name"])
        stats = bench["stats"]
        extra = bench.get("extra_info") if isinstance(bench.get("extra_info"), dict) else {}
        if extra.get("device_name") or extra.get("device"):
            devices[name] = str(extra.get("device_name") or extra.get("device"))
        steps = extra.get("steps_to_target_per_seed")
        if isinstance(steps, list) and steps:
            where = f"{path}: {name}: extra_info.steps_to_target_per_seed"
            samples[(name, "steps_to_target")] = _numbers([math.inf if s is None else s for s in steps], where)
            continue
        data, where = stats.get("data"), f"{path}: {name}: stats.data"
        if not (isinstance(data, list) and data):
            data, where = extra.get("step_times_s"), f"{path}: {name}: extra_info.step_times_s"
        if isinstance(data, list) and data:
            samples[(name, "step_time_s")] = _numbers(data, where)
        elif "median" in stats:
            samples[(name, "step_time_s")] = _numbers([stats["median"]], f"{path}: {name}: stats.median")
    machine = doc.get("machine_info") if isinstance(doc.get("machine_info"), dict) else {}
    cpu = machine.get("cpu") if isinstance(machine.get("cpu"), dict) else {}
    summary = {k: machine.get(k) for k in _MACHINE_KEYS} | {"cpu": cpu.get("brand_raw")}
    return samples, {"machine": summary, "devices": devices}


def _load_store(path: Path) -> tuple[Samples, dict[str, Any]]:
    from bsprof.store import Store

    samples: Samples = {}
    devices: dict[str, str] = {}
    with Store(path) as store:
        run_ids = store.latest_run_ids()
        envs = {r: store.run(r).environment for r in run_ids}
        for row in store.trial_rows(run_ids):
            name = f"{row['workload']}-B{row['batch_size']}"
            devices[name] = str(row.get("device_name") or row.get("device"))
            if row["kind"] == "throughput" and row["status"] == "ok":
                st = row.get("step_times") or {}
                blocks, per_block = st.get("block_times_s"), st.get("steps_per_block")
                if blocks and per_block:
                    values = [float(t) / per_block for t in blocks]
                else:
                    values = [float(row["step_time_s"])]
                samples.setdefault((name, "step_time_s"), []).extend(values)
            elif row["kind"] == "convergence" and row.get("phase", "main") in ("main", "final"):
                steps = row.get("steps_to_target") if row["status"] == "ok" else None
                samples.setdefault((name, "steps_to_target"), []).append(math.inf if steps is None else float(steps))
    machine = {e.get("hostname"): e.get("device_name") for e in envs.values()}
    return samples, {"machine": machine, "devices": devices}


def load_samples(path: str | Path) -> tuple[Samples, dict[str, Any]]:
    """Samples per (benchmark, metric) from a pytest-benchmark JSON file or a bsprof store, and where they
    were measured (``machine``: a summary of the host; ``devices``: device name per benchmark).

    Raises:
        BadInput: A missing or unreadable file, or one in neither format.
    """
    p = Path(path)
    if not p.exists():
        raise BadInput(f"not found: {p}")
    if not p.is_file():
        raise BadInput(f"not a file: {p}")
    with p.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"SQLite format 3"):
        return _load_store(p)
    return _load_benchmark_json(p)


def compare_paths(
    baseline: str | Path, new: str | Path, *, threshold: float = 0.10, alpha: float = 0.05
) -> tuple[list[Comparison], list[str]]:
    """Compare every benchmark present in both inputs; returns the comparisons and warnings.

    Args:
        baseline: The reference results (a pytest-benchmark JSON file or a bsprof store).
        new: The results under test, of the same kind.
        threshold: Relative change of the median that may count as a regression (0.10 = 10%).
        alpha: Significance level of the one-sided test.

    Raises:
        BadInput: Unreadable inputs, bad threshold or alpha, or no benchmark in common.
    """
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise BadInput(f"threshold must be a finite number >= 0, got {threshold}")
    if not 0 < alpha < 1:
        raise BadInput(f"alpha must be in (0, 1), got {alpha}")
    base_s, base_meta = load_samples(baseline)
    new_s, new_meta = load_samples(new)
    common = [k for k in base_s if k in new_s]  # in the baseline's order (pytest's: by batch size)
    if not common:
        raise BadInput(f"{baseline} and {new} have no benchmark in common: nothing to compare")
    warnings = []
    if base_meta["machine"] != new_meta["machine"]:
        warnings.append("the two inputs come from different machines: differences may not be regressions")
    moved = sorted(
        n for n, _ in common if n in base_meta["devices"] and base_meta["devices"][n] != new_meta["devices"].get(n)
    )
    if moved:
        warnings.append(f"{len(set(moved))} benchmark(s) ran on different devices, e.g. {moved[0]}")
    only = sorted({k[0] for k in set(base_s) ^ set(new_s)})
    if only:
        warnings.append(f"{len(only)} benchmark(s) present in only one input were skipped: {', '.join(only[:5])}")
    single = sorted(n for n, m in common if min(len(base_s[(n, m)]), len(new_s[(n, m)])) < 2)
    if single:
        warnings.append(
            f"{len(single)} benchmark(s) have fewer than 2 values on a side and can never be significant "
            f"(run pytest with --benchmark-save-data): {', '.join(single[:3])}"
        )
    out = []
    for name, metric in common:
        b, n = base_s[(name, metric)], new_s[(name, metric)]
        stat = STATISTICS[metric]
        verdict, change, p = compare_samples(b, n, threshold=threshold, alpha=alpha, statistic=stat)
        out.append(
            Comparison(name, metric, stat, _location(b, stat), _location(n, stat), change, p, len(b), len(n), verdict)
        )
    return out, warnings
