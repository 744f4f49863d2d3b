"""Regression comparison of two benchmark results: the nightly gate.

Inputs are two pytest-benchmark JSON files (``--benchmark-json``, read by :mod:`bsprof.benchmark_json`) or two
bsprof stores. For each benchmark of the baseline:

* **time per step** (throughput): the per-round times in ``stats["data"]`` (``--benchmark-save-data``) or
  ``extra_info["step_times_s"]``; for stores, the per-step times of every timed block of the latest run's
  throughput trials. Compared on the **minimum** over rounds: interference on a shared host only *adds*
  time, so the fastest rounds are the best estimate of what the code costs (Chen & Revels 2016; README,
  "Regression gate", has the measurements behind this choice);
* **steps-to-target** (convergence): one value per seed, ``extra_info["steps_to_target_per_seed"]``, a seed
  that missed the target counting as infinitely many steps; compared on the **median** over seeds;
* **peak memory** (``peak_mem_bytes``): one figure per benchmark; growth beyond its own threshold fails where it
  is measured exactly (the CUDA allocator); CPU RSS growth is shown, not judged (:data:`UNJUDGED_MEM_SOURCES`);
* **status**: a benchmark measured in the baseline but missing from the new result, or ``oom``/``error``
  there, fails the gate.

A step-time or steps-to-target change counts as a **regression** only when that statistic got worse by more
than the threshold *and* a one-sided Mann-Whitney U test (the rank test asv uses;
``scipy.stats.mannwhitneyu``) of "new is worse than baseline" gives p < ``alpha``: the threshold alone cries
wolf on a noisy host, the test alone flags 1% shifts over hundreds of rounds.

Small samples are tested exactly: when there are at most :data:`EXACT_LIMIT` ways to split the pooled values
into the two groups, the p-value comes from enumerating all of them (``scipy.stats.PermutationMethod``), which
stays exact when values tie; larger samples use the normal approximation with the tie correction. With n
seeds per side the smallest attainable p is 1 / C(2n, n): 3 vs 3 seeds can never reach p < 0.05.

Provenance: results whose torch or CUDA version or device differ are refused (:class:`BadInput`, exit 2)
unless explicitly allowed; different hosts, thread counts or configuration hashes are warned about. Corrupt or
non-finite figures are :class:`BadInput`: the gate never fails open.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bsprof.analysis import median_to_target
from bsprof.compare_inputs import ENVIRONMENT_KEYS, MISSED, Result, load_result
from bsprof.errors import BadInput, BusyHost

__all__ = [
    "ENVIRONMENT_KEYS",
    "EXACT_LIMIT",
    "METRICS",
    "MISSED",
    "PASSING",
    "STATISTICS",
    "UNJUDGED_MEM_SOURCES",
    "Comparison",
    "Result",
    "busy_benchmarks",
    "compare_paths",
    "compare_results",
    "compare_samples",
    "environment_mismatch",
    "load_result",
    "p_worse",
]


METRICS = ("step_time_s", "steps_to_target", "peak_mem_bytes")
"""Compared quantities; lower is better for all."""

STATISTICS = {"step_time_s": "min", "steps_to_target": "median", "peak_mem_bytes": "max"}
"""The statistic whose relative change is held against the threshold, per metric."""

PASSING = ("unchanged", "improvement", "not significant", "not judged")
"""Verdicts that pass the gate; any other (``regression``, ``missing``, ``oom``, ``error``) fails it."""


EXACT_LIMIT = 20_000
"""Largest number of group assignments enumerated for an exact p-value (C(16, 8) = 12,870 fits)."""


@dataclass(frozen=True)
class Comparison:
    """One benchmark's metric in both runs.

    Attributes:
        name: Benchmark name (pytest-benchmark fullname, or ``workload-B<batch>`` for stores).
        metric: ``step_time_s``, ``steps_to_target``, ``peak_mem_bytes`` (lower is better for all), or
            ``status`` for a baseline benchmark missing or failed in the new result.
        statistic: ``min`` (step times), ``median`` (steps-to-target), ``max`` (peak memory) or ``status``.
        base, new: That statistic of the two samples.
        change: new / base - 1 (positive = worse; ``inf`` when the new median seed missed the target).
        p_value: One-sided Mann-Whitney U p-value of "new is better" for a speed-up beyond the threshold,
            else of "new is worse"; ``nan`` with fewer than two values on a side or all values equal.
        n_base, n_new: Sample sizes.
        verdict: ``regression``, ``improvement``, ``unchanged`` (within threshold) or ``not significant``
            (beyond the threshold, but p >= alpha); ``missing`` / ``oom`` / ``error`` for a status comparison.
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

    @property
    def failed(self) -> bool:
        """Whether this comparison fails the gate (a regression, or a benchmark missing or failed in new)."""
        return self.verdict not in PASSING


