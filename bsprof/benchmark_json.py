"""The one reader of pytest-benchmark ``--benchmark-json`` files (used by ``bsprof compare`` and the report).

Every figure the file holds is validated on read: a statistic, a per-round time, a per-seed step count or a
peak-memory figure that is not a finite number is :class:`~bsprof.errors.BadInput` (one line naming the file,
the benchmark and the field), so that a corrupt result can never pass a gate as "not significant".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bsprof.errors import BadInput

__all__ = ["STATS", "BenchmarkFile", "BenchmarkRecord", "finite_numbers", "read_benchmark_json"]

STATS = ("min", "max", "mean", "median", "q1", "q3", "iqr", "stddev", "rounds")
"""The ``stats`` keys read (seconds per round; ``rounds`` a count). Absent ones are NaN."""


@dataclass(frozen=True)
class BenchmarkRecord:
    """One benchmark of a pytest-benchmark JSON file.

    Attributes:
        name: The test's short name (``test_step[B=8]``).
        fullname: Its node id (the name used to match benchmarks across files).
        group: pytest-benchmark group, or ``None``.
        stats: :data:`STATS` in seconds per round (``rounds`` a count); NaN where absent.
        data: Per-round seconds (``stats.data``, written with ``--benchmark-save-data``); empty if absent.
        extra_info: The benchmark's ``extra_info`` (bsprof's figures, SI units).
    """

    name: str
    fullname: str
    group: str | None
    stats: dict[str, float]
    data: tuple[float, ...] = ()
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchmarkFile:
    """A pytest-benchmark JSON file: its ``machine_info``, ``datetime`` and benchmarks in file order."""

    path: Path
    machine_info: dict[str, Any]
    datetime: str
    benchmarks: tuple[BenchmarkRecord, ...]


def finite_numbers(values: Any, where: str, *, allow_none: bool = False) -> list[float | None]:
    """``values`` as floats, checked: a list of finite numbers (``None`` kept where ``allow_none``).

    Raises:
        BadInput: Not a list, or an item that is not a finite number.
    """
    if not isinstance(values, list):
        raise BadInput(f"{where}: {_short(values)} is not a list of numbers")
    out: list[float | None] = []
    for v in values:
        if v is None and allow_none:
            out.append(None)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise BadInput(f"{where}: {_short(v)} is not a number")
        if not math.isfinite(v):
            raise BadInput(f"{where}: {v!r} is not a finite number")
        out.append(float(v))
    return out


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(v: Any, where: str) -> float:
    return float(finite_numbers([v], where)[0])  # type: ignore[arg-type]


# extra_info fields bsprof writes that compare reads: lists checked item by item, scalars as numbers.
_EXTRA_LISTS = {"step_times_s": False, "steps_to_target_per_seed": True}
_EXTRA_SCALARS = ("peak_mem_bytes", "step_time_s", "samples_per_s", "threads")


def _record(b: Any, i: int, label: str) -> BenchmarkRecord:
    if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not isinstance(b.get("stats"), dict):
        raise BadInput(f"{label}: benchmark #{i} lacks 'name' or 'stats'")
    name = b["name"]
    fullname = b["fullname"] if isinstance(b.get("fullname"), str) and b["fullname"] else name
    stats_in = b["stats"]
    stats = {}
    for key in STATS:
        v = stats_in.get(key)
        stats[key] = math.nan if v is None else _number(v, f"{label}: {name}: stats.{key}")
    if math.isnan(stats["iqr"]) and not (math.isnan(stats["q1"]) or math.isnan(stats["q3"])):
        stats["iqr"] = stats["q3"] - stats["q1"]
    data: tuple[float, ...] = ()
    if stats_in.get("data") is not None:
        data = tuple(finite_numbers(stats_in["data"], f"{label}: {name}: stats.data"))  # type: ignore[arg-type]
    extra = b.get("extra_info")
    if extra is None:
        extra = {}
    if not isinstance(extra, dict):
        raise BadInput(f"{label}: {name}: extra_info is not an object")
    for key, allow_none in _EXTRA_LISTS.items():
        if extra.get(key) is not None:
            finite_numbers(extra[key], f"{label}: {name}: extra_info.{key}", allow_none=allow_none)
    for key in _EXTRA_SCALARS:
        if extra.get(key) is not None:
            _number(extra[key], f"{label}: {name}: extra_info.{key}")
    group = b.get("group") if isinstance(b.get("group"), str) else None
    return BenchmarkRecord(name, fullname, group, stats, data, dict(extra))


def read_benchmark_json(path: str | Path, *, label: str | None = None) -> BenchmarkFile:
    """Read and validate a pytest-benchmark ``--benchmark-json`` file.

    Args:
        path: The file.
        label: How error messages name it (default: the path).

    Raises:
        BadInput: A file that is missing, unreadable, not JSON, not pytest-benchmark's format, or that holds a
            figure that is not a finite number.
    """
    p = Path(path)
    label = label or str(p)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInput(f"{label}: no such file") from None
    except UnicodeDecodeError:
        raise BadInput(f"{label} is not a text file") from None
    except OSError as e:
        raise BadInput(f"{label}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{label} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise BadInput(f"{label} is not a pytest-benchmark JSON file (no 'benchmarks' list)")
    machine = doc.get("machine_info") if isinstance(doc.get("machine_info"), dict) else {}
    records = tuple(_record(b, i, label) for i, b in enumerate(doc["benchmarks"]))
    return BenchmarkFile(p, machine, str(doc.get("datetime", "")), records)
