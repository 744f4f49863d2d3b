"""An example bsprof plug-in workload: ``bsprof sweep --workload examples/tiny_regression.py:factory``.

A linear-regression-like task on synthetic data: the metric is the validation R² (higher is better), so
it also shows how to override :meth:`bsprof.Workload.metric`. R² is not a mean over examples, so the
workload sets ``metric_is_mean = False``: bsprof then computes it once over the whole validation split,
not per evaluation batch.
"""

from __future__ import annotations

import torch
from torch import nn

from bsprof import Split, Workload


class TinyRegression(Workload):
    name = "tiny-regression"
    description = "y = Xw + noise, 32 features, a linear model; target validation R² 0.9"
    metric_name = "r2"
    target = 0.9
    base_lr = 0.01
    base_batch_size = 16
    max_lr = 0.2
    metric_is_mean = False  # R² over the whole split, not an average of per-batch R²s

    def __init__(self, n: int = 4096, features: int = 32) -> None:
        g = torch.Generator().manual_seed(0)  # fixed data, whatever the trial's seed
        x = torch.randn(n, features, generator=g)
        w = torch.randn(features, 1, generator=g)
        y = x @ w + 0.1 * torch.randn(n, 1, generator=g)
        cut = n * 4 // 5
        self._train, self._val = Split(x[:cut], y[:cut]), Split(x[cut:], y[cut:])
        self.features = features

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(self.features, 1)

    def train_split(self) -> Split:
        return self._train

    def val_split(self) -> Split:
        return self._val

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(outputs, targets)

    def metric(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        residual = (outputs.double() - targets.double()).pow(2).sum()
        total = (targets.double() - targets.double().mean()).pow(2).sum()
        return float(1 - residual / total)

    def config(self) -> dict[str, object]:
        return {"name": self.name, "features": self.features}


def factory() -> Workload:
    return TinyRegression()
