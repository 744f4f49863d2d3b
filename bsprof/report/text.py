"""Building blocks of the report's sections: :class:`Section` and :class:`Table`, and number formatting
(presentation: units are scaled and rounded only here)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from bsprof.report.data import ReportData

__all__ = ["STATUS_ORDER", "Section", "Table"]


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


def _f(v: Any, fmt: str = "{:,.0f}") -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "∞"
    return fmt.format(x)


def _g(v: Any, digits: int = 3) -> str:
    """Significant digits, thousands separated for big numbers."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(x):
        return "" if math.isnan(x) else "∞"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _bytes(n: Any) -> str:
    try:
        x = float(n)
    except (TypeError, ValueError):
        return ""
    if math.isnan(x):
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return ""


def _seconds(s: Any) -> str:
    try:
        x = float(s)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(x):
        return ""
    if x >= 1:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} µs"


def _pm(value: Any, se: Any) -> str:
    """``value ± se``; a standard error below 0.1% of the value is shown as such."""
    try:
        v, e = float(value), float(se)
    except (TypeError, ValueError):
        return _g(value)
    if not math.isfinite(e):
        return f"{_g(v)} (uncertainty unknown)"
    if v and abs(e / v) < 1e-3:
        return f"{_g(v)} ± <0.1%"
    return f"{_g(v)} ± {_g(e, 2)}"


def _ratio(a: float, b: float) -> str:
    r = a / b
    return f"{r:.1f}x" if r < 10 else f"{r:.0f}x"


def _sizes(bs: Sequence[Any]) -> str:
    b = [str(int(x)) for x in bs]
    return ", ".join(b[:-1]) + f" and {b[-1]}" if len(b) > 1 else (b[0] if b else "")


def _finite(series: pd.Series) -> pd.Series:
    import pandas as pd

    v = pd.to_numeric(series, errors="coerce").astype(float)
    return v[np.isfinite(v)]


def _finite_mask(df: pd.DataFrame, col: str) -> pd.Series:
    import pandas as pd

    v = pd.to_numeric(df[col], errors="coerce").astype(float)
    return pd.Series(np.isfinite(v), index=df.index)


def _by_run(df: pd.DataFrame, d: ReportData) -> Iterator[tuple[str, pd.DataFrame]]:
    """(run label, rows) in the report's run order, runs without rows skipped."""
    if df is None or df.empty or "run" not in df.columns:
        return
    for r in d.runs:
        g = df[df["run"] == r.label]
        if len(g):
            yield r.label, g


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _prefix(label: str, many: bool) -> str:
    return f"{label}: " if many else ""
