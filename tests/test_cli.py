"""The command line: batch-size parsing, bad input (one line, exit code 2, nothing written), help, export
errors. Most cases run ``bsprof.cli.main`` in-process; a few run the real ``python -m bsprof.cli``."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import QUICK_TIMING, REPO, CliResult, cli_command, cli_env, ref

from bsprof.cli import COMMANDS
from bsprof.engine.timing import TimingSettings
from bsprof.errors import BadInput
from bsprof.options import parse_batch_sizes
from bsprof.store import Store

# --- parse_batch_sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8..1024", (8, 16, 32, 64, 128, 256, 512, 1024)),
        ("8,16,32", (8, 16, 32)),
        ("8..32,100", (8, 16, 32, 100)),
        ("32, 8 ,16", (8, 16, 32)),
        ("16,8,16,8..16", (8, 16)),
        ("3..20", (4, 8, 16)),
        ("1..1", (1,)),
        ("7", (7,)),
        ("100,8..16", (8, 16, 100)),
    ],
)
def test_parse_batch_sizes(text: str, expected: tuple[int, ...]) -> None:
    assert parse_batch_sizes(text) == expected


@pytest.mark.parametrize(
    "text", ["", " ", "0", "-8", "abc", "8,,16", "8,", "64..8", "5..7", "8..", "..8", "1.5", "0..4"]
)
def test_parse_batch_sizes_rejects(text: str) -> None:
    with pytest.raises(BadInput) as info:
        parse_batch_sizes(text)
    assert "\n" not in str(info.value)


# --- bad input in-process -----------------------------------------------------------------------------

SWEEP = ("sweep", "--kind", "throughput", "--seeds", "1", "--repeats", "1")

BAD_SWEEPS: dict[str, tuple[str, ...]] = {
    "batch-0": ("-b", "0"),
    "batch-negative": ("-b", "-8"),
    "batch-abc": ("-b", "abc"),
    "batch-empty": ("-b", ""),
    "batch-empty-item": ("-b", "8,,16"),
    "batch-reversed-range": ("-b", "64..8"),
    "unknown-workload": ("-w", "no-such-workload"),
    "unknown-option": ("--no-such-option",),
    "plugin-missing-file": ("-w", "tests/fixtures/does_not_exist.py:factory"),
    "plugin-missing-attribute": ("-w", ref("tiny.py", "no_such_factory")),
    "plugin-factory-raises": ("-w", ref("tiny.py", "raises")),
    "plugin-wrong-type": ("-w", ref("tiny.py", "wrong_type")),
    "plugin-not-callable": ("-w", ref("tiny.py", "NOT_A_WORKLOAD")),
    "plugin-import-fails": ("-w", ref("broken.py")),
    "plugin-module-not-found": ("-w", "no_such_module_for_bsprof:factory"),
    "plugin-empty-attr": ("-w", "bsprof.workloads.digits:"),
    "device-cuda": ("--device", "cuda"),
    "device-unknown": ("--device", "tpu"),
    "min-time-zero": ("--min-time", "0"),
    "seeds-abc": ("--seeds", "abc"),
    "amp-unknown": ("--amp", "fp8"),
}


@pytest.mark.parametrize("extra", list(BAD_SWEEPS.values()), ids=list(BAD_SWEEPS))
def test_sweep_bad_input_one_line_exit_2_nothing_written(
    extra: tuple[str, ...], cli: Callable[..., CliResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a default store would land in ./reports
    store = tmp_path / "out" / "s.db"
    result = cli(*SWEEP, "--store", store, *extra)
    assert result.code == 2
    assert len(result.err_lines) == 1, result.err
    assert result.err_lines[0].startswith("bsprof")
    assert "Traceback" not in result.err
    assert result.out == ""
    assert not store.exists()
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "reports").exists()


def _non_sqlite(path: Path) -> None:
    path.write_text("just some notes, not a database\n" * 50, encoding="utf-8")


def _foreign_sqlite(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE songs (title TEXT)")
    con.commit()
    con.close()


def _other_schema(path: Path) -> None:
    Store(path, create=True).close()
    con = sqlite3.connect(path)
    con.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    con.commit()
    con.close()


BAD_STORES: dict[str, Callable[[Path], None]] = {
    "non-sqlite": _non_sqlite,
    "foreign-sqlite": _foreign_sqlite,
    "other-schema-version": _other_schema,
}


@pytest.mark.parametrize("make", list(BAD_STORES.values()), ids=list(BAD_STORES))
@pytest.mark.parametrize("command", ["sweep", "export"])
def test_bad_store_is_bad_input_and_left_untouched(
    make: Callable[[Path], None], command: str, cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    path = tmp_path / "s.db"
    make(path)
    before = path.read_bytes()
    args = (*SWEEP, "-w", ref("tiny.py"), "-b", "8") if command == "sweep" else ("export",)
    result = cli(*args, "--store", path)
    assert result.code == 2
    assert len(result.err_lines) == 1, result.err
    assert str(path) in result.err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db"]  # no -wal / -shm / other files


def test_export_missing_store_is_bad_input(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    result = cli("export", "--store", tmp_path / "missing.db")
    assert result.code == 2
    assert len(result.err_lines) == 1
    assert "not found" in result.err
    assert not (tmp_path / "missing.db").exists()


def test_export_unknown_run_is_bad_input(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path, create=True).close()
    result = cli("export", "--store", path, "--run", "deadbeef")
    assert result.code == 2
    assert len(result.err_lines) == 1
    assert "deadbeef" in result.err


def test_export_parquet_needs_output_file(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    Store(path, create=True).close()
    result = cli("export", "--store", path, "--format", "parquet")
    assert result.code == 2
    assert len(result.err_lines) == 1
    assert result.out == ""


def test_find_max_batch_cap_below_start_is_bad_input(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    result = cli("find-max-batch", "-w", ref("tiny.py"), "--start", "64", "--cap", "8", "--store", store)
    assert result.code == 2
    assert len(result.err_lines) == 1
    assert not store.exists()


def test_no_command_is_bad_input(cli: Callable[..., CliResult]) -> None:
    result = cli()
    assert result.code == 2
    assert len(result.err_lines) == 1


# --- help and listing ---------------------------------------------------------------------------------


def _documented_commands() -> list[str]:
    """The subcommands the README's CLI reference lists (``bsprof <command> ...`` lines of its code block)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("## CLI reference", 1)[1].split("```", 2)[1]
    return [line.split()[1] for line in block.splitlines() if line.startswith("bsprof ")]


