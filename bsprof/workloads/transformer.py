"""A small decoder-only (causal) transformer language model on synthetic random tokens.

The data are uniformly random token ids drawn from a fixed seed, so nothing is downloaded and every instance
with the same arguments sees the same tensors. Each example is a sequence of ``seq_len + 1`` tokens: the
input is the first ``seq_len`` of them and the target is the same sequence shifted by one (next-token
prediction). Random tokens carry no signal beyond their uniform distribution, so the loss cannot fall below
``ln(vocab_size)`` nats; the workload is meant for throughput measurements and has no target.

One sample is one sequence: multiply samples/s by ``seq_len`` for tokens/s.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bsprof.workload import Split, Workload

__all__ = ["SyntheticTransformer", "TinyCausalLM"]


class _Block(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention and a GELU MLP, each with a residual."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        # (b, t, d) -> (b, heads, t, d / heads)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        attn = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyCausalLM(nn.Module):
    """Token embedding + learned positions, ``n_layers`` causal pre-norm blocks, final LayerNorm, LM head.

    Args:
        vocab_size: Number of token ids.
        seq_len: Longest input sequence (tokens); shorter inputs use the first positions.
        d_model: Embedding width.
        n_layers: Number of transformer blocks.
        n_heads: Attention heads per block; must divide ``d_model``.
        d_ff: Hidden width of each block's MLP.
    """

    def __init__(self, vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Parameter(torch.zeros(seq_len, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        # GPT-2 style initialisation; residual output projections scaled down by depth.
        for name, p in self.named_parameters():
            if p.dim() >= 2 or name == "pos_emb":
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of shape (batch, time, vocab_size) for int64 ``tokens`` of shape (batch, time)."""
        t = tokens.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than the model's seq_len {self.seq_len}")
        x = self.tok_emb(tokens) + self.pos_emb[:t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class SyntheticTransformer(Workload):
    """Next-token prediction on random tokens with a small causal transformer, AdamW; throughput only.

    Inputs are int64 token ids of shape (n, seq_len); targets are the next tokens, int64 of shape (n, seq_len).
    The model returns logits of shape (batch, seq_len, vocab_size). The loss is the cross-entropy (nats) over
    every position; the metric is token accuracy (a fraction in [0, 1]).

    Args:
        vocab_size: Number of token ids.
        seq_len: Tokens per example.
        d_model: Embedding width.
        n_layers: Number of transformer blocks.
        n_heads: Attention heads; must divide ``d_model``.
        d_ff: Hidden width of each MLP; ``None`` means ``4 * d_model``.
        n_train: Training sequences.
        n_val: Validation sequences.
        data_seed: Seed of the token generator (independent of the model seed).

    Raises:
        ValueError: A non-positive size, or ``n_heads`` not dividing ``d_model``.
    """

    name = "synthetic-transformer"
    description = "small decoder-only transformer on random tokens, AdamW; throughput only (no target)"
    metric_name = "token_accuracy"
    metric_range = (0.0, 1.0)
    higher_is_better = True
    target = None
    base_lr = 1e-3
    base_batch_size = 64
    max_lr = 1e-2
    eval_batch_size = 512

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        seq_len: int = 64,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        n_train: int = 4096,
        n_val: int = 512,
        data_seed: int = 0,
    ) -> None:
        d_ff = 4 * d_model if d_ff is None else d_ff
        sizes = {
            "vocab_size": vocab_size,
            "seq_len": seq_len,
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "d_ff": d_ff,
            "n_train": n_train,
            "n_val": n_val,
        }
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"{key} must be positive, got {value}")
        if d_model % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.d_ff = d_ff
        self.n_train = n_train
        self.n_val = n_val
        self.data_seed = data_seed
        self._splits: tuple[Split, Split] | None = None

    def _load(self) -> tuple[Split, Split]:
        if self._splits is None:
            gen = torch.Generator().manual_seed(self.data_seed)
            seqs = torch.randint(
                0, self.vocab_size, (self.n_train + self.n_val, self.seq_len + 1), generator=gen, dtype=torch.int64
            )
            inputs, targets = seqs[:, :-1].contiguous(), seqs[:, 1:].contiguous()
            n = self.n_train
            self._splits = (Split(inputs[:n], targets[:n]), Split(inputs[n:], targets[n:]))
        return self._splits

    def train_split(self) -> Split:
        return self._load()[0]

    def val_split(self) -> Split:
        return self._load()[1]

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return TinyCausalLM(self.vocab_size, self.seq_len, self.d_model, self.n_layers, self.n_heads, self.d_ff)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy (nats per token) over every position of (B, T, V) logits and (B, T) targets."""
        return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))

    def make_optimizer(self, params: object, lr: float) -> torch.optim.Optimizer:
        """AdamW with betas (0.9, 0.95) and weight decay 0.01, as usual for transformer LMs."""
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)  # type: ignore[arg-type]

    def config(self) -> dict[str, object]:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "d_ff": self.d_ff,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "data_seed": self.data_seed,
        }
