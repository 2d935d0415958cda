"""Checks of the tensor arguments of ``layer_norm`` / ``rms_norm``: x, normalized_shape, γ, β,
residual, and the outputs ``out=`` / ``residual_out=`` (shape, dtype, device, layout, no
autograd, no memory shared with an input).  Each error names the argument, the expected and the
actual value, in torch's words where torch has them.  The options are ``_options``' to check."""

from __future__ import annotations

import math
import numbers
import operator

import torch

from ._options import CASTINGS, NormOptions, _check_casting, _check_out_dtype, _eps_of
from .kernels import reference

_new = tuple.__new__


class _ArgumentError(RuntimeError, ValueError):
    """A tensor argument that does not fit the others (shape, dtype, device, out= under
    autograd): a RuntimeError, as torch raises for these, and a ValueError, as normkit raised
    before."""


class _DtypeError(NotImplementedError, TypeError):
    """x, weight or bias of a dtype the ops do not compute: NotImplementedError (a RuntimeError),
    as torch raises for these, and a TypeError, as normkit raised before."""


def _check_param(name, p, shape, x):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    _check_dense(name, p)
    if p.shape != shape:
        raise _ArgumentError(f"{name} must have shape {shape} (normalized_shape), got "
                             f"{tuple(p.shape)}")
    if not p.is_floating_point():
        raise _DtypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
    if not (p.is_cpu and x.is_cpu) and p.device != x.device:
        raise _ArgumentError(f"{name} is on {p.device} but x is on {x.device}")


def _check_dense(name, t):
    """Nested and sparse tensors: named, with the way to a dense one (the kernels read rows)."""
    if t.is_nested:
        raise NotImplementedError(
            f"{name} must be a dense (strided) tensor, got a nested tensor: normalize the "
            f"rows of a jagged one, {name}.values(), and nest the result again with "
            f"torch.nested.nested_tensor_from_jagged(result, {name}.offsets())")
    if t.layout is not torch.strided:
        raise NotImplementedError(f"{name} must be a dense (strided) tensor, got layout "
                                  f"{t.layout}: pass {name}.to_dense()")


def _shape_of(normalized_shape):
    """normalized_shape as a tuple of ints.  Like torch: an int, or anything with
    ``__index__`` (numpy integers, 0-dim integer tensors), or a sequence of those; not a bool,
    a float or a string."""
    if type(normalized_shape) is int:
        return (normalized_shape,)
    dims = normalized_shape
    if not isinstance(dims, (str, bytes, bool)):
        try:
            dims = (operator.index(dims),)
        except TypeError:
            pass
        try:
            return tuple(_dim(d) for d in dims)
        except TypeError:
            pass
    raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                    f"{normalized_shape!r}")


def _dim(d):
    if isinstance(d, bool):
        raise TypeError(d)
    return operator.index(d)


def _validate(x, normalized_shape, weight, bias, residual, opts: NormOptions):
    """Checks every argument; returns (normalized_shape tuple, N, the options checked, with eps
    a float: None, for RMSNorm, is ``torch.finfo(x.dtype).eps``, as in torch's ``rms_norm``).

    This runs on every call, so the checks are ordered and written to cost ~1 µs in all.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_dense("x", x)
    if not x.is_floating_point():
        raise _DtypeError(f"x must be a floating-point tensor, got {x.dtype}")
    ns = _shape_of(normalized_shape)
    k = len(ns)
    if k == 0 or k > x.dim() or x.shape[-k:] != ns:
        raise _ArgumentError(
            f"normalized_shape {ns} must match the trailing dims of x, whose shape is "
            f"{tuple(x.shape)}"
        )
    if weight is not None:
        _check_param("weight", weight, ns, x)
    if bias is not None:
        _check_param("bias", bias, ns, x)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(
                f"residual must be a torch.Tensor or None, got {type(residual).__name__}"
            )
        _check_dense("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise _ArgumentError(
                f"residual must match x: shape {tuple(x.shape)}, {x.dtype}, {x.device}; got "
                f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}"
            )
    eps, rms, zc, casting, out_dtype = opts
    # NormOptions built with tuple.__new__: the NamedTuple's generated __new__ costs ~0.4 µs
    if eps is None and rms:
        opts = _new(NormOptions, (torch.finfo(x.dtype).eps, rms, zc, casting, out_dtype))
    elif type(eps) is not float or not 0.0 <= eps < math.inf:
        opts = _new(NormOptions, (_eps_of(eps), rms, zc, casting, out_dtype))  # or raises
    if casting not in CASTINGS:
        _check_casting(casting)  # raises
    if out_dtype is not None:
        _check_out_dtype(out_dtype, casting)
    n = ns[0] if k == 1 else math.prod(ns)
    return ns, n, opts


def _check_out(out, x, weight, bias, residual, opts: NormOptions):
    """``out=``: a contiguous tensor shaped like x in the output dtype, outside autograd."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    want = reference.output_dtype(x.dtype, None if weight is None else weight.dtype,
                                  opts.casting, opts.out_dtype)
    _check_output("out", out, want, x, weight, bias, residual)


