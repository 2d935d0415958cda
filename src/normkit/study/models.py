"""The study's models: a small byte-level decoder-only transformer with a choice of norm
placement and norm type, and a byte-level LSTM with optional layer normalization.

Readable top to bottom (nanoGPT's bar).  Every norm is made by :func:`make_norm`, so the
placement and norm-type experiments differ in exactly one place, and the batch-dependence check
finds the norm layers by their types (:data:`NORM_TYPES`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import DyT, LayerNorm, LayerNormLSTM, RMSNorm

__all__ = [
    "PLACEMENTS",
    "NORMS",
    "NORM_TYPES",
    "NoNorm",
    "TokenBatchNorm",
    "make_norm",
    "TinyGPT",
    "CharLSTM",
]

PLACEMENTS = ("none", "post", "pre", "peri")
NORMS = ("layer", "rms", "dyt", "none", "batch")


class NoNorm(nn.Identity):
    """The identity, standing where a norm would be (keeps the no-norm model's module tree the
    same shape as the others'; ``normkit.watch`` does not treat it as a norm)."""


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channel (last) dim of a (B, T, C) tensor: statistics over all B·T
    tokens of the batch — the batch-dependent alternative the study compares LN against."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        shape = x.shape
        return super().forward(x.reshape(-1, shape[-1])).reshape(shape)


NORM_TYPES = (LayerNorm, RMSNorm, DyT, NoNorm, TokenBatchNorm)


def make_norm(kind: str, dim: int) -> nn.Module:
    """A norm layer of ``kind`` (one of :data:`NORMS`) over the last dim ``dim``."""
    if kind == "layer":
        return LayerNorm(dim)
    if kind == "rms":
        return RMSNorm(dim)
    if kind == "dyt":
        return DyT(dim)
    if kind == "none":
        return NoNorm()
    if kind == "batch":
        return TokenBatchNorm(dim)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class _Block(nn.Module):
    """One transformer block; ``placement`` says where its norms sit (Xiong et al. 2020):

    * none: ``x + f(x)``                       (no norm at all)
    * post: ``norm(x + f(x))``                 (the original Transformer)
    * pre:  ``x + f(norm(x))``                 (GPT-2 and most LLMs)
    * peri: ``x + norm_out(f(norm_in(x)))``    (sandwich / Peri-LN: both sides of f)
    """

    def __init__(self, dim: int, heads: int, placement: str, norm: str):
        super().__init__()
        self.placement = placement
        self.attn = _Attention(dim, heads)
        self.mlp = _MLP(dim)
        kind = "none" if placement == "none" else norm
        self.norm1 = make_norm(kind, dim)
        self.norm2 = make_norm(kind, dim)
        if placement == "peri":
            self.norm1_out = make_norm(kind, dim)
            self.norm2_out = make_norm(kind, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.placement
        if p == "post":
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        if p == "pre":
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        if p == "peri":
            x = x + self.norm1_out(self.attn(self.norm1(x)))
            return x + self.norm2_out(self.mlp(self.norm2(x)))
        # "none": the norms are NoNorm identities
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """A byte-level decoder-only transformer.

    Args:
        placement: one of :data:`PLACEMENTS`.
        norm: one of :data:`NORMS` (ignored, i.e. no norm, when ``placement="none"``).
        layers, dim, heads, context: depth, width, attention heads, maximum sequence length.
        vocab: 256 for bytes.

    Shapes: ``forward(idx)`` takes int64 (B, T) with T ≤ context and returns float32 logits
    (B, T, vocab).  Pre- and peri-LN end with a final norm before the head (as GPT-2 does);
    post-LN's last block already ends in a norm.
    """

    def __init__(self, placement: str = "pre", norm: str = "layer", layers: int = 6,
                 dim: int = 128, heads: int = 4, context: int = 64, vocab: int = 256):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.placement, self.norm, self.context = placement, norm, context
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, placement, norm) for _ in range(layers))
        final = norm if placement in ("pre", "peri") else "none"
        self.norm_f = make_norm(final, dim)
        self.head = nn.Linear(dim, vocab)
        self.apply(_init_weights)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_f(x))


def _init_weights(m: nn.Module) -> None:
    # One plain init for every variant (normal 0.02, zero biases, as GPT-2 minus its depth
    # scaling): a depth-scaled init is itself a fix for post-LN's instability, and the study
    # wants to see the instability the placement causes, not hide it.
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


class CharLSTM(nn.Module):
    """A one-layer byte-level LSTM language model, with or without layer normalization.

    The LSTM is ``normkit.nn.LayerNormLSTM`` (Ba et al. 2016, eq. 20–22); without layer
    normalization its three norms are swapped for :class:`NoNorm` identities, so both variants
    run this same Python cell and their wall times compare like for like.

    Shapes: ``forward(idx)`` takes int64 (B, T) and returns float32 logits (B, T, vocab).
    """

    def __init__(self, layer_norm: bool, hidden: int = 128, emb: int = 64, vocab: int = 256):
        super().__init__()
        self.layer_norm = layer_norm
        self.tok = nn.Embedding(vocab, emb)
        self.lstm = LayerNormLSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)
        # The LSTM's weights are drawn again after the head's: the random stream, and with it
        # every recorded study result, stays the one the study has always used.
        self.lstm.reset_parameters()
        if not layer_norm:
            for cell in self.lstm.cells:
                cell.norm_ih, cell.norm_hh, cell.norm_c = NoNorm(), NoNorm(), NoNorm()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.tok(idx))[0])
