"""FLOPs per training step, achieved FLOP/s and model FLOPs utilization (MFU).

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` over one call of the training step:
forward, backward and the optimizer step. The counter only knows matrix products and convolutions
(``mm``, ``addmm``, ``bmm``, ``convolution``, attention...), so elementwise work, the loss and the
optimizer update count as zero; this is the usual "model FLOPs" convention (PaLM's MFU). A training step
comes out at a little under three forward passes for shallow networks (autograd skips the input gradient of
the first layer).

Peaks per op class. Convolutions and matrix products follow different numerics switches: cuDNN
convolutions run in TF32 unless ``torch.backends.cudnn.conv.fp32_precision`` (legacy
``torch.backends.cudnn.allow_tf32``, default True) says IEEE, cuBLAS matmuls only when
``torch.backends.cuda.matmul.fp32_precision`` (legacy ``torch.backends.cuda.matmul.allow_tf32``, default
False) says TF32. So FLOPs are counted per class (:class:`FlopCount`), each class gets its own peak from
:data:`PEAK_FLOPS` (``amp`` bf16/fp16 for both under autocast), and the step's peak is the one that makes
MFU = (conv FLOPs / conv peak + matmul FLOPs / matmul peak) / step time. The new ``fp32_precision`` API is
read first: torch raises when the legacy flag is read after a workload set the new one.

On the CPU, on a GPU not in the table, or on a MIG slice (a fraction of the GPU: its name ends in
``MIG 1g.10gb`` and the whole GPU's peak does not apply), MFU is ``None`` with a reason and only the
achieved FLOP/s is reported, unless the user gives the peak (``--peak-tflops``). Nothing here raises into a
trial: a failure leaves the FLOP fields ``None`` with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bsprof.engine.device import fp32_precision

__all__ = [
    "FLOPS_KEYS",
    "OP_CLASSES",
    "PEAK_FLOPS",
    "FlopCount",
    "chip_of",
    "compute_dtype",
    "count_flops",
    "flops_metrics",
    "is_mig",
    "peak_flops",
    "step_peak_flops",
]

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
    """The :data:`PEAK_FLOPS` key for a CUDA device name (``"NVIDIA A100-SXM4-80GB"`` -> ``"a100"``); ``None``
    for an unknown GPU or a MIG slice (:func:`is_mig`)."""
    if is_mig(device_name):
        return None
    name = device_name.lower()
    for pattern, chip in _CHIPS:
        if re.search(pattern, name):
            return chip
    return None


def is_mig(device_name: str) -> bool:
    """Whether a CUDA device name is a MIG slice (``"NVIDIA A100-SXM4-80GB MIG 1g.10gb"``)."""
    return re.search(r"\bmig\b", device_name.lower()) is not None


OP_CLASSES = ("conv", "matmul")
"""FLOP classes with their own numerics switch: cuDNN convolutions, and every other counted op (cuBLAS
matrix products and attention)."""


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one call, by op class.

    Attributes:
        conv: FLOPs in convolutions (forward and backward).
        matmul: FLOPs in every other counted op: matrix products and attention.
    """

    conv: int = 0
    matmul: int = 0

    @property
    def total(self) -> int:
        """All counted FLOPs."""
        return self.conv + self.matmul


def _op_class(op: Any) -> str:
    return "conv" if "conv" in str(op).rsplit(".", 1)[-1] else "matmul"


def count_flops(fn: Callable[[], Any]) -> FlopCount:
    """FLOPs of one call of ``fn`` (e.g. a :class:`~bsprof.engine.step.TrainingStep`) by op class, from
    :class:`~torch.utils.flop_counter.FlopCounterMode`'s per-op breakdown (matrix products and convolutions
    only)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_class = dict.fromkeys(OP_CLASSES, 0)
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        by_class[_op_class(op)] += int(flops)
    return FlopCount(**by_class)


def compute_dtype(amp: str, op_class: str) -> tuple[str | None, str | None]:
    """(dtype, None) for the dtype ``op_class`` ops run in: ``bf16``/``fp16`` under autocast, else ``tf32``
    or ``fp32`` by :func:`fp32_precision`; (None, reason) when torch's flags cannot be read."""
    if amp in ("bf16", "fp16"):
        return amp, None
    precision, why = fp32_precision(op_class)
    if precision is None:
        return None, why
    return ("tf32" if precision == "tf32" else "fp32"), None


