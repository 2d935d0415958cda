"""How graphs see the op: the ``normkit::norm_fwd_v3`` / ``normkit::norm_bwd_v3`` custom ops
(``torch.library``, with fake implementations and a registered backward) that ``torch.compile``
traces through without graph breaks, and torch's own ops for tracers and exporters
(``_traceable``).  The custom-op machinery costs several µs per call in eager mode, which is
why eager calls bypass it.  The ops take the options' fields one by one: a custom op's schema
has tensors and scalars only.
"""

from __future__ import annotations

import torch

from ._autograd import _kernel_backward, _zero_dy
from ._dispatch import _backward_kernels, _select
from ._options import NormOptions
from .kernels import reference

_tracing_state = torch._C._get_tracing_state

# The ops' names carry the version of their signatures and meaning: torch.compile's on-disk
# caches (FX graph, AOTAutograd) know a graph's custom ops by name, not by code, so an op
# changed under its old name would be served compiled code of the old one after an upgrade
# ("norm_bwd() expected at most 11 argument(s) but received 13").  Bump it with any change.
OPS_VERSION = 3
FWD = f"normkit::norm_fwd_v{OPS_VERSION}"
BWD = f"normkit::norm_bwd_v{OPS_VERSION}"


@torch.library.custom_op(FWD, mutates_args=())
def _norm_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    rms: bool,
    zero_centered: bool,
    casting: str,
    out_dtype: torch.dtype | None,
    memory_efficient: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, stats) on rows; h and stats are empty when not produced.  memory_efficient: the
    backward recomputes x̂ from y (see _fwd_setup_context)."""
    kern = _select(x, weight, bias, casting, out_dtype) if x.numel() else None
    if kern is None:
        y, h, mean, rstd = reference.norm_forward(
            x, weight, bias, residual, eps, rms, zero_centered, casting, out_dtype
        )
        # [m1, dm, rstd] as the kernels write them: the fake's (M, 3) (compiled code checks
        # the shape), and the backward from y (memory_efficient) runs on the kernels.
        stats = torch.stack([mean.reshape(-1), torch.zeros_like(mean.reshape(-1)),
                             rstd.reshape(-1)], 1) if x.numel() else x.new_empty(
            (x.shape[0], 3), dtype=reference.compute_dtype(x.dtype))
    else:
        y, h, stats = kern.forward(
            x, weight, bias, residual, eps, rms, zero_centered, casting, out_dtype, True
        )
    return y, (x.new_empty(0) if h is None else h), stats


@_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps, rms, zero_centered, casting, out_dtype,
      memory_efficient=False):
    m, n = x.shape
    od = reference.output_dtype(
        x.dtype, None if weight is None else weight.dtype, casting, out_dtype
    )
    y = x.new_empty((m, n), dtype=od)
    h = x.new_empty((m, n)) if residual is not None else x.new_empty(0)
    stats = x.new_empty((m, 3), dtype=reference.compute_dtype(x.dtype))
    return y, h, stats


@torch.library.custom_op(BWD, mutates_args=())
def _norm_bwd_op(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    stats: torch.Tensor,
    eps: float,
    rms: bool,
    zero_centered: bool,
    casting: str,
    out_dtype: torch.dtype | None,
    from_y: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dweight/dbias empty when there is no weight/bias.  v: the
    normalized input (x, or h with a residual), or with ``from_y`` the output y."""
    if not from_y and (v.numel() == 0 or _select(v, weight, bias, casting, out_dtype) is None):
        # the forward ran on the reference (autograd cannot run in here)
        dx, dw, db = reference.norm_backward(dy, dh, v, weight, bias is not None, eps, rms,
                                             zero_centered, casting)
    else:
        opts = NormOptions(eps, rms, zero_centered, casting, out_dtype)
        dx, dw, db = _kernel_backward(_backward_kernels(stats), v, weight, bias, stats, dy, dh,
                                      opts, True, from_y)
    dw = v.new_empty(0) if dw is None else dw.to(weight.dtype)
    db = v.new_empty(0) if db is None else db.to(bias.dtype)
    # A kernel may return dγ and dβ as rows of one buffer (the triton backend with one row
    # block); the outputs of a custom op must not alias each other.
    if dw.numel() and db.numel() and (dw.untyped_storage().data_ptr()
                                      == db.untyped_storage().data_ptr()):
        db = db.clone()
    return dx, dw, db


@_norm_bwd_op.register_fake
def _(dy, dh, v, weight, bias, stats, eps, rms, zero_centered, casting, out_dtype,
      from_y=False):
    dw = v.new_empty(0) if weight is None else torch.empty_like(weight)
    db = v.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(v, memory_format=torch.contiguous_format), dw, db


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, residual = inputs[:4]
    y, h, stats = output
    # As _NormFunction: the normalized input (h with a residual), or y with memory_efficient,
    # γ, β and the statistics only.
    ctx.lean = bool(inputs[9]) if len(inputs) > 9 else False
    ctx.save_for_backward(y if ctx.lean else (x if residual is None else h), weight, bias, stats)
    ctx.has_residual = residual is not None
    ctx.opts = NormOptions(*inputs[4:9])


def _fwd_backward(ctx, dy, dh, dstats):
    v, weight, bias, stats = ctx.saved_tensors
    if not ctx.has_residual:
        dh = None
    if dy is None:
        dy = _zero_dy(v, weight, ctx.opts)
    dx, dw, db = _norm_bwd_op(dy, dh, v, weight, bias, stats, *ctx.opts, ctx.lean)
    return (
        dx,
        dw if weight is not None else None,
        db if bias is not None else None,
        dx if ctx.has_residual else None,
        None, None, None, None, None, None,
    )


torch.library.register_autograd(
    FWD, _fwd_backward, setup_context=_fwd_setup_context
)


def _compiled_path(x, w, b, r, opts: NormOptions, lean=False):
    """(y, h or None) on rows through the custom op: what ``torch.compile`` traces."""
    y, h, _ = _norm_fwd_op(x, w, b, r, *opts, lean)
    return y, (h if r is not None else None)


def _traceable(x, ns, n, weight, bias, residual, opts: NormOptions):
    """The op in torch's own ops, for tracers and exporters: ``F.layer_norm`` (ONNX
    LayerNormalization, opset >= 17) and ``F.rms_norm`` (RMSNormalization, opset 23, dynamo
    exporter) where torch's semantics are ours, the reference formulas (plain ONNX ops)
    elsewhere.  Same values as the kernels within rounding; eps and γ/β stay the module's."""
    eps, rms, zc, casting, out_dtype = opts
    h = None if residual is None else x + residual  # in x.dtype, rounded once, as the kernels
    v = x if h is None else h
    same = (casting in ("torch", "gemma") and not zc and out_dtype in (None, v.dtype)
            and all(p is None or p.dtype == v.dtype for p in (weight, bias)))
    # The TorchScript exporter has no symbolic for aten::rms_norm (pytorch#159249).
    if same and not (rms and _tracing_state() is not None):
        y = (torch.nn.functional.rms_norm(v, ns, weight, eps) if rms
             else torch.nn.functional.layer_norm(v, ns, weight, bias, eps))
    else:
        flat = lambda t: None if t is None else t.reshape(n)  # noqa: E731
        y, _, _, _ = reference.norm_forward(v.reshape(-1, n), flat(weight), flat(bias), None,
                                            *opts)
        y = y.reshape(v.shape)
    return y, h