def _check_residual_out(residual_out, x, weight, bias, residual):
    """``residual_out=``: where h goes; like x, contiguous, outside autograd."""
    if not isinstance(residual_out, torch.Tensor):
        raise TypeError(f"residual_out must be a torch.Tensor or None, got "
                        f"{type(residual_out).__name__}")
    if residual is None:
        raise ValueError("residual_out needs residual: without it there is no h to write")
    _check_output("residual_out", residual_out, x.dtype, x, weight, bias, residual)


def _check_output(name, t, dtype, x, weight, bias, residual):
    """What ``out=`` and ``residual_out=`` share: dense, x's shape and device in ``dtype``,
    contiguous (an expanded one named as torch names it), no autograd."""
    _check_dense(name, t)
    if t.shape != x.shape or t.dtype != dtype or t.device != x.device:
        raise _ArgumentError(f"{name} must have x's shape {tuple(x.shape)}, dtype {dtype} and "
                             f"device {x.device}; got {tuple(t.shape)}, {t.dtype}, {t.device}")
    if not t.is_contiguous():
        _check_internal_overlap(name, t)
        raise _ArgumentError(f"{name} must be contiguous")
    _check_no_autograd(name, x, weight, bias, residual, t)


# torch's words for the same errors (aten/src/ATen/MemoryOverlap.cpp), so that a torch user
# recognises them.
_PARTIAL_OVERLAP = ("unsupported operation: some elements of the input tensor and the written-to "
                    "tensor refer to a single memory location")
_INTERNAL_OVERLAP = ("unsupported operation: more than one element of the written-to tensor "
                     "refers to a single memory location")
_CLONE = "Please clone() the tensor before performing the operation."


def _check_writes(x, weight, bias, residual, out, residual_out):
    """``out=`` / ``residual_out=`` (already checked to be contiguous tensors like x) share no
    memory with an input or with each other, as torch requires of its out= arguments
    (RuntimeError in torch's words), except in the in-place forms (``out=x``;
    ``residual_out=residual`` or ``x``: the same elements exactly, which the kernels read row by
    row before writing).  Anything else would be read after it was overwritten.

    Memory, not storage: two tensors over one numpy array overlap, and two disjoint slices of one
    buffer do not (``torch._C._overlaps`` compares storages only, and costs ~0.4 µs a pair).
    The eager fast path (kernels/csrc/host.cpp, ``run``) declines any call whose byte ranges
    meet, so the error is raised here; other calls cost a few pointer reads.
    """
    if out is not None:
        _check_write("out", out, (x, residual, weight, bias, residual_out), 1)
    if residual_out is not None:
        _check_write("residual_out", residual_out, (x, residual, weight, bias), 2)


_SOURCES = ("x", "residual", "weight", "bias", "residual_out")  # _check_write's sources, in order


def _check_write(name, dst, sources, in_place):
    """Raises when output ``dst`` shares memory with one of ``sources`` (named as in _SOURCES;
    None for an absent one), other than an exact alias of one of the first ``in_place``."""
    lo = dst.data_ptr()
    hi = lo + dst.nbytes
    for i, src in enumerate(sources):
        if src is None or (src is dst and i < in_place):
            continue
        start = src.data_ptr()
        # A contiguous source spans [start, start + nbytes); a strided one may reach further.
        if start < hi and (start + src.nbytes > lo or not src.is_contiguous()):
            _check_pair(name, dst, _SOURCES[i], src, lo, hi, i < in_place)


def _check_pair(name, dst, src_name, src, lo, hi, in_place):
    """The exact test, for a source whose span meets the output's bytes [lo, hi)."""
    if not _shares_memory(src, dst, lo, hi):
        return
    if in_place and src.dtype == dst.dtype and src.data_ptr() == lo and (
            src.shape == dst.shape and src.is_contiguous()):
        return  # the same elements: the documented in-place form
    unless = f" unless it is {src_name} itself" if in_place else ""
    raise RuntimeError(f"{name}= and {src_name}: {_PARTIAL_OVERLAP} ({name} must not share "
                       f"memory with {src_name}{unless}). {_CLONE}")


def _shares_memory(src, dst, lo, hi):
    """Whether an element of ``src`` has a byte in [lo, hi), the bytes of contiguous ``dst``."""
    if not (dst.numel() and src.numel()) or src.device != dst.device or dst.is_meta:
        return False  # nothing written or read; other devices, meta: no memory in common
    size = src.element_size()
    # (count, byte step) per dim, largest step first; repeated (step 0) and single dims add no
    # address.  Negative steps do not exist in torch.
    dims = sorted(((n, s * size) for n, s in zip(src.shape, src.stride(), strict=True)
                   if n > 1 and s), key=lambda d: -d[1])
    return _touches(src.data_ptr(), dims, size, lo, hi)


