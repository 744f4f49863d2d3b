"""A run's environment record and identity: numerics flags recorded, NVML read through the NVML layer only,
and a store reused on another GPU or torch starting a new run (no mixed trials, no inherited OOM floor)."""

from __future__ import annotations

import ast
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import ref

import bsprof.environment as environment
from bsprof.engine.device import numerics_flags, resolve_device
from bsprof.engine.sweep import SweepConfig, run_sweep
from bsprof.engine.trial import EngineSettings, TrialResult, TrialSpec
from bsprof.environment import IDENTITY_KEYS, collect_environment, run_identity
from bsprof.store import Store
from bsprof.workload import Workload, load_workload

CPU = torch.device("cpu")


def test_the_environment_records_numerics_flags_and_its_identity() -> None:
    env = collect_environment(CPU)
    numerics = env["numerics"]
    assert set(numerics) >= {
        "matmul_fp32_precision",
        "conv_fp32_precision",
        "float32_matmul_precision",
        "cudnn_benchmark",
        "cudnn_deterministic",
        "deterministic_algorithms",
    }
    assert numerics["cudnn_benchmark"] is torch.backends.cudnn.benchmark
    assert env["identity"] == run_identity(env) and set(env["identity"]) == set(IDENTITY_KEYS)
    assert env["identity"]["torch_version"] == torch.__version__
    assert env["schema_version"] == 1


def test_numerics_flags_survive_mixed_tf32_apis() -> None:
    objects = (torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.cudnn.conv)
    objects += (torch.backends.cudnn.rnn,)
    saved = [o.fp32_precision for o in objects]
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        flags = numerics_flags()  # must not raise, whatever torch does with the legacy getters
        assert flags["matmul_fp32_precision"] == "tf32" and flags["conv_fp32_precision"] == "ieee"
    finally:
        for o, value in zip(objects, saved, strict=True):
            o.fp32_precision = value


def test_nvml_is_initialised_only_in_the_nvml_layer_and_the_store_is_not_imported() -> None:
    tree = ast.parse(Path(environment.__file__).read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "pynvml" not in imported and "bsprof.store" not in imported
    calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "nvmlInit" not in calls


def test_cuda_n_becomes_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1] if current else 0)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert current == [1]
    assert resolve_device("cuda") == torch.device("cuda", 1)  # the current device, which cuda:1 made current
    assert resolve_device("cpu") == CPU and current == [1, 1]


# run identity ---------------------------------------------------------------------------------------


def _env(device_name: str, torch_version: str = "2.13.0", matmul: str = "ieee") -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": "cuda:0",
        "device_name": device_name,
        "torch_version": torch_version,
        "cuda_version": "12.8",
        "cudnn_version": 91000,
        "nvidia_driver_version": "570.86.15",
        "numerics": {"matmul_fp32_precision": matmul, "conv_fp32_precision": "tf32", "cudnn_benchmark": False},
        "hostname": "same-host",
    }
    env["identity"] = run_identity(env)
    return env


H100 = _env("NVIDIA H100 80GB HBM3")
A100 = _env("NVIDIA A100-SXM4-80GB")


def test_a_store_on_another_gpu_torch_or_numerics_starts_a_new_run(tmp_path: Path) -> None:
    config = {"workload": {"name": "tiny"}, "kinds": ["throughput"]}
    with Store(tmp_path / "s.db", create=True) as store:
        first = store.open_run("tiny", config, H100)
        assert store.open_run("tiny", config, _env("NVIDIA H100 80GB HBM3")).run_id == first.run_id  # resumes
        assert store.open_run("tiny", config, {**H100, "hostname": "other"}).run_id == first.run_id
        newer_torch = _env(H100["device_name"], torch_version="2.14.0")
        tf32_matmuls = _env(H100["device_name"], matmul="tf32")
        others = [store.open_run("tiny", config, env).run_id for env in (A100, newer_torch, tf32_matmuls)]
        assert len({first.run_id, *others}) == 4


class _OomAbove:
    """A throughput runner that runs out of memory at ``limit`` and above."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.sizes: list[int] = []

    def __call__(self, workload: Workload, spec: TrialSpec, settings: EngineSettings) -> TrialResult:
        self.sizes.append(spec.batch_size)
        oom = self.limit is not None and spec.batch_size >= self.limit
        return TrialResult(
            spec=spec,
            status="oom" if oom else "ok",
            device="cuda:0",
            metrics={} if oom else {"samples_per_s": 1000.0},
            error="injected oom" if oom else None,
            started_at=time.time(),
        )


def test_a_sweep_on_another_gpu_neither_mixes_trials_nor_inherits_the_oom_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bsprof.engine.sweep as sweep_module

    tiny = load_workload(ref("tiny.py"))
    config = SweepConfig(workload_ref="tiny", batch_sizes=(8, 16, 32), kinds=("throughput",), seeds=1, repeats=1)
    settings = EngineSettings(device=CPU)
    with Store(tmp_path / "s.db", create=True) as store:
        monkeypatch.setattr(sweep_module, "collect_environment", lambda device: A100)
        small = _OomAbove(16)
        on_a100 = run_sweep(config, tiny, settings, store, runners={"throughput": small}, prime=False)
        assert small.sizes == [8, 16]  # 32 skipped after the OOM at 16

        monkeypatch.setattr(sweep_module, "collect_environment", lambda device: H100)
        big = _OomAbove(None)
        on_h100 = run_sweep(config, tiny, settings, store, runners={"throughput": big}, prime=False)
        assert on_h100.run.run_id != on_a100.run.run_id
        assert big.sizes == [8, 16, 32]  # nothing resumed from the A100's run, no OOM floor inherited
        rows = store.trial_rows([on_h100.run.run_id])
        assert sorted((r["batch_size"], r["status"]) for r in rows) == [(8, "ok"), (16, "ok"), (32, "ok")]
