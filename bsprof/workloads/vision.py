"""A ResNet-18-style image classifier fed by a DataLoader with augmentation, with or without torchvision.

Data need no download: scikit-learn's bundled 8x8 digits, upsampled (bilinear) to ``image_size`` pixels
square, standardised, one channel, with the fixed stratified split of :mod:`bsprof.workloads.digits`; or,
for real runs, CIFAR-10 from its official binary files (:mod:`bsprof.workloads.cifar10`, ``--data-dir``).
Training examples are augmented per item, in the dataset's ``__getitem__``, by a random crop of the image
padded by ``image_size / 8`` pixels (a random translation; no flips, digits are not mirror-symmetric), so the
augmentation runs in the DataLoader's workers and its cost shows in the data-wait time.

The network is ResNet-18 (He et al. 2016: four stages of two basic blocks, widths w, 2w, 4w, 8w) with the
usual small-image stem (3x3 convolution, stride 1, no max-pool). With torchvision importable and the
standard width 64, torchvision's ``resnet18`` (stem replaced likewise) and its ``RandomCrop`` are used;
otherwise bsprof's own implementation of the same architecture, so the workload runs where torchvision is
absent or broken (on the CPU-only torch wheel the registry's torchvision wheels fail to import with
``operator torchvision::nms does not exist``). ``channels_last`` trains in NHWC memory format (faster convs
on tensor-core GPUs).

Scale: ``digits-resnet18`` (width 16, 16x16 pixels) reaches the target in a minute or two on a CPU; on a
GPU use width 64 and 32x32 pixels (``VisionResNet18(width=64, image_size=32, channels_last=True)``) or the
``cifar10-resnet18`` built-in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bsprof.workload import Split, Workload

__all__ = ["AugmentedImages", "ResNet18", "VisionResNet18", "cifar10_resnet18", "torchvision_or_reason"]


def torchvision_or_reason() -> tuple[Any, str | None]:
    """``(torchvision, None)`` when it imports beside this torch, else ``(None, why)``."""
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - a broken build raises RuntimeError/OSError, not only ImportError
        return None, f"torchvision does not import here: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return torchvision, None


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stem, stages of 2 basic blocks at widths w, 2w, 4w, 8w, global pooling.

    Args:
        in_channels: Image channels.
        num_classes: Output classes.
        width: Channels of the first stage (64 in the original network).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        c = width
        for i, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            layers += [_BasicBlock(c, c_out, stride), _BasicBlock(c_out, c_out, 1)]
            c = c_out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def _torchvision_resnet18(torchvision: Any, in_channels: int, num_classes: int) -> nn.Module:
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


class AugmentedImages(torch.utils.data.Dataset):
    """Images with a random padded crop per item (a translation of up to ``pad`` pixels), and their labels.

    Args:
        images: Float tensor (n, channels, height, width).
        labels: Long tensor (n,).
        pad: Padding (pixels) before the random crop back to the original size; 0 disables augmentation.
        torchvision: The torchvision module to take ``RandomCrop`` from, or ``None`` for bsprof's own crop.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, pad: int, torchvision: Any = None) -> None:
        self.images, self.labels, self.pad = images, labels, pad
        size = images.shape[-2:]
        self._crop = torchvision.transforms.RandomCrop(tuple(size), padding=pad) if torchvision and pad else None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.pad:
            if self._crop is not None:
                image = self._crop(image)
            else:
                h, w = image.shape[-2:]
                padded = nn.functional.pad(image, (self.pad,) * 4)
                dy, dx = (int(v) for v in torch.randint(0, 2 * self.pad + 1, (2,)))
                image = padded[:, dy : dy + h, dx : dx + w]
        return image, self.labels[i]


def _digits_images(image_size: int) -> tuple[Split, Split]:
    from bsprof.workloads.digits import digits_splits

    def up(split: Split) -> Split:
        images = split.inputs.view(-1, 1, 8, 8)
        if image_size != 8:
            images = nn.functional.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
        return Split(images.contiguous(), split.targets)

    train, val = digits_splits()
    return up(train), up(val)


