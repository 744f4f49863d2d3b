"""A Lightning script with bsprof's callback added (one line: ``callbacks=[BsprofCallback(metric="val_acc")]``).

An MLP on scikit-learn's bundled digits (nothing is downloaded). Run it alone::

    python examples/train_lightning.py --batch-size 64 --lr 0.05

or sweep it::

    bsprof sweep --cmd 'python examples/train_lightning.py --batch-size {batch_size} --lr {lr} --seed {seed}' \\
        -b 16..128 --seeds 2 --kind both --target 0.95 --base-lr 0.025 --base-batch-size 32

Needs ``pip install 'bsprof[lightning]'``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bsprof.integrations.lightning import BsprofCallback


class DigitsMLP(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True)


def loaders(batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    train = TensorDataset(f(x_train), torch.tensor(y_train))
    val = TensorDataset(f(x_val), torch.tensor(y_val))
    g = torch.Generator().manual_seed(seed)
    return DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True, generator=g), DataLoader(val, 512)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.025)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--val-every", type=int, default=5, help="validate every N optimizer steps")
    args = p.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(args.seed, verbose=False)
    train, val = loaders(args.batch_size, args.seed)
    trainer = L.Trainer(
        max_epochs=args.max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, val_check_interval=args.val_every,
        check_val_every_n_epoch=None, num_sanity_val_steps=0,
        callbacks=[BsprofCallback(metric="val_acc")],
    )  # fmt: skip
    trainer.fit(DigitsMLP(args.lr), train, val)
    print(f"final val_acc {float(trainer.callback_metrics['val_acc']):.4f} after {trainer.global_step} steps")


if __name__ == "__main__":
    main()
