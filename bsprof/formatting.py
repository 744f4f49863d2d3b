"""The one number formatter of the console and the report: rounding, unit scaling, missing values.

Data stay in SI units (seconds, bytes, joules) everywhere else; the display unit is picked here, at render time,
from the values shown (as ``torch.utils.benchmark``'s ``select_unit`` does). Missing values (``None``, NaN,
text that is not a number) format as an empty string; an infinite value (a missed target) as ``∞``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "BYTE_UNITS",
    "TIME_UNITS",
    "as_float",
    "capitalize",
    "format_bytes",
    "format_number",
    "format_ratio",
    "format_seconds",
    "format_si",
    "format_sig",
    "format_spread",
    "join_sizes",
    "plus_minus",
    "select_unit",
]

TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9))
"""Display units of durations: (name, seconds per unit), largest first."""

BYTE_UNITS = (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))
"""Display units of memory: (name, bytes per unit), largest first."""


def as_float(v: Any) -> float:
    """``v`` as a float; NaN when it is missing or not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def select_unit(
    values: Iterable[Any], units: Sequence[tuple[str, float]], *, at_least: float = 1.0
) -> tuple[str, float]:
    """The largest unit in which the median of the finite, non-zero ``values`` is at least ``at_least``.

    Args:
        values: The values to show (SI base units).
        units: (name, base units per unit), largest first (:data:`TIME_UNITS`, :data:`BYTE_UNITS`).
        at_least: The median's smallest displayed magnitude (e.g. 4 shows 3.5 GiB as 3,584 MiB).

    Returns:
        (unit name, base units per unit); the base unit when no value is finite and non-zero, the smallest
        unit when even that is too large.
    """
    v = sorted(abs(x) for x in map(as_float, values) if math.isfinite(x) and x != 0)
    if not v:
        return next((u for u in units if u[1] == 1.0), units[-1])
    m = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    for name, size in units:
        if m / size >= at_least:
            return name, size
    return units[-1]


def format_number(v: Any, fmt: str = "{:,.0f}") -> str:
    """``v`` with ``fmt``; empty when missing, ``∞`` when infinite."""
    x = as_float(v)
    if math.isnan(x):
        return ""
    if math.isinf(x):
        return "∞"
    return fmt.format(x)


def format_sig(v: Any, digits: int = 3) -> str:
    """``digits`` significant digits, thousands-separated integers at or above 10**digits."""
    x = as_float(v)
    if not math.isfinite(x):
        return "" if math.isnan(x) else "∞"
    if abs(x) >= 10**digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def format_si(v: float) -> str:
    """``40583`` -> ``"40.6k"``: three significant digits with an SI suffix."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def format_spread(mid: Any, lo: Any, hi: Any) -> str:
    """``"40.6k [31.9k–41.2k]"``; just the middle when the spread is unknown."""
    m, a, b = as_float(mid), as_float(lo), as_float(hi)
    if not math.isfinite(m):
        return format_number(m)
    if not (math.isfinite(a) and math.isfinite(b)) or a == b:
        return format_si(m)
    return f"{format_si(m)} [{format_si(a)}–{format_si(b)}]"


def format_bytes(n: Any, unit: tuple[str, float] | None = None) -> str:
    """``1536`` -> ``"1.5 KiB"`` (unit picked from the value unless given); empty when missing."""
    x = as_float(n)
    if not math.isfinite(x):
        return ""
    name, size = unit or select_unit([x], BYTE_UNITS)
    return f"{x:.0f} B" if size == 1.0 else f"{x / size:.1f} {name}"


def format_seconds(s: Any, unit: tuple[str, float] | None = None, digits: int = 3) -> str:
    """``0.0123`` -> ``"12.3 ms"`` (unit picked from the value unless given); empty when missing or infinite."""
    x = as_float(s)
    if not math.isfinite(x):
        return ""
    name, size = unit or select_unit([x], TIME_UNITS)
    return f"{format_sig(x / size, digits)} {name}"  # 1,240 µs in a µs column, never 1.24e+03 µs


def plus_minus(value: Any, se: Any) -> str:
    """``value ± se``; a standard error below 0.1% of the value is shown as such."""
    if se is None or (isinstance(se, str) and math.isnan(as_float(se))):
        return format_sig(value)
    v, e = as_float(value), as_float(se)
    if not math.isfinite(e):
        return f"{format_sig(v)} (uncertainty unknown)"
    if v and abs(e / v) < 1e-3:
        return f"{format_sig(v)} ± <0.1%"
    return f"{format_sig(v)} ± {format_sig(e, 2)}"


def format_ratio(a: float, b: float) -> str:
    """``a / b`` as ``"3.2x"`` (``"32x"`` from 10 on)."""
    r = a / b
    return f"{r:.1f}x" if r < 10 else f"{r:.0f}x"


def join_sizes(bs: Sequence[Any]) -> str:
    """``[8, 16, 32]`` -> ``"8, 16 and 32"``."""
    b = [str(int(x)) for x in bs]
    return ", ".join(b[:-1]) + f" and {b[-1]}" if len(b) > 1 else (b[0] if b else "")


def capitalize(text: str) -> str:
    """First letter upper-cased, the rest unchanged."""
    return text[:1].upper() + text[1:]
