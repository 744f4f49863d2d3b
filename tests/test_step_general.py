"""The general path of the one training step: datasets, loaders, structured batches, accumulation, schedules."""

from __future__ import annotations

import pytest
import torch
from helpers import FIXTURES, ref

from bsprof.engine.schedules import LRSchedule
from bsprof.engine.step import TrainingStep
from bsprof.workload import load_workload
from bsprof.workloads.digits import DigitsMLP

CPU = torch.device("cpu")


def _step(workload: object, batch_size: int, **kwargs: object) -> TrainingStep:
    return TrainingStep(workload, batch_size=batch_size, seed=0, lr=0.05, device=CPU, **kwargs)  # type: ignore[arg-type]


def _params(step: TrainingStep) -> list[torch.Tensor]:
    return [p.detach().clone() for p in step.model.parameters()]


def test_accumulated_step_b256_as_4x64_equals_the_full_batch_step() -> None:
    """Issue 13, must show 1: same parameters after one step to 1e-5 (float32, CPU)."""
    full = _step(DigitsMLP(), 256)
    accumulated = _step(DigitsMLP(), 256, micro_batch_size=64)
    assert accumulated.plan.steps == 4 and accumulated._general and not full._general
    before = _params(full)
    full_loss, acc_loss = float(full().detach()), float(accumulated())
    after_full, after_acc = _params(full), _params(accumulated)
    diff = max(float((a - b).abs().max()) for a, b in zip(after_acc, after_full))
    moved = max(float((a - b).abs().max()) for a, b in zip(after_full, before))
    assert diff <= 1e-5, diff
    assert moved > 100 * 1e-5  # the step moved the weights far more than the tolerance
    assert acc_loss == pytest.approx(full_loss, rel=1e-5)
    assert accumulated.samples_done == full.samples_done == 256
    assert accumulated.batching_metrics() == {"micro_batch_size": 64, "accumulation_steps": 4}


def test_uneven_accumulation_matches_too() -> None:
    full, acc = _step(DigitsMLP(), 200), _step(DigitsMLP(), 200, micro_batch_size=64)  # 64+64+64+8
    full(), acc()
    assert max(float((a - b).abs().max()) for a, b in zip(_params(acc), _params(full))) <= 1e-5


@pytest.mark.parametrize("factory", ["dict_dataset", "loader_factory", "tensor_dataset", "dict_in_split"])
def test_general_sources_train_and_count_samples(factory: str) -> None:
    workload = load_workload(ref("data_workloads.py", factory))
    step = _step(workload, 24, micro_batch_size=10)
    first = _params(step)
    losses = [float(step().detach()) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert step.samples_done == 6 * 24 and step.epochs == pytest.approx(6 * 24 / 64)
    assert any(not torch.equal(a, b) for a, b in zip(first, _params(step)))
    step.close()


def test_same_seed_same_training_through_a_dataset() -> None:
    workload = load_workload(ref("data_workloads.py", "dict_dataset"))
    a, b = _step(workload, 16), _step(workload, 16)
    for _ in range(5):
        a(), b()
    assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b)))


def test_cosine_schedule_same_lr_at_same_samples_through_the_step() -> None:
    """Issue 13, must show 4, through the engine: the LR each step ran at, keyed by samples consumed."""
    schedule = LRSchedule("cosine", warmup=512, total=2048)

    def lrs(batch_size: int) -> dict[int, float]:
        step = _step(DigitsMLP(), batch_size, schedule=schedule)
        seen = {}
        for _ in range(2048 // batch_size):
            step()
            seen[step.samples_done] = step.optimizer.param_groups[0]["lr"]
        return seen

    small, large = lrs(32), lrs(256)
    assert set(large) == {256 * k for k in range(1, 9)}
    for samples, lr in large.items():
        assert small[samples] == pytest.approx(lr, abs=1e-15)
    assert large[256] == pytest.approx(0.05 * 0.5)  # half-way through the warm-up
    assert large[512] == pytest.approx(0.05)
    assert large[2048] == pytest.approx(0.0, abs=1e-12)


def test_workload_scheduler_is_stepped_per_optimizer_step() -> None:
    class Halving(DigitsMLP):
        def make_scheduler(self, optimizer: torch.optim.Optimizer, batch_size: int) -> object:
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    step = _step(Halving(), 16, micro_batch_size=8)
    for _ in range(3):
        step()
    assert step.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 8)


def test_fixture_file_exists() -> None:
    assert (FIXTURES / "data_workloads.py").is_file()