def _location(values: list[float], statistic: str) -> float:
    if not values:
        return math.nan
    if statistic == "min":
        return min(values)
    return median_to_target(values) if statistic == "median" else max(values)


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


def environment_mismatch(base: Result, new: Result) -> str | None:
    """One line naming what differs in torch/CUDA version or device between two results, or ``None``.

    A field unknown on either side is not a mismatch (older files do not record it).
    """
    diffs = []
    for key in ENVIRONMENT_KEYS:
        a, b = base.environment.get(key), new.environment.get(key)
        if a is not None and b is not None and a != b:
            diffs.append(f"{key.replace('_', ' ')} {a} vs {b}")
    moved = sorted(n for n, d in base.devices.items() if n in new.devices and new.devices[n] != d)
    if moved:
        diffs.append(f"device {base.devices[moved[0]]} vs {new.devices[moved[0]]} ({len(moved)} benchmark(s))")
    return "; ".join(diffs) or None


def _status_failures(base: Result, new: Result) -> list[Comparison]:
    out = []
    for name, st in base.status.items():
        if st != "ok":
            continue
        verdict = "missing" if name not in new.status else ("ok" if new.status[name] == "ok" else "failed")
        if verdict == "ok":
            continue
        note = "missing" if verdict == "missing" else new.status[name]
        out.append(Comparison(name, "status", "status", math.nan, math.nan, math.nan, math.nan, 0, 0, note))
    return out


UNJUDGED_MEM_SOURCES = ("rss_vmhwm", "rss_sampled")
"""Peak-memory sources shown but not judged: on the CPU the figure is the growth of the process's peak RSS
during the trial, a lower bound that depends on what the allocator kept from earlier trials (measured on an
idle host: 64 KiB to 3 MiB for one unchanged benchmark), so a threshold on it fails unchanged code."""


def _memory(base: Result, new: Result, threshold: float) -> list[Comparison]:
    out = []
    for name, b in base.peak_mem_bytes.items():
        n = new.peak_mem_bytes.get(name)
        if n is None or b <= 0 or new.status.get(name) != "ok":
            continue
        change = n / b - 1
        verdict = "regression" if change > threshold else ("improvement" if change < -threshold else "unchanged")
        if {base.mem_sources.get(name), new.mem_sources.get(name)} & set(UNJUDGED_MEM_SOURCES):
            verdict = "not judged"
        out.append(Comparison(name, "peak_mem_bytes", "max", b, n, change, math.nan, 1, 1, verdict))
    return out


def _check_thresholds(threshold: float, mem_threshold: float, alpha: float) -> None:
    for label, value in (("threshold", threshold), ("memory threshold", mem_threshold)):
        if not (value >= 0 and math.isfinite(value)):
            raise BadInput(f"{label} must be a finite number >= 0, got {value}")
    if not 0 < alpha < 1:
        raise BadInput(f"alpha must be in (0, 1), got {alpha}")


def busy_benchmarks(base: Result, new: Result) -> list[str]:
    """``"<side>: <benchmark> (<why>)"`` for every benchmark either input measured on a busy host."""
    return [f"{label}: {n} ({why})" for label, r in (("baseline", base), ("new", new)) for n, why in r.busy.items()]


def compare_paths(
    baseline: str | Path,
    new: str | Path,
    *,
    threshold: float = 0.10,
    alpha: float = 0.05,
    mem_threshold: float = 0.10,
    allow_env_mismatch: bool = False,
    allow_busy: bool = False,
) -> tuple[list[Comparison], list[str]]:
    """Compare every benchmark of the baseline with the new result; returns the comparisons and warnings.

    Reads both inputs (:func:`load_result`) and judges them with :func:`compare_results`.

    Args:
        baseline: The reference results (a pytest-benchmark JSON file or a bsprof store).
        new: The results under test, of the same kind.
        threshold, alpha, mem_threshold, allow_env_mismatch, allow_busy: See :func:`compare_results`.

    Raises:
        BusyHost: See :func:`compare_results`.
        BadInput: Unreadable, corrupt or non-finite inputs, bad thresholds or alpha, and see
            :func:`compare_results`.
    """
    _check_thresholds(threshold, mem_threshold, alpha)
    base_r, new_r = load_result(baseline), load_result(new)
    return compare_results(
        base_r,
        new_r,
        threshold=threshold,
        alpha=alpha,
        mem_threshold=mem_threshold,
        allow_env_mismatch=allow_env_mismatch,
        allow_busy=allow_busy,
        names=(str(baseline), str(new)),
    )


