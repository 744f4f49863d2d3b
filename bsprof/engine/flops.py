"""FLOPs per training step, achieved FLOP/s and model FLOPs utilization (MFU).

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` over one call of the training step:
forward, backward and the optimizer step. The counter only knows matrix products and convolutions
(``mm``, ``addmm``, ``bmm``, ``convolution``, attention...), so elementwise work, the loss and the
optimizer update count as zero; this is the usual "model FLOPs" convention (PaLM's MFU). The count is exact
for the dense layers it sees: a linear layer of ``W`` weights costs ``2 W B`` forward and ``2 W B`` for
each of its two backward products, except that autograd skips the input gradient of a layer whose input
needs none (the first layer), which is why a training step comes out at a little under three forward
passes for shallow networks.

MFU = achieved FLOP/s / peak FLOP/s, with the peak taken from :data:`PEAK_FLOPS` by the CUDA device name
and the compute dtype (``amp`` bf16/fp16, else tf32 when torch allows TF32 matmuls, else fp32), or given
by the user (``--peak-tflops``). On the CPU, or on a GPU not in the table, MFU is ``None`` with a reason
and only the achieved FLOP/s is reported.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PEAK_FLOPS", "compute_dtype", "count_flops", "flops_metrics", "peak_flops"]

_T = 1e12

PEAK_FLOPS: dict[str, dict[str, float]] = {
    # Dense (no 2:4 sparsity) peaks in FLOP/s from NVIDIA's datasheets, which print sparse tensor-core
    # numbers: those are halved here.
    # H100 / H200: https://www.nvidia.com/en-us/data-center/h100/ , .../h200/
    "h100-sxm": {"fp32": 67 * _T, "tf32": 494.7 * _T, "bf16": 989.4 * _T, "fp16": 989.4 * _T},
    "h100-pcie": {"fp32": 51 * _T, "tf32": 378 * _T, "bf16": 756 * _T, "fp16": 756 * _T},
    "h100-nvl": {"fp32": 60 * _T, "tf32": 417.5 * _T, "bf16": 835.5 * _T, "fp16": 835.5 * _T},
    "h200-sxm": {"fp32": 67 * _T, "tf32": 494.7 * _T, "bf16": 989.4 * _T, "fp16": 989.4 * _T},
    "h200-nvl": {"fp32": 60 * _T, "tf32": 417.5 * _T, "bf16": 835.5 * _T, "fp16": 835.5 * _T},
    # A100 (SXM4 and PCIe share the peaks): nvidia-a100-datasheet
    "a100": {"fp32": 19.5 * _T, "tf32": 156 * _T, "bf16": 312 * _T, "fp16": 312 * _T},
    # L4: l4-gpu-datasheet
    "l4": {"fp32": 30.3 * _T, "tf32": 60 * _T, "bf16": 121 * _T, "fp16": 121 * _T},
    # A10G is AWS's variant of the A10, without its own datasheet; the A10's peaks are an upper bound.
    "a10g": {"fp32": 31.2 * _T, "tf32": 62.5 * _T, "bf16": 125 * _T, "fp16": 125 * _T},
    # V100 (no TF32, no bf16 tensor cores): volta-v100-datasheet
    "v100-sxm": {"fp32": 15.7 * _T, "fp16": 125 * _T},
    "v100-pcie": {"fp32": 14 * _T, "fp16": 112 * _T},
    "v100s-pcie": {"fp32": 16.4 * _T, "fp16": 130 * _T},
    # T4 (no TF32, no bf16 tensor cores): t4-tensor-core-datasheet
    "t4": {"fp32": 8.1 * _T, "fp16": 65 * _T},
}
"""Peak dense FLOP/s by chip and compute dtype (``fp32``, ``tf32``, ``bf16``, ``fp16``)."""

_CHIPS: tuple[tuple[str, str], ...] = (
    # (regex on the lower-cased torch device name, chip), first match wins
    (r"h200.*nvl", "h200-nvl"),
    (r"h200", "h200-sxm"),
    (r"h100.*nvl", "h100-nvl"),
    (r"h100.*(pcie|hbm2e)", "h100-pcie"),
    (r"h100.*(sxm|hbm3)", "h100-sxm"),
    (r"a100", "a100"),
    (r"\bl4\b", "l4"),
    (r"\ba10g?\b", "a10g"),
    (r"v100s", "v100s-pcie"),
    (r"v100.*sxm", "v100-sxm"),
    (r"v100.*pcie", "v100-pcie"),
    (r"\bt4\b", "t4"),
)


def chip_of(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` key for a CUDA device name (``"NVIDIA A100-SXM4-80GB"`` -> ``"a100"``)."""
    name = device_name.lower()
    for pattern, chip in _CHIPS:
        if re.search(pattern, name):
            return chip
    return None


