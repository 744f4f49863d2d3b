"""The HuggingFace and Lightning callbacks feed the tracker: a tiny Trainer of each, in this process, with a
trial order in the environment; the events must carry the frameworks' global batch and evaluation steps."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import bsprof.tracker as tracker_module
from bsprof.engine.script_protocol import ENV_VAR, TrialOrder, read_events


@pytest.fixture
def trial_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A convergence trial order in the environment; the process's tracker is reset before and closed after."""
    report = tmp_path / "events.jsonl"
    order = TrialOrder(str(report), "w", "convergence", batch_size=24, seed=0, lr=0.01, target=2.0, max_steps=100)
    monkeypatch.setenv(ENV_VAR, order.to_env())
    monkeypatch.setattr(tracker_module, "_active", None)
    hook = sys.excepthook
    yield report
    if tracker_module._active is not None:
        tracker_module._active.close()
    sys.excepthook = hook


def test_huggingface_callback_reports_global_batch_and_evaluations(trial_env: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="needs the hf extra: pip install 'bsprof[hf]'")
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from bsprof.integrations.huggingface import BsprofCallback, global_batch_size

    class Data(torch.utils.data.Dataset):
        def __init__(self, n: int) -> None:
            self.ids = torch.randint(1, 16, (n, 8), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": (self.ids[i, 0] < 8).long()}

    config = BertConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
        max_position_embeddings=8, num_labels=2,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=6,
        eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no",
    )  # fmt: skip
    assert global_batch_size(args) == 12  # 4 per device x 3 accumulated x 1 process
    trainer = Trainer(
        model=BertForSequenceClassification(config), args=args, train_dataset=Data(96), eval_dataset=Data(16),
        callbacks=[BsprofCallback(metric="loss")],
    )  # fmt: skip
    trainer.train()
    tracker_module._active.close()  # type: ignore[union-attr]
    events = read_events(trial_env)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert [e["samples"] for e in evals] == [24, 48, 72]  # 12 samples per optimizer step
    assert all(e["val_metric"] > 0 for e in evals)  # eval_loss
    assert events[-1]["event"] == "end" and events[-1]["steps"] == 6


def test_lightning_callback_counts_optimizer_steps_with_accumulation(trial_env: Path) -> None:
    pytest.importorskip("lightning", reason="needs the lightning extra: pip install 'bsprof[lightning]'")
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from bsprof.integrations.lightning import BsprofCallback, batch_samples

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
            self.log("val_acc", (self.net(batch[0]).argmax(1) == batch[1]).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 2, (64,), generator=g))
    assert batch_samples((torch.zeros(5, 4), torch.zeros(5))) == 5
    trainer = L.Trainer(
        max_steps=4, accumulate_grad_batches=2, val_check_interval=4, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[BsprofCallback(metric="val_acc")],
    )  # fmt: skip
    trainer.fit(Module(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=64))
    tracker_module._active.close()  # type: ignore[union-attr]
    events = read_events(trial_env)
    end = events[-1]
    assert end["event"] == "end"
    assert end["steps"] == 4 and end["samples"] == 4 * 16  # 2 micro-batches of 8 per optimizer step
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]  # val_check_interval counts micro-batches: every 2 steps
    assert all(0.0 <= e["val_metric"] <= 1.0 for e in evals)
