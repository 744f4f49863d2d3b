"""Workloads on scikit-learn's bundled ``digits`` dataset (1,797 8x8 grey images, ten classes).

The data ship with scikit-learn, so nothing is downloaded. The split is fixed and stratified
(20% validation, ``random_state=0``) and features are standardised with the training split's
statistics, so every trial sees exactly the same data whatever its seed.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from bsprof.workload import Split, Workload

__all__ = ["DigitsCNN", "DigitsMLP", "digits_splits"]

_VAL_FRACTION = 0.2


@lru_cache(maxsize=1)
def digits_splits() -> tuple[Split, Split]:
    """The standardised (train, validation) splits of digits: inputs float32 of shape (n, 64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=_VAL_FRACTION, stratify=y, random_state=0)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0

    def split(xs: object, ys: object) -> Split:
        return Split(torch.tensor((xs - mean) / std, dtype=torch.float32), torch.tensor(ys, dtype=torch.long))

    return split(x_train, y_train), split(x_val, y_val)


class _Digits(Workload):
    metric_name = "accuracy"
    metric_range = (0.0, 1.0)
    higher_is_better = True
    target = 0.95
    eval_batch_size = 4096

    def train_split(self) -> Split:
        return digits_splits()[0]

    def val_split(self) -> Split:
        return digits_splits()[1]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)


class DigitsMLP(_Digits):
    """digits with a 64-256-10 MLP (ReLU), SGD with Nesterov momentum 0.9.

    Args:
        hidden: Width of the hidden layer (units).
    """

    name = "digits-mlp"
    description = "digits 8x8, MLP 64-256-10, SGD+momentum, target val accuracy 0.95"
    base_lr = 0.01
    base_batch_size = 8
    max_lr = 0.8

    def __init__(self, hidden: int = 256) -> None:
        self.hidden = hidden

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def config(self) -> dict[str, object]:
        return {"name": self.name, "hidden": self.hidden}


class _DigitsConvNet(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
        )
        self.head = nn.Linear(2 * c * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], 1, 8, 8)
        return self.head(self.features(x).flatten(1))


class DigitsCNN(_Digits):
    """digits as 1x8x8 images with a two-conv network, SGD with Nesterov momentum 0.9.

    Args:
        channels: Channels of the first convolution (the second has twice as many).
    """

    name = "digits-cnn"
    description = "digits as 1x8x8 images, small conv net, SGD+momentum, target val accuracy 0.95"
    base_lr = 0.01
    base_batch_size = 8
    max_lr = 0.4

    def __init__(self, channels: int = 16) -> None:
        self.channels = channels

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _DigitsConvNet(self.channels)

    def config(self) -> dict[str, object]:
        return {"name": self.name, "channels": self.channels}
