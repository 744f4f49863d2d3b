"""FLOPs per training step against the analytic count, the peak FLOP/s table, and MFU."""

from __future__ import annotations

import pytest
import torch

from bsprof.engine.flops import PEAK_FLOPS, chip_of, compute_dtype, count_flops, flops_metrics, peak_flops
from bsprof.engine.step import TrainingStep
from bsprof.workloads.digits import DigitsMLP

HIDDEN = 256
W_FIRST = 64 * HIDDEN  # weights of the first layer (its input needs no gradient)
W = W_FIRST + HIDDEN * 10  # all weights of digits-mlp (biases are not multiply-adds)


@pytest.mark.parametrize("batch", [1, 32, 256])
def test_digits_mlp_flops_match_the_analytic_count(batch: int) -> None:
    workload = DigitsMLP(hidden=HIDDEN)
    model = workload.build_model(0)
    x = torch.randn(batch, 64)

    forward = count_flops(lambda: model(x))
    assert forward == pytest.approx(2 * W * batch, rel=0.05)

    step = TrainingStep(workload, batch_size=batch, seed=0, lr=0.01, device=torch.device("cpu"))
    training = count_flops(step)
    # forward 2WB; backward 2WB for the weight gradients plus 2WB for the input gradients, except the
    # first layer, whose input (the data) needs none: 6WB - 2 W_first B
    assert training == pytest.approx(6 * W * batch - 2 * W_FIRST * batch, rel=0.05)
    assert 2 * forward <= training <= 3 * forward

    # With the input gradient too, a training step is the textbook 3x the forward pass.
    xg = torch.randn(batch, 64, requires_grad=True)
    full = count_flops(lambda: workload.loss(model(xg), torch.zeros(batch, dtype=torch.long)).backward())
    assert full == pytest.approx(3 * forward, rel=0.05)


@pytest.mark.parametrize(
    ("name", "chip"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H200", "h200-sxm"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A100 80GB PCIe", "a100"),
        ("NVIDIA L4", "l4"),
        ("NVIDIA A10G", "a10g"),
        ("Tesla V100-SXM2-16GB", "v100-sxm"),
        ("Tesla V100-PCIE-32GB", "v100-pcie"),
        ("Tesla V100S-PCIE-32GB", "v100s-pcie"),
        ("Tesla T4", "t4"),
        ("NVIDIA L40S", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_device_names_map_to_chips(name: str, chip: str | None) -> None:
    assert chip_of(name) == chip


def test_peaks_by_dtype() -> None:
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == (312e12, None)
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp16")[0] == pytest.approx(989.4e12)
    assert peak_flops("Tesla T4", "tf32") == (8.1e12, None)  # no TF32 on Turing: fp32 peak
    peak, why = peak_flops("Tesla V100-SXM2-16GB", "bf16")
    assert peak is None and "no bf16 peak" in (why or "")
    peak, why = peak_flops("NVIDIA L40S", "bf16")
    assert peak is None and "--peak-tflops" in (why or "")
    assert all(set(t) <= {"fp32", "tf32", "bf16", "fp16"} and "fp32" in t for t in PEAK_FLOPS.values())


def test_compute_dtype() -> None:
    assert compute_dtype("bf16") == "bf16" and compute_dtype("fp16") == "fp16"
    matmul = torch.backends.cuda.matmul  # a module proxy: monkeypatch cannot restore it, so do it by hand
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert compute_dtype("off") == "fp32"
        matmul.allow_tf32 = True
        assert compute_dtype("off") == "tf32"
    finally:
        matmul.allow_tf32 = before


def test_mfu_on_a_known_gpu() -> None:
    m, reasons = flops_metrics(
        1e12, 0.01, device=torch.device("cuda", 0), device_name="NVIDIA A100-SXM4-80GB", amp="bf16"
    )
    assert m["achieved_flops_per_s"] == pytest.approx(1e14)
    assert m["peak_flops_per_s"] == 312e12
    assert m["mfu"] == pytest.approx(1e14 / 312e12)
    assert reasons == {}


def test_cpu_gets_achieved_flops_only_unless_a_peak_is_given() -> None:
    m, reasons = flops_metrics(2_000_000, 0.001, device=torch.device("cpu"), device_name="cpu")
    assert m["achieved_flops_per_s"] == pytest.approx(2e9)
    assert m["mfu"] is None and "--peak-tflops" in reasons["mfu"]
    m, reasons = flops_metrics(2_000_000, 0.001, device=torch.device("cpu"), device_name="cpu", peak_tflops=0.5)
    assert m["mfu"] == pytest.approx(2e9 / 0.5e12) and reasons == {}


def test_unknown_gpu_and_failed_count() -> None:
    m, reasons = flops_metrics(1e9, 0.1, device=torch.device("cuda", 0), device_name="NVIDIA L40S")
    assert m["achieved_flops_per_s"] == pytest.approx(1e10) and m["mfu"] is None
    assert "L40S" in reasons["mfu"]
    m, reasons = flops_metrics(None, 0.1, device=torch.device("cpu"), device_name="cpu", reason="FLOP counting failed")
    assert all(m[k] is None for k in ("flops_per_step", "achieved_flops_per_s", "mfu"))
    assert reasons["flops_per_step"] == "FLOP counting failed"
