"""Issue 12: a newcomer's faults and bad inputs end in one line and the documented exit code, never a
traceback; a rejected input leaves the store's bytes unchanged; nothing partial is left behind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import FAST, REPO, THROUGHPUT, CliResult, cli_env, ref
from report_stores import make_store

from bsprof.store import Store

TINY = ref("tiny.py")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(r: CliResult, code: int, *words: str) -> None:
    assert r.code == code, (r.code, r.out, r.err)
    assert len(r.err_lines) == 1, r.err
    assert "Traceback" not in r.err + r.out
    for w in words:
        assert w in r.err_lines[0], r.err


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """A store holding one synthetic run (8..1024, 3 seeds, both kinds: the shape of the default sweep)."""
    path = tmp_path / "s.db"
    make_store(path)
    return path


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder`` (root with a working ``mount`` only; else the test skips)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tiny tmpfs")
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mount failed: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> None:
    """Fill the file system of ``folder`` to the last byte."""
    with (folder / "filler").open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC: full


# --- bad values: exit 2, one line, store unchanged -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--min-time", "nan"), ("--min-time", "finite")),
        (("--min-time", "inf"), ("--min-time", "finite")),
        (("--target", "nan"), ("--target", "finite")),
        (("--target", "inf"), ("--target", "finite")),
        (("--target", "2"), ("--target 2", "outside", "accuracy")),
        (("--device", "cuda:x"), ("bad device",)),
    ],
)
def test_bad_values_are_refused_before_anything_is_written(
    cli: Callable[..., CliResult], stored: Path, args: tuple[str, ...], words: tuple[str, ...]
) -> None:
    before = _sha(stored)
    r = cli("sweep", "-w", TINY, "-b", "8", *THROUGHPUT[:2], *args, "--store", stored)
    _one_line(r, 2, *words)
    assert _sha(stored) == before


def test_a_workload_declares_its_metric_range() -> None:
    from bsprof.workload import load_workload

    assert load_workload("digits-mlp").metric_range == (0.0, 1.0)


@pytest.mark.parametrize("code", ["0", "3", "None"])
def test_a_plugin_calling_sys_exit_at_import_is_a_bad_workload(
    cli: Callable[..., CliResult], stored: Path, tmp_path: Path, code: str
) -> None:
    plugin = tmp_path / f"exits{code}.py"
    plugin.write_text(f"import sys\nsys.exit({code})\n", encoding="utf-8")
    before = _sha(stored)
    r = cli("sweep", "-w", f"{plugin}:factory", "-b", "8", *THROUGHPUT, "--store", stored)
    _one_line(r, 2, "sys.exit")
    assert _sha(stored) == before


def test_a_plugin_factory_calling_sys_exit_is_a_bad_workload(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    plugin = tmp_path / "factory_exits.py"
    plugin.write_text("import sys\n\ndef factory():\n    sys.exit(0)\n", encoding="utf-8")
    r = cli("sweep", "-w", f"{plugin}:factory", "-b", "8", *THROUGHPUT, "--store", tmp_path / "new.db")
    _one_line(r, 2, "sys.exit")
    assert not (tmp_path / "new.db").exists()


def test_corrupt_store_is_called_damaged_and_a_foreign_file_not_a_store(
    cli: Callable[..., CliResult], stored: Path, tmp_path: Path
) -> None:
    data = bytearray(stored.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)  # the header survives, the schema page does not
    stored.write_bytes(bytes(data))
    before = _sha(stored)
    _one_line(cli("summary", "--store", stored), 2, "damaged", ".recover")
    assert _sha(stored) == before
    text = tmp_path / "notes.txt"
    text.write_text("hello " * 200, encoding="utf-8")
    _one_line(cli("summary", "--store", text), 2, "not a bsprof store", "not an SQLite file")


# --- export -o -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing", "directory"])
def test_export_into_a_missing_folder_or_onto_a_folder(
    cli: Callable[..., CliResult], stored: Path, tmp_path: Path, where: str
) -> None:
    out = tmp_path / "nope" / "t.csv" if where == "missing" else tmp_path
    before = _sha(stored)
    r = cli("export", "--store", stored, "-o", out)
    _one_line(r, 2, "does not exist" if where == "missing" else "is a directory")
    assert _sha(stored) == before
    assert not (tmp_path / "nope").exists()


def test_export_help_does_not_point_at_design_md(cli: Callable[..., CliResult]) -> None:
    r = cli("export", "--help")
    assert r.code == 0 and "DESIGN.md" not in r.out


# --- read-only store and full disk -------------------------------------------------------------------------------


def test_read_only_store_is_refused_before_any_trial(
    cli: Callable[..., CliResult], stored: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "tried.log"
    monkeypatch.setenv("BSPROF_TEST_LOG", str(log))
    with _tmpfs(tmp_path / "ro", "4m") as folder:
        store = folder / "s.db"
        store.write_bytes(stored.read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        before = _sha(store)
        r = cli("sweep", "-w", ref("tiny.py", "oom_at_256"), "-b", "256", *THROUGHPUT, *FAST, "--store", store)
        _one_line(r, 2, "cannot be written")
        assert _sha(store) == before
    assert not log.exists()  # no trial ran (the fixture logs every batch it is given)


def test_full_disk_sweep_export_report_one_line_and_no_partial_file(
    cli: Callable[..., CliResult], stored: Path, tmp_path: Path
) -> None:
    with _tmpfs(tmp_path / "full", "512k") as folder:
        store = folder / "s.db"
        r = cli("sweep", "-w", TINY, "-b", "8", *THROUGHPUT, *FAST, "--store", store)
        assert r.code == 0, r.err
        # The disk fills up while a trial runs (its model build fills it): storing that trial fails.
        body = f"    def build_model(self, seed):\n        fill(Path({str(folder)!r}))\n"
        body += "        return super().build_model(seed)\n"
        prelude = "from pathlib import Path\nfrom test_hardening import _fill as fill\n"
        spec = _workload_file(tmp_path, body, prelude=prelude)
        r = cli("sweep", "-w", spec, "-b", "16", *THROUGHPUT, *FAST, "--store", store)
        _one_line(r, 1, "bsprof sweep: error:", "full", "kept")
        (folder / "filler").unlink()
        with Store(store) as s:
            assert s.integrity_check() == "ok" and len(s.trial_rows()) == 1  # what finished before is kept
        _fill(folder)
        for args, out in (
            (("export", "--store", stored, "-o"), folder / "t.csv"),
            (("report", "--store", stored, "-o"), folder / "r.html"),
        ):
            r = cli(*args, out)
            _one_line(r, 1, "No space left on device", "nothing was written")
            assert not out.exists()
            assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) == []
        r = cli("sweep", "-w", TINY, "-b", "32", *THROUGHPUT, *FAST, "--store", store)  # full from the start
        _one_line(r, 2, "cannot be written")


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for the test; the old one is restored after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_report_and_export_get_the_normal_file_mode_not_0600(
    cli: Callable[..., CliResult], stored: Path, tmp_path: Path, umask: Callable[[int], None], mask: int
) -> None:
    umask(mask)
    for args, out in (
        (("report", "--store", stored, "-o"), tmp_path / "r" / "index.html"),
        (("export", "--store", stored, "-o"), tmp_path / "t.csv"),
    ):
        r = cli(*args, out)
        assert r.code == 0, r.err
        assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask, (oct(out.stat().st_mode), oct(mask))
        r = cli(*args, out)  # overwriting gives the same mode
        assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask


# --- Ctrl-C ------------------------------------------------------------------------------------------------------


def test_sampler_process_ignores_ctrl_c() -> None:
    from bsprof.engine.sampler_process import SamplerProcess

    with SamplerProcess() as sampler:
        sampler.start_window(time.perf_counter(), 0.01, ("", {}))
        assert sampler.pid is not None
        os.kill(sampler.pid, signal.SIGINT)  # what the terminal sends the whole process group
        time.sleep(0.3)
        assert sampler.alive
        rows, *_ = sampler.stop_window()
        assert rows


def test_ctrl_c_while_the_sampler_process_starts_is_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT was ignored in the sweep's process while the sampler child started: a Ctrl-C then was dropped."""
    from bsprof.engine import sampler_process
    from bsprof.engine.sampler_process import SamplerProcess

    start = sampler_process._start_without_main

    def start_then_ctrl_c(proc: object) -> None:
        start(proc)
        os.kill(os.getpid(), signal.SIGINT)  # pressed while the child is being started

    monkeypatch.setattr(sampler_process, "_start_without_main", start_then_ctrl_c)
    sampler = SamplerProcess()
    with pytest.raises(KeyboardInterrupt):
        sampler.start_window(time.perf_counter(), 0.01, ("", {}))
        time.sleep(1.0)  # the interrupt is raised at the latest here
    assert sampler.pid is not None
    child = sampler.pid
    sampler.close()
    assert not _alive(child), "the child outlived close()"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["factory", "in_exec"])