def _touches(base, dims, size, lo, hi):
    """Whether the elements ``base + Σ i_k·step_k`` (0 <= i_k < count_k over ``dims``, largest
    step first), each ``size`` bytes, touch [lo, hi).  Exact, in O(len(dims)) steps: the blocks
    of the outer dim lie one after another, so only the first block that ends past ``lo`` can
    straddle it; any later block that starts before ``hi`` starts inside."""
    if not dims:
        return base < hi and lo < base + size
    (count, step), inner = dims[0], dims[1:]
    span = size + sum((n - 1) * s for n, s in inner)  # bytes one block reaches
    if step < span:  # blocks interleave (an unusual as_strided view): assume they touch
        return True
    i = max(0, (lo - base - span) // step + 1)  # the first block that ends past lo
    start = base + i * step
    if i >= count or start >= hi:
        return False
    return (start >= lo or _touches(start, inner, size, lo, hi)
            or (i + 1 < count and start + step < hi))


def _check_internal_overlap(name, t):
    """An output with a repeated (stride 0) dim: several elements would be written to one place.
    torch's own test (``MemOverlap::Yes``; it answers "too hard" for other strided layouts)."""
    if torch._debug_has_internal_overlap(t) == 1:
        raise RuntimeError(f"{name}=: {_INTERNAL_OVERLAP} ({name} has stride "
                           f"{tuple(t.stride())} for shape {tuple(t.shape)}). {_CLONE}")


def _check_no_autograd(name, *tensors):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise _ArgumentError(f"{name}= does not support autograd (as torch's out= arguments: "
                             f"functions with out=... arguments don't support automatic "
                             f"differentiation): call without {name}, or under "
                             f"torch.no_grad()")



def _check_lean(memory_efficient, x, weight, opts: NormOptions):
    """``memory_efficient``: a bool; when True, y must determine x̂ through γ and β alone —
    "torch"/"gemma" casting (with "llama"/"t5" x̂ is rounded to 16 bits before γ, so y does not
    give it back) and y in x's dtype (the backward reads y where it would read x)."""
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"memory_efficient must be a bool, got {type(memory_efficient).__name__}")
    if memory_efficient:
        if opts.casting not in ("torch", "gemma"):
            raise ValueError(f"memory_efficient=True needs casting 'torch' or 'gemma', not "
                             f"{opts.casting!r}: there x_hat is rounded before weight is "
                             f"applied, so y does not give it back exactly")
        od = reference.output_dtype(x.dtype, None if weight is None else weight.dtype,
                                    opts.casting, opts.out_dtype)
        if od != x.dtype:
            raise ValueError(f"memory_efficient=True needs the output in x's dtype {x.dtype}, "
                             f"got out_dtype={od}: the backward reads y where it would read x")
    return memory_efficient


# ----------------------------------------------------------------------------------------------
# Quantized outputs: out_dtype=torch.float8_e4m3fn / torch.int8, scale=
# ----------------------------------------------------------------------------------------------


def _check_quant(q_dtype, casting, scale, out, x, weight, bias, residual):
    """The arguments of a call with a quantized output (x, γ, β and the residual already
    checked); returns the static scale as a 0-d float32 tensor on x's device, or None."""
    if q_dtype not in reference.QUANT_DTYPES:
        raise ValueError(f"scale= is for a quantized out_dtype (torch.float8_e4m3fn or "
                         f"torch.int8), got out_dtype={q_dtype}")
    if casting not in ("torch", "gemma"):
        raise ValueError(f"out_dtype={q_dtype} quantizes y as casting 'torch'/'gemma' computes it "
                         f"in float32; casting {casting!r} rounds y to a 16-bit dtype first: use "
                         f"casting='torch'")
    if out is not None:
        raise ValueError(f"out= is not supported with out_dtype={q_dtype}: q and its scales are "
                         f"returned")
    if torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (x, weight, bias, residual, scale)):
        raise _ArgumentError(f"out_dtype={q_dtype} is forward-only (quantized outputs are for "
                             f"serving): call under torch.no_grad() or torch.inference_mode(), "
                             f"or detach the inputs")
    return None if scale is None else _static_scale(scale, x)


def _static_scale(scale, x):
    """scale= as a 0-d float32 tensor on x's device: a real number (used as float32) or a
    1-element float32 tensor, finite and > 0 (a tensor on an accelerator is not read back: that
    would wait for the device)."""
    if isinstance(scale, torch.Tensor):
        _check_dense("scale", scale)
        if scale.numel() != 1 or scale.dtype != torch.float32:
            raise _ArgumentError(f"scale must be a float or a 1-element float32 tensor, got a "
                                 f"{scale.dtype} tensor of shape {tuple(scale.shape)}")
        t = scale.detach().reshape(())
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        t = torch.tensor(float(scale), dtype=torch.float32)
    else:
        raise TypeError(f"scale must be a float or a 1-element float32 tensor, got "
                        f"{type(scale).__name__}")
    if t.is_cpu and not 0.0 < float(t) < math.inf:  # also false for NaN
        raise ValueError(f"scale must be finite and > 0 (as float32), got {float(t)}")
    return t.to(x.device)
