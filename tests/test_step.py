"""The index batcher and the one training step."""

from __future__ import annotations

import pytest
import torch
from helpers import ref

from bsprof.engine.step import IndexBatcher, TrainingStep
from bsprof.workload import load_workload

CPU = torch.device("cpu")


def _stream(n: int, batch_size: int, seed: int, batches: int) -> list[torch.Tensor]:
    batcher = IndexBatcher(n, batch_size, seed, CPU)
    return [batcher.next() for _ in range(batches)]


@pytest.mark.parametrize(
    ("n", "batch_size"),
    [(20, 5), (20, 20), (20, 7), (20, 13), (5, 7), (3, 16), (1, 4)],
    ids=["divides", "equals-n", "not-divides", "more-than-half", "B>n", "B>>n", "n=1"],
)
def test_index_batcher_full_batches_and_each_epoch_a_permutation(n: int, batch_size: int) -> None:
    epochs = 6
    batches = _stream(n, batch_size, seed=3, batches=-(-epochs * n // batch_size))
    assert all(b.shape == (batch_size,) for b in batches)
    assert all(b.dtype == torch.long for b in batches)
    stream = torch.cat(batches)
    for e in range(len(stream) // n):
        epoch = stream[e * n : (e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n)), f"epoch {e} is not a permutation of range({n})"


def test_index_batcher_counts_samples_and_epochs() -> None:
    batcher = IndexBatcher(10, 4, 0, CPU)
    for _ in range(5):
        batcher.next()
    assert batcher.samples_drawn == 20
    assert batcher.epochs == pytest.approx(2.0)


def test_index_batcher_seeded_reproducibility() -> None:
    a = torch.cat(_stream(17, 5, seed=11, batches=12))
    b = torch.cat(_stream(17, 5, seed=11, batches=12))
    c = torch.cat(_stream(17, 5, seed=12, batches=12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_index_batcher_is_shuffled() -> None:
    first = torch.cat(_stream(50, 50, seed=0, batches=1))
    assert first.tolist() != list(range(50))


def test_index_batcher_rejects_empty() -> None:
    with pytest.raises(ValueError):
        IndexBatcher(0, 4, 0, CPU)
    with pytest.raises(ValueError):
        IndexBatcher(4, 0, 0, CPU)


def _tiny_step(seed: int = 0, batch_size: int = 8) -> TrainingStep:
    return TrainingStep(load_workload(ref("tiny.py")), batch_size=batch_size, seed=seed, lr=0.5, device=CPU)


def test_training_step_runs_steps_and_changes_weights() -> None:
    step = _tiny_step()
    before = [p.detach().clone() for p in step.model.parameters()]
    losses = [step() for _ in range(7)]
    assert step.steps_done == 7
    assert step.samples_done == 7 * 8
    assert all(loss.dim() == 0 and loss.grad_fn is not None for loss in losses)  # returned as is, not detached
    after = list(step.model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    assert all(p.grad is None for p in step.model.parameters())  # zero_grad(set_to_none=True) ran
    assert step.model.training


def test_training_step_learns_on_its_batches() -> None:
    step = _tiny_step(batch_size=64)  # the full training split every step
    first = float(step().detach())
    for _ in range(30):
        last = float(step().detach())
    assert last < first


def test_training_step_same_seed_same_losses() -> None:
    a = [float(_s) for _s in _losses(seed=1)]
    b = [float(_s) for _s in _losses(seed=1)]
    c = [float(_s) for _s in _losses(seed=2)]
    assert a == b
    assert a != c


def _losses(seed: int) -> list[torch.Tensor]:
    step = _tiny_step(seed=seed)
    return [step().detach() for _ in range(10)]


def test_training_step_set_lr() -> None:
    step = _tiny_step()
    step.set_lr(0.0)
    before = [p.detach().clone() for p in step.model.parameters()]
    step()
    assert all(torch.equal(b, a) for b, a in zip(before, step.model.parameters()))
    assert all(g["lr"] == 0.0 for g in step.optimizer.param_groups)
