"""The report in a real browser: headless Chromium, network off. Every chart renders and draws data, the
console shows no error, no request goes to a network host, injected script never runs, nothing overflows
the page's width. Skipped only when no Chromium is installed (CI installs Debian's, see ``.ci/run``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser_check import check_page, find_chromium
from report_stores import benchmark_json, make_full_store, make_store

from bsprof.report import write_report

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium to open the report in: apt-get install chromium (or set CHROMIUM_BIN)",
)


def test_full_report_renders_offline_without_errors(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    ids = make_full_store(store)
    out = tmp_path / "index.html"
    info = write_report(store, out, ids, [benchmark_json(tmp_path / "bench.json")])

    page = check_page(out, expect_charts=info.charts)

    assert info.charts == 12
    assert page.external_requests == []
    assert page.console_errors == []
    assert page.dialogs == [], "a user-provided string ran as script"
    assert len(page.charts) == len(page.rendered) == info.charts, page.charts
    assert page.empty == [], "charts rendered without data marks"
    assert page.scroll_width <= page.inner_width, "the page scrolls sideways"
    assert page.scrolled == [], page.scrolled
    for chart in page.rendered:
        assert chart["titles"], f"{chart['id']} has no title"
        assert all(t.strip() for t in chart["axis_titles"]), f"{chart['id']} has an untitled axis"
    assert page.title == "bsprof report: synthetic, <script>alert(1)</script>"


def test_report_without_charts_loads_cleanly(tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    make_store(store, failed_only=True, kinds=("throughput",), batch_sizes=(8, 16), seeds=1)
    out = tmp_path / "index.html"
    assert write_report(store, out).charts == 0

    page = check_page(out, expect_charts=0, settle=0.3)

    assert page.external_requests == [] and page.console_errors == [] and page.charts == []


@pytest.mark.parametrize("width", [1400, 1000])
def test_default_sweep_report_needs_no_sideways_scrolling(tmp_path: Path, width: int) -> None:
    """Issue 12: the learning-curves row scrolled sideways at 1,400 px. Neither the page nor any chart's box
    may (a row of panels too wide for the window wraps onto more rows)."""
    store = tmp_path / "s.db"
    make_store(store)  # the shape of the default sweep: 8..1024, 3 seeds, throughput and convergence
    out = tmp_path / "index.html"
    info = write_report(store, out)

    page = check_page(out, expect_charts=info.charts, width=width)

    assert len(page.rendered) == info.charts and page.console_errors == [], page.console_errors
    assert page.scroll_width <= page.inner_width, "the page scrolls sideways"
    assert page.scrolled == [], f"charts scroll sideways inside their box at {width} px: {page.scrolled}"
