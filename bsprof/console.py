"""Terminal presentation: a progress bar (rich on a terminal, plain log lines otherwise) and summary tables.

Presentation only: numbers come from :mod:`bsprof.analysis`; units are scaled and rounded here.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bsprof.engine.trial import TrialResult, TrialSpec
    from bsprof.store import Store

__all__ = ["Progress", "format_bytes", "print_throughput_summary"]

log = logging.getLogger("bsprof")


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; empty for missing values."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _describe(spec: TrialSpec) -> str:
    return f"{spec.kind} B={spec.batch_size} seed={spec.seed} lr={spec.lr:g} round={spec.repeat}"


class Progress:
    """Per-trial progress with ETA: a rich bar when stderr is a terminal, log lines when it is not."""

    def __init__(self, *, force_plain: bool = False) -> None:
        self._rich: Any = None
        self._task: Any = None
        if not force_plain and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()

    def update(self, spec: TrialSpec, result: TrialResult | None, done: int, total: int) -> None:
        if self._rich is not None:
            if self._task is None:
                self._task = self._rich.add_task("trials", total=total, completed=done)
            self._rich.update(self._task, completed=done, description=_describe(spec))
            if result is not None and result.status != "ok":
                self._rich.console.log(f"{_describe(spec)}: {result.status} {result.error or ''}")
            return
        if result is None:
            return
        detail = ""
        if result.status == "ok" and "samples_per_s" in result.metrics:
            detail = f" {result.metrics['samples_per_s']:.0f} samples/s"
        elif result.error:
            detail = f" ({result.error})"
        log.info("[%d/%d] %s: %s%s", done, total, _describe(spec), result.status, detail)


def print_throughput_summary(store: Store, run_id: str) -> None:
    """Print the per-batch-size throughput table of one run."""
    from rich.console import Console
    from rich.table import Table

    from bsprof.analysis import throughput_table
    from bsprof.export import trials_frame

    table = throughput_table(trials_frame(store, [run_id]))
    if table.empty:
        return
    t = Table(title=f"throughput — run {run_id}")
    for name in (
        "workload",
        "device",
        "batch",
        "samples/s (median)",
        "p25–p75",
        "step time",
        "step IQR",
        "peak mem",
        "efficiency",
        "trials",
        "status",
    ):
        t.add_column(name, justify="left" if name in ("workload", "device", "status") else "right")
    for r in table.itertuples():
        sps = "" if math.isnan(r.samples_per_s) else f"{r.samples_per_s:,.0f}"
        spread = "" if math.isnan(r.samples_per_s_p25) else f"{r.samples_per_s_p25:,.0f}–{r.samples_per_s_p75:,.0f}"
        st = "" if math.isnan(r.step_time_s) else f"{r.step_time_s * 1e3:.3f} ms"
        iqr = "" if math.isnan(r.step_time_iqr_s) else f"{r.step_time_iqr_s * 1e3:.3f} ms"
        eff = "" if r.scaling_efficiency is None or math.isnan(r.scaling_efficiency) else f"{r.scaling_efficiency:.2f}"
        t.add_row(
            r.workload,
            r.device,
            str(r.batch_size),
            sps,
            spread,
            st,
            iqr,
            format_bytes(r.peak_mem_bytes),
            eff,
            f"{r.ok}/{r.trials}",
            r.status,
        )
    Console(width=160).print(t)
