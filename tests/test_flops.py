"""FLOPs per training step against the analytic count, the peak FLOP/s table, and MFU."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch

from bsprof.engine.device import fp32_precision
from bsprof.engine.flops import (
    PEAK_FLOPS,
    FlopCount,
    chip_of,
    compute_dtype,
    count_flops,
    flops_metrics,
    peak_flops,
)
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

    forward = count_flops(lambda: model(x)).total
    assert forward == pytest.approx(2 * W * batch, rel=0.05)

    step = TrainingStep(workload, batch_size=batch, seed=0, lr=0.01, device=torch.device("cpu"))
    training = count_flops(step).total
    # forward 2WB; backward 2WB for the weight gradients plus 2WB for the input gradients, except the
    # first layer, whose input (the data) needs none: 6WB - 2 W_first B
    assert training == pytest.approx(6 * W * batch - 2 * W_FIRST * batch, rel=0.05)
    assert 2 * forward <= training <= 3 * forward

    # With the input gradient too, a training step is the textbook 3x the forward pass.
    xg = torch.randn(batch, 64, requires_grad=True)
    full = count_flops(lambda: workload.loss(model(xg), torch.zeros(batch, dtype=torch.long)).backward()).total
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


@pytest.fixture
def tf32_flags() -> Iterator[None]:
    """Restore torch's TF32 switches after a test, through the new API (the legacy flags are views of it).

    ``torch.backends`` attributes are module proxies that monkeypatch cannot restore.
    """
    objects = (torch.backends, torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.cudnn.conv)
    objects += (torch.backends.cudnn.rnn,)
    saved = [o.fp32_precision for o in objects]
    try:
        yield
    finally:
        for o, value in zip(objects, saved, strict=True):
            o.fp32_precision = value


def test_compute_dtype_per_op_class(tf32_flags: None) -> None:
    assert compute_dtype("bf16", "conv") == ("bf16", None) and compute_dtype("fp16", "matmul") == ("fp16", None)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True  # torch's defaults: convs in TF32, matmuls in fp32
    assert compute_dtype("off", "matmul") == ("fp32", None)
    assert compute_dtype("off", "conv") == ("tf32", None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False
    assert compute_dtype("off", "matmul") == ("tf32", None)
    assert compute_dtype("off", "conv") == ("fp32", None)


def test_the_new_fp32_precision_api_is_read_first(tf32_flags: None) -> None:
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert fp32_precision("matmul") == ("tf32", None)
    assert fp32_precision("conv") == ("ieee", None)


def _conv_step(x: torch.Tensor, *, linear: bool = False) -> FlopCount:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten()]
    if linear:
        layers.append(torch.nn.Linear(8 * 14 * 14, 10))
    model = torch.nn.Sequential(*layers)
    return count_flops(lambda: model(x).square().mean().backward())


def test_flops_are_counted_per_op_class() -> None:
    x = torch.randn(4, 3, 16, 16)
    conv_only, mixed = _conv_step(x), _conv_step(x, linear=True)
    assert conv_only.matmul == 0 and conv_only.conv > 0
    # forward 2 * (outputs x kernel volume) per image, backward once for the weights (the input needs no grad)
    assert conv_only.conv == 2 * (2 * 4 * 8 * 14 * 14 * 3 * 3 * 3)
    assert mixed.conv == conv_only.conv and mixed.matmul == 3 * 2 * 4 * 8 * 14 * 14 * 10
    assert mixed.total == mixed.conv + mixed.matmul


A100 = "NVIDIA A100-SXM4-80GB"
CUDA = torch.device("cuda", 0)


def test_mfu_of_a_conv_workload_without_amp_uses_the_tf32_peak(tf32_flags: None) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the defaults: matmuls in fp32, convs in TF32
    torch.backends.cudnn.allow_tf32 = True
    conv = _conv_step(torch.randn(4, 3, 16, 16))
    m, reasons = flops_metrics(conv, 1e-3, device=CUDA, device_name=A100, amp="off")
    assert m["peak_flops_per_s"] == PEAK_FLOPS["a100"]["tf32"] == 156e12 and reasons == {}
    assert m["mfu"] == pytest.approx(conv.total / 1e-3 / 156e12) and m["peak_dtypes"] == "conv tf32"
    mixed = FlopCount(conv=3 * 10**9, matmul=10**9)  # convs at the TF32 peak, matmuls at the fp32 one
    m, _ = flops_metrics(mixed, 1e-3, device=CUDA, device_name=A100, amp="off")
    assert m["peak_flops_per_s"] == pytest.approx(4e9 / (3e9 / 156e12 + 1e9 / 19.5e12))
    assert m["peak_dtypes"] == "conv tf32, matmul fp32"


def test_a_mig_slice_gets_no_full_gpu_peak() -> None:
    name = "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    assert chip_of(name) is None
    m, reasons = flops_metrics(FlopCount(matmul=10**9), 1e-3, device=CUDA, device_name=name, amp="bf16")
    assert m["achieved_flops_per_s"] == pytest.approx(1e12)
    assert m["peak_flops_per_s"] is None and m["mfu"] is None
    assert "MIG slice" in reasons["mfu"] and "--peak-tflops" in reasons["mfu"]
    m, reasons = flops_metrics(FlopCount(matmul=10**9), 1e-3, device=CUDA, device_name=name, peak_tflops=40.0)
    assert m["mfu"] == pytest.approx(1e12 / 40e12) and reasons == {}


MIXED_APIS = """
import torch
from bsprof.engine.flops import FlopCount, flops_metrics
torch.backends.cuda.matmul.fp32_precision = "tf32"  # a workload that uses the new API
torch.backends.cudnn.conv.fp32_precision = "ieee"
try:
    torch.backends.cuda.matmul.allow_tf32  # what the old MFU code read
    print("legacy read: ok")