def compute_dtype(amp: str) -> str:
    """The dtype matrix products run in: ``bf16``/``fp16`` under autocast, else ``tf32`` when torch allows
    TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``), else ``fp32``."""
    if amp in ("bf16", "fp16"):
        return amp
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(device_name: str, dtype: str) -> tuple[float | None, str | None]:
    """(peak FLOP/s, None) for a CUDA device name and dtype, or (None, reason) when it is not in the table.

    A GPU without TF32 (V100, T4) runs TF32-allowed matmuls in fp32, so ``tf32`` falls back to ``fp32``.
    """
    chip = chip_of(device_name)
    if chip is None:
        return None, f"no peak FLOP/s known for {device_name!r}; pass --peak-tflops"
    table = PEAK_FLOPS[chip]
    if dtype == "tf32" and "tf32" not in table:
        dtype = "fp32"
    if dtype not in table:
        return None, f"{device_name} has no {dtype} peak (not supported in hardware); pass --peak-tflops"
    return table[dtype], None


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (e.g. a :class:`~bsprof.engine.step.TrainingStep`), as counted by
    :class:`~torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions only)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def flops_metrics(
    flops_per_step: int | None,
    step_time_s: float | None,
    *,
    device: torch.device,
    device_name: str,
    amp: str = "off",
    peak_tflops: float | None = None,
    reason: str | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """``flops_per_step``, ``achieved_flops_per_s``, ``peak_flops_per_s`` and ``mfu`` of a trial.

    Args:
        flops_per_step: Counted FLOPs of one training step (``None`` if counting failed).
        step_time_s: Median seconds per step.
        device: The trial's device.
        device_name: e.g. ``"NVIDIA A100-SXM4-80GB"``.
        amp: Mixed-precision mode (picks the peak's dtype).
        peak_tflops: A user-given peak (TFLOP/s) that overrides the table (and allows MFU on the CPU).
        reason: Why ``flops_per_step`` is ``None``.

    Returns:
        (metrics, reasons): ``None`` values come with a reason.
    """
    keys = ("flops_per_step", "achieved_flops_per_s", "peak_flops_per_s", "mfu")
    metrics: dict[str, Any] = dict.fromkeys(keys)
    reasons: dict[str, str] = {}
    metrics["flops_per_step"] = flops_per_step
    if flops_per_step is None or not step_time_s or step_time_s <= 0:
        why = reason or ("no FLOPs counted" if flops_per_step is None else "no step time")
        return metrics, dict.fromkeys((k for k in keys if metrics[k] is None), why)
    metrics["achieved_flops_per_s"] = flops_per_step / step_time_s
    if peak_tflops is not None:
        peak: float | None = peak_tflops * 1e12
        why_peak = None
    elif device.type == "cuda":
        peak, why_peak = peak_flops(device_name, compute_dtype(amp))
    else:
        peak, why_peak = None, f"no peak FLOP/s for {device.type}; MFU needs --peak-tflops"
    if peak is None:
        reasons["peak_flops_per_s"] = reasons["mfu"] = why_peak or "no peak FLOP/s"
    else:
        metrics["peak_flops_per_s"] = peak
        metrics["mfu"] = metrics["achieved_flops_per_s"] / peak
    return metrics, reasons
