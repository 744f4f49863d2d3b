"""find-max-batch: doubling then bisection on a fake probe; real probes on an OOM-injecting workload; the CLI."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import CliResult, ref

from bsprof.engine.maxbatch import find_max_batch, probe_fits
from bsprof.engine.step import TrainingStep
from bsprof.engine.trial import EngineSettings
from bsprof.errors import MeasurementFailed
from bsprof.store import Store
from bsprof.workload import Workload, load_workload

SETTINGS = EngineSettings(device=torch.device("cpu"))


class FakeProbe:
    def __init__(self, fits: Callable[[int], bool]) -> None:
        self.fits = fits
        self.tried: list[int] = []

    def __call__(self, b: int) -> bool:
        self.tried.append(b)
        return self.fits(b)


@pytest.fixture(scope="module")
def tiny() -> Workload:
    return load_workload(ref("tiny.py"))


def test_doubling_then_bisection_finds_300(tiny: Workload) -> None:
    probe = FakeProbe(lambda b: b <= 300)
    result = find_max_batch(tiny, SETTINGS, start=1, cap=65536, probe=probe)
    assert result.max_batch_size == 300
    assert result.first_oom_batch_size == 301
    assert not result.hit_cap
    assert probe.tried[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert len(probe.tried) == len(set(probe.tried))  # nothing probed twice
    assert len(probe.tried) <= 10 + 8  # bisection of (256, 512) takes at most log2(256) probes
    assert result.tried == [(b, "ok" if b <= 300 else "oom") for b in probe.tried]


def test_bisection_from_another_start(tiny: Workload) -> None:
    result = find_max_batch(tiny, SETTINGS, start=3, probe=FakeProbe(lambda b: b <= 300))
    assert (result.max_batch_size, result.first_oom_batch_size) == (300, 301)
    assert [b for b, _ in result.tried][:8] == [3, 6, 12, 24, 48, 96, 192, 384]


def test_hits_cap_without_oom(tiny: Workload) -> None:
    probe = FakeProbe(lambda b: True)
    result = find_max_batch(tiny, SETTINGS, start=1, cap=100, probe=probe)
    assert result.hit_cap
    assert result.max_batch_size == 100
    assert result.first_oom_batch_size is None
    assert probe.tried == [1, 2, 4, 8, 16, 32, 64, 100]


def test_oom_exactly_at_cap_is_not_hit_cap(tiny: Workload) -> None:
    result = find_max_batch(tiny, SETTINGS, start=1, cap=100, probe=FakeProbe(lambda b: b < 100))
    assert not result.hit_cap
    assert (result.max_batch_size, result.first_oom_batch_size) == (99, 100)


def test_first_size_oom(tiny: Workload) -> None:
    probe = FakeProbe(lambda b: False)
    result = find_max_batch(tiny, SETTINGS, start=8, probe=probe)
    assert result.max_batch_size is None
    assert result.first_oom_batch_size == 8
    assert result.tried == [(8, "oom")]
    assert not result.hit_cap


@pytest.mark.parametrize(("start", "cap"), [(0, 10), (16, 8)])
def test_bad_range(tiny: Workload, start: int, cap: int) -> None:
    with pytest.raises(ValueError):
        find_max_batch(tiny, SETTINGS, start=start, cap=cap, probe=FakeProbe(lambda b: True))


def test_probe_fits_on_injected_oom() -> None:
    workload = load_workload(ref("tiny.py", "oom_over_100"))
    assert probe_fits(workload, 100, SETTINGS)
    assert not probe_fits(workload, 101, SETTINGS)


def test_probe_non_oom_failure_stops_the_search() -> None:
    workload = load_workload(ref("tiny.py", "error_at_128"))
    with pytest.raises(MeasurementFailed, match="not out of memory"):
        find_max_batch(workload, SETTINGS, start=64, cap=1024)  # 64 fits, 128 raises ValueError


def test_cli_find_max_batch_prints_100_stores_row_and_process_still_trains(
    cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    store = tmp_path / "s.db"
    result = cli("find-max-batch", "-w", ref("tiny.py", "oom_over_100"), "--start", "48", "--store", store)
    assert result.code == 0, result.err
    assert "= 100" in result.out
    assert "101" in result.out
    with Store(store) as s:
        (row,) = s.max_batch_results()
    assert (row["max_batch_size"], row["first_oom_batch_size"]) == (100, 101)
    assert row["workload"] == "tiny-oom100"
    assert row["tried"][:2] == [[48, "ok"], [96, "ok"]]
    assert row["tried"][2] == [192, "oom"]
    # The process is still usable after the OOMs: a training step at the largest size runs.
    workload = load_workload(ref("tiny.py", "oom_over_100"))
    step = TrainingStep(workload, batch_size=100, seed=0, lr=0.1, device=SETTINGS.device)
    loss = step()
    assert torch.isfinite(loss)
    assert step.steps_done == 1


def test_cli_find_max_batch_reports_cap(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    result = cli("find-max-batch", "-w", ref("tiny.py"), "--start", "8", "--cap", "16", "--store", tmp_path / "s.db")
    assert result.code == 0, result.err
    assert ">= 16" in result.out
    assert "cap" in result.out


def test_cli_find_max_batch_first_size_oom(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    result = cli("find-max-batch", "-w", ref("tiny.py", "oom_over_100"), "--start", "200", "--store", tmp_path / "s.db")
    assert result.code == 0, result.err
    assert "even batch size 200" in result.out
    with Store(tmp_path / "s.db") as s:
        (row,) = s.max_batch_results()
    assert row["max_batch_size"] is None
    assert row["first_oom_batch_size"] == 200


def test_cli_find_max_batch_other_error_exit_1_nothing_stored(cli: Callable[..., CliResult], tmp_path: Path) -> None:
    store = tmp_path / "s.db"
    result = cli("find-max-batch", "-w", ref("tiny.py", "error_at_128"), "--start", "64", "--store", store)
    assert result.code == 1
    assert len(result.err_lines) == 1, result.err
    assert "shape mismatch injected at 128" in result.err
    assert not store.exists()
