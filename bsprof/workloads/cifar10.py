"""CIFAR-10 with a small CIFAR-style ResNet, read from a local folder in the official binary format.

Nothing is downloaded. Point bsprof at the folder of the "CIFAR-10 binary version" archive
(``cifar-10-binary.tar.gz``, which unpacks to ``cifar-10-batches-bin/``) with the ``data_dir`` argument or the
``BSPROF_CIFAR10_DIR`` environment variable; either that folder or its parent is accepted.

Format (https://www.cs.toronto.edu/~kriz/cifar.html): each file is a sequence of 3,073-byte records, one byte
label (0-9) followed by 3,072 pixel bytes: the 1,024 red values, then green, then blue, each a 32x32 image in
row-major order. Training data are ``data_batch_1.bin`` ... ``data_batch_5.bin`` (10,000 records each; those
present are used, at least one is required), validation data are ``test_batch.bin``. The files are parsed with
numpy only; the pickled "python version" of the dataset is never read, because unpickling runs arbitrary code.

Inputs are float32 of shape (n, 3, 32, 32), normalised per channel with the mean and standard deviation of the
training split; targets are int64 class indices. There is no data augmentation (the engine batches in-memory
tensors by index), so the model overfits sooner than in the ResNet paper; the default target of 0.80 validation
accuracy is within reach of the default ResNet-20 without augmentation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bsprof.errors import BadInput
from bsprof.workload import Split, Workload

__all__ = [
    "CIFAR10_DIR_ENV",
    "RECORD_BYTES",
    "Cifar10ResNet",
    "find_cifar10_files",
    "read_cifar10_binary",
    "write_cifar10_binary",
]

CIFAR10_DIR_ENV = "BSPROF_CIFAR10_DIR"
"""Environment variable naming the CIFAR-10 folder when no ``data_dir`` is given."""

RECORD_BYTES = 3073
"""Bytes per record: one label byte and 3 x 32 x 32 pixel bytes."""

_IMAGE_SHAPE = (3, 32, 32)
_NUM_CLASSES = 10
_SUBFOLDER = "cifar-10-batches-bin"
_TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_VAL_FILE = "test_batch.bin"
_EXPECTED = "data_batch_1.bin ... data_batch_5.bin and test_batch.bin"


def write_cifar10_binary(path: str | Path, labels: np.ndarray, images: np.ndarray) -> None:
    """Write records in the official CIFAR-10 binary format.

    Args:
        path: File to create (overwritten if it exists).
        labels: Integer class indices in [0, 9], shape (n,).
        images: uint8 pixel values, shape (n, 3, 32, 32) (channels R, G, B; rows; columns).

    Raises:
        ValueError: Wrong shapes, dtype or label range.
    """
    labels = np.asarray(labels)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != _IMAGE_SHAPE:
        raise ValueError(f"images must have shape (n, 3, 32, 32), got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        raise ValueError(f"labels must lie in [0, {_NUM_CLASSES - 1}]")
    records = np.empty((images.shape[0], RECORD_BYTES), dtype=np.uint8)
    records[:, 0] = labels
    records[:, 1:] = images.reshape(images.shape[0], -1)
    records.tofile(str(path))


def read_cifar10_binary(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one file in the official CIFAR-10 binary format.

    Args:
        path: A ``data_batch_N.bin`` or ``test_batch.bin`` file.

    Returns:
        ``(labels, images)``: labels uint8 of shape (n,), images uint8 of shape (n, 3, 32, 32).

    Raises:
        BadInput: Missing file, a size that is not a positive multiple of 3,073 bytes, or a label above 9.
    """
    path = Path(path)
    _check_size(path)
    raw = np.fromfile(path, dtype=np.uint8)
    records = raw.reshape(-1, RECORD_BYTES)
    labels = records[:, 0].copy()
    if labels.max() >= _NUM_CLASSES:
        bad = int(np.argmax(labels >= _NUM_CLASSES))
        raise BadInput(
            f"CIFAR-10 file {path} has label {int(labels[bad])} in record {bad} (labels are 0-9): "
            f"not the CIFAR-10 binary format; re-extract cifar-10-binary.tar.gz"
        )
    images = records[:, 1:].reshape(-1, *_IMAGE_SHAPE).copy()
    return labels, images


