"""The CIFAR-10 workload on tiny files written in the official binary format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bsprof.errors import BadInput
from bsprof.workload import load_workload
from bsprof.workloads.cifar10 import (
    CIFAR10_DIR_ENV,
    RECORD_BYTES,
    Cifar10ResNet,
    read_cifar10_binary,
    write_cifar10_binary,
)

N_TRAIN = 20
N_VAL = 10


def _fake(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 256, size=(n, 3, 32, 32)).astype(np.uint8)
    return labels, images


def _write_unchecked(path: Path, labels: np.ndarray, images: np.ndarray) -> None:
    """Like write_cifar10_binary but without validating labels, to produce corrupt files."""
    records = np.concatenate([labels.reshape(-1, 1), images.reshape(len(labels), -1)], axis=1).astype(np.uint8)
    records.tofile(path)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CIFAR10_DIR_ENV, raising=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    write_cifar10_binary(folder / "data_batch_1.bin", *_fake(N_TRAIN, 1))
    write_cifar10_binary(folder / "test_batch.bin", *_fake(N_VAL, 2))
    return folder


def _bad_input(call: object) -> str:
    with pytest.raises(BadInput) as info:
        call()  # type: ignore[operator]
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_file_layout_is_the_official_one(tmp_path: Path) -> None:
    labels = np.array([3, 7], dtype=np.uint8)
    images = np.zeros((2, 3, 32, 32), dtype=np.uint8)
    images[1, 2, 5, 9] = 200  # blue, row 5, column 9 of the second record
    path = tmp_path / "x.bin"
    write_cifar10_binary(path, labels, images)
    raw = path.read_bytes()
    assert len(raw) == 2 * RECORD_BYTES
    assert raw[0] == 3 and raw[RECORD_BYTES] == 7
    # record 1, after its label byte: 1024 red, 1024 green, then blue row-major
    assert raw[RECORD_BYTES + 1 + 2 * 1024 + 5 * 32 + 9] == 200
    assert sum(raw) == 3 + 7 + 200


def test_reads_back_labels_and_pixels(data_dir: Path) -> None:
    labels, images = read_cifar10_binary(data_dir / "data_batch_1.bin")
    exp_labels, exp_images = _fake(N_TRAIN, 1)
    np.testing.assert_array_equal(labels, exp_labels)
    np.testing.assert_array_equal(images, exp_images)


def test_splits_shapes_dtypes_and_normalisation(data_dir: Path) -> None:
    w = Cifar10ResNet(data_dir)
    train, val = w.train_split(), w.val_split()
    assert train.inputs.shape == (N_TRAIN, 3, 32, 32) and train.inputs.dtype == torch.float32
    assert val.inputs.shape == (N_VAL, 3, 32, 32) and val.inputs.dtype == torch.float32
    assert train.targets.dtype == torch.int64 and val.targets.dtype == torch.int64

    train_labels, train_images = _fake(N_TRAIN, 1)
    val_labels, val_images = _fake(N_VAL, 2)
    assert train.targets.tolist() == train_labels.tolist()
    assert val.targets.tolist() == val_labels.tolist()

    # training split: per channel mean 0 and (population) std 1
    x = train.inputs.double()
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        x.std(dim=(0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0
    )

    # one known pixel, both splits normalised with the training statistics
    scaled = train_images.astype(np.float64) / 255.0
    mean, std = scaled.mean(axis=(0, 2, 3)), scaled.std(axis=(0, 2, 3))
    np.testing.assert_allclose(w.channel_mean, mean, rtol=1e-9)
    np.testing.assert_allclose(w.channel_std, std, rtol=1e-9)
    i, c, r, col = 4, 2, 7, 30
    assert train.inputs[i, c, r, col].item() == pytest.approx(
        (train_images[i, c, r, col] / 255 - mean[c]) / std[c], abs=1e-5
    )
    assert val.inputs[i, c, r, col].item() == pytest.approx(
        (val_images[i, c, r, col] / 255 - mean[c]) / std[c], abs=1e-5
    )

    assert w.train_split() is train  # cached


def test_model_forward_and_backward(data_dir: Path) -> None:
    w = Cifar10ResNet(data_dir)
    model = w.build_model(seed=0)
    train = w.train_split()
    out = model(train.inputs[:8])
    assert out.shape == (8, 10)
    loss = w.loss(out, train.targets[:8])
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    w.make_optimizer(model.parameters(), lr=w.base_lr).step()
    assert 0.0 <= w.metric(out, train.targets[:8]) <= 1.0


def test_same_seed_same_weights(data_dir: Path) -> None:
    w = Cifar10ResNet(data_dir, depth=8)
    a, b, c = w.build_model(1), w.build_model(1), w.build_model(2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_parent_folder_env_var_and_config(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CIFAR10_DIR_ENV, str(data_dir.parent))  # the parent holding cifar-10-batches-bin/
    w = Cifar10ResNet()
    assert w.data_dir == data_dir
    assert w.config() == {
        "name": "cifar10-resnet",
        "depth": 20,
        "width": 16,
        "weight_decay": 5e-4,
        "train_files": ["data_batch_1.bin"],
        "train_records": N_TRAIN,
        "val_records": N_VAL,
    }
    assert len(w.train_split()) == N_TRAIN


def test_uses_every_training_batch_present(data_dir: Path) -> None:
    write_cifar10_binary(data_dir / "data_batch_3.bin", *_fake(5, 3))
    w = Cifar10ResNet(data_dir)
    assert w.config()["train_files"] == ["data_batch_1.bin", "data_batch_3.bin"]
    assert w.train_records == N_TRAIN + 5
    assert w.train_split().targets.tolist() == [*_fake(N_TRAIN, 1)[0].tolist(), *_fake(5, 3)[0].tolist()]


def test_load_workload_by_name(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CIFAR10_DIR_ENV, str(data_dir))
    w = load_workload("cifar10-resnet")
    assert isinstance(w, Cifar10ResNet)
    assert w.target == 0.80 and w.val_split().inputs.shape == (N_VAL, 3, 32, 32)


def test_env_var_unset() -> None:
    message = _bad_input(Cifar10ResNet)
    assert CIFAR10_DIR_ENV in message and "--data-dir" in message


def test_env_var_unset_through_load_workload() -> None:
    assert CIFAR10_DIR_ENV in _bad_input(lambda: load_workload("cifar10-resnet"))


def test_folder_missing(tmp_path: Path) -> None:
    assert "does not exist" in _bad_input(lambda: Cifar10ResNet(tmp_path / "nope"))


def test_folder_missing_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CIFAR10_DIR_ENV, str(tmp_path / "nope"))
    message = _bad_input(Cifar10ResNet)
    assert "does not exist" in message and CIFAR10_DIR_ENV in message


def test_test_batch_missing(data_dir: Path) -> None:
    (data_dir / "test_batch.bin").unlink()
    message = _bad_input(lambda: Cifar10ResNet(data_dir))
    assert "lacks test_batch.bin" in message


def test_training_batches_missing(data_dir: Path) -> None:
    (data_dir / "data_batch_1.bin").unlink()
    assert "data_batch_N.bin" in _bad_input(lambda: Cifar10ResNet(data_dir))


def test_empty_folder(tmp_path: Path) -> None:
    message = _bad_input(lambda: Cifar10ResNet(tmp_path))
    assert "test_batch.bin" in message and "data_batch_N.bin" in message


@pytest.mark.parametrize("size", [RECORD_BYTES * 3 - 1, 0])
def test_bad_file_size(data_dir: Path, size: int) -> None:
    path = data_dir / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:size])
    message = _bad_input(lambda: Cifar10ResNet(data_dir))  # caught by the constructor, before any reading
    assert f"{size} bytes" in message and str(RECORD_BYTES) in message


def test_label_out_of_range(data_dir: Path) -> None:
    labels, images = _fake(N_TRAIN, 1)
    labels[6] = 11
    _write_unchecked(data_dir / "data_batch_1.bin", labels, images)
    w = Cifar10ResNet(data_dir)  # sizes are fine; labels are checked when the data are read
    message = _bad_input(w.train_split)
    assert "label 11" in message and "record 6" in message


def test_writer_rejects_bad_arrays(tmp_path: Path) -> None:
    labels, images = _fake(2, 0)
    with pytest.raises(ValueError):
        write_cifar10_binary(tmp_path / "x.bin", labels, images.astype(np.int16))
    with pytest.raises(ValueError):
        write_cifar10_binary(tmp_path / "x.bin", labels, images[:, :, :16])
    with pytest.raises(ValueError):
        write_cifar10_binary(tmp_path / "x.bin", np.array([1, 10]), images)
