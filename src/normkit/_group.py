"""GroupNorm: ``group_norm`` — its checks, memory layouts, backend choice and autograd.

A group of a sample (C/G channels × all spatial positions) is one row of the LayerNorm
contract: statistics in float32 (float64 for float64 input), shifted moments (never
E[x²] − E[x]²), a NaN stays in its group, and a sample's output depends only on that sample
(not on the batch, its position or the threads).  InstanceNorm without running statistics is
the case G = C.

Layouts, each run by the kernels without a copy:

* contiguous x (B, C, *): the kernels see (B, C, S), each group one contiguous row;
* channels-last x (4-D ``torch.channels_last``, 5-D ``torch.channels_last_3d``): the kernels
  see (B, S, C), and y comes back in that memory format, as torch's ``group_norm`` returns it;
* any other strides: a contiguous copy first.
"""

from __future__ import annotations

import operator

import torch

from . import _dispatch
from ._options import _eps_of
from ._validate import _ArgumentError, _check_dense, _DtypeError
from .kernels import reference

__all__ = ["group_norm"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CL = {4: torch.channels_last, 5: torch.channels_last_3d}


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """GroupNorm, as ``torch.nn.functional.group_norm``: per sample, the channels are split into
    ``num_groups`` groups of C / num_groups channels, and each group (its channels at every
    spatial position) is normalized: ``y = (x - mean) * rsqrt(var + eps) * weight[c] + bias[c]``
    (biased variance), statistics in float32 (float64 for float64 input).

    Args:
        x: (B, C, *) floating-point tensor, at least 2-D.  Contiguous or channels-last
            (``torch.channels_last`` / ``channels_last_3d``) run without a copy.
        num_groups: a positive int dividing C.  ``num_groups == C`` is InstanceNorm (without
            running statistics), ``1`` LayerNorm over (C, *) with per-channel γ/β.
        weight, bias: (C,) per-channel γ and β (any float dtype, x's device), or None.
        eps: added to the variance; a real number, finite and >= 0.

    Returns:
        y shaped like x, in x.dtype and x's memory format (channels-last stays channels-last).

    Raises:
        TypeError: x not a tensor, num_groups not an int, eps not a real number.
        ValueError: num_groups <= 0, an eps out of range, a backend that cannot compute the
            call.  Also (as RuntimeError, as torch): C not divisible by num_groups, a weight
            or bias of the wrong shape or device, x of fewer than 2 dims.
    """
    num_groups, eps = _check(x, num_groups, weight, bias, eps)
    if torch.jit.is_tracing() or torch.compiler.is_compiling() or x.numel() == 0:
        # tracers, exporters and torch.compile record torch's ops (the reference's)
        return _reference(x, num_groups, weight, bias, eps, None)
    b, c = x.shape[:2]
    s = x.numel() // (b * c)
    fmt = _CL.get(x.dim())
    cl = fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)
    kern = _select(x, weight, bias)
    sink = getattr(_dispatch._tls, "sink", None) if _dispatch._observers else None
    if kern is None:
        return _reference(x, num_groups, weight, bias, eps, sink)
    # the kernels' view: (B, S, C) of a channels-last x, else (B, C, S) (a copy only for other
    # strides); reshaped here, never inside the autograd.Function
    xv = x.movedim(1, -1).reshape(b, s, c) if cl else x.reshape(b, c, s).contiguous()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias)):
        y = _GroupNormFunction.apply(xv, weight, bias, num_groups, eps, cl, kern, sink)
    else:
        y, stats = kern.group_forward(xv, weight, bias, num_groups, eps, cl)
        if sink is not None:
            _dispatch._report_stats(sink, stats, eps, False)
    if cl:
        return y.view(b, *x.shape[2:], c).movedim(-1, 1)
    return y.view(x.shape)


def _reference(x, num_groups, weight, bias, eps, sink):
    y, mean, rstd = reference.group_norm(x, num_groups, weight, bias, eps)
    if sink is not None:
        _dispatch._report(sink, mean.detach(), rstd.detach(), eps, False)
    fmt = _CL.get(x.dim())
    if fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt):
        y = y.contiguous(memory_format=fmt)
    return y


