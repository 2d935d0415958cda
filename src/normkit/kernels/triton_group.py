"""Triton kernels for GroupNorm, forward and backward, NCHW and channels-last: the interface of
``cpu.group_forward`` / ``cpu.group_backward``, the math of ``reference.group_norm``.

One program per (sample, group) row.  The row is walked in tiles of (channels × spatial
positions), addressed by strides, so one kernel serves both layouts: NCHW (a group is one
contiguous run) and channels-last (C/G channels strided by C).  Tile sizes are functions of
(C, S, G) alone (``_tiles``), so a sample's bits do not depend on the batch.

Statistics as ``triton.py``'s looped rows: m1 is the mean of the first tile; each tile adds its
own centred sum of squares about its mean of d = v − m1, merged with Chan's formula (never
E[x²] − E[x]²); float32 accumulation for every input dtype; y = x̂·γ_c + β_c with
x̂ = ((v − m1) − dm)·rstd.  Backward: per channel Σ dy and Σ dy·x̂ (this sample's dβ / dγ
partials, written to a (2, B, C) buffer and added over samples by torch's sum, which is
deterministic), c1 = Σ γ_c·Σ dy, c2 = Σ γ_c·Σ dy·x̂, dx = rstd·(γ_c·dy − c1/L − x̂·c2/L).

Imported only where ``_group`` chose the triton backend (triton is importable then).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import compute_dtype

__all__ = ["group_forward", "group_backward"]

_TILE = 4096  # elements per tile: 16 fp32 values per thread at 8 warps


@triton.jit
def _tile(X, base, c0, s0, CG, S, sc, ss, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    cs = c0 + tl.arange(0, BLOCK_C)
    sp = s0 + tl.arange(0, BLOCK_S)
    mask = (cs[:, None] < CG) & (sp[None, :] < S)
    offs = base + cs[:, None] * sc + sp[None, :] * ss
    return offs, mask, cs


@triton.jit
def _channels(W, row, c0, G, CG, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels c0 .. c0 + BLOCK_C of the row's group: their indices, which of them exist, and
    their γ (1 without γ; 0 past the group's end, where nothing is stored)."""
    ch = (row % G) * CG + c0 + tl.arange(0, BLOCK_C)
    cm = c0 + tl.arange(0, BLOCK_C) < CG
    w = tl.where(cm, 1.0, 0.0)
    if HAS_W:
        w = tl.load(W + ch, mask=cm, other=0.0)
    return ch, cm, w


