"""--micro-batch-size auto: the max-batch finder's largest fitting batch becomes the micro-batch size."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAST, THROUGHPUT

import bsprof.engine.maxbatch as maxbatch
from bsprof.engine.sweep import auto_micro_batch_size
from bsprof.engine.trial import EngineSettings
from bsprof.workloads.digits import DigitsMLP


def _fits_up_to(limit: int):  # type: ignore[no-untyped-def]
    return lambda workload, b, settings, **kw: b <= limit


def test_auto_micro_batch_is_the_largest_fitting_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    settings = EngineSettings(device=torch.device("cpu"), micro_batch_size=8)
    seen: list[int | None] = []

    def probe(workload, b, s, **kw):  # type: ignore[no-untyped-def]
        seen.append(s.micro_batch_size)
        return b <= 40

    monkeypatch.setattr(maxbatch, "probe_fits", probe)
    assert auto_micro_batch_size(DigitsMLP(), settings, (16, 32, 64, 128)) == 40
    assert set(seen) == {None}  # probes run whole batches, never accumulated
    monkeypatch.setattr(maxbatch, "probe_fits", _fits_up_to(1000))
    assert auto_micro_batch_size(DigitsMLP(), settings, (16, 32, 64, 128)) is None  # everything fits whole


def test_sweep_with_auto_micro_batch_accumulates_above_it(  # type: ignore[no-untyped-def]
    cli, fast_timing: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maxbatch, "probe_fits", _fits_up_to(32))
    store = tmp_path / "s.db"
    result = cli("sweep", "-b", "16..128", *THROUGHPUT, *FAST, "--micro-batch-size", "auto", "--store", store)
    assert result.code == 0, result.err
    from bsprof.export import trials_frame

    frame = trials_frame(store).set_index("batch_size")
    assert frame["status"].tolist() == ["ok"] * 4
    assert frame["micro_batch_size"].to_dict() == {16: 16, 32: 32, 64: 32, 128: 32}
    assert frame["accumulation_steps"].to_dict() == {16: 1, 32: 1, 64: 2, 128: 4}