def _check_size(path: Path) -> int:
    """The number of records in ``path``; raises :class:`BadInput` unless it is a positive whole number."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadInput(f"CIFAR-10 file {path} cannot be read ({e.strerror}); re-extract cifar-10-binary.tar.gz") from e
    if not path.is_file():
        raise BadInput(f"CIFAR-10 file {path} is not a regular file; re-extract cifar-10-binary.tar.gz")
    if size == 0 or size % RECORD_BYTES:
        raise BadInput(
            f"CIFAR-10 file {path} is {size} bytes, not a positive multiple of {RECORD_BYTES} "
            f"(truncated, or not the binary version?); re-extract cifar-10-binary.tar.gz"
        )
    return size // RECORD_BYTES


def find_cifar10_files(data_dir: str | Path | None = None) -> tuple[Path, list[Path], Path]:
    """Locate the CIFAR-10 binary files.

    Args:
        data_dir: The folder holding the ``.bin`` files or its parent holding ``cifar-10-batches-bin/``;
            ``None`` reads the ``BSPROF_CIFAR10_DIR`` environment variable.

    Returns:
        ``(folder, train_files, val_file)``: the folder holding the files, the ``data_batch_N.bin`` files
        present (in order), and ``test_batch.bin``.

    Raises:
        BadInput: Folder not set or missing, ``test_batch.bin`` or every ``data_batch_N.bin`` missing. Sizes
            are not checked here.
    """
    if data_dir is None or str(data_dir).strip() == "":
        env = os.environ.get(CIFAR10_DIR_ENV, "").strip()
        if not env:
            raise BadInput(
                f"CIFAR-10 folder not set: pass --data-dir or set {CIFAR10_DIR_ENV} to the folder holding "
                f"{_EXPECTED} (the binary version of CIFAR-10)"
            )
        data_dir, source = env, f" (from {CIFAR10_DIR_ENV})"
    else:
        source = ""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise BadInput(
            f"CIFAR-10 folder {root}{source} does not exist or is not a folder; "
            f"point it at the folder holding {_EXPECTED}"
        )
    folder = root
    if not any((root / name).exists() for name in (*_TRAIN_FILES, _VAL_FILE)) and (root / _SUBFOLDER).is_dir():
        folder = root / _SUBFOLDER
    train_files = [folder / name for name in _TRAIN_FILES if (folder / name).exists()]
    val_file = folder / _VAL_FILE
    if not val_file.exists() and not train_files:
        what = f"{_VAL_FILE} and any data_batch_N.bin"
    elif not val_file.exists():
        what = _VAL_FILE
    elif not train_files:
        what = "any data_batch_N.bin (N = 1..5; at least one is needed)"
    else:
        return folder, train_files, val_file
    raise BadInput(
        f"CIFAR-10 folder {folder}{source} lacks {what}; it must hold {_EXPECTED} "
        f"from the binary version of CIFAR-10 (cifar-10-binary.tar.gz)"
    )


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class _CifarResNet(nn.Module):
    """He et al. (2016) CIFAR ResNet: a 3x3 stem, three stages of ``blocks`` BasicBlocks, pooling, linear."""

    def __init__(self, blocks: int, width: int, num_classes: int = _NUM_CLASSES) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        in_channels = width
        for stage, out_channels in enumerate(widths):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1  # 32x32 -> 16x16 -> 8x8
                layers.append(_BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Cifar10ResNet(Workload):
    """CIFAR-10 with a CIFAR-style ResNet (BasicBlocks, BatchNorm), SGD with Nesterov momentum and weight decay.

    The constructor only locates the files and checks their sizes; the data are read on the first call to
    :meth:`train_split` or :meth:`val_split` and cached on the instance.

    Args:
        data_dir: Folder holding the ``.bin`` files, or its parent holding ``cifar-10-batches-bin/``;
            ``None`` reads ``BSPROF_CIFAR10_DIR``.
        depth: Network depth, ``6n + 2`` (8, 14, 20, 32, ...): ``n`` BasicBlocks per stage.
        width: Channels of the first stage; the stages have ``width``, ``2 * width`` and ``4 * width``.
        weight_decay: L2 penalty of the optimizer (applied to every parameter).

    Raises:
        BadInput: The folder is not set or missing, a required file is missing or has a bad size.
        ValueError: ``depth`` is not of the form ``6n + 2`` or ``width`` is not positive.
    """

    name = "cifar10-resnet"
    description = "CIFAR-10 (local binary files), ResNet-20, SGD+momentum+wd, target val accuracy 0.80"
    metric_name = "accuracy"
    metric_range = (0.0, 1.0)
    higher_is_better = True
    target = 0.80
    base_lr = 0.1
    base_batch_size = 128
    max_lr = 1.6
    eval_batch_size = 1000

    def __init__(
        self, data_dir: str | Path | None = None, *, depth: int = 20, width: int = 16, weight_decay: float = 5e-4
    ) -> None:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.depth = depth
        self.width = width
        self.weight_decay = weight_decay
        self.data_dir, self._train_files, self._val_file = find_cifar10_files(data_dir)
        self.train_records = sum(_check_size(p) for p in self._train_files)
        self.val_records = _check_size(self._val_file)
        self._splits: tuple[Split, Split] | None = None
        self.channel_mean: tuple[float, ...] | None = None
        self.channel_std: tuple[float, ...] | None = None

    @property
    def train_files(self) -> list[str]:
        """Names of the training files in use, e.g. ``["data_batch_1.bin", ...]``."""
        return [p.name for p in self._train_files]

    def _load(self) -> tuple[Split, Split]:
        if self._splits is None:
            parts = [read_cifar10_binary(p) for p in self._train_files]
            y_train = np.concatenate([labels for labels, _ in parts])
            x_train = np.concatenate([images for _, images in parts])
            del parts
            y_val, x_val = read_cifar10_binary(self._val_file)
            mean, std = _channel_stats(x_train)
            self.channel_mean = tuple(float(v) for v in mean)
            self.channel_std = tuple(float(v) for v in std)
            self._splits = (_to_split(x_train, y_train, mean, std), _to_split(x_val, y_val, mean, std))
        return self._splits

    def train_split(self) -> Split:
        return self._load()[0]

    def val_split(self) -> Split:
        return self._load()[1]

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _CifarResNet(blocks=(self.depth - 2) // 6, width=self.width)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    def make_optimizer(self, params: object, lr: float) -> torch.optim.Optimizer:
        """SGD with Nesterov momentum 0.9 and weight decay :attr:`weight_decay`."""
        return torch.optim.SGD(
            params,  # type: ignore[arg-type]
            lr=lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=self.weight_decay,
        )

    def config(self) -> dict[str, object]:
        """Model variant and the files in use (names and record counts).

        The folder path is left out so that the same data in another folder or on another machine hash the same.
        """
        return {
            "name": self.name,
            "depth": self.depth,
            "width": self.width,
            "weight_decay": self.weight_decay,
            "train_files": self.train_files,
            "train_records": self.train_records,
            "val_records": self.val_records,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_dir={str(self.data_dir)!r}, depth={self.depth}, width={self.width})"


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and population standard deviation of uint8 images (n, 3, H, W), in [0, 1] units."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    mean = np.empty(3)
    std = np.empty(3)
    for c in range(3):
        counts = np.bincount(images[:, c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean[c] = (counts * levels).sum() / total
        var = (counts * (levels - mean[c]) ** 2).sum() / total
        std[c] = np.sqrt(var) if var > 0 else 1.0
    return mean, std


def _to_split(images: np.ndarray, labels: np.ndarray, mean: np.ndarray, std: np.ndarray) -> Split:
    x = torch.from_numpy(images).to(torch.float32).div_(255.0)
    x.sub_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    x.div_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    return Split(x, torch.from_numpy(labels.astype(np.int64)))
