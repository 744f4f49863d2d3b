"""Gradient accumulation: B as k x m gives the full-batch step (issue 13, must show 1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bsprof.engine.accumulation import AccumulationPlan, accumulate
from bsprof.engine.batches import split_batch


def test_plan_sizes_steps_and_weights() -> None:
    plan = AccumulationPlan.for_batch(256, 64)
    assert (plan.sizes, plan.steps, plan.accumulating) == ((64, 64, 64, 64), 4, True)
    assert plan.weights("mean") == (0.25,) * 4
    uneven = AccumulationPlan.for_batch(100, 32)
    assert uneven.sizes == (32, 32, 32, 4) and uneven.steps == 4
    assert sum(uneven.weights("mean")) == pytest.approx(1.0)
    assert uneven.weights("sum") == (1.0,) * 4
    whole = AccumulationPlan.for_batch(16, None)
    assert (whole.micro_batch_size, whole.steps, whole.accumulating) == (16, 1, False)
    assert AccumulationPlan.for_batch(16, 64).micro_batch_size == 16
    with pytest.raises(ValueError):
        uneven.weights("max")


def _model_after_one_step(
    inputs: torch.Tensor, targets: torch.Tensor, micro: int | None, reduction: str
) -> tuple[list[torch.Tensor], float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    plan = AccumulationPlan.for_batch(len(inputs), micro)

    def loss_of(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction=reduction)

    total = accumulate(split_batch((inputs, targets), plan.micro_batch_size), loss_of, plan.weights(reduction))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()], float(total)


@pytest.mark.parametrize(
    ("batch_size", "micro", "reduction"),
    [(256, 64, "mean"), (256, 64, "sum"), (250, 64, "mean"), (250, 64, "sum"), (256, 1, "mean")],
    ids=["256=4x64-mean", "256=4x64-sum", "250-uneven-mean", "250-uneven-sum", "256x1"],
)
def test_accumulated_step_equals_full_batch_step(batch_size: int, micro: int, reduction: str) -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch_size, 16, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 5, (batch_size,), generator=generator)
    full, full_loss = _model_after_one_step(inputs, targets, None, reduction)
    accumulated, acc_loss = _model_after_one_step(inputs, targets, micro, reduction)
    assert acc_loss == pytest.approx(full_loss, rel=1e-9)
    for a, b in zip(accumulated, full):
        assert torch.allclose(a, b, rtol=0, atol=1e-5)
    # The step changed the parameters by far more than the tolerance, so the check can fail.
    torch.manual_seed(0)
    init = [p.detach().double() for p in nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5)).parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(full, init)) > 1e-3


def test_float32_accumulated_step_within_1e_5() -> None:
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(256, 16, generator=generator)
    targets = torch.randint(0, 5, (256,), generator=generator)

    def run(micro: int | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        plan = AccumulationPlan.for_batch(256, micro)
        accumulate(
            split_batch((inputs, targets), plan.micro_batch_size),
            lambda b: nn.functional.cross_entropy(model(b[0]), b[1]),
            plan.weights(),
        )
        opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(64), run(None)):
        assert float((a - b).abs().max()) <= 1e-5


def test_accumulate_checks_lengths() -> None:
    with pytest.raises(ValueError):
        accumulate([torch.zeros(1)], lambda b: b.sum(), [])
