"""Assemble the report page: Vega-Lite specs with their data inlined, the Vega JavaScript embedded once, one
HTML file that requests nothing from the network.

* The JavaScript bundle (Vega, Vega-Lite, vega-embed; ~0.9 MB) comes from ``vl-convert-python``. Building it
  takes a second or more, so it is built once per process and cached on disk under
  ``$XDG_CACHE_HOME/bsprof`` (``~/.cache/bsprof``), keyed by the vl-convert and Vega-Lite versions.
* The page embeds the bundle once, then calls ``vegaEmbed('#id', spec)`` per chart: pasting several
  ``chart.save(inline=True)`` outputs would redeclare the bundle's globals and break all but one chart.
* Data are inlined in the specs (never a URL). User strings reach the page only through jinja2's autoescape
  or inside the JSON of the specs, where ``<``, ``>`` and ``&`` are written as ``\\u003c``-style escapes so
  that no ``</script>`` can end the script early.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shlex
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bsprof.errors import BadInput
from bsprof.files import write_atomic

if TYPE_CHECKING:
    from bsprof.report.data import ReportData
    from bsprof.report.sections import Section
    from bsprof.store import Store

__all__ = ["DEFAULT_REPORT", "ReportInfo", "javascript_bundle", "render_html", "to_spec", "write_report"]

log = logging.getLogger(__name__)

DEFAULT_REPORT = Path("reports") / "index.html"

CONFIG: dict[str, Any] = {
    "font": "Liberation Sans, Helvetica, Arial, sans-serif",
    "axis": {
        "labelFontSize": 11,
        "titleFontSize": 12,
        "titleFontWeight": "normal",
        "titleColor": "#222",
        "gridColor": "#ececec",
    },
    "legend": {"labelFontSize": 11, "titleFontSize": 11, "titleFontWeight": "normal"},
    "title": {"fontSize": 14, "anchor": "start", "subtitleFontSize": 11, "subtitleColor": "#555", "offset": 8},
    "header": {"labelFontSize": 12},
    "view": {"stroke": "#ddd"},
    "concat": {"spacing": 36},
}


@dataclass(frozen=True)
class ReportInfo:
    """What :func:`write_report` wrote.

    Attributes:
        path: The HTML file.
        charts: Charts on the page.
        bytes: File size.
        seconds: Time to read the store, analyse and render.
        sections_without_data: Titles of the sections that say why they have no chart.
    """

    path: Path
    charts: int
    bytes: int
    seconds: float
    sections_without_data: tuple[str, ...]


def _vl_version() -> str | None:
    import altair as alt
    import vl_convert as vlc

    want = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return want if want in vlc.get_vegalite_versions() else None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bsprof"


@functools.lru_cache(maxsize=1)
def javascript_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one script defining ``vegaEmbed`` globally (built once, cached)."""
    from importlib.metadata import version

    import vl_convert as vlc

    vl = _vl_version()
    key = hashlib.sha256(f"{version('vl-convert-python')}|{vl}".encode()).hexdigest()[:16]
    path = _cache_dir() / f"vega-bundle-{key}.js"
    try:
        text = path.read_text(encoding="utf-8")
        if len(text) > 100_000:
            return text
    except OSError:
        pass  # not cached yet
    t0 = time.perf_counter()
    text = vlc.javascript_bundle(vl_version=vl) if vl else vlc.javascript_bundle()
    log.debug("built the Vega JavaScript bundle in %.1f s", time.perf_counter() - t0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bundle-", suffix=".js")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home only costs the rebuild next time
        log.debug("cannot cache the Vega bundle in %s: %s", path.parent, e)
    return text


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


PALETTE = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac")
"""Run colours (Tableau 10), assigned in the report's run order so a run has one colour in every chart."""


def _runs_in(node: Any, found: set[str] | None = None) -> set[str]:
    """Run labels appearing in the spec's data (records with a ``run`` key)."""
    found = set() if found is None else found
    if isinstance(node, dict):
        if isinstance(node.get("run"), str):
            found.add(node["run"])
        for v in node.values():
            if isinstance(v, (dict, list)):
                _runs_in(v, found)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, (dict, list)):
                _runs_in(v, found)
    return found


def _pin_runs(node: Any, runs: list[str], colors: list[str]) -> None:
    """Give every ``run`` colour (and dash) scale the same domain and colours, in every (nested) view."""
    if isinstance(node, dict):
        enc = node.get("encoding")
        if isinstance(enc, dict):
            for channel in ("color", "stroke", "fill", "strokeDash"):
                e = enc.get(channel)
                if isinstance(e, dict) and e.get("field") == "run":
                    scale = {"domain": runs}
                    if channel != "strokeDash":
                        scale["range"] = colors
                    e["scale"] = scale
        for v in node.values():
            if isinstance(v, (dict, list)):
                _pin_runs(v, runs, colors)
    elif isinstance(node, list):
        for v in node:
            _pin_runs(v, runs, colors)


def to_spec(chart: Any, runs: Sequence[str] = ()) -> dict[str, Any]:
    """The chart's Vega-Lite spec with its data inlined and the report's look (fonts, sizes) applied.

    Args:
        chart: An Altair chart.
        runs: Run labels in report order: each gets the same colour in every chart.
    """
    import altair as alt

    with alt.data_transformers.enable("default", max_rows=None):
        spec = chart.to_dict(validate=False)
    spec.pop("$schema", None)
    if runs:
        present = _runs_in(spec)
        shown = [r for r in runs if r in present] or list(runs)
        colors = [PALETTE[list(runs).index(r) % len(PALETTE)] for r in shown]
        _pin_runs({k: v for k, v in spec.items() if k != "datasets"}, shown, colors)
    spec["config"] = {**CONFIG, **spec.get("config", {})}
    spec.setdefault("padding", 8)
    spec.setdefault("autosize", {"type": "pad"})
    return _clean(spec)


