"""The HTML report: sections present or explained, escaping, several runs, failed-only stores, CLI exit codes.

Stores are synthetic (``tests/report_stores.py``: trials written through ``Store.add_trial``); the browser
test is ``test_report_browser.py``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from helpers import ref
from report_stores import XSS, benchmark_json, make_full_store, make_store

from bsprof.errors import BadInput
from bsprof.report import charts, load_benchmark_json, report_data, write_report
from bsprof.report.page import script_json

ALL_CHARTS = {
    "chart-headline-wallclock",
    "chart-throughput-throughput",
    "chart-memory-memory",
    "chart-gpu-gpu",
    "chart-steps-steps",
    "chart-to-target-to-target",
    "chart-to-target-pareto",
    "chart-curves-curves",
    "chart-generalization-generalization",
    "chart-lr-lr",
    "chart-ops-ops",
    "chart-benchmarks-benchmarks",
}


def chart_ids(html: str) -> set[str]:
    return set(re.findall(r'<div id="(chart-[\w-]+)"></div>', html))


def specs(html: str) -> dict:
    m = re.search(r"var SPECS = (.*?);\n", html)
    assert m, "no SPECS in the page"
    return json.loads(m.group(1))


def section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"no section {sid}"
    return m.group(1)


def render(store: Path, tmp_path: Path, run_ids=None, bench=()) -> str:
    out = tmp_path / "report" / "index.html"
    info = write_report(store, out, run_ids, bench)
    html = out.read_text(encoding="utf-8")
    assert info.charts == len(chart_ids(html)) == len(specs(html))
    return html


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """Three runs: tuned GPU run with OOM, profile and max-batch; an AMP twin; a CPU run named like an attack."""
    tmp = tmp_path_factory.mktemp("full")
    store = tmp / "s.db"
    ids = make_full_store(store)
    return render(store, tmp, ids, [benchmark_json(tmp / "bench.json")]), ids


def test_full_store_shows_every_section_with_its_chart(full):
    html, _ = full
    assert chart_ids(html) == ALL_CHARTS
    for sid in (
        "headline",
        "throughput",
        "memory",
        "gpu",
        "steps",
        "to-target",
        "curves",
        "generalization",
        "lr",
        "ops",
        "benchmarks",
        "trials",
    ):
        assert section(html, sid)
    assert "Throughput grows 26x from B=8" in section(html, "throughput")
    assert "Out of memory at B=2048" in section(html, "memory")
    assert "B = 1536 (first out-of-memory at 1792)" in section(html, "headline")
    assert re.search(r"B_noise = B_crit = 2\d\d ± ", section(html, "steps"))
    assert "the median seed missed the target (oom: 3)" in section(html, "steps")
    assert "tensorboard --logdir reports/traces" in section(html, "ops")
    assert "test_step[B=256]" in section(html, "benchmarks")
    trials = section(html, "trials")
    assert trials.count('class="status-oom"') == 6
    assert trials.count('class="status-budget_exhausted"') == 6


def test_page_is_self_contained(full):
    html, _ = full
    assert html.count("<script") == 2  # the Vega bundle once, then one loop of vegaEmbed calls
    assert "vegaEmbed(el, columns < n ? wrapped(spec, columns) : spec, OPTIONS)" in html
    start = html.index("<script>")
    page = html[:start] + html[html.index("</script>", start) :]  # the page without the (trusted) Vega bundle
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    data_urls = re.findall(r'"url"\s*:', json.dumps(specs(html)))
    assert not data_urls, "chart data must be inlined, never fetched"


def test_user_strings_are_escaped(full):
    html, _ = full
    assert XSS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>not bold</b>" not in html  # pytest-benchmark extra_info is user data too
    assert html.count("</script>") == 2  # nothing user-provided closes a script element early
    assert "\\u003cscript\\u003ealert(1)\\u003c/script\\u003e" in html  # inside the specs' JSON
    assert XSS in json.dumps(specs(html), ensure_ascii=False)  # ...and shown as that text by Vega


def test_script_json_cannot_close_the_script_element():
    text = script_json({"a": "</script><script>alert(1)</script>", "b": "x & y \u2028"})
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text)["a"] == "</script><script>alert(1)</script>"


def test_several_runs_share_charts_and_colours(full):
    html, _ = full
    s = specs(html)
    text = json.dumps(s["chart-throughput-throughput"])
    for label in ("synthetic · cuda:0 · amp off · LR tuned x3", "synthetic · cuda:0 · amp bf16 · LR not tuned"):
        assert json.dumps(label)[1:-1] in text
    domains = [e["scale"] for e in _encodings(s["chart-throughput-throughput"]) if e.get("field") == "run"]
    assert domains and all(d == domains[0] for d in domains)


def _encodings(node):
    if isinstance(node, dict):
        for ch in ("color", "stroke"):
            e = (node.get("encoding") or {}).get(ch)
            if isinstance(e, dict):
                yield e
        for v in node.values():
            yield from _encodings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _encodings(v)


def test_default_runs_are_the_latest_per_workload(tmp_path):
    store = tmp_path / "s.db"
    make_store(store, workload="a", batch_sizes=(8, 16, 32))
    b_old = make_store(store, workload="b", batch_sizes=(8, 16, 32))
    b_new = make_store(store, workload="b", batch_sizes=(8, 16, 32), amp="bf16")
    data = report_data(store)
    assert [r.workload for r in data.runs] == ["a", "b"]
    assert b_new in [r.run_id for r in data.runs] and b_old not in [r.run_id for r in data.runs]
    both = report_data(store, [b_old, b_new])
    assert {r.label for r in both.runs} == {"b · cuda:0 · amp off", "b · cuda:0 · amp bf16"}


def test_throughput_only_store(tmp_path):
    store = tmp_path / "s.db"
    make_store(store, kinds=("throughput",), device="cpu")
    html = render(store, tmp_path)
    assert chart_ids(html) == {"chart-throughput-throughput", "chart-memory-memory"}
    assert "No convergence trials in these runs" in section(html, "steps")
    assert "No wall-clock-to-target" in section(html, "headline")
    assert "Not measured (trials run on cpu)" in section(html, "gpu")
    assert "No LR tuning" in section(html, "lr")
    assert "No operator profile" in section(html, "ops")
    assert "--benchmark-json FILE" in section(html, "benchmarks")


def test_convergence_only_store(tmp_path):
    store = tmp_path / "s.db"
    make_store(store, kinds=("convergence",))
    html = render(store, tmp_path)
    assert chart_ids(html) == {
        "chart-steps-steps",
        "chart-to-target-to-target",
        "chart-curves-curves",
        "chart-generalization-generalization",
    }
    assert "No successful throughput trial" in section(html, "throughput")
    assert "no throughput trial measured the step time" in section(html, "to-target")


def test_store_with_only_failed_trials_still_renders(tmp_path):
    store = tmp_path / "s.db"
    make_store(store, failed_only=True, batch_sizes=(8, 16), seeds=2)
    html = render(store, tmp_path)
    # No throughput, no target reached; the failed trials' learning curves (and weights) still show why.
    assert chart_ids(html) == {"chart-curves-curves", "chart-generalization-generalization"}
    assert "every one failed" in section(html, "throughput")
    assert "No batch size reached the target" in section(html, "steps")
    trials = section(html, "trials")
    for status in ("error", "diverged", "budget_exhausted"):
        assert f'class="status-{status}"' in trials
    assert trials.count("<tr class=") == 8


def test_fixed_lr_rule_is_warned(tmp_path):
    store = tmp_path / "s.db"
    make_store(store, lr_rule="fixed", batch_sizes=(8, 16, 32))
    html = render(store, tmp_path)
    assert 'class="warning"' in html and "LR rule &#39;fixed&#39;" in html


def test_charts_accept_plain_analysis_frames(tmp_path):
    """The notebook API: the export frame through bsprof.analyze.analyze straight into the chart functions."""
    import altair as alt

    from bsprof import trials_frame
    from bsprof.analysis import throughput_table
    from bsprof.analyze import analyze

    store = tmp_path / "s.db"
    make_store(store, batch_sizes=(8, 16, 32, 64))
    trials = trials_frame(store)
    a = analyze(trials)
    made = [
        charts.throughput_chart(a.throughput),
        charts.memory_chart(a.throughput),
        charts.steps_to_target_chart(a.convergence),
        charts.to_target_chart(a.tradeoff),
        charts.pareto_chart(a.tradeoff),
        charts.headline_chart(a.tradeoff),
    ]
    for c in made:
        assert isinstance(c, alt.TopLevelMixin)
        assert c.to_dict()  # valid Vega-Lite
    with pytest.raises(ValueError, match="no throughput trials"):
        charts.throughput_chart(throughput_table(trials[trials["kind"] == "convergence"]))


def test_benchmark_json_is_validated(tmp_path):
    good = load_benchmark_json([benchmark_json(tmp_path / "b.json")])
    assert list(good["name"]) == ["test_step[B=8]", "test_step[B=256]"]
    assert good["iqr"].iloc[0] == pytest.approx(0.00025)
    cases = {
        "missing.json": None,
        "notjson.json": "{",
        "wrong.json": json.dumps({"results": []}),
        "nostats.json": json.dumps({"benchmarks": [{"name": "x"}]}),
        "badnum.json": json.dumps({"benchmarks": [{"name": "x", "stats": {"median": "fast"}}]}),
    }
    for name, text in cases.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        with pytest.raises(BadInput, match=re.escape(f"--benchmark-json {p}")):
            load_benchmark_json([p])


@pytest.mark.parametrize(
    "case",
    ["missing-store", "not-a-store", "empty-store", "unknown-run", "bad-benchmark", "output-is-dir"],
)
def test_cli_bad_input_is_one_line_and_exit_2(case, cli, tmp_path):
    from bsprof.store import Store

    store = tmp_path / "s.db"
    args = ["report", "--store", store, "-o", tmp_path / "out.html"]
    if case == "not-a-store":
        store.write_text("hello")
    elif case == "empty-store":
        Store(store, create=True).close()
    elif case != "missing-store":
        make_store(store, batch_sizes=(8, 16), seeds=1)
    if case == "unknown-run":
        args += ["--run", "nosuch"]
    elif case == "bad-benchmark":
        (tmp_path / "b.json").write_text("[1, 2")
        args += ["--benchmark-json", tmp_path / "b.json"]
    elif case == "output-is-dir":
        args[-1] = tmp_path
    r = cli(*args)
    assert r.code == 2, r.err
    assert len(r.err_lines) == 1 and r.err_lines[0].startswith("bsprof report: error:"), r.err
    assert not (tmp_path / "out.html").exists()


def test_cli_report_writes_the_page(cli, tmp_path):
    store = tmp_path / "s.db"
    make_store(store, batch_sizes=(8, 16, 32), seeds=2)
    bench = benchmark_json(tmp_path / "b.json")
    r = cli("report", "--store", store, "-o", tmp_path / "r" / "index.html", "--benchmark-json", bench)
    assert r.code == 0, r.err
    assert "charts" in r.out and (tmp_path / "r" / "index.html").is_file()
    assert "chart-benchmarks-benchmarks" in (tmp_path / "r" / "index.html").read_text()


def test_sweep_report_renders_at_the_end(cli, tmp_path):
    out = tmp_path / "sweep.html"
    r = cli(
        "sweep",
        "-w",
        ref("tiny.py"),
        "--kind",
        "throughput",
        "-b",
        "4,8",
        "--seeds",
        "1",
        "--min-time",
        "0.01",
        "--min-steps",
        "2",
        "--timing-warmup-steps",
        "1",
        "--store",
        tmp_path / "s.db",
        "--report-out",
        out,
    )
    assert r.code == 0, r.err
    assert f"report: {out}" in r.out
    assert "chart-throughput-throughput" in out.read_text()


def test_one_report_data_call_runs_each_analysis_function_once_per_run(tmp_path, monkeypatch):
    """Issue 10.3: the report only encodes analysis; nothing is recomputed (counting spies)."""
    from collections import Counter

    from bsprof import analysis, analyze
    from bsprof.report import write_report

    calls: Counter[str] = Counter()

    def spy(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for name in ("throughput_table", "convergence_analysis", "fit_steps_model", "bootstrap_median_ci"):
        spy(analysis, name)
    for name in ("analyze", "tradeoff_table", "pareto_front", "recommend", "gpu_table", "lr_tuning_table",
                 "gap_trend", "final_state_table", "operator_shares"):  # fmt: skip
        spy(analyze, name)
    store = tmp_path / "s.db"
    make_store(store, batch_sizes=(8, 16, 32, 64), tune=True, top_ops=True)  # one run, one (workload, device)
    info = write_report(store, tmp_path / "index.html")
    assert info.charts >= 9
    once = ("analyze", "throughput_table", "convergence_analysis", "fit_steps_model", "tradeoff_table", "recommend",
            "gpu_table", "lr_tuning_table", "gap_trend", "final_state_table", "operator_shares")  # fmt: skip
    assert {n: calls[n] for n in once} == dict.fromkeys(once, 1)
    assert calls["pareto_front"] in (1, 2)  # time vs samples, and time vs energy where measured
    assert calls["bootstrap_median_ci"] == 4 * 3  # 4 batch sizes x (steps, samples, seconds), once each


def test_a_drifting_throughput_trial_is_said_in_the_report(tmp_path):
    from bsprof.engine.trial import TrialResult, TrialSpec
    from bsprof.report.sections_compute import throughput_section
    from bsprof.store import Store

    path = tmp_path / "s.db"
    with Store(path, create=True) as st:
        run = st.open_run("w", {"engine": {"device": "cpu"}}, {"device_name": "cpu"})
        for b, drift in ((8, 0.02), (16, 0.45)):
            metrics = {"samples_per_s": 100.0 * b, "step_time_s": 0.01, "step_time_iqr_s": 0.001,
                       "step_time_drift_rel": drift, "step_time_drifted": drift > 0.1}  # fmt: skip
            st.add_trial(run.run_id, TrialResult(TrialSpec("w", "throughput", b, 0, 0.1), "ok", "cpu", "cpu", metrics))
    text = " ".join(throughput_section(report_data(path), "").sentences)
    assert "drifted within 1 trial(s) at B=16" in text and "+45%" in text


def _log_encodings(node: object, found: list[tuple[str, dict]] | None = None) -> list[tuple[str, dict]]:
    """Every x/y encoding of a Vega-Lite spec whose scale is logarithmic, as (channel, encoding)."""
    found = [] if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("x", "y") and isinstance(value, dict) and (value.get("scale") or {}).get("type") == "log":
                found.append((key, value))
            _log_encodings(value, found)
    elif isinstance(node, list):
        for value in node:
            _log_encodings(value, found)
    return found


def _assert_log_axes_are_uncramped(spec: dict, name: str) -> int:
    encs = _log_encodings(spec)
    for channel, enc in encs:
        axis = enc.get("axis") or {}
        assert axis.get("labelOverlap") == "greedy", (name, channel, enc)
        ticks = axis.get("values")
        assert ticks and ticks == sorted(ticks), (name, channel, enc)
        if (enc["scale"].get("base") or 10) == 2:
            continue  # batch sizes: the data's own (tested below)
        mantissas = {round(t / 10 ** math.floor(math.log10(t) + 1e-9), 6) for t in ticks}
        assert mantissas <= {1, 2, 3, 5}, (name, channel, ticks)
        assert len(ticks) <= 4 * 5, (name, channel, ticks)
    return len(encs)


def test_every_log_axis_has_explicit_sparse_ticks_and_drops_overlapping_labels(full):
    html, _ = full
    with_log = set()
    for chart_id, spec in specs(html).items():
        if _assert_log_axes_are_uncramped(spec, chart_id):
            with_log.add(chart_id)
    # Every chart with a log batch-size or value axis: all but the LR heatmap, the operator bars and the benchmarks
    # (log only when their times spread over more than 50x, not in this store).
    assert with_log == ALL_CHARTS - {"chart-lr-lr", "chart-ops-ops", "chart-benchmarks-benchmarks"}, with_log
    curves = specs(html)["chart-curves-curves"]
    x_ticks = [enc["axis"]["values"] for ch, enc in _log_encodings(curves) if ch == "x"]
    assert x_ticks and all(sum(1 for _ in t) <= 7 for t in x_ticks), x_ticks  # a third of the page wide


def test_noise_charts_use_the_shared_log_axis() -> None:
    import pandas as pd

    from bsprof.report.noise_charts import noise_scale_chart, predicted_steps_chart

    curves = pd.DataFrame(
        {"run": "r", "trial_id": [1, 1, 2, 2], "batch_size": [8, 8, 64, 64], "seed": 0, "epochs": [0.1, 3, 0.2, 40],
         "b_simple": [5.0, 300.0, 8.0, 900.0], "b_simple_low": 1.0, "b_simple_high": 2000.0, "step": [1, 9, 1, 9]}
    )  # fmt: skip
    critical = pd.DataFrame({"run": ["r"], "predicted": [250.0], "measured": [300.0]})
    steps = pd.DataFrame(
        {"run": "r", "batch_size": [8, 64, 512], "predicted_steps": [400.0, 60.0, 20.0], "predicted_low": 10.0,
         "predicted_high": 500.0, "measured_steps": [380.0, 70.0, 25.0], "relative": False}
    )  # fmt: skip
    for name, chart in (("noise", noise_scale_chart(curves, critical)), ("steps", predicted_steps_chart(steps))):
        assert _assert_log_axes_are_uncramped(chart.to_dict(), name) >= 2


@pytest.mark.parametrize(
    ("values", "max_ticks", "nice", "expected"),
    [
        ([1, 330], 7, True, [1, 3, 10, 30, 100, 300, 1000]),  # steps of a learning curve: axis 1..1000
        ([1, 330], 6, True, [1, 10, 100, 1000]),
        ([0.2, 0.95], 7, True, [0.1, 0.2, 0.3, 0.5, 1]),  # step time in ms: one decade, 1-2-3-5
        ([39_564, 3_000_000], 7, True, [1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7]),  # throughput and the ideal line
        ([1e-3, 1e6], 4, True, [1e-3, 1, 1e3, 1e6]),  # ten decades: every third
        ([2_600, 12_000], 3, False, [1e3, 2e3, 3e3, 5e3, 1e4, 2e4, 3e4, 5e4, 1e5]),  # axis 2.6k..12k: 3k, 5k, 10k
        ([0, -1, float("nan")], 7, True, []),  # nothing positive: Vega's default ticks
    ],
)
def test_log_ticks_are_the_densest_round_set_that_fits(values, max_ticks, nice, expected) -> None:
    from bsprof.report._chart_base import _log_ticks

    ticks = _log_ticks(values, max_ticks=max_ticks, nice=nice)
    assert ticks == pytest.approx(expected)


def test_batch_ticks_are_the_batch_sizes_or_powers_of_two() -> None:
    from bsprof.report._chart_base import _batch_ticks

    assert _batch_ticks([8, 16, 32, 1024]) == [8, 16, 32, 1024]
    many = [2**k for k in range(1, 21)]  # 2..1M: 20 sizes
    assert _batch_ticks(many) == [2**k for k in range(1, 21, 2)]
    assert _batch_ticks([]) == []
