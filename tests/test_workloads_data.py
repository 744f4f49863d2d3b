"""The DataLoader-backed built-in workloads: HF GPT-2 on stdlib bytes, ResNet-18 on upsampled digits."""

from __future__ import annotations

import pytest
import torch

from bsprof.engine.batches import batch_size_of
from bsprof.engine.data import eval_batches
from bsprof.engine.validate import check_dataset, check_loader_factory, check_loss
from bsprof.workloads.vision import AugmentedImages, ResNet18, VisionResNet18, torchvision_or_reason

torchvision, NO_TORCHVISION = torchvision_or_reason()


def test_vision_workload_builtin_backend_trains_through_its_dataset() -> None:
    w = VisionResNet18(width=4, image_size=16)
    train = w.train_split()
    assert isinstance(train, AugmentedImages) and len(train) == 1437
    check_dataset(train, None, "digits-resnet18")
    image, label = train[0]
    assert image.shape == (1, 16, 16) and label.dtype == torch.long
    model = w.build_model(0)
    assert isinstance(model, ResNet18)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 20  # 1 stem + 16 + 3 shortcuts
    batch = torch.utils.data.default_collate([train[i] for i in range(4)])
    loss = w.compute_loss(model, batch)
    check_loss(loss, "compute_loss")
    x, y = next(eval_batches(w.val_split(), 8))
    assert model(x).shape == (8, 10) and batch_size_of((x, y)) == 8


def test_vision_augmentation_is_a_translation_of_the_image() -> None:
    images = torch.arange(16.0).view(1, 1, 4, 4)
    data = AugmentedImages(images, torch.zeros(1, dtype=torch.long), pad=1)
    torch.manual_seed(0)
    crops = {tuple(data[0][0].flatten().tolist()) for _ in range(40)}
    assert len(crops) > 1  # random
    padded = torch.nn.functional.pad(images[0], (1, 1, 1, 1))
    windows = {tuple(padded[:, dy : dy + 4, dx : dx + 4].flatten().tolist()) for dy in range(3) for dx in range(3)}
    assert crops <= windows


def test_vision_channels_last() -> None:
    w = VisionResNet18(width=4, image_size=8, channels_last=True)
    model = w.build_model(0)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = torch.utils.data.default_collate([w.train_split()[i] for i in range(2)])
    check_loss(w.compute_loss(model, batch), "compute_loss")


@pytest.mark.skipif(torchvision is None, reason=str(NO_TORCHVISION))
def test_vision_torchvision_backend() -> None:  # pragma: no cover - torchvision does not import on this host
    w = VisionResNet18(width=64, image_size=16, backend="torchvision")
    model = w.build_model(0)
    assert type(model).__module__.startswith("torchvision")
    batch = torch.utils.data.default_collate([w.train_split()[i] for i in range(2)])
    check_loss(w.compute_loss(model, batch), "compute_loss")


def test_vision_without_torchvision_asked_for_it_is_bad_input() -> None:
    if torchvision is not None:
        pytest.skip("torchvision imports here")
    from bsprof.errors import BadInput

    with pytest.raises(BadInput, match="torchvision"):
        VisionResNet18(width=64, backend="torchvision").build_model(0)
    assert isinstance(VisionResNet18(width=64).build_model(0), ResNet18)  # auto falls back


def test_hf_workload_dict_batches_and_model_loss() -> None:
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    from bsprof.workloads.hf_text import HFStdlibLM

    w = HFStdlibLM(n_layer=1, n_embd=16, n_head=2, seq_len=16, max_bytes=1 << 16)
    check_loader_factory(w.make_loader, "hf")
    batch = next(iter(w.make_loader(4, 0)))
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and batch["input_ids"].shape == (4, 16)
    model = w.build_model(0)
    loss = w.compute_loss(model, batch)
    check_loss(loss, "compute_loss")
    assert float(loss.detach()) == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.1)  # ~uniform at init
    outputs, targets = w.eval_outputs(model, next(eval_batches(w.val_split(), 8)))
    assert outputs.shape == (8 * 15, 256) and targets.shape == (8 * 15,)
    same = [next(iter(w.make_loader(4, 1)))["input_ids"] for _ in range(2)]
    assert torch.equal(same[0], same[1])  # the seed fixes the order
