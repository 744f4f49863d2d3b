"""Batch sources: where a trial's global batches of exactly B examples come from.

Three sources share one small interface (:class:`BatchSource`: ``next()``, ``samples_drawn``, ``epochs``,
``waits_s``, ``close()``):

* :class:`SplitSource` — an in-memory :class:`~bsprof.workload.Split` moved to the device once and batched
  by index on the device (the fast path: no host copies, no data-wait timing).
* :class:`DatasetSource` — a map-style ``torch.utils.data.Dataset``: a seeded, endless batch sampler (the
  same index stream as the in-memory batcher: consecutive seeded permutations cut into batches of B) feeds a
  ``DataLoader`` with the workload's collate function, workers and pinned memory.
* :class:`LoaderSource` — the workload's own loader factory ``make_loader(batch_size, seed)`` (any iterable
  of batches, typically a ``DataLoader``: its sampler, workers and collate function are the user's), or an
  iterable-style dataset wrapped in a ``DataLoader``.

**Epoch ends.** Every global batch has exactly B examples. The index-stream sources never end: an epoch's
last examples are followed by the next epoch's first in the same batch. A loader is iterated again
(``iter(loader)``, so a shuffling sampler draws a new order) when it runs out; a short last batch (a
remainder when ``drop_last=False``, or the partial batches of several workers of an iterable dataset) is not
dropped but completed with the first examples of the next pass, so no example is skipped. A loader built
with ``drop_last=True`` drops its remainder itself. A batch larger than B is cut and its rest carried over.

**Data wait.** Loader-backed sources time every ``next()`` with the host clock (the time the training loop
is blocked waiting for the next batch: fetch, collate, worker hand-off), without synchronising the device —
the engine's clock discipline (synchronise only at block boundaries); on a CPU that is exact, on a GPU the
wait may overlap device work queued earlier, which is precisely the case where it costs nothing. The
in-memory source is not timed (its index gather is part of the step).

(Above 400 lines: the three sources, their sampler, the evaluation batches and the data-wait metrics share the
epoch-end and timing rules documented here; split apart, each would have to restate them.)
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bsprof.engine.batches import BatchError, batch_size_of, concat_batches, map_tensors, slice_batch
from bsprof.errors import BadInput

if TYPE_CHECKING:
    from bsprof.workload import Workload

__all__ = [
    "BatchSource",
    "DatasetSource",
    "IndexBatcher",
    "LoaderSource",
    "SeededBatchSampler",
    "SplitSource",
    "data_wait_metrics",
    "eval_batches",
    "is_map_dataset",
    "is_split",
    "make_source",
]


# Epochs drawn ahead per refill: enough for this many indices, but at most _REFILL_MAX_EPOCHS permutations. A refill
# costs tens of microseconds beyond the permutations themselves, which at one epoch per refill (every few steps
# of a small dataset) is a few percent of a sub-millisecond step.
_REFILL_MIN_INDICES = 1 << 16
_REFILL_MAX_EPOCHS = 64


class IndexBatcher:
    """Seeded batches of exactly ``batch_size`` indices, drawn on ``device`` without host copies.

    The index stream is a concatenation of seeded random permutations of ``range(n)`` (one per epoch), cut
    into consecutive batches: no example is dropped and every batch has the same size, even when
    ``batch_size`` does not divide ``n`` or exceeds it. Permutations are drawn on the CPU with a private
    generator (reproducible across devices) and moved to the device several epochs at a time (about 65,536
    indices, at most 64 epochs), so that refills do not show in the step time; the stream is the same.

    Args:
        n: Number of examples.
        batch_size: Samples per batch.
        seed: Seed of the permutations.
        device: Where the index tensors live.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n = n
        self.batch_size = batch_size
        self.device = device
        self._generator = torch.Generator().manual_seed(seed)
        self._buffer = torch.empty(0, dtype=torch.long, device=device)
        self._pos = 0
        self.samples_drawn = 0

    def _refill(self) -> None:
        rest = self._buffer[self._pos :]
        need = self.batch_size - rest.numel()
        ahead = min(-(-_REFILL_MIN_INDICES // self.n), _REFILL_MAX_EPOCHS)
        epochs = max(1, -(-need // self.n), ahead)
        perms = [torch.randperm(self.n, generator=self._generator) for _ in range(epochs)]
        self._buffer = torch.cat([rest, torch.cat(perms).to(self.device)])
        self._pos = 0

    def next(self) -> torch.Tensor:
        """The next batch of indices (a view into the current epoch's permutation where possible)."""
        if self._pos + self.batch_size > self._buffer.numel():
            self._refill()
        idx = self._buffer[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        self.samples_drawn += self.batch_size
        return idx

    @property
    def epochs(self) -> float:
        """Passes over the data so far (samples drawn / n)."""
        return self.samples_drawn / self.n


class BatchSource(Protocol):
    """Yields a trial's global batches of exactly ``batch_size`` examples."""

    batch_size: int
    samples_drawn: int
    waits_s: list[float] | None
    n_examples: int | None

    def next(self) -> Any:
        """The next global batch (on the device for the in-memory source, else on the host)."""
        ...

    @property
    def epochs(self) -> float | None:
        """Passes over the training data so far (``None`` when the data's length is unknown)."""
        ...

    def close(self) -> None:
        """Release workers and iterators."""
        ...


def is_split(data: object) -> bool:
    """Whether ``data`` is an in-memory split (``inputs`` and ``targets``)."""
    return hasattr(data, "inputs") and hasattr(data, "targets")


def is_map_dataset(data: object) -> bool:
    """Whether ``data`` is a map-style dataset (``__getitem__`` and ``__len__``, not iterable-style)."""
    if isinstance(data, torch.utils.data.IterableDataset):
        return False
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


class SplitSource:
    """An in-memory split on ``device``, batched by index on the device (see :class:`IndexBatcher`).

    Args:
        split: The training split (tensors or nestings of tensors, first dimension the examples).
        batch_size: Examples per batch.
        seed: Seeds the permutations.
        device: Where data and indices live.
    """

    waits_s = None

    def __init__(self, split: Any, batch_size: int, seed: int, device: torch.device) -> None:
        self.split = split.to(device)
        self.batch_size = batch_size
        self.n_examples = len(self.split)
        self.batcher = IndexBatcher(self.n_examples, batch_size, seed, device)

    def next(self) -> tuple[Any, Any]:
        """``(inputs, targets)`` of the next batch."""
        idx = self.batcher.next()
        return map_tensors(self.split.inputs, lambda t: t[idx]), map_tensors(self.split.targets, lambda t: t[idx])

    @property
    def samples_drawn(self) -> int:
        return self.batcher.samples_drawn

    @property
    def epochs(self) -> float:
        return self.batcher.epochs

    def close(self) -> None:
        """Nothing to release."""


class SeededBatchSampler:
    """An endless stream of index batches of exactly ``batch_size``: consecutive seeded permutations of
    ``range(n)`` cut into batches (the stream of :class:`IndexBatcher`, as Python lists for a DataLoader).

    Args:
        n: Examples in the dataset.
        batch_size: Indices per batch.
        seed: Seeds the permutations (drawn with a private generator).
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        self.n = n
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        stream = itertools.chain.from_iterable(
            torch.randperm(self.n, generator=generator).tolist() for _ in itertools.count()
        )
        while True:
            yield list(itertools.islice(stream, self.batch_size))


class _TimedSource:
    """Common part of the loader-backed sources: the timed ``next()`` and the epoch count."""

    def __init__(self, batch_size: int, n_examples: int | None, clock: Callable[[], float]) -> None:
        self.batch_size = batch_size
        self.n_examples = n_examples
        self.samples_drawn = 0
        self.waits_s: list[float] = []
        self._clock = clock

    def _fetch(self) -> Any:
        raise NotImplementedError

    def next(self) -> Any:
        """The next global batch, on the host; the seconds spent waiting for it are appended to ``waits_s``."""
        t0 = self._clock()
        batch = self._fetch()
        self.waits_s.append(self._clock() - t0)
        self.samples_drawn += self.batch_size
        return batch

    @property
    def epochs(self) -> float | None:
        return self.samples_drawn / self.n_examples if self.n_examples else None


class DatasetSource(_TimedSource):
    """A map-style dataset through a ``DataLoader`` driven by a :class:`SeededBatchSampler`.

    Args:
        dataset: Map-style dataset; ``dataset[i]`` is one example (any nesting of tensors).
        batch_size: Examples per batch.
        seed: Seeds the sampling.
        collate_fn: Builds a batch from a list of examples (default: ``default_collate``).
        num_workers: Loader worker processes (0: load in the training process).
        pin_memory: Page-locked host batches (for asynchronous copies to a GPU).
        clock: Host clock of the data-wait timer (seconds).
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        seed: int,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        super().__init__(batch_size, len(dataset), clock)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=SeededBatchSampler(len(dataset), batch_size, seed),
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(seed),  # seeds the workers' RNGs (augmentation)
        )
        self._it: Iterator[Any] | None = iter(self.loader)

    def _fetch(self) -> Any:
        assert self._it is not None, "source closed"
        return next(self._it)

    def close(self) -> None:
        """Shut the loader's workers down."""
        self._it = None


class LoaderSource(_TimedSource):
    """Batches from a loader (any iterable of batches), regrouped into global batches of exactly B.

    Args:
        loader: Typically ``make_loader(batch_size, seed)``'s ``DataLoader``; iterated again when exhausted.
        batch_size: Examples per global batch.
        clock: Host clock of the data-wait timer (seconds).
    """

    def __init__(self, loader: Iterable[Any], batch_size: int, *, clock: Callable[[], float] = time.perf_counter):
        super().__init__(batch_size, _length(getattr(loader, "dataset", None)), clock)
        self.loader = loader
        self.passes = 0
        self._it: Iterator[Any] | None = iter(loader)
        self._pending: list[Any] = []
        self._pending_n = 0

    def _piece(self) -> Any:
        assert self._it is not None, "source closed"
        try:
            return next(self._it)
        except StopIteration:
            self.passes += 1
            self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                raise BatchError("the training loader yields no batches") from None

    def _fetch(self) -> Any:
        b = self.batch_size
        piece = self._piece()
        n = batch_size_of(piece)
        if n == b and not self._pending:
            return piece
        pieces, have = [*self._pending, piece], self._pending_n + n
        while have < b:
            piece = self._piece()
            pieces.append(piece)
            have += batch_size_of(piece)
        joined = concat_batches(pieces)
        self._pending = [slice_batch(joined, b, have)] if have > b else []
        self._pending_n = have - b
        return slice_batch(joined, 0, b)

    def close(self) -> None:
        """Drop the iterator (a DataLoader's workers shut down with it)."""
        self._it = None
        self._pending = []


def _length(data: object) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def eval_batches(
    data: Any,
    batch_size: int,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    num_workers: int = 0,
) -> Iterator[Any]:
    """The evaluation batches of a split or dataset, in order, every example once.

    Args:
        data: A :class:`~bsprof.workload.Split` (yields ``(inputs, targets)`` slices) or a dataset (map-style
            or iterable; yields collated batches).
        batch_size: Examples per evaluation batch.
        collate_fn: For a dataset: builds a batch from a list of examples.
        num_workers: For a dataset: loader worker processes.
    """
    if is_split(data):
        n = len(data)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield slice_batch(data.inputs, start, stop), slice_batch(data.targets, start, stop)
        return
    yield from torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=False, collate_fn=collate_fn, num_workers=num_workers
    )


def make_source(
    workload: Workload,
    batch_size: int,
    seed: int,
    device: torch.device,
    *,
    clock: Callable[[], float] = time.perf_counter,
) -> BatchSource:
    """The batch source of one trial: the workload's loader if :meth:`~bsprof.workload.Workload.make_loader`
    returns one, else its training split (in memory) or dataset (map-style or iterable).

    Raises:
        BadInput: The training data are neither a split nor a dataset.
    """
    loader = workload.make_loader(batch_size, seed)
    if loader is not None:
        return LoaderSource(loader, batch_size, clock=clock)
    data = workload.train_split()
    if is_split(data):
        return SplitSource(data, batch_size, seed, device)
    pin = workload.pin_memory and device.type == "cuda"
    if is_map_dataset(data):
        return DatasetSource(
            data,
            batch_size,
            seed,
            collate_fn=workload.collate,
            num_workers=workload.num_workers,
            pin_memory=pin,
            clock=clock,
        )
    if isinstance(data, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, collate_fn=workload.collate, num_workers=workload.num_workers, pin_memory=pin
        )
        return LoaderSource(loader, batch_size, clock=clock)
    raise BadInput(
        f"workload {workload.name}: train_split() returned {type(data).__name__}; return a bsprof.Split or a "
        "torch Dataset, or implement make_loader()"
    )


def data_wait_metrics(
    waits_s: list[float] | None, *, steps: int, measured_s: float
) -> tuple[dict[str, float | None], dict[str, str]]:
    """Seconds spent waiting for data over the last ``steps`` steps, which took ``measured_s`` seconds.

    Returns:
        ``data_wait_s`` (mean seconds per step waiting for the next batch) and ``data_wait_frac`` (waiting
        seconds / step seconds), or ``None`` with a reason for an in-memory split.
    """
    if waits_s is None:
        why = "in-memory data, batched by index on the device (no loader to wait for)"
        return {"data_wait_s": None, "data_wait_frac": None}, {"data_wait_s": why, "data_wait_frac": why}
    if steps < 1 or len(waits_s) < steps:
        raise ValueError(f"{len(waits_s)} timed fetches for {steps} steps")
    waited = math.fsum(waits_s[-steps:])
    return {"data_wait_s": waited / steps, "data_wait_frac": waited / measured_s if measured_s > 0 else None}, {}
