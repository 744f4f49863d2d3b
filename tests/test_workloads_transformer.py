"""The synthetic causal-transformer workload."""

from __future__ import annotations

import math

import pytest
import torch

from bsprof.workload import load_workload
from bsprof.workloads.transformer import SyntheticTransformer

SMALL = {"vocab_size": 50, "seq_len": 16, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_train": 64, "n_val": 16}


def test_shapes_and_dtypes() -> None:
    w = SyntheticTransformer(**SMALL)
    train, val = w.train_split(), w.val_split()
    assert train.inputs.shape == (64, 16) and train.targets.shape == (64, 16)
    assert val.inputs.shape == (16, 16) and val.targets.shape == (16, 16)
    for t in (train.inputs, train.targets, val.inputs, val.targets):
        assert t.dtype == torch.int64
        assert 0 <= int(t.min()) and int(t.max()) < 50
    # targets are the inputs shifted by one token
    assert torch.equal(train.inputs[:, 1:], train.targets[:, :-1])
    assert torch.equal(val.inputs[:, 1:], val.targets[:, :-1])
    out = w.build_model(0)(train.inputs[:8])
    assert out.shape == (8, 16, 50)


def test_default_sizes() -> None:
    w = SyntheticTransformer()
    assert w.config() == {
        "name": "synthetic-transformer",
        "vocab_size": 256,
        "seq_len": 64,
        "d_model": 128,
        "n_layers": 2,
        "n_heads": 4,
        "d_ff": 512,
        "n_train": 4096,
        "n_val": 512,
        "data_seed": 0,
    }
    assert len(w.train_split()) == 4096 and len(w.val_split()) == 512


def test_data_are_deterministic() -> None:
    a, b = SyntheticTransformer(**SMALL), SyntheticTransformer(**SMALL)
    for sa, sb in ((a.train_split(), b.train_split()), (a.val_split(), b.val_split())):
        assert torch.equal(sa.inputs, sb.inputs) and torch.equal(sa.targets, sb.targets)
    c = SyntheticTransformer(**SMALL, data_seed=1)
    assert not torch.equal(a.train_split().inputs, c.train_split().inputs)
    assert not torch.equal(a.train_split().inputs[: len(a.val_split())], a.val_split().inputs)


def test_same_seed_same_weights() -> None:
    w = SyntheticTransformer(**SMALL)
    a, b, c = w.build_model(3), w.build_model(3), w.build_model(4)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("train_mode", [True, False])
def test_causal_masking(train_mode: bool) -> None:
    w = SyntheticTransformer(**SMALL)
    model = w.build_model(0).train(train_mode)
    x = w.val_split().inputs[:4].clone()
    y = x.clone()
    k = 9
    y[:, k] = (y[:, k] + 1) % 50  # change one later token
    with torch.no_grad():
        ox, oy = model(x), model(y)
    torch.testing.assert_close(ox[:, :k], oy[:, :k])  # earlier positions are unaffected
    assert not torch.allclose(ox[:, k:], oy[:, k:])  # the changed position and later ones see it


def test_loss_metric_and_backward() -> None:
    w = SyntheticTransformer(**SMALL)
    model = w.build_model(0)
    train = w.train_split()
    out = model(train.inputs[:32])
    loss = w.loss(out, train.targets[:32])
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(50), rel=0.1)  # near-uniform predictions at initialisation
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    w.make_optimizer(model.parameters(), lr=w.base_lr).step()
    acc = w.metric(out, train.targets[:32])
    assert 0.0 <= acc <= 1.0
    assert w.metric(torch.nn.functional.one_hot(train.targets[:4], 50).float(), train.targets[:4]) == 1.0


def test_load_workload_by_name() -> None:
    w = load_workload("synthetic-transformer")
    assert isinstance(w, SyntheticTransformer)
    assert w.target is None
    assert w.metric_name == "token_accuracy"


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        SyntheticTransformer(d_model=30, n_heads=4)
    with pytest.raises(ValueError):
        SyntheticTransformer(seq_len=0)