def test_ctrl_c_during_a_sweep_exits_130_with_one_line_and_keeps_finished_trials(tmp_path: Path, workload: str) -> None:
    """``in_exec`` sleeps inside a string ``exec``, where CPython remembers the interrupt even though bsprof
    handles it: ``python -m`` then used to exit by the signal (-2) instead of 130 (now and then with ``factory``,
    when the Ctrl-C landed in code ``dataclasses``/``namedtuple`` run that way; every time with ``in_exec``)."""
    store = tmp_path / "s.db"
    args = [sys.executable, "-m", "bsprof.cli", "sweep", "-w", f"tests/fixtures/slow.py:{workload}", "-b", "1,2,4",
            "--kind", "throughput", "--seeds", "1", "--repeats", "3", "--min-time", "0.2", "--min-steps", "1",
            "--store", str(store)]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_default_sigint)  # fmt: skip
    lines: list[str] = []
    first_done = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if re.search(r"\[1/9\] throughput .*: ok", line):
                first_done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first_done.wait(180), "\n".join(lines)
    time.sleep(0.5)  # in the middle of the second trial, with the sampler process running
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    proc.wait(timeout=60)
    reader.join(timeout=10)
    err = "\n".join(lines)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "sampler process failed" not in err, err
    assert lines[-1] == "bsprof: interrupted; finished trials are stored, run the same command to resume", err
    finished = [line for line in lines if re.search(r"\[\d+/9\] throughput .*: ok", line)]
    with Store(store) as s:
        rows = s.trial_rows()
    assert finished and len(rows) >= len(finished), (len(rows), err)  # every trial said finished is stored
    assert {r["status"] for r in rows} == {"ok"}  # the interrupted one is not stored as an error


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default, so Python installs its handler even when this test
    runs in a shell's background job (which ignores SIGINT, and an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# --- trial errors ----------------------------------------------------------------------------------------------