def script_json(value: Any) -> str:
    """JSON that is safe inside an HTML ``<script>`` element."""
    text = json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _safe_bundle(text: str) -> str:
    # The bundle is trusted code, but a literal "</script" inside it would still end the element.
    return text.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


def render_html(data: ReportData, sections: Sequence[Section], *, title: str, source: str) -> tuple[str, int]:
    """The page's HTML and its number of charts."""
    import datetime as dt

    import jinja2
    from markupsafe import Markup

    from bsprof import __version__

    specs: dict[str, Any] = {}
    for s in sections:
        for cid, chart in s.charts:
            specs[cid] = to_spec(chart, [r.label for r in data.runs])
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["code"] = _inline_code
    warnings = [
        f"{r.label}: LR rule 'fixed' — one learning rate at every batch size makes large batches look worse than "
        "they are (Shallue et al. 2018); steps-to-target here understate what bigger batches can do. Re-run with "
        "`--lr-rule linear` or `--tune-lr 3`."
        for r in data.runs
        if r.lr_rule == "fixed"
    ]
    warnings += stability_warnings(data.stability)
    html = env.get_template("report.html.j2").render(
        title=title,
        source=source,
        generated=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        version=__version__,
        runs=data.runs,
        sections=sections,
        warnings=warnings,
        bundle=Markup(_safe_bundle(javascript_bundle())),
        specs=Markup(script_json(specs)),
    )
    return html, len(specs)


def stability_warnings(stability: Any) -> list[str]:
    """The banner lines of the batch sizes whose throughput is not to be trusted (README, "Noisy hosts")."""
    if stability is None or stability.empty:
        return []
    bad = stability[stability["verdict"].isin(["busy", "unstable"])]
    return [
        f"{r.run}: B={int(r.batch_size)} {str(r.verdict).upper()} — {r.why}. These throughput figures may be wrong; "
        "run `bsprof check` and re-measure on a quiet host (README, 'Noisy hosts')."
        for r in bad.itertuples()
    ]


def _inline_code(text: str) -> Any:
    """Escape ``text``, then show `backticked` parts as code."""
    import re

    from markupsafe import Markup, escape

    return Markup(re.sub(r"`([^`]+)`", lambda m: f"<code>{m.group(1).strip()}</code>", str(escape(text))))


def _other_runs(store: Store | str | Path, run_ids: list[str]) -> list[Any]:
    from bsprof.store import Store

    if isinstance(store, Store):
        return store.other_runs(run_ids)
    with Store(store) as st:
        return st.other_runs(run_ids)


def command_hint(data: ReportData, store_path: Path) -> str:
    """The options that make a suggested ``bsprof`` command act on the report's runs, shell-quoted:
    ``--workload REF`` when the report shows one workload (its reference as given, e.g. a plug-in's
    ``file.py:factory``) and ``--store PATH`` unless it is the default store."""
    refs = {str(r.config.get("workload_ref") or r.workload) for r in data.runs}
    parts = ["--workload", refs.pop()] if len(refs) == 1 else []
    if store_path != Path("reports/bsprof.db"):
        parts += ["--store", str(store_path)]
    return " ".join(shlex.quote(p) for p in parts)


def write_report(
    store: Store | str | Path,
    out: str | Path = DEFAULT_REPORT,
    run_ids: Sequence[str] | None = None,
    benchmark_json: Sequence[str | Path] = (),
) -> ReportInfo:
    """Read the store, analyse, and write the self-contained HTML report.

    Args:
        store: A :class:`~bsprof.store.Store` or its path.
        out: HTML file to write (its folder is created).
        run_ids: Runs to show; default: the latest run per workload.
        benchmark_json: pytest-benchmark JSON files to include.

    Raises:
        BadInput: Missing or foreign store, unknown run, bad benchmark file, unwritable output.
    """
    from bsprof.report.data import report_data
    from bsprof.report.sections import build_sections

    t0 = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise BadInput(f"report output {out} is a directory; give a file name such as {out / 'index.html'}")
    data = report_data(store, run_ids, benchmark_json)
    store_path = Path(getattr(store, "path", store))
    sections = build_sections(data, command_hint(data, store_path))
    others = _other_runs(store, [r.run_id for r in data.runs])
    if others:
        shown = ", ".join(f"{r.run_id} ({r.workload})" for r in data.runs)
        sections[0].sentences.append(
            f"This report shows run(s) {shown}{'' if run_ids else ', the latest per workload'}; the store holds "
            f"{len(others)} other run(s) of the same workload(s) ({', '.join(r.run_id for r in others[:5])}"
            f"{', ...' if len(others) > 5 else ''}): `bsprof runs` lists them and `bsprof report --run ID` shows one."
        )
    workloads = ", ".join(dict.fromkeys(r.workload for r in data.runs))
    html, n_charts = render_html(data, sections, title=f"bsprof report: {workloads}", source=str(store_path))
    write_atomic(out, lambda tmp: tmp.write_text(html, encoding="utf-8"), "report", create_parent=True)
    empty = tuple(s.title for s in sections if not s.charts and s.notes)
    return ReportInfo(out, n_charts, out.stat().st_size, time.perf_counter() - t0, empty)
