"""Small models for the telemetry tests and the watch-overhead benchmark.

``TinyTransformer``: a 6-block pre-LN decoder (token embedding, per block LN → attention →
residual, LN → MLP → residual, final LN, LM head): 13 norm layers, in forward order
``blocks.0.ln1, blocks.0.ln2, ..., blocks.5.ln2, ln_f``.  Every Linear is an ``InjectLinear``
that can put NaN into its output rows (forward) or into the gradient it passes back (backward),
so a test knows exactly which module produced a non-finite value.

``Branches``: k independent Linear → LayerNorm branches on k slices of the input features, so
shifting one slice's distribution drifts exactly one norm layer.

``ConvNet`` and ``ConvNeXtish``: convolutional models that modify their norm layers' outputs in
place, the way real vision models do (torchvision's ``ReLU(inplace=True)``, Hugging Face ResNet's
``hidden_state += residual``, ConvNeXt's channels-last LayerNorm permuted back): a watch must
leave every one of those working, with the same bits.
"""

from __future__ import annotations

import torch
from torch import nn


class _NaNGrad(torch.autograd.Function):
    """Identity forward; backward puts NaN into the chosen rows of the incoming gradient."""

    @staticmethod
    def forward(ctx, x, rows):
        ctx.rows = rows
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g.reshape(-1, g.shape[-1])[list(ctx.rows)] = float("nan")
        return g, None


class InjectLinear(nn.Linear):
    """A Linear that can inject NaN: ``inject_forward`` / ``inject_backward`` are row indices
    (of the output flattened to (rows, features)); empty = off."""

    inject_forward: tuple[int, ...] = ()
    inject_backward: tuple[int, ...] = ()

    def forward(self, x):
        y = super().forward(x)
        if self.inject_backward and torch.is_grad_enabled():
            y = _NaNGrad.apply(y, self.inject_backward)
        if self.inject_forward:
            y = y.clone()
            y.reshape(-1, y.shape[-1])[list(self.inject_forward)] = float("nan")
        return y


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = InjectLinear(d, 3 * d)
        self.proj = InjectLinear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = InjectLinear(d, 4 * d)
        self.act = nn.GELU()
        self.fc2 = InjectLinear(4 * d, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d, heads, eps):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """6-block pre-LN decoder; ``norm_names()`` lists its 13 norms in forward order."""

    def __init__(self, vocab=64, d=32, heads=2, layers=6, seq=16, eps=1e-5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, eps) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=eps)
        self.head = InjectLinear(d, vocab)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))

    def norm_names(self) -> list[str]:
        names = []
        for i in range(len(self.blocks)):
            names += [f"blocks.{i}.ln1", f"blocks.{i}.ln2"]
        return names + ["ln_f"]

    def feeder_of(self, k: int) -> str:
        """The Linear whose output reaches norm k (k ≥ 1) through the residual add: the
        attention projection for an ln2, the previous block's fc2 for an ln1."""
        b, which = divmod(k, 2)
        if which == 1:
            return f"blocks.{b}.attn.proj"
        return f"blocks.{b - 1}.mlp.fc2"


class Branches(nn.Module):
    """``k`` independent branches: slice i of the input → Linear → LayerNorm; outputs summed."""

    def __init__(self, k=4, d=16):
        super().__init__()
        self.d = d
        self.lin = nn.ModuleList(nn.Linear(d, d) for _ in range(k))
        self.norm = nn.ModuleList(nn.LayerNorm(d) for _ in range(k))

    def forward(self, x):
        parts = x.split(self.d, dim=-1)
        return sum(n(l(p)) for p, l, n in zip(parts, self.lin, self.norm, strict=True))


class ConvNet(nn.Module):
    """Conv → BatchNorm → ReLU(inplace=True) → Conv → GroupNorm, then in-place ops on norm outputs:
    ``+=`` a residual, ``relu_()``, and in-place ops through views (transpose + slice, view)."""

    def __init__(self, c=8, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.gn = nn.GroupNorm(2, c)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = self.act(self.bn1(self.conv1(x)))  # in-place ReLU module on a BatchNorm output
        y = self.gn(self.conv2(h))
        y += h  # += on a GroupNorm output
        y.relu_()
        z = self.bn2(self.conv3(y))
        z.transpose(2, 3)[..., :2].mul_(0.5)  # in place through a transposed, sliced view
        z.view(z.shape[0], -1).add_(0.1)  # and through a reshaping view
        return self.head(z.mean(dim=(2, 3)))


class ChannelsLayerNorm(nn.Module):
    """LayerNorm over the channels of (B, C, H, W): permute → LayerNorm → permute back (a view),
    as ConvNeXt's ``LayerNorm2d`` does."""

    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pw1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(4 * c, c)

    def forward(self, x):
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # channels last
        h = self.pw2(self.act(self.pw1(h))).permute(0, 3, 1, 2)
        h += x  # in-place residual add on a permuted view
        return h


class ConvNeXtish(nn.Module):
    """A ConvNeXt-style net: patchify stem → channels LayerNorm (its permuted-back output then
    gets ``+=`` in place) → blocks of depthwise conv → LayerNorm over channels → MLP."""

    def __init__(self, c=16, depth=2, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.stem_norm = ChannelsLayerNorm(c)
        self.pos = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.blocks = nn.Sequential(*(ConvNeXtBlock(c) for _ in range(depth)))
        self.head_norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = self.stem_norm(self.stem(x))
        h += self.pos  # in place on a view of the LayerNorm's output
        h = self.blocks(h)
        return self.head(self.head_norm(h.mean(dim=(2, 3))))


def lm_batch(batch=4, seq=16, vocab=64, generator=None):
    """(idx, targets) of random tokens."""
    idx = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    return idx[:, :-1], idx[:, 1:]


def train_step(model, opt, idx, tgt):
    logits = model(idx)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss
