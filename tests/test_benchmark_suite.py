"""The pytest-benchmark suite's own logic: option parsing (command line > environment > default), the
plugin in a real pytest session (``pytester``, running copies of ``benchmarks/``'s files on a tiny workload),
the ``extra_info`` fields, the xdist refusal, the CUDA skip and the store it writes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import REPO, ref

from bsprof.benchmark_results import convergence_extra_info, throughput_extra_info
from bsprof.engine.timing import StepTimes
from bsprof.engine.trial import TrialResult, TrialSpec
from bsprof.errors import BadInput
from bsprof.options import SUITE_OPTIONS, BsprofOptions, parse_suite_options
from bsprof.pytest_plugin import pytest_configure, pytest_report_header, pytest_unconfigure
from bsprof.store import Store

BENCH = REPO / "benchmarks"
TINY = ref("tiny.py")
FAST = ("--bsprof-min-time", "0", "--bsprof-min-rounds", "5", "--bsprof-warmup-rounds", "1", "--bsprof-max-time", "5")

GPU_KEYS = ("gpu_util_pct", "power_w", "energy_j", "energy_per_sample_j")

# --- options ----------------------------------------------------------------------------------------------


def _parse(cli: dict[str, str] | None = None, env: dict[str, str] | None = None) -> BsprofOptions:
    cli = cli or {}
    return parse_suite_options(lambda suffix: cli.get(suffix), env or {})


def test_defaults() -> None:
    o = _parse()
    assert o == BsprofOptions()
    assert o.batch_sizes == (8, 16, 32, 64, 128, 256, 512, 1024)
    assert (o.workload_ref, o.device_spec, o.seeds, o.target, o.store, o.threads) == (
        "digits-mlp", "auto", 3, None, None, None,
    )  # fmt: skip


def test_every_option_has_an_environment_variable() -> None:
    assert all(var == "BSPROF_" + suffix.upper().replace("-", "_") for suffix, (var, _, _) in SUITE_OPTIONS.items())
    assert {"workload", "batch-sizes", "device", "seeds", "target", "store"} <= set(SUITE_OPTIONS)


def test_environment_then_command_line() -> None:
    env = {
        "BSPROF_WORKLOAD": "digits-cnn",
        "BSPROF_BATCH_SIZES": "16..64",
        "BSPROF_DEVICE": "CPU",
        "BSPROF_SEEDS": "5",
        "BSPROF_TARGET": "0.9",
        "BSPROF_STORE": "x.db",
        "BSPROF_THREADS": "2",
        "BSPROF_MIN_TIME": "0.5",
    }
    o = _parse(env=env)
    assert (o.workload_ref, o.batch_sizes, o.device_spec, o.seeds, o.target, o.store, o.threads, o.min_time_s) == (
        "digits-cnn", (16, 32, 64), "cpu", 5, 0.9, Path("x.db"), 2, 0.5,
    )  # fmt: skip
    o = _parse({"seeds": "2", "batch-sizes": "8", "target": "0.5"}, env)
    assert (o.seeds, o.batch_sizes, o.target, o.workload_ref) == (2, (8,), 0.5, "digits-cnn")
    assert _parse(env={"BSPROF_SEEDS": ""}).seeds == 3  # an empty variable counts as unset


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"batch-sizes": "8,x"}, "--bsprof-batch-sizes '8,x': 'x' is not an integer"),
        ({"batch-sizes": "0"}, "--bsprof-batch-sizes"),
        ({"seeds": "0"}, "--bsprof-seeds '0': must be >= 1"),
        ({"seeds": "three"}, "--bsprof-seeds 'three': not an integer"),
        ({"target": "high"}, "--bsprof-target 'high': not a number"),
        ({"target": "nan"}, "--bsprof-target 'nan': must be a finite number"),
        ({"device": "tpu"}, "--bsprof-device 'tpu'"),
        ({"min-time": "-1"}, "--bsprof-min-time"),
        ({"max-time": "0"}, "--bsprof-max-time '0': must be a finite number > 0"),
        ({"threads": "0"}, "--bsprof-threads '0': must be >= 1"),
        ({"workload": " "}, "--bsprof-workload: empty"),
    ],
)
def test_bad_values_name_the_option(cli: dict[str, str], message: str) -> None:
    with pytest.raises(BadInput, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        _parse(cli)


def _config(**option: Any) -> Any:
    """A stand-in for ``pytest.Config`` with what the plugin's configure hooks read."""
    cli = {"--bsprof-workload": TINY, "--bsprof-device": "cpu"}
    return SimpleNamespace(option=SimpleNamespace(**option), getoption=cli.get, stash={})


