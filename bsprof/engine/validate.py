"""Checks that catch a bad workload before the first trial, each failing with one line (:class:`BadInput`).

Without them a workload whose data have the wrong structure fails every trial with the same bare exception
deep inside the step. Each check runs the workload's own code once on a tiny batch (2 or 3 examples) and
says what is wrong in the user's terms: a dataset that returns the wrong structure, a collate function
that raises, a loader factory that ignores the batch size, a loss that is not a scalar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from bsprof.engine.batches import BatchError, batch_size_of
from bsprof.errors import BadInput

if TYPE_CHECKING:
    from bsprof.workload import Workload

__all__ = [
    "PROBE_SIZES",
    "check_batch",
    "check_data",
    "check_dataset",
    "check_loader_factory",
    "check_loss",
    "check_split",
    "validate_workload",
]

PROBE_SIZES = (2, 3)
"""Batch sizes the checks ask for; two different ones reveal a loader factory that ignores the batch size."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def check_batch(batch: Any, expected: int, what: str, *, mismatch: str | None = None) -> None:
    """``batch`` is a nesting of tensors with ``expected`` examples in dimension 0.

    Args:
        batch: The batch to check.
        expected: Examples it should hold.
        what: Where it came from, for the message (e.g. ``"workload digits: dataset"``).
        mismatch: The message when the batch has another number of examples, with ``{n}`` for that number.
    """
    try:
        n = batch_size_of(batch)
    except BatchError as e:
        raise BadInput(f"{what}: {e}") from None
    if n != expected:
        default = f"{what}: a batch of {expected} examples has {{n}} in dimension 0 (the batch dimension)"
        raise BadInput((mismatch or default).format(n=n))


def check_split(split: Any, what: str) -> int:
    """A :class:`~bsprof.workload.Split`-like object: inputs and targets are tensors (or nestings of tensors)
    of the same, non-zero length. Returns that length."""
    if not (hasattr(split, "inputs") and hasattr(split, "targets")):
        raise BadInput(f"{what}: expected a bsprof.Split or a Dataset, got {type(split).__name__}")
    try:
        n_in, n_out = batch_size_of(split.inputs), batch_size_of(split.targets)
    except BatchError as e:
        raise BadInput(f"{what}: {e}") from None
    if n_in != n_out:
        raise BadInput(f"{what}: inputs and targets differ in length: {n_in} != {n_out}")
    if n_in == 0:
        raise BadInput(f"{what}: the split is empty")
    return n_in


def check_dataset(dataset: Any, collate_fn: Callable[[list[Any]], Any] | None, what: str) -> None:
    """A map-style dataset: it has at least two examples, ``dataset[i]`` works, and the collate function
    turns two examples into a batch of two."""
    from torch.utils.data import default_collate

    try:
        n = len(dataset)
    except TypeError as e:
        raise BadInput(f"{what}: a map-style dataset needs __len__ ({_one_line(e)})") from None
    if n < 2:
        raise BadInput(f"{what}: the dataset has {n} example(s); at least 2 are needed")
    try:
        items = [dataset[0], dataset[1]]
    except Exception as e:  # noqa: BLE001 - the user's __getitem__; reported in one line
        raise BadInput(f"{what}: dataset[0] raised {_one_line(e)}") from None
    collate = collate_fn or default_collate
    try:
        batch = collate(items)
    except Exception as e:  # noqa: BLE001 - the user's collate function; reported in one line
        raise BadInput(f"{what}: the collate function raised {_one_line(e)} on dataset[0], dataset[1]") from None
    check_batch(batch, 2, f"{what}: dataset[0] and dataset[1] collated")


def check_loader_factory(make_loader: Callable[[int, int], Any], what: str, *, seed: int = 0) -> None:
    """``make_loader(batch_size, seed)`` returns an iterable whose first batch has ``batch_size`` examples,
    for two different batch sizes (:data:`PROBE_SIZES`)."""
    for b in PROBE_SIZES:
        call = f"make_loader(batch_size={b}, seed={seed})"
        try:
            loader = make_loader(b, seed)
            first = next(iter(loader))
        except StopIteration:
            raise BadInput(f"{what}: {call} yields no batches") from None
        except Exception as e:  # noqa: BLE001 - the user's factory, dataset or collate function
            raise BadInput(f"{what}: {call} raised {_one_line(e)}") from None
        honour = f"{what}: {call} yields batches of {{n}} examples; the factory must honour batch_size"
        check_batch(first, b, f"{what}: {call}'s first batch", mismatch=honour)