def _check(x, num_groups, weight, bias, eps):
    """Checks every argument; returns (num_groups, eps) as an int and a float."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_dense("x", x)
    if not x.is_floating_point():
        raise _DtypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise _ArgumentError(f"x must have shape (B, C, *), at least 2 dims, got shape "
                             f"{tuple(x.shape)}")
    if isinstance(num_groups, bool):
        raise TypeError("num_groups must be an int, got bool")
    try:
        g = operator.index(num_groups)
    except TypeError:
        raise TypeError(f"num_groups must be an int, got {type(num_groups).__name__}") from None
    if g <= 0:
        raise ValueError(f"num_groups must be positive, got {g}")
    c = x.shape[1]
    if c % g:
        raise _ArgumentError(f"num_groups={g} must divide the channels of x (dim 1): C={c} "
                             f"in x of shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        _check_dense(name, p)
        if p.shape != (c,):
            raise _ArgumentError(f"{name} must have shape ({c},) (one value per channel of x), "
                                 f"got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise _DtypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
        if p.device != x.device:
            raise _ArgumentError(f"{name} is on {p.device} but x is on {x.device}")
    return g, _eps_of(eps)


def _select(x, weight, bias):
    """The kernels module (cpu, or triton's group kernels), or None for the reference: as
    ``_dispatch._select`` decides for the other ops (the backend setting, the device)."""
    name = _dispatch.get_backend()
    if name == "reference" or x.is_meta:
        return None
    ok = x.dtype in _KERNEL_DTYPES and not (
        x.dtype != torch.float64 and torch.float64 in
        {p.dtype for p in (weight, bias) if p is not None})
    if name == "triton" or (name == "auto" and x.is_cuda):
        tri = _dispatch._load_triton() if (x.is_cuda or _dispatch._interpreting()) else None
        if tri is not None and ok and x.dtype != torch.float64:
            from .kernels import triton_group

            return triton_group
        why = _dispatch._triton_error or f"x {x.dtype} on {x.device}"
    else:
        cpu = _dispatch._cpu_module or _dispatch._load_cpu()
        if cpu is not None and ok and x.is_cpu:
            return cpu
        why = _dispatch._cpu_error or f"x {x.dtype} on {x.device}"
    if name in ("cpu", "triton"):
        raise ValueError(f"backend {name!r} cannot compute this group_norm ({why}, weight "
                         f"{None if weight is None else weight.dtype}); use 'auto'")
    return None


class _GroupNormFunction(torch.autograd.Function):
    """Stashes what backward needs: x as the kernels saw it, γ, β and the (B·G, 3) statistics."""

    @staticmethod
    def forward(ctx, xv, weight, bias, num_groups, eps, cl, kern, sink):
        y, stats = kern.group_forward(xv, weight, bias, num_groups, eps, cl)
        if sink is not None:
            _dispatch._report_stats(sink, stats, eps, False)
        ctx.save_for_backward(xv, weight, bias, stats)
        ctx.args = (num_groups, eps, cl, kern)
        return y

    @staticmethod
    def backward(ctx, dy):
        xv, weight, bias, stats = ctx.saved_tensors
        num_groups, eps, cl, kern = ctx.args
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: autograd of the reference, recorded (double backward).  xv is
            # an input of this node, so the nested grad stops there.
            x = xv.movedim(-1, 1) if cl else xv
            wanted = [t for t, n in zip((xv, weight, bias), need[:3], strict=True) if n]
            with torch.enable_grad():
                y = reference.group_norm(x, num_groups, weight, bias, eps)[0]
                got = iter(torch.autograd.grad(y, wanted, dy.movedim(-1, 1) if cl else dy,
                                               create_graph=True))
            return tuple(next(got) if n else None for n in need[:3]) + (None,) * 5
        dy = dy.to(xv.dtype).contiguous()
        dx, dw, db = kern.group_backward(dy, xv, weight, stats, num_groups, cl,
                                         need[1] and weight is not None,
                                         need[2] and bias is not None)
        return (dx if need[0] else None,
                None if dw is None else dw.to(weight.dtype),
                None if db is None else db.to(bias.dtype),
                None, None, None, None, None)