@pytest.mark.parametrize(
    "option", [{"dist": "load", "numprocesses": 2}, {"dist": "no", "numprocesses": 2}, {"dist": "loadscope"}]
)
def test_configure_refuses_xdist(option: dict[str, Any]) -> None:
    with pytest.raises(pytest.UsageError, match="pytest-xdist"):
        pytest_configure(_config(**option))


def test_configure_refuses_an_xdist_worker() -> None:
    worker = _config(dist="no")
    worker.workerinput = {"workerid": "gw0"}
    with pytest.raises(pytest.UsageError, match="pytest-xdist"):
        pytest_configure(worker)


def test_configure_without_xdist_starts_the_session() -> None:
    config = _config(dist="no")
    pytest_configure(config)
    try:
        assert "device cpu" in (pytest_report_header(config) or "")
    finally:
        pytest_unconfigure(config)
    assert pytest_report_header(config) is None


# --- extra_info (pure) ------------------------------------------------------------------------------------


def test_throughput_extra_info_says_why_gpu_fields_are_empty() -> None:
    spec = TrialSpec("w", "throughput", 8, 0, 0.1)
    metrics = {"samples_per_s": 80.0, "step_time_s": 0.1, "peak_mem_bytes": 4096, "peak_mem_source": "rss_vmhwm"}
    metrics |= dict.fromkeys(GPU_KEYS)
    reasons = {k: "trial ran on cpu, not a GPU" for k in GPU_KEYS}
    times = StepTimes((0.1, 0.1, 0.2), steps_per_block=1, batch_size=8, warmup_steps=12)
    result = TrialResult(spec, "ok", "cpu", "cpu", metrics, reasons, step_times=times)
    info = throughput_extra_info(result, warmup_rounds=1)
    assert info["samples_per_s"] == 80.0 and info["step_times_s"] == [0.1, 0.1, 0.2]
    assert (info["rounds"], info["iterations"], info["warmup_rounds"]) == (3, 1, 1)
    assert info["peak_mem_bytes"] == 4096 and info["peak_mem_source"] == "rss_vmhwm"
    for k in GPU_KEYS:
        assert info[k] is None and info[f"{k}_reason"] == "trial ran on cpu, not a GPU"
    assert "peak_mem_bytes_reason" not in info
    json.dumps(info)


def test_convergence_extra_info_counts_a_missed_seed_as_infinitely_slow() -> None:
    def trial(seed: int, steps: int | None, status: str = "ok") -> TrialResult:
        metrics: dict[str, Any] = {"reached_target": steps is not None}
        if steps is not None:
            metrics |= {"steps_to_target": steps, "samples_to_target": 8 * steps, "time_to_target_s": steps / 100}
        return TrialResult(TrialSpec("w", "convergence", 8, seed, 0.1), status, "cpu", "cpu", metrics)

    info = convergence_extra_info([trial(0, 10), trial(1, None, "budget_exhausted"), trial(2, 30)], target=0.9)
    assert info["steps_to_target_per_seed"] == [10, None, 30]
    assert info["samples_to_target_per_seed"] == [80, None, 240]
    assert info["statuses"] == ["ok", "budget_exhausted", "ok"]
    assert info["steps_to_target_median"] == 30  # median of (10, 30, inf)
    assert info["reached_fraction"] == pytest.approx(2 / 3)
    info = convergence_extra_info([trial(0, None, "diverged"), trial(1, None, "diverged"), trial(2, 5)], target=0.9)
    assert info["steps_to_target_median"] is None
    assert info["steps_to_target_median_reason"] == "the median seed did not reach the target"


# --- the plugin in a pytest session -------------------------------------------------------------------------


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester folder holding copies of ``benchmarks/``'s conftest and the two engine benchmark files."""
    for name in ("conftest.py", "test_throughput.py", "test_convergence.py"):
        (pytester.path / name).write_text((BENCH / name).read_text(encoding="utf-8"), encoding="utf-8")
    return pytester


def _run(suite: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    """Run the copied suite in a subprocess (in-process runs would drop the torch modules they import lazily
    from ``sys.modules`` afterwards, and torch cannot register its operator libraries twice)."""
    out = suite.path / "bench.json"
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "--benchmark-json", str(out), *args, timeout=120)
    doc = json.loads(out.read_text()) if out.exists() else {}
    return result, doc


