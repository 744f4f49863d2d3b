"""Recognising out-of-memory failures, and freeing memory between trials.

The typed check comes first: :class:`torch.OutOfMemoryError` (CUDA, and other accelerators that raise it)
anywhere in the exception's ``__cause__`` / ``__context__`` chain, so an OOM re-wrapped by a compiled
runtime is still found. The documented fallback for the CPU and MPS, which raise a plain
``RuntimeError``, is message matching against :data:`OOM_MESSAGES` (a failed host allocation says
"DefaultCPUAllocator: can't allocate memory"), plus :class:`MemoryError` from Python itself. The same
fallback catches the CUDA libraries' allocation failures, which torch raises as a plain ``RuntimeError``
with the library's status: ``CUBLAS_STATUS_ALLOC_FAILED``, ``CUDNN_STATUS_ALLOC_FAILED``, and
``CUDNN_STATUS_NOT_SUPPORTED``, which cuDNN reports when its workspace does not fit (Lightning's
``is_oom_error`` and accelerate's ``should_reduce_batch_size`` treat it as out of memory too).
"""

from __future__ import annotations

import gc

import torch

__all__ = ["OOM_MESSAGES", "free_memory", "is_oom", "reset_peak_memory"]

OOM_MESSAGES = (
    "can't allocate memory",  # CPU: DefaultCPUAllocator
    "cuda out of memory",
    "cuda error: out of memory",
    "mps backend out of memory",
    "out of memory",
    "cublas_status_alloc_failed",  # cuBLAS could not allocate its workspace
    "cudnn_status_alloc_failed",
    "cudnn_status_not_supported",  # cuDNN's answer when no algorithm fits the memory left
)
"""Lower-case substrings of a ``RuntimeError`` message that mean out of memory (the untyped fallback)."""


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        stack.extend([e.__cause__, e.__context__])
    return seen


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) means the device ran out of memory."""
    chain = _chain(exc)
    if any(isinstance(e, (torch.OutOfMemoryError, MemoryError)) for e in chain):
        return True
    return any(isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OOM_MESSAGES) for e in chain)


def free_memory(device: torch.device) -> None:
    """Release what an ended trial left behind: garbage, then (CUDA) the caching allocator's unused blocks.

    Call it only once nothing refers to the trial any more — in particular after the ``except`` block that
    caught its failure has ended, since the exception's traceback holds the trial's frames (model, batch,
    activations) until then, and the allocator cannot release blocks that are still in use.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # blocks freed by queued kernels return to the cache first
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> int | None:
    """Free memory (:func:`free_memory`), then restart the allocator's peak statistics; at a trial's start.

    ``torch.cuda.reset_peak_memory_stats`` sets each peak to the allocator's *current* value: without the
    clean-up first, the reserved peak of a small trial would start at what an earlier, larger trial left
    reserved in the cache.

    Returns:
        Bytes still allocated on the CUDA device after the clean-up — the trial's baseline, which grows from
        trial to trial when something leaks — or ``None`` on other devices.
    """
    free_memory(device)
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))
