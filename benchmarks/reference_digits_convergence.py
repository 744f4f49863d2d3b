"""An independent reference for digits-mlp steps-to-target, in plain PyTorch (it does not import bsprof).

It rebuilds what ``bsprof sweep --kind convergence`` does for the built-in ``digits-mlp`` workload from the
workload's published description, not from bsprof's code paths: scikit-learn's digits, a stratified 20%
validation split (``random_state=0``) standardised with the training split's statistics; ``torch.manual_seed
(seed)`` then ``Linear(64, 256) - ReLU - Linear(256, 10)``; SGD with Nesterov momentum 0.9 at the linear
rule's LR (0.01 x B / 8, capped at 0.8); batches of exactly B consecutive indices from a stream of
``torch.randperm(n)`` permutations drawn from a CPU generator seeded with ``seed``; the validation accuracy
evaluated after every step up to step 19, then at ``floor(s / 0.95)``; the target is reached when the
number of correct validation examples is at least 95% of 360, decided on integers.

If bsprof is right, its ``steps_to_target`` equals this script's for every (batch size, seed).

Run: ``python benchmarks/reference_digits_convergence.py --batch-sizes 8,64,1024 --seeds 8``
(add ``--compare STORE`` to check a bsprof store's convergence trials of the same run against it).
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
from fractions import Fraction

import torch
from torch import nn

TARGET = Fraction(95, 100)
BASE_LR, BASE_B, MAX_LR = 0.01, 8, 0.8


def _splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xt, xv, yt, yv = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    mean, std = xt.mean(axis=0), xt.std(axis=0)
    std[std == 0] = 1.0
    f = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return f(xt), torch.tensor(yt), f(xv), torch.tensor(yv)


def _lr(b: int) -> float:
    return float(f"{min(BASE_LR * b / BASE_B, MAX_LR):.6g}")


def steps_to_target(b: int, seed: int, max_steps: int = 20_000) -> int | None:
    xt, yt, xv, yv = _splits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=_lr(b), momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    stream = torch.empty(0, dtype=torch.long)
    next_eval = 1
    for s in range(1, max_steps + 1):
        while stream.numel() < b:
            stream = torch.cat([stream, torch.randperm(len(yt), generator=gen)])
        idx, stream = stream[:b], stream[b:]
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s == next_eval:
            with torch.no_grad():
                correct = int((model(xv).argmax(dim=1) == yv).sum())
            if Fraction(correct, len(yv)) >= TARGET:
                return s
            next_eval = max(s + 1, math.floor(s / 0.95))
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="8,16,32,64,128,256,512,1024")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--compare", help="a bsprof store: compare its digits-mlp convergence trials")
    a = p.parse_args()
    torch.set_num_threads(1)
    ours: dict[tuple[int, int], int | None] = {}
    if a.compare:
        with sqlite3.connect(a.compare) as db:
            for b, seed, metrics in db.execute(
                "SELECT batch_size, seed, metrics_json FROM trials WHERE kind='convergence' AND workload='digits-mlp'"
            ):
                ours[(b, seed)] = json.loads(metrics).get("steps_to_target")
    same = total = 0
    for b in [int(v) for v in a.batch_sizes.split(",")]:
        row = []
        for seed in range(a.seeds):
            ref = steps_to_target(b, seed)
            cell = f"{ref}"
            if (b, seed) in ours:
                total += 1
                same += ours[(b, seed)] == ref
                cell += "" if ours[(b, seed)] == ref else f"(bsprof {ours[(b, seed)]})"
            row.append(cell)
        print(f"B={b:5d} lr={_lr(b):<6g} steps-to-target per seed: {' '.join(row)}")
    if a.compare:
        print(f"bsprof matches the reference in {same}/{total} trials")


if __name__ == "__main__":
    main()
