"""The HTML report: one self-contained, offline page of the compute/accuracy trade-off of a store's runs.

* :func:`write_report` — read a store, analyse, write ``reports/index.html`` (``bsprof report``).
* :func:`report_data` — every frame the report shows, one ``run`` label per run (for notebooks).
* :mod:`bsprof.report.charts` — one function per chart, each returning an Altair chart.
* :func:`load_benchmark_json` — validated pytest-benchmark ``--benchmark-json`` results.
"""

from __future__ import annotations

from bsprof.report.data import ReportData, RunInfo, load_benchmark_json, report_data
from bsprof.report.page import DEFAULT_REPORT, ReportInfo, write_report

__all__ = [
    "DEFAULT_REPORT",
    "ReportData",
    "ReportInfo",
    "RunInfo",
    "load_benchmark_json",
    "report_data",
    "write_report",
]