def compare_results(
    base_r: Result,
    new_r: Result,
    *,
    threshold: float = 0.10,
    alpha: float = 0.05,
    mem_threshold: float = 0.10,
    allow_env_mismatch: bool = False,
    allow_busy: bool = False,
    names: tuple[str, str] = ("the baseline", "the new result"),
    busy_hint: str = "re-run them on a quiet host (`bsprof check`)",
) -> tuple[list[Comparison], list[str]]:
    """The gate's verdicts on two read inputs: every benchmark of the baseline against the new result.

    A benchmark that measured in the baseline but is missing from the new result, or ended ``oom`` (or any
    other failure) there, is a comparison with verdict ``missing`` / ``oom``: a failure (see :data:`PASSING`).
    Peak memory is compared where both measured it: a growth beyond ``mem_threshold`` is a ``regression``.

    Args:
        base_r: The reference results.
        new_r: The results under test.
        threshold: Relative change of the compared statistic (minimum step time, median steps-to-target)
            that may count as a regression (0.10 = 10%).
        alpha: Significance level of the one-sided test.
        mem_threshold: Relative growth of peak memory that is a regression (0.10 = 10%).
        allow_env_mismatch: Compare results whose torch/CUDA version or device differ (stated as a warning)
            instead of refusing.
        allow_busy: Compare benchmarks measured on a busy host (stated as a warning) instead of refusing.
        names: How the two inputs are named in messages.
        busy_hint: What the refusal of busy benchmarks tells the user to do.

    Raises:
        BusyHost: A benchmark of either input was measured on a busy host (``host_busy``) and not
            ``allow_busy`` (exit code 3).
        BadInput: No benchmark in common, or results from a different torch/CUDA/device without
            ``allow_env_mismatch``.
    """
    _check_thresholds(threshold, mem_threshold, alpha)
    warnings: list[str] = []
    busy = busy_benchmarks(base_r, new_r)
    if busy and not allow_busy:
        raise BusyHost(
            f"refusing to judge {len(busy)} benchmark(s) measured on a busy host, first {busy[0]}; {busy_hint}, "
            "or pass --allow-busy to compare anyway"
        )
    if busy:
        warnings.append(f"{len(busy)} benchmark(s) measured on a busy host: differences may not be regressions")
    mismatch = environment_mismatch(base_r, new_r)
    if mismatch and not allow_env_mismatch:
        raise BadInput(f"refusing to compare results from different environments ({mismatch}); "
                       "pass --allow-env-mismatch to compare anyway")  # fmt: skip
    if mismatch:
        warnings.append(f"different environments ({mismatch}): differences may not be regressions")
    base_s, new_s = base_r.samples, new_r.samples
    common = [k for k in base_s if k in new_s]  # in the baseline's order (pytest's: by batch size)
    failures = _status_failures(base_r, new_r)
    if not set(base_r.status) & set(new_r.status):  # nothing shared: a wrong file, not a night that lost all
        raise BadInput(f"{names[0]} and {names[1]} have no benchmark in common: nothing to compare")
    if base_r.machine != new_r.machine:
        warnings.append("the two inputs come from different machines: differences may not be regressions")
    if base_r.threads and new_r.threads and base_r.threads != new_r.threads:
        warnings.append(f"torch threads differ ({base_r.threads} vs {new_r.threads}): step times are not comparable")
    if base_r.config_hash and new_r.config_hash and base_r.config_hash != new_r.config_hash:
        warnings.append(f"configurations differ (hash {base_r.config_hash[:12]} vs {new_r.config_hash[:12]})")
    only_new = sorted({n for n in new_r.status if n not in base_r.status})
    if only_new:
        warnings.append(
            f"{len(only_new)} benchmark(s) only in the new result are not compared: {', '.join(only_new[:5])}"
        )
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
    memory = _memory(base_r, new_r, mem_threshold)
    if any(c.verdict == "not judged" for c in memory):
        warnings.append(
            "peak memory measured as RSS growth (CPU) is shown, not judged: it is a lower bound that varies from "
            "run to run"
        )
    return [*failures, *out, *memory], warnings
