"""Bad workloads are caught before the first trial: one line on stderr, exit code 2, nothing stored
(issue 13, must show 5)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FAST, THROUGHPUT, ref


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("wrong_structure", "training data: dataset[0] and dataset[1] collated: a batch must hold tensors"),
        ("raising_collate", "the collate function raised TypeError: collate cannot handle dicts"),
        ("nonscalar_loss", "compute_loss returned a tensor of shape (2,), not a scalar"),
        ("ignores_batch_size", "make_loader(batch_size=2, seed=0) yields batches of 8 examples"),
        ("dict_split_without_tensors", "train_split() raised BatchError: a batch must hold tensors"),
    ],
)
def test_bad_workload_one_line_exit_2(cli, tmp_path: Path, factory: str, message: str) -> None:  # type: ignore[no-untyped-def]
    store = tmp_path / "s.db"
    result = cli(
        "sweep", "--workload", ref("data_workloads.py", factory), "-b", "4", *THROUGHPUT, *FAST, "--store", store
    )
    assert result.code == 2, result.err
    assert len(result.err_lines) == 1, result.err
    assert message in result.err_lines[0]
    assert "Traceback" not in result.err
    assert not store.exists() or store.stat().st_size == 0 or "trials" not in result.out


@pytest.mark.parametrize("factory", ["tensor_dataset", "dict_in_split", "dict_dataset", "loader_factory"])
def test_datasets_and_structured_splits_now_sweep(cli, fast_timing: None, tmp_path: Path, factory: str) -> None:  # type: ignore[no-untyped-def]
    result = cli(
        "sweep", "--workload", ref("data_workloads.py", factory), "-b", "4,8", *THROUGHPUT, *FAST,
        "--micro-batch-size", "3", "--store", tmp_path / "s.db",
    )  # fmt: skip
    assert result.code == 0, result.err
    from bsprof.export import trials_frame

    frame = trials_frame(tmp_path / "s.db").set_index("batch_size")
    assert frame["status"].tolist() == ["ok", "ok"]
    assert frame["accumulation_steps"].to_dict() == {4: 2, 8: 3}
    assert frame["micro_batch_size"].to_dict() == {4: 3, 8: 3}


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--micro-batch-size", "0", "--micro-batch-size '0': give a positive integer or 'auto'"),
        ("--lr-schedule", "cosine", "needs its total length"),
        ("--lr-schedule", "cosine:warmup=x,total=10", "warmup must be a number"),
        ("--lr-schedule", "step:total=10", "unknown LR schedule 'step'"),
    ],
)
def test_bad_options_exit_2(cli, tmp_path: Path, option: str, value: str, message: str) -> None:  # type: ignore[no-untyped-def]
    result = cli("sweep", "-b", "8", *THROUGHPUT, *FAST, option, value, "--store", tmp_path / "s.db")
    assert result.code == 2 and len(result.err_lines) == 1 and message in result.err_lines[0], result.err
