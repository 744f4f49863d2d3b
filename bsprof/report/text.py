"""Building blocks of the report's sections: :class:`Section`, :class:`Table` and the helpers that pick a run's
rows. Numbers are formatted by :mod:`bsprof.formatting` (shared with the console)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from bsprof.report.data import ReportData

__all__ = ["STATUS_ORDER", "Section", "Table", "by_run", "finite_mask", "run_prefix"]


STATUS_ORDER = ("ok", "oom", "diverged", "budget_exhausted", "error")


@dataclass
class Table:
    """An HTML table: header cells, rows of text cells, and a CSS class per row."""

    columns: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)
    numeric: set[int] = field(default_factory=set)
    scroll: bool = False


@dataclass
class Section:
    """One section of the page.

    Attributes:
        id: HTML anchor.
        title: Heading.
        sentences: What the charts say, in words (plain text; `code` in backticks).
        charts: (chart id, Altair chart) pairs.
        notes: Why data are missing and what to run (plain text).
        commands: Shell commands worth copying.
        tables: HTML tables.
    """

    id: str
    title: str
    sentences: list[str] = field(default_factory=list)
    charts: list[tuple[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)

    def chart(self, name: str, make: Callable[[], Any]) -> bool:
        """Add the chart ``make()`` builds; when it has nothing to draw (ValueError), add the reason as a note."""
        try:
            self.charts.append((f"chart-{self.id}-{name}", make()))
        except ValueError as e:
            self.notes.append(f"No chart: {e}.")
            return False
        return True


def finite_mask(df: pd.DataFrame, col: str) -> pd.Series:
    """Rows of ``df`` whose ``col`` is a finite number."""
    import pandas as pd

    v = pd.to_numeric(df[col], errors="coerce").astype(float)
    return pd.Series(np.isfinite(v), index=df.index)


def by_run(df: pd.DataFrame, d: ReportData) -> Iterator[tuple[str, pd.DataFrame]]:
    """(run label, rows) in the report's run order, runs without rows skipped."""
    if df is None or df.empty or "run" not in df.columns:
        return
    for r in d.runs:
        g = df[df["run"] == r.label]
        if len(g):
            yield r.label, g


def run_prefix(label: str, many: bool) -> str:
    """``"label: "`` in front of a sentence when the report shows several runs, else nothing."""
    return f"{label}: " if many else ""