def test_a_session_fills_extra_info(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BSPROF_BATCH_SIZES", "8,16")  # from the environment ...
    monkeypatch.setenv("BSPROF_SEEDS", "5")
    store = tmp_path / "bench.db"
    result, doc = _run(suite, "--bsprof-workload", TINY, "--bsprof-seeds", "2", "--bsprof-store", str(store), *FAST)
    result.assert_outcomes(passed=4)
    assert any("bsprof: workload tiny, batch sizes 8,16, device cpu, seeds 2" in line for line in result.outlines)
    benches = {b["name"]: b for b in doc["benchmarks"]}
    assert set(benches) == {  # ... and the command line wins
        "test_throughput[tiny-B8]", "test_throughput[tiny-B16]",
        "test_convergence[tiny-B8-convergence]", "test_convergence[tiny-B16-convergence]",
    }  # fmt: skip
    for b in (8, 16):
        info = benches[f"test_throughput[tiny-B{b}]"]["extra_info"]
        assert info["batch_size"] == b and info["device"] == "cpu" and info["device_name"] == "cpu"
        assert info["rounds"] >= 5 and len(info["step_times_s"]) == info["rounds"]
        assert info["samples_per_s"] == pytest.approx(b / info["step_time_s"])
        assert info["peak_mem_bytes"] is not None and info["peak_mem_source"].startswith("rss_")
        for k in GPU_KEYS:
            assert info[k] is None and "not a GPU" in info[f"{k}_reason"]
        conv = benches[f"test_convergence[tiny-B{b}-convergence]"]
        assert conv["stats"]["rounds"] == 2  # one round per seed
        info = conv["extra_info"]
        assert info["seeds"] == [0, 1] and len(info["steps_to_target_per_seed"]) == 2
        assert len(info["samples_to_target_per_seed"]) == len(info["time_to_target_s_per_seed"]) == 2
        assert set(info) >= {"statuses", "reached_fraction", "lr", "device", "steps_to_target_median", "target"}
    with Store(store) as st:
        (run,) = st.runs()
        rows = st.trial_rows([run.run_id])
    assert run.config["source"] == "pytest-benchmark"
    assert sorted((r["kind"], r["batch_size"]) for r in rows) == [
        ("convergence", 8), ("convergence", 8), ("convergence", 16), ("convergence", 16),
        ("throughput", 8), ("throughput", 16),
    ]  # fmt: skip
    assert all(r["step_times"]["block_times_s"] for r in rows if r["kind"] == "throughput")


_COUNT_SAMPLER_STARTS = """

import multiprocessing.process

_starts = []
_start = multiprocessing.process.BaseProcess.start


def _counting_start(self):
    _starts.append(self.name)
    return _start(self)


multiprocessing.process.BaseProcess.start = _counting_start


def pytest_unconfigure(config):
    with open("process_starts.txt", "w") as f:
        f.write("\\n".join(_starts))
"""


def test_throughput_benchmarks_share_one_sampler_process(suite: pytest.Pytester) -> None:
    """A sweep starts one telemetry sampler process; so does a session of throughput benchmarks (it was one per
    benchmark), whatever the number of batch sizes."""
    conftest = suite.path / "conftest.py"
    conftest.write_text(conftest.read_text(encoding="utf-8") + _COUNT_SAMPLER_STARTS, encoding="utf-8")
    result, doc = _run(
        suite, "--bsprof-workload", TINY, "--bsprof-batch-sizes", "8,16,32,64", *FAST, "-k", "throughput"
    )
    result.assert_outcomes(passed=4, deselected=4)
    assert len(doc["benchmarks"]) == 4
    starts = (suite.path / "process_starts.txt").read_text().split()
    assert starts == ["bsprof-sampler"]


def test_bad_option_is_one_usage_error(suite: pytest.Pytester) -> None:
    result, doc = _run(suite, "--bsprof-batch-sizes", "8,oops")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "bsprof: --bsprof-batch-sizes '8,oops': 'oops' is not an integer" in result.errlines[0]
    assert not doc


def test_unknown_workload_is_a_usage_error(suite: pytest.Pytester) -> None:
    result, _ = _run(suite, "--bsprof-workload", "no-such-workload")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown workload 'no-such-workload'" in result.errlines[0]


def test_cuda_without_cuda_skips_with_the_reason(suite: pytest.Pytester) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    result, doc = _run(suite, "--bsprof-device", "cuda", "--bsprof-workload", TINY, "--bsprof-batch-sizes", "8", "-rs")
    result.assert_outcomes(skipped=2)
    assert any("CUDA is not available on this host" in line for line in result.outlines)
    assert not doc.get("benchmarks")  # pytest-benchmark writes no file when nothing ran


def test_throughput_only_workload_skips_convergence(suite: pytest.Pytester) -> None:
    result, _ = _run(
        suite, "--bsprof-workload", ref("slow.py"), "--bsprof-batch-sizes", "2", *FAST, "-k", "convergence", "-rs"
    )
    result.assert_outcomes(skipped=1, deselected=1)
    assert any("has no target: pass --bsprof-target" in line for line in result.outlines)
