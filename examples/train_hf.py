"""A HuggingFace Trainer script with bsprof's callback added (one line: ``callbacks=[BsprofCallback()]``).

A tiny BERT built from a config (no download) learns a synthetic task from local data: is the token at
position 3 of a 16-token sequence in the lower half of the vocabulary? Run it alone::

    python examples/train_hf.py --batch-size 32 --lr 1e-3

or sweep it (``--batch-size`` is the global batch: per-device batch x ``--accum``)::

    bsprof sweep --cmd 'python examples/train_hf.py --batch-size {batch_size} --lr {lr} --seed {seed}' \\
        -b 16..128 --seeds 2 --kind both --target 0.9 --base-lr 1e-3 --base-batch-size 32

Needs ``pip install 'bsprof[hf]'``.
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from bsprof.integrations.huggingface import BsprofCallback

VOCAB, LENGTH = 64, 16


class Synthetic(torch.utils.data.Dataset):
    """Random token sequences; the label says whether token 3 is below VOCAB / 2 (fixed data, seed 0/1)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        self.labels = (self.ids[:, 3] < VOCAB // 2).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def accuracy(pred: object) -> dict[str, float]:
    logits, labels = pred.predictions, pred.label_ids  # type: ignore[attr-defined]
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=32, help="global batch (per-device x accumulation)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--out", default=os.environ.get("TMPDIR", "/tmp") + "/bsprof-hf-example")
    args = p.parse_args()
    torch.set_num_threads(1)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=LENGTH, num_labels=2,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = BertForSequenceClassification(config)
    training = TrainingArguments(
        output_dir=args.out, per_device_train_batch_size=args.batch_size // args.accum,
        gradient_accumulation_steps=args.accum, learning_rate=args.lr, lr_scheduler_type="constant",
        max_steps=args.max_steps, eval_strategy="steps", eval_steps=args.eval_steps, per_device_eval_batch_size=512,
        metric_for_best_model="accuracy", save_strategy="no", report_to=[], logging_strategy="no", use_cpu=True,
        seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=training, train_dataset=Synthetic(8192, 0), eval_dataset=Synthetic(1024, 1),
        compute_metrics=accuracy, callbacks=[BsprofCallback()],
    )  # fmt: skip
    trainer.train()
    print(f"final: {trainer.evaluate()}")


if __name__ == "__main__":
    main()
