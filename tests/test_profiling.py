"""Profiling on the CPU: a sweep with --profile writes one TensorBoard trace per batch size that
torch-tb-profiler's own loader parses, and stores the top operators; the run's environment says why GPU
telemetry is empty here."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bsprof.engine.profiling import profile_steps, top_operators, trace_folder
from bsprof.engine.step import TrainingStep
from bsprof.store import Store
from bsprof.workloads.digits import DigitsMLP

QUICK = ("--device", "cpu", "--min-time", "0.001", "--min-steps", "2")


def load_with_tb_plugin(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Parse a trace folder with torch-tb-profiler's RunLoader; its profiles (one per trace file)."""
    # The plugin picks its process start method when first imported; fork keeps the test fast.
    monkeypatch.setenv("TORCH_PROFILER_START_METHOD", "fork")
    pytest.importorskip("torch_tb_profiler", reason="extra not installed: pip install 'bsprof[tensorboard]'")
    from torch_tb_profiler import io as tb_io
    from torch_tb_profiler.profiler.loader import RunLoader

    run = RunLoader(folder.name, str(folder), tb_io.Cache()).load()
    return list(run.get_profiles())


def test_profile_steps_writes_a_trace_and_top_operators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    step = TrainingStep(DigitsMLP(), batch_size=16, seed=0, lr=0.01, device=torch.device("cpu"))
    folder = trace_folder(tmp_path / "traces" / "run1", "digits-mlp", 16)
    result = profile_steps(step, trace_dir=folder, device=torch.device("cpu"), wait=1, warmup=1, active=2)
    assert folder == tmp_path / "traces" / "run1" / "digits-mlp-B16"
    assert [Path(f).parent for f in result.trace_files] == [folder]
    assert result.trace_files[0].endswith(".pt.trace.json")
    assert step.steps_done == 4
    names = [r["name"] for r in result.top_ops]
    assert any(n in names for n in ("aten::mm", "aten::addmm"))
    assert not any(n.startswith("ProfilerStep") for n in names)
    mm = next(r for r in result.top_ops if r["name"] == "aten::addmm")
    assert mm["calls_per_step"] == 2.0  # two linear layers, forward
    assert mm["self_device_s_per_step"] is None
    assert sum(r["self_cpu_pct"] for r in result.top_ops) <= 100.0 + 1e-6
    profiles = load_with_tb_plugin(folder, monkeypatch)
    assert len(profiles) == 1


def test_top_operators_with_device_times() -> None:
    def ev(key: str, count: int, cpu_us: float, dev_us: float) -> SimpleNamespace:
        return SimpleNamespace(
            key=key, count=count, self_cpu_time_total=cpu_us, cpu_time_total=cpu_us, self_device_time_total=dev_us
        )

    events = [
        ev("ProfilerStep#3", 2, 9000, 0),
        ev("aten::mm", 6, 300, 8000),
        ev("aten::add_", 10, 900, 1000),
        ev("cudaLaunchKernel", 40, 2000, 0),
    ]
    rows, key = top_operators(events, active_steps=2, with_device=True, top=2)
    assert key == "self_device_s_per_step"
    assert [r["name"] for r in rows] == ["aten::mm", "aten::add_", "cudaLaunchKernel"]  # top 2 of each kind
    mm = rows[0]
    assert mm["calls_per_step"] == 3.0
    assert mm["self_device_s_per_step"] == pytest.approx(8000e-6 / 2)
    assert mm["self_device_pct"] == pytest.approx(100 * 8000 / 9000)
    assert mm["self_cpu_pct"] == pytest.approx(100 * 300 / 3200)


@pytest.mark.usefixtures("fast_timing")
def test_sweep_with_profile_writes_one_loadable_trace_per_batch_size(
    cli: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_path = tmp_path / "s.db"
    res = cli(  # type: ignore[operator]
        "sweep", "-w", "digits-mlp", "-b", "8,32", "--kind", "throughput", "--repeats", "2", "--seeds", "1",
        "--profile", "--monitor-hz", "50", "-s", store_path, *QUICK,
    )  # fmt: skip
    assert res.code == 0, res.err
    assert f"tensorboard --logdir {tmp_path / 'traces'}" in res.out
    with Store(store_path) as store:
        (run,) = store.runs()
        rows = store.trial_rows([run.run_id])
        env = run.environment
    assert len(rows) == 4  # 2 batch sizes x 2 rounds; only the first round is profiled
    profiled = {r["batch_size"]: r["extra"] for r in rows if "trace_dir" in r["extra"]}
    assert sorted(profiled) == [8, 32]
    for batch, extra in profiled.items():
        folder = tmp_path / "traces" / run.run_id / f"digits-mlp-B{batch}"
        assert Path(extra["trace_dir"]) == folder
        traces = [p for p in os.listdir(folder) if p.endswith(".pt.trace.json")]
        assert len(traces) == 1, traces
        assert len(extra["top_ops"]) >= 3
        assert {"name", "self_cpu_s_per_step", "self_cpu_pct", "calls_per_step"} <= set(extra["top_ops"][0])
        assert len(load_with_tb_plugin(folder, monkeypatch)) == 1
    for r in rows:  # FLOPs and telemetry are there for every trial, profiled or not
        assert r["flops_per_step"] > 0 and r["achieved_flops_per_s"] > 0
        assert r["mfu"] is None and "--peak-tflops" in r["reasons"]["mfu"]
        assert r["extra"]["telemetry"]
    # acceptance: the run says why GPU telemetry is empty here, and every GPU field is empty with a reason
    assert env["gpu_telemetry"] is None
    assert env["gpu_telemetry_reason"].startswith("trials run on cpu; ")
    for r in rows:
        for key in ("gpu_util_pct", "power_w", "energy_j", "energy_per_sample_j"):
            assert r[key] is None and "cpu" in r["reasons"][key]


@pytest.mark.usefixtures("fast_timing")
def test_profile_subcommand_reuses_the_sweep(cli: object, tmp_path: Path) -> None:
    store_path = tmp_path / "s.db"
    args = ("profile", "-w", "digits-mlp", "-b", "16", "--peak-tflops", "0.1", "-s", store_path, *QUICK)
    res = cli(*args)  # type: ignore[operator]
    assert res.code == 0, res.err
    assert "profiler traces for batch sizes 16" in res.out
    with Store(store_path) as store:
        (row,) = store.trial_rows()
    assert row["kind"] == "throughput" and row["extra"]["top_ops"]
    assert row["mfu"] == pytest.approx(row["achieved_flops_per_s"] / 0.1e12)
    # resuming the finished run profiles nothing, and says so
    again = cli(*args)  # type: ignore[operator]
    assert again.code == 0 and "no trial was profiled" in again.out
