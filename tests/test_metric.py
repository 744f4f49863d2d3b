"""Evaluation: exact default accuracy, whole-split metrics, and the float64 target decision with tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bsprof.engine.convergence import ConvergenceSettings, evaluate, run_convergence_trial
from bsprof.engine.trial import EngineSettings, TrialSpec
from bsprof.workload import Split, Workload, load_workload

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_regression.py"
N_VAL = 360


class _FixedPredictions(nn.Module):
    """Predicts class ``table[i]`` for input ``i`` whatever its weights (one trainable scalar, unused)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.one_hot(self.table[x.long().squeeze(1)], 10).float()
        return logits + 0 * self.w


class _KnownAccuracy(Workload):
    """A 360-example validation split on which the model gets exactly ``correct`` examples right."""

    name = "known-accuracy"
    target = 0.95
    base_lr = 0.01
    base_batch_size = 8

    def __init__(self, correct: int, eval_batch_size: int = 1024) -> None:
        self.correct = correct
        self.eval_batch_size = eval_batch_size
        self.labels = torch.arange(N_VAL) % 10
        wrong = (self.labels + 1) % 10
        self.table = torch.where(torch.arange(N_VAL) < correct, self.labels, wrong)

    def build_model(self, seed: int) -> nn.Module:
        return _FixedPredictions(self.table)

    def train_split(self) -> Split:
        return self.val_split()

    def val_split(self) -> Split:
        return Split(torch.arange(N_VAL, dtype=torch.float32).unsqueeze(1), self.labels)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)


class _Float32Accuracy(_KnownAccuracy):
    """The same, with a user metric computed in float32 (342/360 rounds to 0.949999988 there)."""

    def metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return float((outputs.argmax(dim=-1) == targets).float().mean().item())


def _trial(workload: Workload) -> dict[str, object]:
    spec = TrialSpec(workload.name, "convergence", 8, 0, 0.01)
    settings = EngineSettings(device=torch.device("cpu"))
    result = run_convergence_trial(workload, spec, settings, ConvergenceSettings(max_steps=3))
    return {"status": result.status, **result.metrics}


@pytest.mark.parametrize("eval_batch_size", [1024, 100, 7])
def test_342_of_360_correct_is_exactly_095_and_reaches_it(eval_batch_size: int) -> None:
    w = _KnownAccuracy(342, eval_batch_size)
    assert float(torch.tensor(342 / 360, dtype=torch.float32)) < 0.95  # the trap: float32 rounds below
    assert evaluate(w.build_model(0), w, w.val_split()) == pytest.approx(0.95, rel=1e-15, abs=0)
    out = _trial(w)
    assert out["status"] == "ok" and out["reached_target"] is True
    assert out["steps_to_target"] == 1


def test_a_float32_user_metric_of_exactly_the_target_reaches_it() -> None:
    w = _Float32Accuracy(342)
    assert evaluate(w.build_model(0), w, w.val_split()) < 0.95
    out = _trial(w)
    assert out["status"] == "ok" and out["steps_to_target"] == 1


@pytest.mark.parametrize("workload", [_KnownAccuracy(341), _Float32Accuracy(341)], ids=["exact", "float32"])
def test_341_of_360_does_not_reach_095(workload: Workload) -> None:
    out = _trial(workload)
    assert out["status"] == "budget_exhausted" and out["reached_target"] is False
    assert out["final_val_metric"] == pytest.approx(341 / 360, rel=1e-7)


@pytest.mark.parametrize(("value", "higher", "reached"), [(0.95 - 0.9e-6, True, True), (0.95 - 2e-6, True, False)])
def test_target_tolerance_is_relative_1e6(value: float, higher: bool, reached: bool) -> None:
    w = _KnownAccuracy(0)
    w.higher_is_better = higher
    assert w.has_reached_target(value, 0.95) is reached
    w.higher_is_better = False
    assert w.has_reached_target(2 * 0.95 - value, 0.95) is reached  # mirrored for lower-is-better


def test_r2_workload_gets_its_whole_split_value() -> None:
    w = load_workload(f"{EXAMPLE}:factory")
    assert w.metric_is_mean is False
    w.eval_batch_size = 64  # 820 validation examples in 13 batches
    model = w.build_model(0)
    val = w.val_split()
    with torch.no_grad():
        whole = w.metric(model(val.inputs), val.targets)
        batches = range(0, len(val), w.eval_batch_size)
        per_batch = sum(
            w.metric(model(val.inputs[i : i + 64]), val.targets[i : i + 64]) * len(val.inputs[i : i + 64])
            for i in batches
        ) / len(val)
    assert abs(whole - per_batch) > 1e-3  # averaging per-batch R² would be wrong here
    assert evaluate(model, w, val) == pytest.approx(whole, rel=1e-12)
    assert model.training  # left in train mode
