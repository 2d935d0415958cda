"""Autograd of the eager general path: ``_NormFunction``, and the backward helpers it shares with
the custom ops (``_ops``).

The three ways a gradient is computed:

* the eager fast path: a C++ autograd node (kernels/csrc/host.cpp), whose ``create_graph=True``
  backward is the reference's (``_dispatch._eager_double_backward``);
* the eager general path: ``_NormFunction`` over the backend's ``forward`` / ``backward``;
* under ``torch.compile``: the ``normkit::norm_fwd_v3`` op's registered backward (``_ops``).

Every one records the reference's backward formulas (``reference.norm_backward_graph``) when a
graph of the backward itself is wanted.  Each keeps for backward only the normalized input (h
with a residual, else x), γ, β and the per-row statistics — or, with ``memory_efficient=True``,
the output y instead of the normalized input, from which the kernels recompute
x̂ = (y − β)/γ (no double backward then: ``LEAN_NO_DOUBLE_BACKWARD``).
"""

from __future__ import annotations

import torch

from ._dispatch import _report_stats
from ._options import NormOptions
from .kernels import reference

# As kernels/csrc/host.cpp says it for the eager node: y fixes x only up to its scale (x̂ depends
# on it only through eps), so the second-order terms in x cannot be formed from what was saved.
LEAN_NO_DOUBLE_BACKWARD = (
    "memory_efficient=True saves y, not x: its backward cannot be differentiated again "
    "(create_graph=True); use memory_efficient=False for double backward")


class _NormFunction(torch.autograd.Function):
    """Stashes what backward needs; shapes are already (M, N)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, opts: NormOptions, kern, sink, lean=False):
        y, h, stats = kern.forward(x, weight, bias, residual, *opts, True)
        if sink is not None:
            _report_stats(sink, stats, opts.eps, opts.rms)
        ctx.set_materialize_grads(False)
        # Only what backward reads: the normalized input (h with a residual: x and the residual
        # are not kept, one (M, N) tensor instead of three), γ, β and the per-row statistics.
        # lean (memory_efficient=True): y instead, which the next layer keeps anyway.
        ctx.save_for_backward(y if lean else (x if h is None else h), weight, bias, stats)
        ctx.lean = lean
        ctx.has_residual = h is not None
        ctx.opts = opts
        ctx.kern = kern  # backward runs on the backend that ran the forward
        if residual is not None:
            return y, h
        return y

    @staticmethod
    def backward(ctx, dy, dh=None):
        v, weight, bias, stats = ctx.saved_tensors
        opts = ctx.opts
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            if ctx.lean:
                raise ValueError(LEAN_NO_DOUBLE_BACKWARD)
            # create_graph=True: the reference's formulas, recorded (double backward).
            return reference.norm_backward_graph(need, v, weight, bias, dy, dh, opts.eps,
                                                 opts.rms, opts.zero_centered,
                                                 opts.casting) + (None, None, None, None)
        if dy is None:  # only h was used
            dy = _zero_dy(v, weight, opts)
        dx, dw, db = _kernel_backward(ctx.kern, v, weight, bias, stats, dy, dh, opts,
                                      need[1] or need[2], ctx.lean)
        if dw is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        if db is not None and db.dtype != bias.dtype:
            db = db.to(bias.dtype)
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if need[2] else None,
            dx if need[3] else None,
            None, None, None, None,
        )


def _zero_dy(v, weight, opts: NormOptions):
    """The gradient of an unused y: zeros shaped like v (x or h) in y's dtype."""
    return torch.zeros(v.shape, device=v.device, dtype=reference.output_dtype(
        v.dtype, None if weight is None else weight.dtype, opts.casting, opts.out_dtype))


def _kernel_backward(kern, v, weight, bias, stats, dy, dh, opts: NormOptions, need_dw,
                     lean=False, dropout=None):
    """v: the normalized input, or with ``lean`` the output y (x̂ recomputed from y and β).
    dropout: a fused dropout's spec; then a fourth result, m·dx (the backends' ``backward``)."""
    dy = dy.contiguous()
    if dh is not None:
        dh = dh.contiguous()
    return kern.backward(dy, dh, v.contiguous(), weight, bias is not None, stats, opts.rms,
                         opts.zero_centered, opts.casting, need_dw,
                         bias if lean else None, lean, dropout)
