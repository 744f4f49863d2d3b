"""The sweep's settings come from the options once (bsprof.options), for a workload's sweep and a script's alike,
and a script trial's order carries them to the child unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bsprof import commands
from bsprof.cli import build_parser
from bsprof.engine.convergence import ConvergenceSettings
from bsprof.engine.result import TrialSpec
from bsprof.engine.script import _order
from bsprof.engine.script_job import ScriptJob
from bsprof.engine.timing import TimingSettings
from bsprof.engine.trial import EngineSettings
from bsprof.errors import BadInput
from bsprof.options import convergence_settings, timing_settings

TIMING = ["--min-time", "0.5", "--min-steps", "7", "--timing-warmup-steps", "3", "--device", "cpu"]
CONV = ["--target", "0.8", "--target-patience", "3", "--max-steps", "50", "--max-time", "7", "--eval-every", "4"]
CMD = ["--cmd", "python train.py --batch-size {batch_size}"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # the CLI's settings set 1 thread on the CPU
    yield
    torch.set_num_threads(threads)


def _args(*argv: str):
    return build_parser().parse_args(["sweep", "-b", "8,16", *argv])


def test_workload_and_script_sweeps_get_the_same_timing_and_convergence_settings() -> None:
    native = _args(*TIMING, *CONV)
    script = _args(*TIMING, *CONV, *CMD)
    workload, native_settings = commands._workload_and_settings(native)
    job, script_settings = commands._load_script(script, commands.script_command(script), (8, 16))
    expected = TimingSettings(warmup_steps=3, min_time_s=0.5, min_steps=7)
    assert native_settings.timing == script_settings.timing == timing_settings(native) == expected
    conv = convergence_settings(native, workload)
    assert conv == convergence_settings(script, job)
    assert (conv.target, conv.patience, conv.max_steps, conv.max_time_s, conv.eval_every) == (0.8, 3, 50, 7.0, 4)


def test_subcommands_without_timing_options_keep_the_engine_default() -> None:
    args = build_parser().parse_args(["find-max-batch", "--device", "cpu"])
    assert timing_settings(args) is None
    assert commands._workload_and_settings(args)[1].timing == TimingSettings()


def test_convergence_settings_check_the_target_against_a_scripts_metric_range() -> None:
    job = ScriptJob(name="s", command=("python", "t.py", "{batch_size}"), metric_range=(0.0, 1.0))
    with pytest.raises(BadInput, match=r"outside the range of s's metric \[0, 1\]"):
        convergence_settings(_args("--target", "1.5", *CMD), job)
    with pytest.raises(BadInput, match="no default target"):
        convergence_settings(_args("--kind", "convergence", *CMD), job)


def test_a_script_trials_order_carries_the_settings_to_the_child(tmp_path: Path) -> None:
    job = ScriptJob(name="s", command=("python", "t.py", "{batch_size}"), target=0.9, higher_is_better=False)
    timing = TimingSettings(warmup_steps=2, min_time_s=0.25, min_steps=9, block_min_s=0.01, max_time_s=30.0)
    settings = EngineSettings(device=torch.device("cpu"), timing=timing)
    spec = TrialSpec("s", "convergence", 16, 2, 0.05, repeat=1)
    conv = ConvergenceSettings(patience=3, max_steps=50, max_time_s=7.0, continue_after_target=True, explode_factor=4)
    order = _order(job, spec, settings, conv, tmp_path / "events.jsonl")
    assert TimingSettings(**order.timing) == timing
    assert (order.patience, order.max_steps, order.max_time_s) == (3, 50, 7.0)
    assert (order.continue_after_target, order.explode_factor) == (True, 4)
    assert (order.target, order.higher_is_better, order.batch_size, order.seed, order.repeat) == (0.9, False, 16, 2, 1)
    bare = _order(job, spec, settings, None, tmp_path / "events.jsonl")  # no settings: the order's own defaults
    assert (bare.patience, bare.max_steps, bare.max_time_s, bare.explode_factor) == (1, None, None, 10.0)
