"""Dropout fused into the residual add before a norm (``dropout_p=`` / ``seed=`` of
``layer_norm`` / ``rms_norm``): the checks of the two options, the seed drawn when none is
given, the autograd of the fused op, and the keep-mask for ``return_dropout_mask=True``.

    h = dropout(x) + residual   (h = dropout(x) without a residual),   y = norm(h)

The mask is ``reference.dropout_mask``: element k of the (M, N) rows (k = i·N + j) is kept iff
word k % 4 of Triton's ``tl.randint4x(seed, k // 4)``, as ``tl.rand`` maps it to [0, 1), is >
float32(p) — a function of the seed and k alone, the same on every backend, thread count and
instruction set.  Backward regenerates it (nothing M×N is
kept for it): dx = m·dh_total, d-residual = dh_total, with m = 1/(1-p) where kept, else 0.
"""

from __future__ import annotations

import functools
import numbers

import torch

from ._autograd import _kernel_backward, _zero_dy
from ._dispatch import _report_stats
from ._options import NormOptions
from .kernels import reference

_SEED_END = 2**63  # seeds are ints in [0, 2**63): an int64 on every backend


def _check(p, seed):
    """(p as a float in [0, 1], seed as an int in [0, 2**63) or None)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1], got {type(p).__name__}")
    p = float(p)
    if not 0.0 <= p <= 1.0:  # also false for NaN
        raise ValueError(f"dropout_p must be in [0, 1], got {p}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an int in [0, 2**63) or None, got "
                            f"{type(seed).__name__}")
        seed = int(seed)
        if not 0 <= seed < _SEED_END:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return p, seed


def _draw_seed() -> int:
    """A seed from torch's default (CPU) generator: ``torch.manual_seed`` makes it reproducible,
    as it makes ``torch.nn.functional.dropout`` reproducible."""
    return int(torch.randint(_SEED_END - 1, (), dtype=torch.int64))


@functools.lru_cache(maxsize=256)
def _spec(p: float, seed: int):
    """What the kernels take: (seed, keep_above, scale); keep_above is a binary search."""
    return seed, reference.keep_above(p), float(reference.dropout_scale(p, torch.float32))


def _keep_mask(kern, spec, p, m, n, device):
    """The (M, N) bool mask the kernels used: theirs (m·1 is nonzero iff kept), or the
    reference's."""
    if kern is None:
        return reference.dropout_mask(spec[0], p, m, n, device)
    return kern.dropout_apply(torch.ones((m, n), device=device), spec) != 0


class _DropoutNormFunction(torch.autograd.Function):
    """The fused op on (M, N) rows; keeps h, γ, β, the statistics, and the seed and p."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, opts: NormOptions, kern, sink, spec, p):
        y, h, stats = kern.forward(x, weight, bias, residual, *opts, True, dropout=spec)
        if sink is not None:
            _report_stats(sink, stats, opts.eps, opts.rms)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(h, weight, bias, stats)
        ctx.opts, ctx.kern, ctx.spec, ctx.p = opts, kern, spec, p
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        h, weight, bias, stats = ctx.saved_tensors
        opts = ctx.opts
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: the reference's formulas, recorded (double backward)
            dht, dw, db, _ = reference.norm_backward_graph(
                (True, need[1], need[2], False), h, weight, bias, dy, dh, opts.eps, opts.rms,
                opts.zero_centered, opts.casting)
            keep = reference.dropout_mask(ctx.spec[0], ctx.p, *h.shape, h.device)
            dx = reference.dropout_add(dht, None, keep, ctx.p) if need[0] else None
        else:
            if dy is None:  # only h was used
                dy = _zero_dy(h, weight, opts)
            # dx = m·dht comes from the same pass over the rows as dht
            grads = _kernel_backward(ctx.kern, h, weight, bias, stats, dy, dh, opts,
                                     need[1] or need[2], False, ctx.spec if need[0] else None)
            dht, dw, db = grads[:3]
            dx = grads[3] if need[0] else None
            if dw is not None and dw.dtype != weight.dtype:
                dw = dw.to(weight.dtype)
            if db is not None and db.dtype != bias.dtype:
                db = db.to(bias.dtype)
        return (dx, dw if need[1] else None, db if need[2] else None,
                dht if need[3] else None, None, None, None, None, None)
