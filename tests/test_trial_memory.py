"""Memory between trials: a failed trial is released before memory is freed, and every trial's peaks are its own.

The CUDA cases run on this CPU-only host against :class:`FakeCachingAllocator`, a stand-in for
``torch.cuda``'s memory functions that models the caching allocator as torch documents it: freed blocks stay
reserved (cached) until ``empty_cache()``, which releases the unused ones, and ``reset_peak_memory_stats()``
sets every peak to the *current* value (``c10/cuda/CUDACachingAllocator.cpp``: ``resetPeakStats`` sets
``peak = current``), so a reservation left from an earlier trial is a small trial's "peak" unless it is
released first.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, ClassVar

import pytest
import torch
from helpers import ref

import bsprof.engine.trial as trial_module
from bsprof.engine.timing import TimingSettings
from bsprof.engine.trial import EngineSettings, TrialSpec, begin_trial, memory_metrics, run_throughput_trial
from bsprof.workload import load_workload

QUICK = TimingSettings(warmup_steps=1, warmup_s=0.0, min_time_s=0.0, min_steps=2, block_min_s=0.0, min_blocks=2)
MiB = 1 << 20


# --- a failed trial is gone before its memory is freed ------------------------------------------------------


class _Leaky(torch.nn.Module):
    """Runs out of memory at batch sizes >= 256, after computing an activation; keeps weak references to
    itself and to that activation so the test can see when they die."""

    refs: ClassVar[list[weakref.ref[Any]]] = []

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if x.shape[0] >= 256:
            _Leaky.refs[:] = [weakref.ref(self), weakref.ref(h)]
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return h


def _alive() -> list[bool]:
    gc.collect()
    return [r() is not None for r in _Leaky.refs]


def test_failed_trial_model_and_activations_are_dead_before_cleanup_and_next_trial(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workload = load_workload(ref("tiny.py"))
    monkeypatch.setattr(workload, "build_model", lambda seed: (torch.manual_seed(seed), _Leaky())[1])
    seen: dict[str, list[bool]] = {}
    real_free, real_begin = trial_module.free_memory, trial_module.begin_trial

    def free_memory(device: torch.device) -> None:
        seen.setdefault("cleanup", _alive())
        real_free(device)

    def begin_trial(settings: EngineSettings) -> int | None:
        if _Leaky.refs:
            seen.setdefault("next trial", _alive())
        return real_begin(settings)

    monkeypatch.setattr(trial_module, "free_memory", free_memory)
    monkeypatch.setattr(trial_module, "begin_trial", begin_trial)
    settings = EngineSettings(device=torch.device("cpu"), timing=QUICK)
    failed = run_throughput_trial(workload, TrialSpec("tiny", "throughput", 256, 0, 0.1), settings)
    assert failed.status == "oom" and "injected" in (failed.error or "")
    assert len(_Leaky.refs) == 2
    after = run_throughput_trial(workload, TrialSpec("tiny", "throughput", 8, 0, 0.1), settings)
    assert after.status == "ok", after.error
    assert seen == {"cleanup": [False, False], "next trial": [False, False]}


# --- peaks and baselines on a (fake) CUDA device ------------------------------------------------------------


class FakeCachingAllocator:
    """``torch.cuda``'s memory statistics for one device, as the caching allocator keeps them (bytes)."""

    def __init__(self) -> None:
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.calls: list[str] = []

    def malloc(self, n: int) -> None:
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated)  # cached blocks are reused before new ones
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, n: int) -> None:
        self.allocated -= n  # the block goes back to the cache: still reserved

    # the torch.cuda functions

    def synchronize(self, device: Any = None) -> None:
        self.calls.append("synchronize")

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")
        self.reserved = self.allocated

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        self.calls.append("reset_peak_memory_stats")
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def memory_allocated(self, device: Any = None) -> int:
        return self.allocated

    def max_memory_allocated(self, device: Any = None) -> int:
        return self.peak_allocated

    def max_memory_reserved(self, device: Any = None) -> int:
        return self.peak_reserved


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCachingAllocator:
    fake = FakeCachingAllocator()
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", fake.max_memory_allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", fake.max_memory_reserved)
    return fake


def _trial(fake: FakeCachingAllocator, settings: EngineSettings, *, use: int, leak: int = 0) -> dict[str, Any]:
    """The memory part of one trial: begin, allocate ``use`` bytes, free all but ``leak``, measure."""
    baseline = begin_trial(settings)
    fake.malloc(use)
    fake.free(use - leak)
    metrics, _ = memory_metrics(settings.device, None, baseline)
    return metrics


def test_reserved_peak_of_a_small_trial_after_a_large_one_is_its_own(fake_cuda: FakeCachingAllocator) -> None:
    settings = EngineSettings(device=torch.device("cuda", 0))
    large = _trial(fake_cuda, settings, use=4096 * MiB)
    assert large["peak_mem_reserved_bytes"] == 4096 * MiB
    assert fake_cuda.reserved == 4096 * MiB  # the large trial's blocks are still cached
    small = _trial(fake_cuda, settings, use=64 * MiB)
    assert small["peak_mem_bytes"] == 64 * MiB
    assert small["peak_mem_reserved_bytes"] == 64 * MiB  # not the 4 GiB an earlier trial left reserved
    assert small["peak_mem_source"] == "cuda_allocator"
    # the clean-up comes first: a sync so queued frees land, then empty_cache, then the reset
    assert fake_cuda.calls[-3:] == ["synchronize", "empty_cache", "reset_peak_memory_stats"]


def test_baseline_shows_a_leak_from_trial_to_trial(fake_cuda: FakeCachingAllocator) -> None:
    settings = EngineSettings(device=torch.device("cuda", 0))
    baselines = [_trial(fake_cuda, settings, use=256 * MiB, leak=8 * MiB)["mem_baseline_bytes"] for _ in range(3)]
    assert baselines == [0, 8 * MiB, 16 * MiB]


def test_cpu_baseline_is_the_rss_when_the_window_opened() -> None:
    settings = EngineSettings(device=torch.device("cpu"), timing=QUICK)
    result = run_throughput_trial(load_workload(ref("tiny.py")), TrialSpec("tiny", "throughput", 8, 0, 0.1), settings)
    assert result.status == "ok", result.error
    assert isinstance(result.metrics["mem_baseline_bytes"], int) and result.metrics["mem_baseline_bytes"] > 0
