"""Built-in workloads, listed by ``bsprof workloads``.

Each entry maps a name to a zero-argument factory and a one-line description. Factories import their
module lazily so that listing the workloads stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bsprof.workload import Workload

__all__ = ["BUILTINS", "Builtin"]


@dataclass(frozen=True)
class Builtin:
    """A built-in workload: where its factory lives and what it is."""

    name: str
    target: str  # "module:callable"
    description: str

    def factory(self) -> Workload:
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)()


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin(
            "digits-mlp",
            "bsprof.workloads.digits:DigitsMLP",
            "scikit-learn's bundled 8x8 digits (1,797 images), 2-layer MLP, SGD+momentum; target val accuracy 0.95",
        ),
        Builtin(
            "digits-cnn",
            "bsprof.workloads.digits:DigitsCNN",
            "the same digits as 1x8x8 images, small conv net, SGD+momentum; target val accuracy 0.95",
        ),
        Builtin(
            "cifar10-resnet",
            "bsprof.workloads.cifar10:Cifar10ResNet",
            "CIFAR-10 from a local folder, official binary format (--data-dir or BSPROF_CIFAR10_DIR), small ResNet",
        ),
        Builtin(
            "digits-resnet18",
            "bsprof.workloads.vision:VisionResNet18",
            "digits upsampled to 16x16, ResNet-18 (width 16) fed by a DataLoader with random crops; target 0.9",
        ),
        Builtin(
            "cifar10-resnet18",
            "bsprof.workloads.vision:cifar10_resnet18",
            "CIFAR-10 binary files (--data-dir), ResNet-18 (torchvision's if it imports), DataLoader with crops",
        ),
        Builtin(
            "hf-gpt2-stdlib",
            "bsprof.workloads.hf_text:HFStdlibLM",
            "HuggingFace GPT-2 config (2x64, no download) on Python stdlib source bytes, dict batches, model's .loss; "
            "needs bsprof[hf]",
        ),
        Builtin(
            "synthetic-transformer",
            "bsprof.workloads.transformer:SyntheticTransformer",
            "small decoder-only transformer on random tokens; throughput only (no target)",
        ),
    )
}
