"""Recognising out-of-memory failures.

The typed check comes first: :class:`torch.OutOfMemoryError` (CUDA, and other accelerators that raise it)
anywhere in the exception's ``__cause__`` / ``__context__`` chain, so an OOM re-wrapped by a compiled
runtime is still found. The documented fallback for the CPU and MPS, which raise a plain
``RuntimeError``, is message matching against :data:`OOM_MESSAGES` (a failed host allocation says
"DefaultCPUAllocator: can't allocate memory"), plus :class:`MemoryError` from Python itself.
"""

from __future__ import annotations

import gc

import torch

__all__ = ["OOM_MESSAGES", "free_memory", "is_oom"]

OOM_MESSAGES = (
    "can't allocate memory",  # CPU: DefaultCPUAllocator
    "cuda out of memory",
    "cuda error: out of memory",
    "mps backend out of memory",
    "out of memory",
)


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
    """Release what an aborted trial left behind: garbage, and the CUDA caching allocator's blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
