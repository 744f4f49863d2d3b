"""The checks that catch bad workloads before the first trial: one line each (issue 13, must show 5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bsprof.engine.validate import check_batch, check_dataset, check_loader_factory, check_loss, check_split
from bsprof.errors import BadInput
from bsprof.workload import Split


class _Bad:
    def __init__(self, item: object) -> None:
        self.item = item

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> object:
        if isinstance(self.item, Exception):
            raise self.item
        return self.item


def _one_line(excinfo: pytest.ExceptionInfo[BadInput]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_good_dataset_and_loader_pass() -> None:
    data = TensorDataset(torch.randn(8, 3), torch.arange(8))
    check_dataset(data, None, "w")
    check_loader_factory(lambda b, s: DataLoader(data, batch_size=b), "w")
    check_split(Split(torch.zeros(4, 2), torch.zeros(4)), "w")
    check_loss(nn.Linear(2, 1)(torch.zeros(3, 2)).sum(), "w: compute_loss")


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("a string", "must hold tensors"),
        ({"x": None}, "the collate function raised TypeError"),
        (KeyError("input_ids"), "dataset\\[0\\] raised KeyError"),
    ],
    ids=["no-tensors", "none-field", "getitem-raises"],
)
def test_dataset_with_the_wrong_structure(item: object, message: str) -> None:
    with pytest.raises(BadInput, match=message) as e:
        check_dataset(_Bad(item), None, "workload w: training dataset")
    assert _one_line(e).startswith("workload w: training dataset")


def test_collate_that_raises() -> None:
    def collate(items: list[object]) -> object:
        raise TypeError("cannot stack strings\nsecond line")

    with pytest.raises(BadInput, match="the collate function raised TypeError: cannot stack strings") as e:
        check_dataset(TensorDataset(torch.zeros(4)), collate, "w")
    _one_line(e)


def test_loader_factory_ignoring_the_batch_size() -> None:
    data = TensorDataset(torch.zeros(16))
    with pytest.raises(BadInput, match="yields batches of 8 examples; the factory must honour batch_size") as e:
        check_loader_factory(lambda b, s: DataLoader(data, batch_size=8), "w")
    _one_line(e)


def test_loader_factory_that_raises_or_is_empty() -> None:
    with pytest.raises(BadInput, match="raised RuntimeError: no data"):
        check_loader_factory(lambda b, s: (_ for _ in ()).throw(RuntimeError("no data")), "w")
    with pytest.raises(BadInput, match="yields no batches"):
        check_loader_factory(lambda b, s: [], "w")


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (torch.zeros(3, requires_grad=True), "shape \\(3,\\), not a scalar"),
        (1.5, "returned float, not a tensor"),
        (torch.tensor(1.0), "does not require grad"),
        (torch.tensor(float("nan"), requires_grad=True), "non-finite"),
    ],
)
def test_bad_losses(loss: object, message: str) -> None:
    with pytest.raises(BadInput, match=message):
        check_loss(loss, "workload w: compute_loss")


def test_split_that_holds_a_dataset_or_mismatched_lengths() -> None:
    with pytest.raises(BadInput, match=r"expected a bsprof\.Split or a Dataset, got list"):
        check_split([1, 2], "w")

    class Fake:
        def __init__(self) -> None:
            self.inputs = {"a": torch.zeros(3)}
            self.targets = torch.zeros(4)

    with pytest.raises(BadInput, match="differ in length: 3 != 4"):
        check_split(Fake(), "w")
    with pytest.raises(BadInput, match="a batch of 4 examples has 3"):
        check_batch(torch.zeros(3), 4, "w")
