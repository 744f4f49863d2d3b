"""Interleaved paired comparison of two variants of the same work: is B within a tolerance of A's speed?

For figures like "the tracker costs under 1% of the script's samples/s", which a shared host's drift (load
regimes that change within seconds) swamps unless the two variants are measured side by side:

* **ABBA blocks.** The work runs in short chunks (a few milliseconds); a block is four chunks in the order
  A B B A, the next B A A B, and so on. Each chunk is led in by a few untimed units of the same variant: the
  first unit after a switch of variant finds its code and data cold in the caches, which neither variant pays
  in a steady loop. A drift that is linear over a block cancels exactly (the A chunks sit at
  positions 0 and 3, the B chunks at 1 and 2, the same mean position), and each variant comes first as often as
  the other.
* **Paired ratios.** Each block gives one ratio, B's samples/s over A's (A's seconds over B's: the same work
  in each), so the drift between blocks divides out. The figure is the **median** of the block ratios, with a
  percentile-bootstrap 95% interval (:func:`~bsprof.analysis.bootstrap_median_ci`).
* **A/A control in the same run.** Control blocks, interleaved with the test blocks, compare A with itself in
  exactly the same way; their interval is how finely this run, on this host, at this moment, resolves a ratio.

:func:`judge` decides on the intervals: *within* when the test's whole interval is above ``1 - tolerance``,
*beyond* when its whole interval is below it, and *unresolved* when the control's interval reaches further
than ``resolution`` from 1 (identical code looking different: too noisy to judge) or the test's interval
straddles the bound. Pure apart from the clock the caller passes to :func:`run_interleaved`.

Comparisons that cannot be cut into short chunks (a whole trial against a reference loop, rounds of a second)
pair their rounds the same way, the order flipping every round, and are judged by the same rule on the median
per-round ratio (:func:`ratio_interval`): with ``two_sided=True`` when B must be within ``tolerance`` of A
either way (a measurement against a reference), and without a control (``control=None``) when the two sides are
different methods by design, so that the interval alone says whether the run resolved the tolerance.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from bsprof.analysis import bootstrap_median_ci

__all__ = [
    "Interleaved",
    "PairedRatio",
    "Verdict",
    "abba",
    "judge",
    "paired_ratio",
    "pooled_ratio",
    "ratio_interval",
    "run_interleaved",
]


def abba(block: int) -> tuple[str, str, str, str]:
    """The chunk order of block number ``block``: ``a b b a`` for even blocks, ``b a a b`` for odd ones."""
    return ("a", "b", "b", "a") if block % 2 == 0 else ("b", "a", "a", "b")


@dataclass(frozen=True)
class Interleaved:
    """Seconds per block and variant (two chunks each) of the test blocks (A vs B) and the control blocks (A vs A).

    Attributes:
        test_a_s: Seconds of A's two chunks in each test block.
        test_b_s: Seconds of B's two chunks in each test block.
        control_a_s: Seconds of the first A's two chunks in each control block.
        control_b_s: Seconds of the second A's two chunks in each control block.
    """

    test_a_s: tuple[float, ...]
    test_b_s: tuple[float, ...]
    control_a_s: tuple[float, ...]
    control_b_s: tuple[float, ...]


def run_interleaved(
    a: Callable[[int], object],
    b: Callable[[int], object],
    *,
    steps: int,
    blocks: int,
    lead_in: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    between: Callable[[int], object] | None = None,
) -> Interleaved:
    """Run ``blocks`` test blocks (``a`` against ``b``) alternating with as many control blocks (``a`` against
    ``a``), each in :func:`abba` order; a chunk is ``run(lead_in)`` untimed, then ``run(steps)`` timed.

    Args:
        a: ``a(n)`` runs ``n`` units of the work, the reference variant.
        b: ``b(n)`` runs ``n`` units of the same work, the variant under test.
        steps: Units per timed chunk.
        blocks: Test blocks (as many control blocks run between them).
        lead_in: Untimed units before each timed chunk.
        clock: Seconds, monotonic (tests pass fakes).
        between: Called with the block number after each pair of blocks, outside the timed chunks (e.g. to
            read the host's load).
    """
    out: dict[str, dict[str, list[float]]] = {"test": {"a": [], "b": []}, "control": {"a": [], "b": []}}
    pairs = (("test", b), ("control", a))
    for i in range(blocks):
        for kind, other in pairs if i % 2 == 0 else pairs[::-1]:  # test and control blocks take turns first
            seconds = {"a": 0.0, "b": 0.0}
            for side in abba(i):
                run = a if side == "a" else other
                run(lead_in)
                t0 = clock()
                run(steps)
                seconds[side] += clock() - t0
            out[kind]["a"].append(seconds["a"])
            out[kind]["b"].append(seconds["b"])
        if between is not None:
            between(i)
    test, control = out["test"], out["control"]
    return Interleaved(tuple(test["a"]), tuple(test["b"]), tuple(control["a"]), tuple(control["b"]))


@dataclass(frozen=True)
class PairedRatio:
    """The median over blocks of B's speed over A's, and its percentile-bootstrap 95% interval.

    Attributes:
        median: Median block ratio (A's seconds over B's: below 1 means B is slower).
        ci_low: Lower end of the 95% interval.
        ci_high: Upper end of the 95% interval.
        blocks: Blocks the ratio is taken over.
        ratios: Every block's ratio, in order.
    """

    median: float
    ci_low: float
    ci_high: float
    blocks: int
    ratios: tuple[float, ...] = field(default=(), repr=False)


def paired_ratio(a_s: tuple[float, ...], b_s: tuple[float, ...], *, n_boot: int = 4000, seed: int = 0) -> PairedRatio:
    """The :class:`PairedRatio` of blocks whose variants took ``a_s`` and ``b_s`` seconds (the same work)."""
    return ratio_interval(np.asarray(a_s, dtype=float) / np.asarray(b_s, dtype=float), n_boot=n_boot, seed=seed)


def ratio_interval(ratios: Sequence[float] | np.ndarray, *, n_boot: int = 4000, seed: int = 0) -> PairedRatio:
    """The :class:`PairedRatio` of per-block (or per-round) ratios B/A: their median and its percentile-bootstrap
    95% interval (``n_boot`` resamples, seeded)."""
    values = np.asarray(ratios, dtype=float)
    low, high = bootstrap_median_ci(values, np.random.default_rng(seed), n_boot)
    return PairedRatio(float(np.median(values)), low, high, len(values), tuple(float(r) for r in values))


def pooled_ratio(groups: Sequence[Sequence[float]], *, n_boot: int = 2000, seed: int = 0) -> PairedRatio:
    """The :class:`PairedRatio` of block ratios measured in several processes (``groups``, one per process): the
    median of all blocks, and a percentile-bootstrap 95% interval that draws whole processes with replacement,
    so that it also holds how much a whole process can differ from another: code and data land at other
    addresses in each interpreter (address-space randomisation), which can move a process's every block alike
    and which no number of blocks in one process averages out (pyperf runs its benchmarks in many processes for
    the same reason). Only the processes are resampled, not their blocks as well: a second level of resampling
    would count the blocks' noise twice. One group: :func:`ratio_interval`."""
    arrays = [np.asarray(g, dtype=float) for g in groups if len(g)]
    if len(arrays) <= 1:
        return ratio_interval(arrays[0] if arrays else np.array([]), n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    pooled = np.concatenate(arrays)
    medians = np.empty(n_boot)
    for i in range(n_boot):
        medians[i] = np.median(np.concatenate([arrays[j] for j in rng.integers(0, len(arrays), size=len(arrays))]))
    low, high = np.quantile(medians, [0.025, 0.975], method="inverted_cdf")
    return PairedRatio(float(np.median(pooled)), float(low), float(high), len(pooled), tuple(pooled.tolist()))


@dataclass(frozen=True)
class Verdict:
    """Whether B is within ``tolerance`` of A's speed.

    Attributes:
        outcome: ``within``, ``beyond`` or ``unresolved``.
        reason: One line: the figures the outcome rests on.
    """

    outcome: str
    reason: str


def judge(
    test: PairedRatio,
    control: PairedRatio | None,
    *,
    tolerance: float,
    resolution: float = 0.0,
    two_sided: bool = False,
) -> Verdict:
    """Decide on the intervals (see the module docstring).

    Args:
        test: B against A.
        control: A against A, measured in the same run; ``None`` when there is none (the interval alone decides).
        tolerance: Largest accepted slowdown of B (0.01 = B keeps at least 99% of A's speed); with
            ``two_sided``, the largest accepted difference either way.
        resolution: How far from 1 the control's interval may reach for the run to count as able to judge.
        two_sided: Judge ``|B/A - 1| <= tolerance`` (B must also not be faster by more than ``tolerance``).
    """
    low_bound, high_bound = 1 - tolerance, (1 + tolerance if two_sided else math.inf)
    figures = f"B/A {test.median:.4f} (95% CI {test.ci_low:.4f}-{test.ci_high:.4f})"
    if control is not None:
        figures += f", A/A control {control.median:.4f} (CI {control.ci_low:.4f}-{control.ci_high:.4f})"
    figures += f", {test.blocks} blocks"
    if control is not None:
        reach = max(1 - control.ci_low, control.ci_high - 1)
        if not reach <= resolution:
            return Verdict("unresolved", f"too noisy to judge: the A/A control reaches {reach:.2%} from 1 (> "
                                         f"{resolution:.2%}): {figures}")  # fmt: skip
    band = f"{low_bound:.4f}-{high_bound:.4f}" if two_sided else f"{low_bound:.4f}"
    if test.ci_low >= low_bound and test.ci_high <= high_bound:
        return Verdict("within", f"within {tolerance:.0%}: {figures}")
    if test.ci_high < low_bound:
        return Verdict("beyond", f"slower by more than {tolerance:.0%}: {figures}")
    if test.ci_low > high_bound:
        return Verdict("beyond", f"faster by more than {tolerance:.0%}: {figures}")
    if math.isnan(test.ci_low) or math.isnan(test.ci_high):
        return Verdict("unresolved", f"no interval: {figures}")
    return Verdict("unresolved", f"the interval straddles {band}: {figures}")
