"""The report's charts, one function each, as Altair chart objects (also the notebook API).

Every function takes analysis frames (SI units, as :mod:`bsprof.analysis` and
:func:`bsprof.report.report_data` return them) and returns an ``altair`` chart; units are scaled here, for
display only. Frames may carry a ``run`` column (a label per run): runs are then drawn side by side in the
same chart, one colour each. Without it the label is ``workload · device``.

In a notebook::

    import bsprof
    from bsprof.analysis import throughput_table
    from bsprof.report import charts, report_data

    charts.throughput_chart(throughput_table(bsprof.trials_frame("reports/bsprof.db")))
    data = report_data("reports/bsprof.db")          # every frame of the report, latest run per workload
    charts.steps_to_target_chart(data.convergence, data.fits)

A function raises ``ValueError`` when its frame holds nothing it can draw. Charts with more than 5,000 rows
(learning curves of big sweeps) need ``alt.data_transformers.disable_max_rows()`` in a notebook.
"""

from __future__ import annotations

from bsprof.report.accuracy_charts import (
    REGIME_COLORS,
    generalization_chart,
    learning_curves_chart,
    lr_sensitivity_chart,
    steps_to_target_chart,
)
from bsprof.report.compute_charts import (
    benchmarks_chart,
    gpu_chart,
    memory_chart,
    throughput_chart,
    top_operators_chart,
)
from bsprof.report.tradeoff_charts import headline_chart, pareto_chart, to_target_chart

__all__ = [
    "REGIME_COLORS",
    "benchmarks_chart",
    "generalization_chart",
    "gpu_chart",
    "headline_chart",
    "learning_curves_chart",
    "lr_sensitivity_chart",
    "memory_chart",
    "pareto_chart",
    "steps_to_target_chart",
    "throughput_chart",
    "to_target_chart",
    "top_operators_chart",
]