def peak_flops(device_name: str, dtype: str) -> tuple[float | None, str | None]:
    """(peak FLOP/s, None) for a CUDA device name and dtype, or (None, reason) when it is not in the table.

    A GPU without TF32 (V100, T4) runs TF32-allowed matmuls in fp32, so ``tf32`` falls back to ``fp32``.
    """
    if is_mig(device_name):
        return None, f"{device_name!r} is a MIG slice (a fraction of the GPU's peak); pass --peak-tflops"
    chip = chip_of(device_name)
    if chip is None:
        return None, f"no peak FLOP/s known for {device_name!r}; pass --peak-tflops"
    table = PEAK_FLOPS[chip]
    if dtype == "tf32" and "tf32" not in table:
        dtype = "fp32"
    if dtype not in table:
        return None, f"{device_name} has no {dtype} peak (not supported in hardware); pass --peak-tflops"
    return table[dtype], None


def step_peak_flops(flops: FlopCount, device_name: str, amp: str) -> tuple[float | None, str | None, str | None]:
    """The peak FLOP/s of a step whose FLOPs are ``flops``, each op class at its own dtype's peak.

    Returns:
        (peak FLOP/s, dtypes, reason): the peak is ``total / sum(class FLOPs / class peak)``, so that
        ``achieved / peak`` is the fraction of the time the step would take at every class's peak;
        ``dtypes`` says which dtype each class was taken at (e.g. ``"conv tf32, matmul fp32"``);
        ``(None, None, reason)`` when a class with FLOPs has no known dtype or peak.
    """
    seconds_at_peak = 0.0
    dtypes = []
    for op_class in OP_CLASSES:
        class_flops = getattr(flops, op_class)
        if class_flops == 0:
            continue
        dtype, why = compute_dtype(amp, op_class)
        if dtype is None:
            return None, None, why
        peak, why = peak_flops(device_name, dtype)
        if peak is None:
            return None, None, why
        seconds_at_peak += class_flops / peak
        dtypes.append(f"{op_class} {dtype}")
    if seconds_at_peak <= 0:
        return None, None, "no counted FLOPs to weigh the peaks by"
    return flops.total / seconds_at_peak, ", ".join(dtypes), None


FLOPS_KEYS = ("flops_per_step", "conv_flops_per_step", "achieved_flops_per_s", "peak_flops_per_s", "mfu")
"""Metric keys of :func:`flops_metrics` (besides the string ``peak_dtypes``)."""


def flops_metrics(
    flops: FlopCount | None,
    step_time_s: float | None,
    *,
    device: torch.device,
    device_name: str,
    amp: str = "off",
    peak_tflops: float | None = None,
    reason: str | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """``flops_per_step``, ``conv_flops_per_step``, ``achieved_flops_per_s``, ``peak_flops_per_s``, ``mfu``
    and ``peak_dtypes`` of a trial. Never raises: a failure leaves fields ``None`` with the reason.

    Args:
        flops: Counted FLOPs of one training step by op class (``None`` if counting failed).
        step_time_s: Median seconds per step.
        device: The trial's device.
        device_name: e.g. ``"NVIDIA A100-SXM4-80GB"``.
        amp: Mixed-precision mode (bf16/fp16 puts every class at that dtype's peak).
        peak_tflops: A user-given peak (TFLOP/s) that overrides the table (and allows MFU on the CPU).
        reason: Why ``flops`` is ``None``.

    Returns:
        (metrics, reasons): ``None`` values come with a reason.
    """
    keys = (*FLOPS_KEYS, "peak_dtypes")
    metrics: dict[str, Any] = dict.fromkeys(keys)
    reasons: dict[str, str] = {}
    if flops is not None:
        metrics["flops_per_step"] = flops.total
        metrics["conv_flops_per_step"] = flops.conv
    if flops is None or not step_time_s or step_time_s <= 0:
        why = reason or ("no FLOPs counted" if flops is None else "no step time")
        return metrics, dict.fromkeys((k for k in keys if metrics[k] is None), why)
    metrics["achieved_flops_per_s"] = flops.total / step_time_s
    dtypes: str | None = None
    if peak_tflops is not None:
        peak: float | None = peak_tflops * 1e12
        why_peak = None
        dtypes = "user peak"
    elif device.type == "cuda":
        try:
            peak, dtypes, why_peak = step_peak_flops(flops, device_name, amp)
        except Exception as e:  # noqa: BLE001 - MFU must never fail a timed trial; the reason is stored
            peak, why_peak = None, f"peak FLOP/s lookup failed: {type(e).__name__}: {e}"[:300]
    else:
        peak, why_peak = None, f"no peak FLOP/s for {device.type}; MFU needs --peak-tflops"
    if peak is None:
        reasons["peak_flops_per_s"] = reasons["mfu"] = reasons["peak_dtypes"] = why_peak or "no peak FLOP/s"
    else:
        metrics["peak_flops_per_s"] = peak
        metrics["peak_dtypes"] = dtypes
        metrics["mfu"] = metrics["achieved_flops_per_s"] / peak
    return metrics, reasons