except RuntimeError as e:
    print("legacy read: raises", "legacy and new APIs" in str(e))
m, reasons = flops_metrics(
    FlopCount(conv=10**9, matmul=10**9), 1e-3, device=torch.device("cuda", 0), device_name="NVIDIA A100-SXM4-80GB"
)
print(m["peak_dtypes"], "|", m["peak_flops_per_s"], "|", reasons)
"""


def test_mixed_tf32_apis_leave_the_mfu_standing() -> None:
    # A fresh process: torch raises on a legacy read only while the new API's settings are its first.
    out = subprocess.run([sys.executable, "-c", MIXED_APIS], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "legacy read: raises True"  # the clash that used to turn a timed trial into an error
    dtypes, peak, reasons = lines[1].split(" | ")
    assert dtypes == "conv fp32, matmul tf32" and reasons == "{}"
    assert float(peak) == pytest.approx(2e9 / (1e9 / 19.5e12 + 1e9 / 156e12))


def test_unreadable_tf32_flags_leave_a_reason_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import bsprof.engine.flops as flops_module

    def broken(op_class: str) -> tuple[str | None, str | None]:
        raise RuntimeError("flag exploded")

    monkeypatch.setattr(flops_module, "fp32_precision", broken)
    m, reasons = flops_metrics(FlopCount(matmul=10**9), 1e-3, device=CUDA, device_name=A100)
    assert m["achieved_flops_per_s"] == pytest.approx(1e12) and m["mfu"] is None
    assert "flag exploded" in reasons["mfu"]


def test_mfu_on_a_known_gpu() -> None:
    m, reasons = flops_metrics(
        FlopCount(matmul=10**12), 0.01, device=torch.device("cuda", 0), device_name="NVIDIA A100-SXM4-80GB", amp="bf16"
    )
    assert m["achieved_flops_per_s"] == pytest.approx(1e14)
    assert m["peak_flops_per_s"] == 312e12
    assert m["mfu"] == pytest.approx(1e14 / 312e12)
    assert reasons == {}


def test_cpu_gets_achieved_flops_only_unless_a_peak_is_given() -> None:
    m, reasons = flops_metrics(FlopCount(matmul=2_000_000), 0.001, device=torch.device("cpu"), device_name="cpu")
    assert m["achieved_flops_per_s"] == pytest.approx(2e9)
    assert m["mfu"] is None and "--peak-tflops" in reasons["mfu"]
    m, reasons = flops_metrics(
        FlopCount(matmul=2_000_000), 0.001, device=torch.device("cpu"), device_name="cpu", peak_tflops=0.5
    )
    assert m["mfu"] == pytest.approx(2e9 / 0.5e12) and reasons == {}


def test_unknown_gpu_and_failed_count() -> None:
    m, reasons = flops_metrics(FlopCount(matmul=10**9), 0.1, device=CUDA, device_name="NVIDIA L40S")
    assert m["achieved_flops_per_s"] == pytest.approx(1e10) and m["mfu"] is None
    assert "L40S" in reasons["mfu"]
    m, reasons = flops_metrics(None, 0.1, device=torch.device("cpu"), device_name="cpu", reason="FLOP counting failed")
    assert all(m[k] is None for k in ("flops_per_step", "achieved_flops_per_s", "mfu"))
    assert reasons["flops_per_step"] == "FLOP counting failed"
