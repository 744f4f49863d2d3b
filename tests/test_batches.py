"""Structured batches: device moves, example counts, micro-batch slicing and concatenation."""

from __future__ import annotations

from collections import OrderedDict, namedtuple
from dataclasses import dataclass

import pytest
import torch

from bsprof.engine.batches import BatchError, batch_size_of, concat_batches, slice_batch, split_batch, to_device

Pair = namedtuple("Pair", ["x", "y"])


@dataclass
class Features:
    pixels: torch.Tensor
    label: torch.Tensor
    tag: str = "img"


def _nested(n: int) -> dict[str, object]:
    return {
        "input_ids": torch.arange(n * 4).view(n, 4),
        "extra": (torch.zeros(n), [torch.ones(n, 2)]),
        "pair": Pair(torch.arange(n), torch.arange(n) * 2),
        "features": Features(torch.randn(n, 3), torch.arange(n)),
        "name": "kept",
    }


def test_batch_size_of_nested_structures() -> None:
    assert batch_size_of(_nested(5)) == 5
    assert batch_size_of(torch.zeros(7, 3)) == 7
    assert batch_size_of(OrderedDict(a=torch.zeros(2))) == 2


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"a": torch.zeros(3), "b": torch.zeros(4)}, "differ in length"),
        ({"a": "text"}, "must hold tensors"),
        ((torch.tensor(1.0), torch.zeros(1)), "0-d tensor"),
    ],
    ids=["mismatch", "no-tensor", "scalar"],
)
def test_batch_size_of_rejects_bad_batches(batch: object, message: str) -> None:
    with pytest.raises(BatchError, match=message):
        batch_size_of(batch)


def test_split_keeps_types_and_covers_every_example_once_with_an_uneven_last_piece() -> None:
    batch = _nested(10)
    pieces = split_batch(batch, 4)
    assert [batch_size_of(p) for p in pieces] == [4, 4, 2]
    for p in pieces:
        assert isinstance(p, dict) and isinstance(p["pair"], Pair) and isinstance(p["features"], Features)
        assert isinstance(p["extra"], tuple) and isinstance(p["extra"][1], list)
        assert p["name"] == "kept" and p["features"].tag == "img"
    rebuilt = concat_batches(pieces)
    assert torch.equal(rebuilt["input_ids"], batch["input_ids"])
    assert torch.equal(rebuilt["pair"].y, batch["pair"].y)
    assert torch.equal(rebuilt["features"].pixels, batch["features"].pixels)


def test_slice_is_a_view() -> None:
    batch = {"x": torch.zeros(6, 2)}
    part = slice_batch(batch, 2, 4)
    part["x"].fill_(1)
    assert batch["x"][2:4].eq(1).all() and batch["x"][:2].eq(0).all()


def test_concat_of_mismatched_trailing_shapes_is_one_clear_error() -> None:
    with pytest.raises(BatchError, match="cannot concatenate"):
        concat_batches([{"x": torch.zeros(2, 3)}, {"x": torch.zeros(2, 5)}])


def test_to_device_moves_every_tensor_and_keeps_structure() -> None:
    batch = _nested(3)
    moved = to_device(batch, torch.device("meta"))
    assert moved["input_ids"].device.type == "meta"
    assert moved["extra"][1][0].device.type == "meta"
    assert moved["features"].pixels.device.type == "meta"
    assert moved["name"] == "kept"
    assert batch["input_ids"].device.type == "cpu"


def test_split_rejects_zero() -> None:
    with pytest.raises(ValueError):
        split_batch(torch.zeros(3), 0)
