"""``torch.compile`` trials: one compilation per trial shape whatever the trial order, and a convergence
trial's compilation done before its clock starts.

A counting backend (``torch.compile(backend=...)`` takes any callable ``(graph_module, example_inputs) ->
callable``) stands in for inductor: it counts the graphs dynamo hands it and runs them eagerly, so the
numerics are the eager ones and the test takes seconds.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import ref

from bsprof.engine.convergence import ConvergenceSettings, run_convergence_trial
from bsprof.engine.step import TrainingStep
from bsprof.engine.timing import TimingSettings
from bsprof.engine.trial import EngineSettings, TrialSpec, run_throughput_trial
from bsprof.workload import load_workload
from bsprof.workloads.digits import DigitsMLP

QUICK = TimingSettings(warmup_steps=1, warmup_s=0.0, min_time_s=0.0, min_steps=2, block_min_s=0.0, min_blocks=2)


class CountingBackend:
    """A ``torch.compile`` backend that counts compilations and keeps the leading sizes of each one's inputs."""

    __name__ = "counting"

    def __init__(self) -> None:
        self.compiled: list[set[int]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.compiled.append({int(t.shape[0]) for t in example_inputs if isinstance(t, torch.Tensor) and t.dim()})
        return gm.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize("order", [(8, 16, 8, 32), (32, 8, 16, 8)], ids=["ascending", "mixed"])
def test_one_compilation_per_trial_shape_whatever_the_order(order: tuple[int, ...]) -> None:
    backend = CountingBackend()
    settings = EngineSettings(device=torch.device("cpu"), compile=True, compile_backend=backend, timing=QUICK)
    workload = load_workload(ref("tiny.py"))
    per_trial = []
    for b in order:
        before = len(backend.compiled)
        result = run_throughput_trial(workload, TrialSpec("tiny", "throughput", b, 0, 0.1), settings)
        assert result.status == "ok", result.error
        per_trial.append(backend.compiled[before:])
    # every trial compiled once, for its own batch size: no cache hit from an earlier trial of the same size
    # (whose graph would serve a later one), no dynamic-shape graph after a size change
    assert [len(c) for c in per_trial] == [1] * len(order)
    assert all(b in c[0] for b, c in zip(order, per_trial))


def test_compiled_convergence_compiles_before_the_clock_and_trains_as_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = CountingBackend()
    at_clock_start: list[int] = []
    warm_up = TrainingStep.warm_up_compiled

    def spy(step: TrainingStep) -> None:
        warm_up(step)
        at_clock_start.append(len(backend.compiled))

    monkeypatch.setattr(TrainingStep, "warm_up_compiled", spy)
    w = DigitsMLP()
    spec = TrialSpec(w.name, "convergence", 64, 0, 0.05)
    conv = ConvergenceSettings(target=0.9)
    cpu = torch.device("cpu")
    eager = run_convergence_trial(w, spec, EngineSettings(device=cpu), conv)
    compiled = run_convergence_trial(w, spec, EngineSettings(device=cpu, compile=True, compile_backend=backend), conv)
    assert eager.status == compiled.status == "ok", (eager.error, compiled.error)
    assert at_clock_start == [1] and len(backend.compiled) == 1  # compiled once, before training began
    assert 64 in backend.compiled[0]
    assert compiled.metrics["compile_time_s"] > 0 and "compile_time_s" not in eager.metrics
    # the warm-up left parameters, RNG and batch order untouched: the same training, step for step
    assert compiled.metrics["steps_to_target"] == eager.metrics["steps_to_target"]
    assert [r["val_metric"] for r in compiled.curve] == pytest.approx([r["val_metric"] for r in eager.curve])
    assert [r["train_loss"] for r in compiled.curve] == pytest.approx([r["train_loss"] for r in eager.curve])
