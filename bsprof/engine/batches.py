"""Structured batches: any nesting of tensors, with the batch in dimension 0.

A batch is a tensor, or a mapping (``dict``, ``OrderedDict``, HuggingFace ``BatchEncoding``), tuple,
named tuple, list or dataclass whose leaves are tensors. Every tensor leaf has the batch dimension first,
and all of them have the same length there. Leaves that are not tensors (strings, numbers, ``None``) are
kept as they are: they are copied whole into every slice, never cut.

These functions move a batch to a device as a whole, count its examples, cut it into micro-batches along
dimension 0 and glue pieces back together; they rebuild each container with its own type.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["BatchError", "batch_size_of", "concat_batches", "map_tensors", "slice_batch", "split_batch", "to_device"]


class BatchError(ValueError):
    """A batch that is not a nesting of tensors with a common first dimension (the message is one line)."""


def _rebuild_mapping(batch: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    try:
        return type(batch)(items)
    except Exception:  # noqa: BLE001 - a mapping type whose constructor takes something else: a plain dict
        return items


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``batch`` with ``fn`` applied to every tensor leaf; containers keep their types, other leaves are kept.

    Args:
        batch: A tensor or a nesting of mappings, sequences and dataclasses with tensor leaves.
        fn: Applied to every tensor.
    """
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {k: map_tensors(v, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # named tuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {f.name: map_tensors(getattr(batch, f.name), fn) for f in dataclasses.fields(batch) if f.init}
        return dataclasses.replace(batch, **changes)
    return batch


def _tensors(batch: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    map_tensors(batch, keep)
    return found


def to_device(batch: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor on ``device`` (tensors already there are not copied).

    Args:
        batch: A structured batch.
        device: Target device.
        non_blocking: Asynchronous host-to-device copies (only asynchronous from pinned memory).
    """
    return map_tensors(batch, lambda t: t.to(device, non_blocking=non_blocking))


def batch_size_of(batch: Any) -> int:
    """Examples in ``batch``: the common length of dimension 0 of its tensors.

    Raises:
        BatchError: No tensor in the batch, a 0-d tensor, or tensors of different lengths.
    """
    tensors = _tensors(batch)
    if not tensors:
        raise BatchError(f"a batch must hold tensors; got {type(batch).__name__} with none")
    sizes = set()
    for t in tensors:
        if t.dim() == 0:
            raise BatchError("a batch holds a 0-d tensor; the batch dimension must be dimension 0")
        sizes.add(int(t.shape[0]))
    if len(sizes) > 1:
        raise BatchError(f"the tensors of a batch differ in length along dimension 0: {sorted(sizes)}")
    return sizes.pop()


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of ``batch`` (views, no copies)."""
    return map_tensors(batch, lambda t: t[start:stop])


def split_batch(batch: Any, micro_batch_size: int) -> list[Any]:
    """``batch`` cut along dimension 0 into consecutive micro-batches of ``micro_batch_size`` examples; the
    last one is smaller when the size does not divide the batch.

    Args:
        batch: A structured batch.
        micro_batch_size: Examples per micro-batch (>= 1).
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    n = batch_size_of(batch)
    return [slice_batch(batch, s, min(s + micro_batch_size, n)) for s in range(0, n, micro_batch_size)]


def concat_batches(batches: list[Any]) -> Any:
    """Pieces of the same structure concatenated along dimension 0 (non-tensor leaves from the first piece).

    Raises:
        BatchError: The pieces differ in structure.
    """
    if not batches:
        raise ValueError("nothing to concatenate")
    if len(batches) == 1:
        return batches[0]
    columns = [_tensors(b) for b in batches]
    if len({len(c) for c in columns}) != 1:
        raise BatchError("batches to concatenate differ in structure")
    try:
        joined = iter([torch.cat(parts) for parts in zip(*columns)])
    except RuntimeError as e:  # e.g. sequences padded to different lengths
        raise BatchError(f"cannot concatenate batches along dimension 0: {str(e).splitlines()[0]}") from e
    return map_tensors(batches[0], lambda _: next(joined))
