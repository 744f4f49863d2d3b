"""Throughput trials time the steps training runs: every block starts from the initial state, and a step
time that drifts within a trial is flagged."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from bsprof.engine.step import TrainingStep
from bsprof.engine.timing import DRIFT_REL_THRESHOLD, TimingSettings
from bsprof.engine.trial import EngineSettings, TrialSpec, run_throughput_trial
from bsprof.workload import Split, Workload
from bsprof.workloads.digits import DigitsMLP

TIMING = TimingSettings(warmup_steps=2, warmup_s=0.0, min_time_s=0.1, min_steps=8, block_min_s=0.01, min_blocks=8)


class _Recording(nn.Module):
    """A linear model that records, at every training forward, whether its weights are the initial ones;
    and that sleeps ``base_s * growth ** calls`` seconds, so its steps slow down with time."""

    def __init__(self, base_s: float, growth: float) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.initial = self.linear.weight.detach().clone()
        self.base_s = base_s
        self.growth = growth
        self.at_initial: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.at_initial.append(bool(torch.equal(self.linear.weight, self.initial)))
        time.sleep(self.base_s * self.growth ** len(self.at_initial))
        return self.linear(x)


class _RecordingWorkload(Workload):
    name = "recording"
    base_lr = 0.1
    base_batch_size = 4

    def __init__(self, base_s: float = 0.0, growth: float = 1.0) -> None:
        self.base_s, self.growth = base_s, growth
        self.models: list[_Recording] = []

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        self.models.append(_Recording(self.base_s, self.growth))
        return self.models[-1]

    def train_split(self) -> Split:
        return Split(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.ones(64, 1))

    def val_split(self) -> Split:
        return self.train_split()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(outputs, targets)


def _run(workload: Workload, timing: TimingSettings = TIMING) -> tuple[object, dict[str, object]]:
    result = run_throughput_trial(
        workload, TrialSpec(workload.name, "throughput", 4, 0, 0.1), EngineSettings(torch.device("cpu"), timing=timing)
    )
    assert result.status == "ok", result.error
    return result, result.metrics


def test_every_block_starts_from_the_initial_state() -> None:
    w = _RecordingWorkload()
    result, _ = _run(w)
    times = result.step_times  # type: ignore[attr-defined]
    flags = w.models[0].at_initial[: times.warmup_steps + times.measured_steps]
    # the first warm-up step, every calibration block and every timed block start from the initial weights
    assert sum(flags) >= 1 + len(times.block_times_s) + 1
    timed = flags[-times.measured_steps :]
    for b in range(len(times.block_times_s)):
        block = timed[b * times.steps_per_block : (b + 1) * times.steps_per_block]
        assert block[0] is True
        assert not any(block[1:])  # the weights do change within a block: it is real training


def test_restore_returns_model_and_optimizer_to_the_snapshot() -> None:
    step = TrainingStep(DigitsMLP(), batch_size=32, seed=0, lr=0.5, device=torch.device("cpu"))
    initial = step.snapshot()
    before = [p.detach().clone() for p in step.model.parameters()]
    for _ in range(5):
        step()
    assert step.optimizer.state_dict()["state"]  # momentum buffers exist now
    step.restore(initial)
    assert all(torch.equal(p, q) for p, q in zip(step.model.parameters(), before))
    assert step.optimizer.state_dict()["state"] == {}
    step()  # and it trains on from there, without touching the snapshot
    assert initial.optimizer["state"] == {}
    assert torch.equal(initial.model["0.weight"], before[0])


def test_a_step_that_slows_down_is_flagged_as_drifting() -> None:
    w = _RecordingWorkload(base_s=0.005, growth=1.3)  # every step 30% slower than the one before
    # one-step blocks, 8 of them: the last two are 1.3**6 = 4.8x slower than the first two
    timing = TimingSettings(warmup_steps=1, warmup_s=0.0, min_time_s=0.0, min_steps=1, block_min_s=0.0, min_blocks=8)
    _, metrics = _run(w, timing)
    assert metrics["step_time_drifted"] is True
    assert metrics["step_time_drift_rel"] > DRIFT_REL_THRESHOLD  # type: ignore[operator]


def test_drift_fields_are_stored_and_exported(tmp_path: Path) -> None:
    from bsprof.export import trials_frame
    from bsprof.store import Store

    result, metrics = _run(_RecordingWorkload())
    path = tmp_path / "s.db"
    with Store(path, create=True) as store:
        run = store.open_run("recording", {"w": 1}, {})
        store.add_trial(run.run_id, result)  # type: ignore[arg-type]
    row = trials_frame(path).iloc[0]
    assert bool(row["step_time_drifted"]) is metrics["step_time_drifted"]
    assert float(row["step_time_drift_rel"]) == pytest.approx(metrics["step_time_drift_rel"])