@triton.jit
def _gn_fwd_kernel(X, Y, W, B, STATS, S, G, CG, eps, sb, sc, ss,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    base = (row // G) * sb + (row % G) * CG * sc
    # m1: the mean of the first tile
    offs, mask, cs = _tile(X, base, 0, 0, CG, S, sc, ss, BLOCK_C, BLOCK_S)
    v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    n0 = tl.sum(mask.to(tl.float32), axis=None)
    m1 = tl.sum(v, axis=None) / n0
    # Chan's merge of the tiles' (count, mean, centred M2) of d = v - m1
    cnt = m1 * 0.0
    mean = m1 * 0.0
    m2 = m1 * 0.0
    for c0 in range(0, CG, BLOCK_C):
        for s0 in range(0, S, BLOCK_S):
            offs, mask, cs = _tile(X, base, c0, s0, CG, S, sc, ss, BLOCK_C, BLOCK_S)
            v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            nb = tl.sum(mask.to(tl.float32), axis=None)
            d = tl.where(mask, v - m1, 0.0)
            mb = tl.sum(d, axis=None) / nb
            e = tl.where(mask, d - mb, 0.0)
            m2b = tl.sum(e * e, axis=None)
            n = cnt + nb
            delta = mb - mean
            mean = mean + delta * (nb / n)
            m2 = m2 + m2b + delta * delta * (cnt * nb / n)
            cnt = n
    var = tl.maximum(m2 / cnt, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(STATS + row * 3, m1)
    tl.store(STATS + row * 3 + 1, mean)
    tl.store(STATS + row * 3 + 2, rstd)
    for c0 in range(0, CG, BLOCK_C):
        ch, cm, w = _channels(W, row, c0, G, CG, HAS_W, BLOCK_C)
        bb = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_B:
            bb = tl.load(B + ch, mask=cm, other=0.0)
        for s0 in range(0, S, BLOCK_S):
            offs, mask, cs = _tile(X, base, c0, s0, CG, S, sc, ss, BLOCK_C, BLOCK_S)
            v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            xh = ((v - m1) - mean) * rstd
            y = xh * w[:, None] + bb[:, None]
            tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_kernel(X, DY, DX, W, STATS, SUMS, C, S, G, CG, sb, sc, ss, NB,
                   HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    smp = row // G
    base = smp * sb + (row % G) * CG * sc
    m1 = tl.load(STATS + row * 3)
    dm = tl.load(STATS + row * 3 + 1)
    rstd = tl.load(STATS + row * 3 + 2)
    c1 = m1 * 0.0
    c2 = m1 * 0.0
    for c0 in range(0, CG, BLOCK_C):
        ch, cm, w = _channels(W, row, c0, G, CG, HAS_W, BLOCK_C)
        sdy = tl.zeros((BLOCK_C,), tl.float32)
        sdx = tl.zeros((BLOCK_C,), tl.float32)
        for s0 in range(0, S, BLOCK_S):
            offs, mask, cs = _tile(X, base, c0, s0, CG, S, sc, ss, BLOCK_C, BLOCK_S)
            v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            xh = tl.where(mask, ((v - m1) - dm) * rstd, 0.0)
            sdy += tl.sum(d, axis=1)
            sdx += tl.sum(d * xh, axis=1)
        tl.store(SUMS + smp * C + ch, sdx, mask=cm)
        tl.store(SUMS + (NB + smp) * C + ch, sdy, mask=cm)
        c1 += tl.sum(w * sdy, axis=0)
        c2 += tl.sum(w * sdx, axis=0)
    nf = CG * S * 1.0
    nc1 = -(c1 / nf)
    nc2 = -(c2 / nf)
    for c0 in range(0, CG, BLOCK_C):
        ch, cm, w = _channels(W, row, c0, G, CG, HAS_W, BLOCK_C)
        for s0 in range(0, S, BLOCK_S):
            offs, mask, cs = _tile(X, base, c0, s0, CG, S, sc, ss, BLOCK_C, BLOCK_S)
            v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            xh = ((v - m1) - dm) * rstd
            dx = rstd * (d * w[:, None] + nc1 + xh * nc2)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _tiles(cg: int, s: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_S): a function of the group's shape only (batch invariance)."""
    bc = min(triton.next_power_of_2(cg), 64)
    bs = max(1, min(triton.next_power_of_2(s), _TILE // bc))
    return bc, bs


def _layout(xv, num_groups, cl):
    """(C, S, strides of sample, channel, spatial position) of the kernels' view."""
    if cl:
        b, s, c = xv.shape
        return c, s, (s * c, 1, c)
    b, c, s = xv.shape
    return c, s, (c * s, s, 1)


def group_forward(x, weight, bias, num_groups, eps, channels_last):
    """As ``cpu.group_forward``: (y like x, stats (B·G, 3) [m1, dm, rstd] float32)."""
    c, s, strides = _layout(x, num_groups, channels_last)
    cg = c // num_groups
    w, b = (None if p is None else p.to(torch.float32).contiguous() for p in (weight, bias))
    y = torch.empty_like(x)
    rows = x.shape[0] * num_groups
    stats = torch.empty((rows, 3), device=x.device, dtype=compute_dtype(x.dtype))
    bc, bs = _tiles(cg, s)
    _gn_fwd_kernel[(rows,)](x, y, w if w is not None else x, b if b is not None else x, stats,
                            s, num_groups, cg, eps, *strides, HAS_W=w is not None,
                            HAS_B=b is not None, BLOCK_C=bc, BLOCK_S=bs)
    return y, stats


def group_backward(dy, x, weight, stats, num_groups, channels_last, need_w, need_b):
    """As ``cpu.group_backward``: (dx like x, dγ, dβ) with dγ/dβ (C,) float32 or None."""
    c, s, strides = _layout(x, num_groups, channels_last)
    cg = c // num_groups
    nb = x.shape[0]
    w = None if weight is None else weight.to(torch.float32).contiguous()
    dx = torch.empty_like(x)
    sums = torch.empty((2, nb, c), device=x.device, dtype=torch.float32)
    bc, bs = _tiles(cg, s)
    _gn_bwd_kernel[(nb * num_groups,)](x, dy, dx, w if w is not None else x, stats, sums, c, s,
                                       num_groups, cg, *strides, nb, HAS_W=w is not None,
                                       BLOCK_C=bc, BLOCK_S=bs)
    return (dx, sums[0].sum(0) if need_w else None, sums[1].sum(0) if need_b else None)
