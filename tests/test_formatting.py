"""The one number formatter (console and report): units picked from the data, missing values, infinities."""

from __future__ import annotations

import math

import pytest

from bsprof.formatting import (
    BYTE_UNITS,
    TIME_UNITS,
    format_bytes,
    format_number,
    format_seconds,
    format_sig,
    format_spread,
    join_sizes,
    plus_minus,
    select_unit,
)


@pytest.mark.parametrize(
    ("values", "unit"),
    [
        ([2.5, 3.0], "s"),
        ([0.0012, 0.004, 0.9], "ms"),  # the median picks the unit, not the largest value
        ([3e-6, 4e-6], "µs"),
        ([2e-10], "ns"),
        ([math.nan, None, 0.0], "s"),  # nothing to go by: the base unit
    ],
)
def test_time_unit_is_picked_from_the_values(values, unit):
    assert select_unit(values, TIME_UNITS)[0] == unit


def test_byte_units_and_a_threshold():
    assert select_unit([1536], BYTE_UNITS)[0] == "KiB"
    gib_mib = [u for u in BYTE_UNITS if u[0] in ("GiB", "MiB")]
    assert select_unit([3 * 2**30], gib_mib, at_least=4)[0] == "MiB"  # 3 GiB reads better as 3,072 MiB
    assert select_unit([5 * 2**30], gib_mib, at_least=4)[0] == "GiB"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (format_bytes(1536), "1.5 KiB"),
        (format_bytes(512), "512 B"),
        (format_bytes(None), ""),
        (format_seconds(0.0123), "12.3 ms"),
        (format_seconds(0.0123, ("s", 1.0)), "0.0123 s"),
        (format_seconds(math.inf), ""),
        (format_seconds(0.00124, ("µs", 1e-6)), "1,240 µs"),  # a value above the column unit, never 1.24e+03
        (format_number(math.inf), "∞"),
        (format_number("n/a"), ""),
        (format_number(12345.6), "12,346"),
        (format_sig(12345.6), "12,346"),
        (format_sig(0.012345), "0.0123"),
        (format_spread(40583, 31900, 41200), "40.6k [31.9k–41.2k]"),
        (format_spread(40583, math.nan, 1), "40.6k"),
        (plus_minus(100.0, 5.0), "100 ± 5"),
        (plus_minus(100.0, 1e-5), "100 ± <0.1%"),
        (plus_minus(100.0, math.inf), "100 (uncertainty unknown)"),
        (plus_minus(100.0, None), "100"),
        (join_sizes([8, 16, 32]), "8, 16 and 32"),
    ],
)
def test_formats(text, expected):
    assert text == expected
