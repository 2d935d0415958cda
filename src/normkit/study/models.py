"""The study's models: a small byte-level decoder-only transformer with a choice of norm
placement and norm type, and a byte-level LSTM with optional layer normalization.

Readable top to bottom (nanoGPT's bar).  Every norm is made by :func:`make_norm`, so the
placement and norm-type experiments differ in exactly one place, and the batch-dependence check
finds the norm layers by their types (:data:`NORM_TYPES`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import DyT, LayerNorm, RMSNorm

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


class _LSTMCell(nn.Module):
    """An LSTM cell, optionally layer-normalized as in Ba et al. 2016 (eq. 20–22):
    ``gates = LN(W_x x) + LN(W_h h) + b``, ``c' = f·c + i·g``, ``h' = o·tanh(LN(c'))``.
    Both variants run this same Python code, so their wall times compare like for like."""

    def __init__(self, n_in: int, hidden: int, layer_norm: bool):
        super().__init__()
        self.hidden = hidden
        self.wx = nn.Linear(n_in, 4 * hidden, bias=False)
        self.wh = nn.Linear(hidden, 4 * hidden, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * hidden))
        kind = "layer" if layer_norm else "none"
        self.norm_x = make_norm(kind, 4 * hidden)
        self.norm_h = make_norm(kind, 4 * hidden)
        self.norm_c = make_norm(kind, hidden)
        with torch.no_grad():  # forget-gate bias 1: the usual start that lets memory flow
            self.bias[hidden:2 * hidden].fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, n_in) -> (B, T, hidden)
        b, t, _ = x.shape
        gx = self.norm_x(self.wx(x))  # the input projection for all steps at once
        h = x.new_zeros(b, self.hidden)
        c = x.new_zeros(b, self.hidden)
        out = []
        for s in range(t):
            gates = gx[:, s] + self.norm_h(self.wh(h)) + self.bias
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.norm_c(c))
            out.append(h)
        return torch.stack(out, dim=1)


class CharLSTM(nn.Module):
    """A one-layer byte-level LSTM language model, with or without layer normalization.

    Shapes: ``forward(idx)`` takes int64 (B, T) and returns float32 logits (B, T, vocab).
    """

    def __init__(self, layer_norm: bool, hidden: int = 128, emb: int = 64, vocab: int = 256):
        super().__init__()
        self.layer_norm = layer_norm
        self.tok = nn.Embedding(vocab, emb)
        self.cell = _LSTMCell(emb, hidden, layer_norm)
        self.head = nn.Linear(hidden, vocab)
        bound = 1.0 / math.sqrt(hidden)  # torch.nn.LSTM's own init range
        for name, p in self.cell.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.uniform_(p, -bound, bound)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.cell(self.tok(idx)))
