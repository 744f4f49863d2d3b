"""A HuggingFace ``transformers`` GPT-2-style causal language model on the Python standard library's source.

The model is built from a ``GPT2Config`` (random initialisation; no weights are downloaded) and the text is
already on every machine that runs bsprof: the ``.py`` files at the top level of the standard library
(``sysconfig.get_paths()["stdlib"]``), sorted by name and concatenated. Tokens are bytes (vocabulary 256),
so no tokenizer is downloaded either. Every ``seq_len`` bytes form one example, a dict of ``input_ids``,
``attention_mask`` and ``labels`` (the model shifts the labels itself); one file in ten (every tenth by
name) is held out for validation.

The workload exercises the general data path: its own loader factory (a ``DataLoader`` with a seeded
shuffling sampler, dict batches), the model's own loss (``model(**batch).loss`` through
:meth:`compute_loss`), and an evaluation hook that turns logits into next-byte predictions. The metric is
next-byte top-1 accuracy on the held-out files (a fraction); predicting the most frequent byte (space) scores
about 0.15; the target, 0.35, needs common keywords and indentation (a few hundred steps at B=16).

Scale: the defaults (2 layers, width 64, 64-byte sequences, 1 MiB of text) train to the target in a minute
or two on a CPU; a GPU run would raise ``n_layer``/``n_embd``/``seq_len`` and ``max_bytes`` through the
constructor (a ``file.py:factory`` returning ``HFStdlibLM(...)``).

Requires the ``hf`` extra (``pip install 'bsprof[hf]'``); the import error names it.
"""

from __future__ import annotations

import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from bsprof.errors import BadInput
from bsprof.workload import Workload

__all__ = ["ByteWindows", "HFStdlibLM", "stdlib_text"]

_VAL_EVERY = 10


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise BadInput(f"the hf-gpt2-stdlib workload needs transformers: pip install 'bsprof[hf]' ({e})") from None
    return transformers


@lru_cache(maxsize=4)
def stdlib_text(max_bytes: int) -> tuple[bytes, bytes]:
    """(training, validation) bytes of the standard library's top-level modules, ``max_bytes`` in all.

    Files are read in name order; every tenth goes to validation, until validation holds ``max_bytes / 32``
    bytes and training the rest (evaluation runs often, so it is kept small).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    n_val = max(max_bytes // 32, 1)
    n_train = max_bytes - n_val
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        if len(train) >= n_train and len(val) >= n_val:
            break
        (val if i % _VAL_EVERY == _VAL_EVERY - 1 else train).extend(f.read_bytes())
    if len(train) < n_train or len(val) < n_val:
        raise BadInput(f"the standard library folder {root} holds fewer than {max_bytes} bytes of Python source")
    return bytes(train[:n_train]), bytes(val[:n_val])


class ByteWindows(torch.utils.data.Dataset):
    """Consecutive, non-overlapping windows of ``seq_len`` bytes as causal-LM examples.

    Args:
        data: The text's bytes.
        seq_len: Bytes (tokens) per example.
    """

    def __init__(self, data: bytes, seq_len: int) -> None:
        n = len(data) // seq_len
        if n < 2:
            raise BadInput(f"{len(data)} bytes of text make fewer than two {seq_len}-byte examples")
        self.tokens = torch.frombuffer(bytearray(data[: n * seq_len]), dtype=torch.uint8).view(n, seq_len)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[i].long()
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class HFStdlibLM(Workload):
    """GPT-2-style causal LM (HuggingFace ``GPT2LMHeadModel`` from a config) on standard-library source bytes.

    Args:
        n_layer: Transformer blocks.
        n_embd: Embedding width.
        n_head: Attention heads.
        seq_len: Bytes per example (and the model's context length).
        max_bytes: Bytes of text read (training and validation together).
        num_workers: DataLoader worker processes.
    """

    name = "hf-gpt2-stdlib"
    description = "HF GPT-2 config (2x64) on Python stdlib source bytes, DataLoader + dict batches; target 0.35"
    metric_name = "next-byte accuracy"
    higher_is_better = True
    target = 0.35
    base_lr = 1e-3
    base_batch_size = 16
    max_lr = 4e-3
    eval_batch_size = 256

    def __init__(
        self,
        n_layer: int = 2,
        n_embd: int = 64,
        n_head: int = 2,
        seq_len: int = 64,
        max_bytes: int = 1 << 20,
        num_workers: int = 0,
    ) -> None:
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.seq_len = seq_len
        self.max_bytes = max_bytes
        self.num_workers = num_workers

    def _datasets(self) -> tuple[ByteWindows, ByteWindows]:
        train, val = stdlib_text(self.max_bytes)
        return ByteWindows(train, self.seq_len), ByteWindows(val, self.seq_len)

    def build_model(self, seed: int) -> torch.nn.Module:
        transformers = _transformers()
        transformers.logging.set_verbosity_error()
        config = transformers.GPT2Config(
            vocab_size=256,
            n_positions=self.seq_len,
            n_embd=self.n_embd,
            n_layer=self.n_layer,
            n_head=self.n_head,
            bos_token_id=0,
            eos_token_id=0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(config)

    def make_loader(self, batch_size: int, seed: int) -> torch.utils.data.DataLoader:
        """A shuffling DataLoader over the training windows, its order seeded by ``seed``."""
        return torch.utils.data.DataLoader(
            self._datasets()[0],
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            num_workers=self.num_workers,
        )

    def train_split(self) -> ByteWindows:
        return self._datasets()[0]

    def val_split(self) -> ByteWindows:
        return self._datasets()[1]

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own causal-LM loss (mean over predicted tokens)."""
        return model(**batch).loss

    def eval_outputs(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-byte logits and the bytes they predict, flattened over positions."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits[:, :-1].reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1)

    def make_optimizer(self, params: object, lr: float) -> torch.optim.Optimizer:
        """AdamW (weight decay 0.01), as transformers are usually trained."""
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)  # type: ignore[arg-type]

    def config(self) -> dict[str, object]:
        import sys

        return {
            "name": self.name,
            "n_layer": self.n_layer,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "seq_len": self.seq_len,
            "max_bytes": self.max_bytes,
            "num_workers": self.num_workers,
            "python": sys.version.split()[0],  # the text is this Python's standard library
        }