def check_loss(loss: object, what: str) -> None:
    """A training loss: a finite scalar tensor that requires grad."""
    if not isinstance(loss, torch.Tensor):
        raise BadInput(f"{what} returned {type(loss).__name__}, not a tensor")
    if loss.numel() != 1:
        raise BadInput(f"{what} returned a tensor of shape {tuple(loss.shape)}, not a scalar (reduce it)")
    if not loss.requires_grad:
        raise BadInput(f"{what} returned a loss that does not require grad (detached from the model?)")
    if not torch.isfinite(loss.detach()).all():
        raise BadInput(f"{what} returned a non-finite loss ({float(loss.detach())}) at initialisation")


def check_data(data: Any, collate_fn: Callable[[list[Any]], Any] | None, what: str) -> None:
    """Training or validation data: a split, a map-style dataset or an iterable one, each well-formed."""
    from bsprof.engine.data import is_map_dataset, is_split

    if is_split(data):
        check_split(data, what)
    elif is_map_dataset(data):
        check_dataset(data, collate_fn, what)
    elif isinstance(data, torch.utils.data.IterableDataset):
        check_loader_factory(
            lambda b, _seed: torch.utils.data.DataLoader(data, batch_size=b, collate_fn=collate_fn), what
        )
    else:
        raise BadInput(f"{what}: expected a bsprof.Split or a torch Dataset, got {type(data).__name__}")


def _run(fn: Callable[[], Any], what: str) -> Any:
    try:
        return fn()
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - the workload's own code; reported in one line, exit code 2
        raise BadInput(f"{what} raised {_one_line(e)}") from None


def validate_workload(workload: Workload, device: torch.device) -> None:
    """Run the workload's data, collate, loss and evaluation code once on tiny batches, before any trial.

    Checks: the training data (a split, a dataset whose examples collate into a batch, or a loader factory
    that honours the batch size), the validation data, ``compute_loss`` on a batch of two (a finite scalar
    that requires grad), and ``eval_outputs`` + ``metric`` on a validation batch (a number).

    Raises:
        BadInput: The first problem found, in one line naming the workload.
    """
    from bsprof.engine.batches import to_device
    from bsprof.engine.data import eval_batches, make_source

    what = f"workload {workload.name}"
    loader = _run(lambda: workload.make_loader(PROBE_SIZES[0], 0), f"{what}: make_loader")
    if loader is not None:
        check_loader_factory(workload.make_loader, f"{what}: make_loader")
    else:
        check_data(_run(workload.train_split, f"{what}: train_split()"), workload.collate, f"{what}: training data")
    val = _run(workload.val_split, f"{what}: val_split()")
    check_data(val, workload.collate, f"{what}: validation data")

    model = _run(lambda: workload.build_model(0), f"{what}: build_model(0)").to(device)
    source = _run(lambda: make_source(workload, PROBE_SIZES[0], 0, device), f"{what}: its training data")
    try:
        batch = _run(lambda: to_device(source.next(), device), f"{what}: the first training batch")
    finally:
        source.close()
    model.train()
    loss = _run(lambda: workload.compute_loss(model, batch), f"{what}: compute_loss")
    check_loss(loss, f"{what}: compute_loss")
    model.zero_grad(set_to_none=True)

    def evaluate_once() -> float:
        model.eval()
        with torch.no_grad():
            first = next(eval_batches(val, PROBE_SIZES[0], collate_fn=workload.collate))
            outputs, targets = workload.eval_outputs(model, to_device(first, device))
            return float(workload.metric(outputs, targets))

    _run(evaluate_once, f"{what}: evaluation (eval_outputs, metric)")
