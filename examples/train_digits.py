"""A plain PyTorch training script, as a user would write it, with bsprof's three tracker lines added.

Run it alone (bsprof does nothing then)::

    python examples/train_digits.py --batch-size 64 --lr 0.05 --epochs 20

or sweep its batch size with bsprof::

    bsprof sweep --cmd 'python examples/train_digits.py --batch-size {batch_size} --lr {lr} --seed {seed}' \\
        -b 16..128 --seeds 2 --kind both --target 0.95 --base-lr 0.025 --base-batch-size 32

The lines marked ``# bsprof`` are the only ones bsprof needs; the data are scikit-learn's bundled digits
(nothing is downloaded).
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import bsprof


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train an MLP on digits.")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.025)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=5, help="evaluate every N optimizer steps")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return f(x_train), torch.tensor(y_train), f(x_val), torch.tensor(y_val)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train, x_val, y_val = data()
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(args.seed)

    tracker = bsprof.track()  # bsprof
    step = 0
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[start : start + args.batch_size]
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            tracker.step(samples=len(idx))  # bsprof
            if step % args.eval_every == 0:
                acc = accuracy(model, x_val, y_val)
                tracker.evaluate(metric=acc)  # bsprof
            if tracker.should_stop():  # optional: bsprof has what it needs
                return
        print(f"epoch {epoch}: step {step}, loss {loss.item():.4f}, val accuracy {accuracy(model, x_val, y_val):.4f}")


if __name__ == "__main__":
    main()
