"""Batch sources: exactly B examples per global batch, seeded order, epoch ends, the data-wait timer."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from bsprof.engine.batches import batch_size_of
from bsprof.engine.data import (
    DatasetSource,
    LoaderSource,
    SeededBatchSampler,
    SplitSource,
    eval_batches,
    is_map_dataset,
)
from bsprof.engine.step import IndexBatcher
from bsprof.workload import Split

CPU = torch.device("cpu")


class _Dicts(Dataset):
    """Example i is {"x": [i, i], "y": i}."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor([float(i), float(i)]), "y": torch.tensor(i)}


class _Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(torch.arange(self.n))


def _ticks(step: float = 1.0):  # type: ignore[no-untyped-def]
    counter = itertools.count()
    return lambda: next(counter) * step


def test_seeded_batch_sampler_is_the_index_batcher_stream() -> None:
    sampler = iter(SeededBatchSampler(10, 4, seed=3))
    batcher = IndexBatcher(10, 4, 3, CPU)
    for _ in range(12):
        assert next(sampler) == batcher.next().tolist()


@pytest.mark.parametrize(("n", "batch_size"), [(10, 4), (10, 10), (3, 8)])
def test_dataset_source_full_batches_every_epoch_a_permutation(n: int, batch_size: int) -> None:
    source = DatasetSource(_Dicts(n), batch_size, seed=1)
    batches = [source.next() for _ in range(-(-5 * n // batch_size))]
    assert all(batch_size_of(b) == batch_size for b in batches)
    stream = torch.cat([b["y"] for b in batches])
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert source.samples_drawn == batch_size * len(batches)
    assert source.epochs == pytest.approx(source.samples_drawn / n)
    assert len(source.waits_s) == len(batches)
    source.close()


def test_dataset_source_same_seed_same_order() -> None:
    a = DatasetSource(_Dicts(20), 6, seed=7)
    b = DatasetSource(_Dicts(20), 6, seed=7)
    c = DatasetSource(_Dicts(20), 6, seed=8)
    ya = [a.next()["y"].tolist() for _ in range(5)]
    assert ya == [b.next()["y"].tolist() for _ in range(5)]
    assert ya != [c.next()["y"].tolist() for _ in range(5)]


def test_loader_source_carries_the_short_last_batch_into_the_next_pass() -> None:
    # 10 examples in batches of 4: the loader yields 4, 4, 2 per pass; global batches must be 4, 4, 4, ...
    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=4, shuffle=False)
    source = LoaderSource(loader, 4)
    got = [source.next()[0].tolist() for _ in range(5)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5], [6, 7, 8, 9]]
    assert source.passes == 1 and source.epochs == pytest.approx(2.0)


def test_loader_source_over_an_iterable_dataset_with_unknown_length() -> None:
    source = LoaderSource(DataLoader(_Stream(5), batch_size=3), 3)
    got = [source.next().tolist() for _ in range(4)]
    assert got == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    assert source.epochs is None


def test_loader_source_cuts_larger_batches() -> None:
    source = LoaderSource(DataLoader(TensorDataset(torch.arange(12)), batch_size=8), 3)
    assert [source.next()[0].tolist() for _ in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def test_data_wait_is_timed_per_global_batch_with_the_injected_clock() -> None:
    source = LoaderSource(DataLoader(TensorDataset(torch.arange(10)), batch_size=4), 4, clock=_ticks(0.5))
    for _ in range(3):
        source.next()
    assert source.waits_s == [0.5, 0.5, 0.5]


def test_split_source_matches_the_index_batcher() -> None:
    split = Split(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    source = SplitSource(split, 4, seed=2, device=CPU)
    batcher = IndexBatcher(10, 4, 2, CPU)
    for _ in range(6):
        x, y = source.next()
        assert y.tolist() == batcher.next().tolist()
        assert torch.equal(x.squeeze(1).long(), y)
    assert source.waits_s is None and source.epochs == pytest.approx(2.4)


def test_eval_batches_cover_every_example_once_in_order() -> None:
    split = Split(torch.arange(10).float(), torch.arange(10))
    assert [len(y) for _, y in eval_batches(split, 4)] == [4, 4, 2]
    seen = torch.cat([b["y"] for b in eval_batches(_Dicts(10), 4)])
    assert seen.tolist() == list(range(10))


def test_is_map_dataset() -> None:
    assert is_map_dataset(_Dicts(3)) and is_map_dataset(TensorDataset(torch.zeros(2)))
    assert not is_map_dataset(_Stream(3)) and not is_map_dataset(Split(torch.zeros(2), torch.zeros(2)))