def test_every_documented_subcommand_exists_and_every_subcommand_is_documented(cli: Callable[..., CliResult]) -> None:
    documented = _documented_commands()
    assert sorted(documented) == sorted(COMMANDS)
    usage = cli("--help").out
    assert all(c in usage for c in documented)


def _subcommands() -> list[str]:
    return sorted(COMMANDS)


@pytest.mark.parametrize("command", [[], *[[c] for c in _subcommands()]], ids=["bsprof", *_subcommands()])
def test_help_exits_0(command: list[str], cli: Callable[..., CliResult]) -> None:
    result = cli(*command, "--help")
    assert result.code == 0
    assert "usage:" in result.out
    assert result.err == ""


def test_version(cli: Callable[..., CliResult]) -> None:
    result = cli("--version")
    assert result.code == 0
    assert result.out.startswith("bsprof ")


def test_workloads_lists_builtins(cli: Callable[..., CliResult]) -> None:
    from bsprof.workloads import BUILTINS

    result = cli("workloads")
    assert result.code == 0
    listed = [line.split()[0] for line in result.out.splitlines() if line.strip()]
    assert listed == list(BUILTINS)


# --- the real process: one line on stderr, exit code 2, for a few cases -------------------------------

SUBPROCESS_CASES: dict[str, tuple[str, ...]] = {
    "batch-abc": (*SWEEP, "-b", "abc"),
    "plugin-import-fails": (*SWEEP, "-w", "tests/fixtures/broken.py:factory"),
    "device-cuda": (*SWEEP, "-w", "tests/fixtures/tiny.py:factory", "--device", "cuda"),
    "export-missing-store": ("export",),
}


@pytest.fixture(scope="module")
def subprocess_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every case of :data:`SUBPROCESS_CASES` run as a real process, all started at once (each imports torch)."""
    root = tmp_path_factory.mktemp("cli")
    running = {}
    for name, args in SUBPROCESS_CASES.items():
        store = root / name / "s.db"
        cmd = cli_command(*args, "--store", str(store))
        running[name] = (
            subprocess.Popen(cmd, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            store,
        )
    results = {}
    for name, (proc, store) in running.items():
        out, err = proc.communicate(timeout=120)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), store)
    return results


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_subprocess_bad_input_one_line_exit_2(
    case: str, subprocess_results: dict[str, tuple[subprocess.CompletedProcess[str], Path]]
) -> None:
    proc, store = subprocess_results[case]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not store.exists()
    assert not store.parent.exists()


# --- the fast_timing fixture reaches the CLI's trials ---------------------------------------------------


@pytest.mark.usefixtures("fast_timing")
def test_fast_timing_shortens_the_cli_trials(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    """Were the fixture's patch to miss the settings the CLI builds, the CLI tests would only get slow; this fails."""
    default_blocks = next(f.default for f in dataclasses.fields(TimingSettings) if f.name == "min_blocks")
    store = tmp_path / "s.db"
    quick = ("--min-time", "1e-6", "--min-steps", "1", "--timing-warmup-steps", "0")
    result = cli(*SWEEP, "-w", ref("tiny.py"), "-b", "8", *quick, "--store", store)
    assert result.code == 0, result.err
    with Store(store) as s:
        (row,) = s.trial_rows()
    assert row["status"] == "ok"
    assert row["measured_steps"] == QUICK_TIMING["min_blocks"] < default_blocks