def _cifar_images(data_dir: str | None) -> tuple[Split, Split]:
    from bsprof.workloads.cifar10 import Cifar10ResNet

    w = Cifar10ResNet(data_dir=data_dir)
    return w.train_split(), w.val_split()


class VisionResNet18(Workload):
    """ResNet-18 through a DataLoader with per-item augmentation, on digits (upsampled) or CIFAR-10.

    Args:
        dataset: ``digits`` (bundled with scikit-learn) or ``cifar10`` (binary files in ``data_dir``).
        width: Channels of the first stage (64: the original ResNet-18, torchvision's when available).
        image_size: Side of the (square) digits images in pixels after upsampling (CIFAR-10: always 32).
        channels_last: Train in channels-last (NHWC) memory format.
        num_workers: DataLoader worker processes for the augmentation.
        backend: ``auto`` (torchvision when it imports and ``width == 64``), ``torchvision`` or ``builtin``.
        data_dir: CIFAR-10 folder (else ``BSPROF_CIFAR10_DIR``).
    """

    name = "digits-resnet18"
    description = "digits upsampled to 16x16, ResNet-18 (width 16) via DataLoader with random crops; target 0.9"
    metric_name = "accuracy"
    higher_is_better = True
    target = 0.9
    base_lr = 0.02
    base_batch_size = 16
    max_lr = 0.4
    eval_batch_size = 512

    def __init__(
        self,
        dataset: str = "digits",
        *,
        width: int = 16,
        image_size: int = 16,
        channels_last: bool = False,
        num_workers: int = 0,
        backend: str = "auto",
        data_dir: str | None = None,
    ) -> None:
        if dataset not in ("digits", "cifar10"):
            raise ValueError(f"dataset must be digits or cifar10, got {dataset!r}")
        if backend not in ("auto", "torchvision", "builtin"):
            raise ValueError(f"backend must be auto, torchvision or builtin, got {backend!r}")
        self.dataset = dataset
        self.width, self.image_size = width, (32 if dataset == "cifar10" else image_size)
        self.channels_last, self.num_workers = channels_last, num_workers
        self.data_dir = data_dir
        self.backend = backend
        self._cache: tuple[Split, Split] | None = None
        if dataset == "cifar10":
            self.name = "cifar10-resnet18"
            self.description = "CIFAR-10 (local binary files), ResNet-18 via DataLoader with random crops"
            self.target = 0.8
            self.base_lr, self.base_batch_size, self.max_lr = 0.1, 128, 1.6

    def _torchvision(self) -> Any:
        if self.backend == "builtin" or (self.backend == "auto" and self.width != 64):
            return None
        torchvision, why = torchvision_or_reason()
        if torchvision is None and self.backend == "torchvision":
            from bsprof.errors import BadInput

            raise BadInput(f"backend='torchvision' asked for, but {why}")
        return torchvision

    def _splits(self) -> tuple[Split, Split]:
        if self._cache is None:  # read (CIFAR-10) or upsampled (digits) once per workload instance
            self._cache = _digits_images(self.image_size) if self.dataset == "digits" else _cifar_images(self.data_dir)
        return self._cache

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        in_channels = 1 if self.dataset == "digits" else 3
        torchvision = self._torchvision()
        if torchvision is not None:
            model = _torchvision_resnet18(torchvision, in_channels, 10)
        else:
            model = ResNet18(in_channels, 10, self.width)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def train_split(self) -> AugmentedImages:
        train = self._splits()[0]
        return AugmentedImages(train.inputs, train.targets, max(1, self.image_size // 8), self._torchvision())

    def val_split(self) -> Split:
        return self._splits()[1]

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)

    def compute_loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.loss(model(images), labels)

    def config(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dataset": self.dataset,
            "width": self.width,
            "image_size": self.image_size,
            "channels_last": self.channels_last,
            "num_workers": self.num_workers,
            "torchvision": self._torchvision() is not None,
        }


def cifar10_resnet18() -> VisionResNet18:
    """The ``cifar10-resnet18`` built-in: ResNet-18 at full width on CIFAR-10 (``--data-dir``), 2 loader workers,
    channels-last (a GPU-scale workload)."""
    return VisionResNet18("cifar10", width=64, channels_last=True, num_workers=2)