def _workload_file(tmp_path: Path, body: str, prelude: str = "") -> str:
    path = tmp_path / "wl.py"
    fixtures = str(REPO / "tests" / "fixtures")
    head = f"import sys\nimport torch\nsys.path.insert(0, {fixtures!r})\nfrom tiny import TinyWorkload\n"
    head += f"sys.path.insert(0, {str(REPO / 'tests')!r})\n{prelude}"
    head += "from bsprof.workload import Split\n\n\nclass W(TinyWorkload):\n"
    path.write_text(head + body + "\n\ndef factory():\n    return W()\n", encoding="utf-8")
    return f"{path}:factory"


def test_nan_metric_is_a_clear_trial_error(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    spec = _workload_file(tmp_path, "    def metric(self, outputs, targets):\n        return float('nan')\n")
    r = cli("sweep", "-w", spec, "-b", "8", "--kind", "convergence", "--seeds", "1", "--max-steps", "5",
            "--store", tmp_path / "s.db")  # fmt: skip
    assert r.code == 1 and "Traceback" not in r.err, r.err
    with Store(tmp_path / "s.db") as s:
        rows = s.trial_rows()
    assert [row["status"] for row in rows] == ["error"] and "returned NaN" in rows[0]["error"]


def test_empty_validation_split_is_refused_before_the_first_trial(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    """The workload check before the first trial (issue 13) names the empty split: one line, exit 2, no trial."""
    body = "    def val_split(self):\n        return Split(torch.ones(0, 4), torch.zeros(0, dtype=torch.long))\n"
    spec = _workload_file(tmp_path, body)
    r = cli("sweep", "-w", spec, "-b", "8", "--kind", "convergence", "--seeds", "1", "--max-steps", "5",
            "--store", tmp_path / "s.db")  # fmt: skip
    assert r.code == 2 and r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert "ZeroDivisionError" not in r.err and "split is empty" in r.err


def test_batch_larger_than_the_training_set_is_warned(
    cli: Callable[..., CliResult], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = cli("sweep", "-w", TINY, "-b", "8,128", *THROUGHPUT, *FAST, "--store", tmp_path / "s.db")
    assert r.code == 0, r.err
    assert "batch size(s) 128 exceed the 64 training examples" in r.err + caplog.text


# --- runs that hide each other -----------------------------------------------------------------------------------


def test_runs_lists_every_run_and_summary_says_which_is_shown(cli: Callable[..., CliResult], stored: Path) -> None:
    with Store(stored) as s:
        first = s.runs()[0].run_id
    second = make_store(stored, amp="bf16")
    r = cli("runs", "--store", stored)
    assert r.code == 0 and first in r.out and second in r.out and "amp bf16" in r.out
    r = cli("summary", "--store", stored)
    assert r.code == 0 and f"run {second}" in r.out and f"run {first}" not in r.out
    assert "1 other run(s)" in r.out and "bsprof runs" in r.out
    r = cli("summary", "--store", stored, "--run", first)
    assert r.code == 0 and f"run {first}" in r.out and "the runs asked for" in r.out


# --- the summary fits 100 columns ---------------------------------------------------------------------------------


def test_default_sweep_summary_fits_100_columns_without_wrapping(stored: Path) -> None:
    from rich.console import Console

    from bsprof.console import print_summary

    console = Console(width=100, record=True, file=io.StringIO())
    with Store(stored) as s:
        print_summary(s, s.latest_run_ids(), console=console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 100
    rows = [line.split() for line in lines if line.strip().split(" ")[0].isdigit()]
    assert [int(r[0]) for r in rows] == [8, 16, 32, 64, 128, 256, 512, 1024]  # one line per batch size
    assert all(r[-1] == "ok" for r in rows)
    header = " ".join(lines[:6])
    for head in ("batch", "samples", "step", "peak mem", "target", "reached", "E(B)", "regime", "status"):
        assert head in header


def test_a_drifted_batch_size_keeps_the_summary_in_100_columns(stored: Path, tmp_path: Path) -> None:
    """A drift detail in the status cell wrapped the default sweep's B=1024 row over five lines at width 100."""
    import shutil
    import sqlite3

    from rich.console import Console

    from bsprof.console import print_summary

    path = tmp_path / "drifted.db"
    shutil.copy(stored, path)
    with sqlite3.connect(path) as con:
        con.execute(
            "UPDATE trials SET metrics_json = json_set(metrics_json, '$.step_time_drifted', json('true')) "
            "WHERE kind = 'throughput' AND batch_size = 1024 AND seed = 0"
        )
    console = Console(width=100, record=True, file=io.StringIO())
    with Store(path) as s:
        print_summary(s, s.latest_run_ids(), console=console)
    lines = console.export_text().splitlines()
    rows = [line.split() for line in lines if line.strip().split(" ")[0].isdigit()]
    assert [int(r[0]) for r in rows] == [8, 16, 32, 64, 128, 256, 512, 1024]  # one line per batch size
    assert rows[-1][-1] == "drift" and all(r[-1] == "ok" for r in rows[:-1])
    assert any(line.startswith("drift: step time drifted between rounds of a trial at B=1024 in 1/") for line in lines)


def test_wide_summary_has_every_column(cli: Callable[..., CliResult], stored: Path) -> None:
    r = cli("summary", "--store", stored, "--wide")
    assert r.code == 0 and "95% CI" in r.out and "val/train" in r.out and "measured" in r.out


def test_status_cell_names_the_trial_kind() -> None:
    from types import SimpleNamespace

    from bsprof.console import _status_text

    cell = _status_text(SimpleNamespace(throughput_status="error", statuses="error: 1"), "")
    assert cell == "throughput error; convergence error: 1"


def test_sub_millisecond_time_to_target_gets_a_unit_from_the_data() -> None:
    from bsprof.formatting import TIME_UNITS, format_seconds, select_unit

    unit = select_unit([2e-4, 5e-4, 9e-4], TIME_UNITS)
    assert format_seconds(4e-4, unit, 3) == "400 µs"


# --- the report: which run, commands a plug-in user can paste ---------------------------------------------------


def test_report_names_the_run_shown_and_suggests_commands_for_the_plugin(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    import html

    store = tmp_path / "my store.db"
    r = cli("sweep", "-w", TINY, "-b", "8", *THROUGHPUT, *FAST, "--store", store)
    assert r.code == 0, r.err
    r = cli("sweep", "-w", TINY, "-b", "8", *THROUGHPUT, *FAST, "--fresh", "--store", store)
    assert r.code == 0, r.err
    out = tmp_path / "r.html"
    assert cli("report", "--store", store, "-o", out).code == 0
    text = html.unescape(out.read_text(encoding="utf-8"))
    assert "1 other run(s)" in text and "bsprof runs" in text
    assert f"--workload {TINY}" in text  # the reference as given, not the workload's name
    assert f"--store '{store}'" in text  # shell-quoted: the path has a space
    assert "--workload tiny " not in text


def test_pytest_bsprof_store_that_is_not_a_store_fails_at_session_start(tmp_path: Path) -> None:
    from bsprof.errors import BadInput
    from bsprof.options import parse_suite_options
    from bsprof.pytest_session import BsprofSession

    bad = tmp_path / "notes.txt"
    bad.write_text("not a store\n" * 100, encoding="utf-8")
    before = _sha(bad)
    options = parse_suite_options(lambda s: {"workload": TINY, "store": str(bad)}.get(s), environ={})
    with pytest.raises(BadInput, match=r"--bsprof-store: .*not a bsprof store"):
        BsprofSession.start(options)
    assert _sha(bad) == before


def test_keskar_is_cited_for_higher_is_better_metrics_only() -> None:
    from types import SimpleNamespace

    import pandas as pd

    from bsprof.report.sections_accuracy import _keskar

    frame = pd.DataFrame({"run": ["acc", "mse"], "higher_is_better": [True, False]})
    d = SimpleNamespace(trials=frame)
    assert "Keskar" in _keskar(d, "acc")  # type: ignore[arg-type]
    assert _keskar(d, "mse") == ""  # type: ignore[arg-type]
    assert _keskar(SimpleNamespace(trials=frame.drop(columns="higher_is_better")), "acc") == ""  # type: ignore[arg-type]


def test_benchmark_extra_info_reads_as_key_value_pairs_not_json() -> None:
    from bsprof.report.sections_compute import _extra_text

    text = _extra_text('{"batch_size": 64, "samples_per_s": 12345.678, "workload": "digits-mlp"}')
    assert text == "batch_size: 64; samples_per_s: 12,346; workload: digits-mlp"
    assert _extra_text("") == ""


def test_lower_is_better_learning_curves_use_a_log_axis_so_a_small_target_shows() -> None:
    import json

    import pandas as pd

    from bsprof.report.accuracy_charts import learning_curves_chart

    curves = pd.DataFrame(
        {"run": "r", "trial_id": 1, "batch_size": 8, "seed": 0, "step": [1, 2, 4, 8],
         "samples": [8, 16, 32, 64], "train_s": [0.1, 0.2, 0.4, 0.8], "val_metric": [16.0, 2.0, 0.2, 0.04]}
    )  # fmt: skip
    lower = learning_curves_chart(curves, {"r": 0.05}, "mse", lower_is_better=True).to_dict()
    higher = learning_curves_chart(curves, {"r": 0.05}, "mse").to_dict()
    y = lower["hconcat"][0]["layer"][0]["encoding"]["y"]
    assert y["scale"]["type"] == "log" and y["axis"]["title"] == "mse (log scale)"
    assert min(y["axis"]["values"]) <= 0.05  # the target is on the axis's ticked range
    assert "mse (log scale)" not in json.dumps(higher)


def test_report_wall_clock_chart_picks_its_unit_from_the_data() -> None:
    import json

    import pandas as pd

    from bsprof.report.tradeoff_charts import headline_chart

    t = pd.DataFrame({"run": "r", "batch_size": [8, 16, 32], "wallclock_to_target_s": [4e-4, 2e-4, 3e-4],
                      "samples_to_target": [80, 96, 128], "steps_to_target": [10, 6, 4]})  # fmt: skip
    spec = json.dumps(headline_chart(t).to_dict())
    assert "wall-clock to target (µs, log scale)" in spec.encode().decode("unicode_escape")
    assert '"labelOverlap": "greedy"' in spec
