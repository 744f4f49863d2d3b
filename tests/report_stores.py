"""Synthetic stores for the report tests: trials written through ``Store.add_trial`` as the engine writes
them, from a known model (S = S_min(1 + B_noise/B), saturating throughput), with no training run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bsprof.engine.result import ProfileInfo, TrialExtra, TrialResult, TrialSpec
from bsprof.store import Store

S_MIN, B_NOISE = 10.0, 256.0
GIB = 2**30


def environment(device: str = "cuda:0", **extra: Any) -> dict[str, Any]:
    env = {
        "bsprof_version": "0.1.0",
        "torch_version": "2.13.0",
        "python_version": "3.11.7",
        "device": device,
        "device_name": "Fake GPU 16GB" if device.startswith("cuda") else "Fake CPU",
        "hostname": "testhost",
    }
    if device.startswith("cuda"):
        env["device_memory_bytes"] = 16 * GIB
    else:
        env["gpu_telemetry_reason"] = "trials run on cpu"
    env.update(extra)
    return env


def config(device: str = "cuda:0", amp: str = "off", lr_rule: str = "linear", tune_lr: int = 0) -> dict[str, Any]:
    return {
        "workload": {"name": "w"},
        "kinds": ["convergence", "throughput"],
        "lr_rule": lr_rule,
        "tune_lr": tune_lr,
        "engine": {"device": device, "amp": amp, "compile": False},
    }


def throughput_trial(
    workload: str,
    b: int,
    seed: int,
    *,
    device: str = "cuda:0",
    status: str = "ok",
    gpu: bool = True,
    speed: float = 1.0,
    repeat: int = 0,
    top_ops: bool = False,
) -> TrialResult:
    spec = TrialSpec(workload, "throughput", b, seed, 0.01 * b / 8, repeat=repeat)
    if status != "ok":
        return TrialResult(spec, status, device, error="CUDA out of memory" if status == "oom" else "boom")
    sps = speed * 5000 * b / (1 + b / 256) * (1 + 0.02 * seed)
    util = 30 + 70 * b / (b + 64)
    metrics: dict[str, Any] = {
        "samples_per_s": sps,
        "step_time_s": b / sps,
        "step_time_iqr_s": 0.02 * b / sps,
        "peak_mem_bytes": int(50e6 + b * 4e6),
        "measured_steps": 100,
    }
    reasons = {}
    if gpu:
        power = 100 + 2 * util
        metrics.update(gpu_util_pct=util, power_w=power, energy_j=power * 1.0, energy_per_sample_j=power / sps)
    else:
        for k in ("gpu_util_pct", "power_w", "energy_j", "energy_per_sample_j"):
            metrics[k] = None
            reasons[k] = "trial ran on cpu, not a GPU"
    extra = TrialExtra()
    if top_ops:
        ops = (
            {"name": "aten::mm", "self_cpu_s_per_step": 1e-4 * b / 8, "self_device_s_per_step": None},
            {"name": "aten::addmm", "self_cpu_s_per_step": 5e-5 * b / 8},
            {"name": "Optimizer.step#SGD.step", "self_cpu_s_per_step": 2e-4},
            {"name": "aten::copy_", "self_cpu_s_per_step": 1e-5},
        )
        extra = TrialExtra(profile=ProfileInfo(trace_dir=f"reports/traces/run/{workload}-B{b}", top_ops=ops))
    return TrialResult(spec, "ok", device, "Fake GPU", metrics, reasons, extra=extra, duration_s=1.0)


def convergence_trial(
    workload: str,
    b: int,
    seed: int,
    *,
    lr: float | None = None,
    phase: str = "main",
    status: str = "ok",
    device: str = "cuda:0",
    curve_points: int = 40,
    slow: float = 1.0,
) -> TrialResult:
    lr = 0.01 * b / 8 if lr is None else lr
    spec = TrialSpec(workload, "convergence", b, seed, lr, phase=phase)
    steps = max(1, round(slow * S_MIN * (1 + B_NOISE / b) * (1 + 0.05 * ((seed * 7) % 5 - 2))))
    target = 0.9
    curve = []
    last = steps if status == "ok" else steps * 3
    marks = sorted({max(1, round(last * (i + 1) / curve_points)) for i in range(curve_points)})
    for s in marks:
        val = 0.1 + 0.85 * (1 - math.exp(-3 * s / steps))
        curve.append(
            {
                "step": s,
                "samples": s * b,
                "train_s": s * b / 40000,
                "val_metric": val,
                "train_loss": 2.3 * math.exp(-s / steps),
                "weight_distance": 3 * math.log1p(s * lr),
                "grad_norm": 1 / (1 + s / steps),
            }
        )
    reached = status == "ok"
    metrics = {
        "reached_target": reached,
        "target": target,
        "steps_to_target": steps if reached else None,
        "samples_to_target": steps * b if reached else None,
        "epochs_to_target": steps * b / 1400 if reached else None,
        "time_to_target_s": steps * b / 40000 if reached else None,
        "bracket_steps": steps - 1 if reached else None,
        "final_train_metric": 0.93 + 0.0001 * math.log2(b) if status != "diverged" else None,
        "final_val_metric": 0.91 if status != "diverged" else None,
        "target_fallbacks": 0,
    }
    error = None if reached else f"target {target} not reached" if status == "budget_exhausted" else "loss nan"
    return TrialResult(spec, status, device, "Fake GPU", metrics, error=error, curve=curve, duration_s=1.0)


def make_store(
    path: Path,
    *,
    workload: str = "synthetic",
    kinds: tuple[str, ...] = ("throughput", "convergence"),
    batch_sizes: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512, 1024),
    seeds: int = 3,
    device: str = "cuda:0",
    amp: str = "off",
    lr_rule: str = "linear",
    tune: bool = False,
    oom_from: int | None = None,
    failed_only: bool = False,
    top_ops: bool = False,
    max_batch: bool = False,
    speed: float = 1.0,
    repeats: int = 1,
    curve_points: int = 40,
) -> str:
    """Write one run into the store at ``path`` (created if needed); returns the run id."""
    gpu = device.startswith("cuda")
    with Store(path, create=True) as st:
        run = st.open_run(
            workload,
            {**config(device, amp, lr_rule, 3 if tune else 0), "wl": workload},
            environment(device),
            fresh=True,
        )
        for b in batch_sizes:
            oom = oom_from is not None and b >= oom_from
            for seed in range(seeds):
                if "throughput" in kinds:
                    for r in range(repeats):
                        status = "oom" if oom else ("error" if failed_only else "ok")
                        st.add_trial(
                            run.run_id,
                            throughput_trial(
                                workload,
                                b,
                                seed,
                                device=device,
                                status=status,
                                gpu=gpu,
                                speed=speed,
                                repeat=r,
                                top_ops=top_ops and seed == 0,
                            ),
                        )
                if "convergence" in kinds:
                    if oom:
                        st.add_trial(
                            run.run_id,
                            TrialResult(
                                TrialSpec(workload, "convergence", b, seed, 0.01),
                                "oom",
                                device,
                                error="CUDA out of memory",
                            ),
                        )
                        continue
                    status = ("diverged" if seed % 2 else "budget_exhausted") if failed_only else "ok"
                    if tune:
                        for k, mult in enumerate((0.5, 1.0, 2.0)):
                            st.add_trial(
                                run.run_id,
                                convergence_trial(
                                    workload,
                                    b,
                                    seed,
                                    lr=0.01 * b / 8 * mult,
                                    phase="tune",
                                    device=device,
                                    slow=(1.6, 1.0, 1.3)[k],
                                    status="budget_exhausted" if (k == 2 and b >= 512) else status,
                                    curve_points=curve_points,
                                ),
                            )
                        st.add_trial(
                            run.run_id,
                            convergence_trial(
                                workload,
                                b,
                                1000 + seed,
                                phase="final",
                                status=status,
                                device=device,
                                curve_points=curve_points,
                            ),
                        )
                    else:
                        st.add_trial(
                            run.run_id,
                            convergence_trial(
                                workload, b, seed, status=status, device=device, curve_points=curve_points
                            ),
                        )
        if max_batch:
            tried = [(b, "ok") for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)] + [(2048, "oom"), (1536, "ok")]
            st.add_max_batch(workload, device, {}, environment(device), 1536, 1792, tried)
    return run.run_id


XSS = "<script>alert(1)</script>"


def make_full_store(store: Path) -> list[str]:
    """Three runs in ``store``: a tuned GPU run with an OOM, a profile and a max-batch result; its AMP twin;
    a CPU run whose workload name is a script injection. Returns the run ids."""
    return [
        make_store(
            store,
            tune=True,
            oom_from=2048,
            batch_sizes=(8, 16, 32, 64, 128, 256, 512, 1024, 2048),
            top_ops=True,
            max_batch=True,
        ),
        make_store(store, amp="bf16", speed=1.6),
        make_store(store, workload=XSS, device="cpu", seeds=2, batch_sizes=(8, 32, 128)),
    ]


def benchmark_json(path: Path) -> Path:
    doc = {
        "machine_info": {"node": "testhost", "processor": "x86_64", "python_version": "3.11.7"},
        "datetime": "2026-01-01T00:00:00",
        "version": "5.1.0",
        "benchmarks": [
            {
                "group": None,
                "name": name,
                "fullname": f"benchmarks/test_x.py::{name}",
                "stats": {
                    "min": m,
                    "max": m * 2,
                    "mean": m * 1.2,
                    "median": m * 1.1,
                    "q1": m * 1.05,
                    "q3": m * 1.3,
                    "iqr": m * 0.25,
                    "stddev": m * 0.1,
                    "rounds": 20,
                },
                "extra_info": {"batch_size": bs, "samples_per_s": bs / m, "note": "<b>not bold</b>"},
            }
            for name, m, bs in (("test_step[B=8]", 0.001, 8), ("test_step[B=256]", 0.004, 256))
        ],
    }
    path.write_text(json.dumps(doc))
    return path
