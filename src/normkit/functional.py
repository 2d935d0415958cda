"""The public functional API: ``layer_norm`` and ``rms_norm``.

Three ways in, one set of kernels:

* eager, the common CPU call (contiguous x, 1-D γ/β, "torch" casting): straight into the compiled
  entry point (``cpu.infer``, held by ``_dispatch._fast``), which checks, allocates and launches
  in C++, with a C++ autograd node when a gradient is wanted.  At M=1 every 0.1 µs counts
  against torch's own ~3 µs op.
* eager, everything else (``_norm``): validate (``_validate``, the options as one
  ``NormOptions``), flatten to rows, call the backend ``_dispatch`` chooses, through
  ``_autograd._NormFunction`` when a gradient is wanted.
* under ``torch.compile``: the ``normkit::norm_fwd_v3`` / ``normkit::norm_bwd_v3`` custom ops
  (``_ops``), with fake implementations, so graphs trace through without breaks; under tracers
  and exporters, torch's own ops.

Backend selection (``use_backend``) and the statistics sink live in ``_dispatch``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _dispatch, _dropout
from ._autograd import _NormFunction
from ._dispatch import (
    BACKENDS,
    _first_call,
    _report,
    _report_stats,
    _select,
    available_backends,
    empty_cache,
    get_backend,
    use_backend,
)
from ._group import group_norm
from ._ops import _compiled_path, _traceable
from ._options import CASTINGS, NormOptions
from ._validate import (
    _check_lean,
    _check_out,
    _check_quant,
    _check_residual_out,
    _check_writes,
    _validate,
)
from .kernels import reference

__all__ = [
    "layer_norm",
    "rms_norm",
    "group_norm",
    "use_backend",
    "get_backend",
    "available_backends",
    "empty_cache",
    "BACKENDS",
    "CASTINGS",
]

_tracing_state = torch._C._get_tracing_state  # bound once: ~60 ns on the M=1 fast path
_is_compiling = torch.compiler.is_compiling
# Builds the general path's NormOptions without the NamedTuple's generated __new__ (a Python
# frame): ~0.15 µs against ~0.35 µs, on every general-path call.
_new = tuple.__new__


def layer_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    zero_centered_gamma: bool = False,
    return_residual: bool = False,
    casting: str = "torch",
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    memory_efficient: bool = False,
    scale: float | torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_dropout_mask: bool = False,
):
    """LayerNorm over the last ``len(normalized_shape)`` dims, optionally fused with a residual add.

    ``y = (h - mean(h)) * rsqrt(var(h) + eps) * g + b`` with ``h = x`` (or ``x + residual``,
    rounded to x.dtype), biased variance, ``g = weight`` (or ``1 + weight`` with
    ``zero_centered_gamma``), statistics in float32 (float64 for float64 input).

    Args:
        x: (..., *normalized_shape) float tensor (float32, bfloat16, float16, float64), dense
            (not nested or sparse).  On the meta device the outputs are meta tensors of the
            right shape and dtype, as with torch's ops.
        normalized_shape: int or shape of the trailing dims to normalize over (anything with
            ``__index__``, such as a numpy integer, counts as an int, as in torch).
        weight, bias: γ and β of shape ``normalized_shape``, or None.  They may have another
            float dtype than x (e.g. float32 γ with bfloat16 activations).
        eps: added to the variance; a real number (numpy scalars too), finite and >= 0.
        residual: tensor like x (same shape, dtype and device), added before normalizing.
        zero_centered_gamma: multiply by ``1 + weight`` (γ stored zero-centred, as in Gemma).
        return_residual: also return ``h`` — the input of the next pre-norm block.
        casting: where the cast back to a 16-bit input dtype happens:
            "torch" / "gemma": everything in float32, one rounding at the end; output dtype
            x.dtype (or ``out_dtype``).  "llama": normalize in float32, cast to x.dtype, then
            apply γ/β with torch's type promotion; output ``promote_types(x.dtype, weight.dtype)``.
            "t5": normalize in float32, cast to weight.dtype only when that is 16-bit, then
            multiply; output weight.dtype (16-bit weight) or float32.
        out_dtype: output dtype for "torch"/"gemma" casting; ``torch.float8_e4m3fn`` or
            ``torch.int8``: the quantized output described below.
        out: a tensor to write y into (shape of x, the output dtype, contiguous, same device);
            it is returned as y.  It may be x itself (each row is read before it is written);
            any other memory it shares with x, residual, weight, bias or residual_out raises
            a RuntimeError, as torch's ``out=`` arguments do (so does an out that overlaps
            itself).  No autograd through it, as with torch's ``out=`` arguments: with a
            gradient wanted this raises.  Saves the allocation and the first-touch page faults
            of a fresh output, which for large tensors cost as much as the op.
        residual_out: with ``residual``, a tensor to write h into (x's shape and dtype,
            contiguous, same device); it is returned as h.  It may be ``residual`` itself — the
            in-place update of the residual stream that serving engines use — or x; other
            memory shared with an input or with ``out`` raises, as for ``out``.  No autograd
            through it, as ``out``.
        memory_efficient: for training: backward keeps y (which the next layer keeps anyway)
            instead of the normalized input (x, or h with a residual), and recomputes
            ``x̂ = (y - b) / g`` from it, as Apex's ``memory_efficient``.  The forward and
            its bits are unchanged; the gradients lose what y's rounding loses (about
            ``ulp(y) / |g|`` in x̂).  Needs y in x.dtype ("torch"/"gemma" casting, no other
            ``out_dtype``); the backward raises ValueError where ``g`` is 0 (x̂ is lost
            there) and under ``create_graph=True``.  Eager calls on the reference backend
            ignore it.
        scale: with a quantized ``out_dtype``, a static scale (a real number, used as float32,
            or a 1-element float32 tensor), finite and > 0, instead of each row's own.
        dropout_p: dropout before the residual add: ``h = dropout(x) + residual`` (``h =
            dropout(x)`` without one), kept elements scaled by ``1/(1-p)`` as torch's dropout,
            fused into the norm's pass.  A float in [0, 1]; 1 drops everything (h = 0·x +
            residual: a NaN or Inf of x still gives NaN, as with torch's dropout).  0: no
            dropout, the plain op bit for bit.  Not with ``out=`` / ``residual_out=``.
        seed: the mask's seed, an int in [0, 2**63).  None: drawn from torch's default CPU
            generator (``torch.manual_seed`` makes it reproducible).  Element k = i·N + j of the
            (M, N) rows (the flattened leading dims, N the normalized size) is kept iff word
            k % 4 of Triton's ``tl.randint4x(seed, k // 4)`` (Philox4x32-10, one call per 4
            elements), as ``tl.rand`` maps it to [0, 1), is > float32(p): the mask depends on the
            seed and k only, never on the backend, the thread count or the instruction set.
            So the first rows of a batch get the same mask as those rows alone; a row at
            another position gets another mask.  Backward regenerates it.  Not with
            ``memory_efficient=True`` or a quantized ``out_dtype`` (ValueError).
        return_dropout_mask: also return the (…, N) bool keep-mask, last (for debugging).

    Quantized outputs (for serving): ``out_dtype=torch.float8_e4m3fn`` or ``torch.int8`` returns
    ``(q, scale)`` — ``(q, scale, h)`` with ``return_residual=True`` — where y is the float32
    value of "torch"/"gemma" casting (never rounded to x.dtype first), ``scale`` is float32 of
    x's shape with the normalized dims 1 (one per row: ``q.float() * scale`` is y again, within
    a quantization step), by default ``max(amax(|y_row|) / qmax, floor)`` (qmax 448 for e4m3,
    127 for int8; floor 1/(448·512) for e4m3, 2^-23 for int8, so that a zero row is zeros), and
    ``q = sat(rne(y · (1/scale)))`` with 1/scale rounded to float32 once per row: e4m3
    saturates to ±448, int8 to [-128, 127].  A NaN in a row makes its dynamic scale NaN, its
    e4m3 q all NaN and its int8 q all 0 (int8 holds no NaN: the scale carries it); with a static
    scale a NaN y gives a NaN e4m3 and a 0 int8 element.  Forward only (with a gradient wanted
    this raises); no ``out=``; casting "torch"/"gemma" only.  See docs/kernels.md.

    Returns:
        ``y`` shaped like x, or ``(y, h)`` with ``return_residual=True`` (h in x.dtype),
        with the mask last when ``return_dropout_mask=True``; quantized: ``(q, scale)`` or
        ``(q, scale, h)``.

    Raises:
        TypeError: an argument of the wrong kind (x not a tensor, a float in normalized_shape,
            a string eps).
        RuntimeError: as torch, for a tensor that does not fit the others: shape, device,
            dtype, out= with autograd, out=/residual_out= sharing memory with an input.  Its
            subclass NotImplementedError for a non-floating x, weight or bias and for nested
            and sparse tensors.  (Shape, device and dtype errors are also ValueError /
            TypeError, which normkit raised before.)
        ValueError: an option out of range: eps < 0, an unknown casting, out_dtype with
            "llama"/"t5", memory_efficient with "llama"/"t5" or another output dtype, a
            backend that cannot compute the call, a scale <= 0 or with a float
            out_dtype, out= with a quantized out_dtype.

    Under ``torch.autocast`` the op behaves like torch's own ``layer_norm``: on CUDA (and other
    accelerators) it runs in float32 and returns float32; on the CPU autocast leaves it alone.
    """
    if dropout_p != 0.0 or seed is not None or return_dropout_mask:
        _dropout_alone(memory_efficient, out_dtype, scale)
        return _dropout_norm(x, normalized_shape, weight, bias, residual,
                             NormOptions(eps, False, zero_centered_gamma, casting, out_dtype),
                             return_residual, out, residual_out, dropout_p, seed,
                             return_dropout_mask)
    fast = _dispatch._fast or _first_call(x)
    if (fast is not None and casting == "torch" and out_dtype is None and not zero_centered_gamma
            and scale is None and type(eps) is float and 0.0 <= eps < math.inf
            and type(memory_efficient) is bool
            and not _is_compiling() and _tracing_state() is None):
        res = fast(x, normalized_shape, weight, bias, eps, False, residual, out, residual_out,
                   memory_efficient)
        if res is not None:
            return _finish(res, x, residual, return_residual)
    if scale is not None or out_dtype in _QUANT:
        return _norm_quant(x, normalized_shape, weight, bias, residual,
                           _new(NormOptions, (eps, False, zero_centered_gamma, casting, out_dtype)),
                           return_residual, residual_out, out, scale)
    return _norm(x, normalized_shape, weight, bias, residual,
                 _new(NormOptions, (eps, False, zero_centered_gamma, casting, out_dtype)),
                 return_residual, out, residual_out, memory_efficient)


def rms_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    residual: torch.Tensor | None = None,
    zero_centered_gamma: bool = False,
    return_residual: bool = False,
    casting: str = "torch",
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    memory_efficient: bool = False,
    scale: float | torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    return_dropout_mask: bool = False,
):
    """RMSNorm: ``y = h * rsqrt(mean(h²) + eps) * g``, optionally fused with a residual add.

    Args:
        x, normalized_shape, weight, residual, zero_centered_gamma, return_residual, casting,
            out_dtype, out, residual_out, scale, dropout_p, seed, return_dropout_mask: as
            in ``layer_norm`` (no bias).
        memory_efficient: as in ``layer_norm``; x̂ = y / g.
        eps: added to the mean square; None means ``torch.finfo(x.dtype).eps``, as in
            ``torch.nn.functional.rms_norm``.

    Returns:
        ``y`` shaped like x, or ``(y, h)`` with ``return_residual=True``.  Output dtype and the
        quantized outputs (``(q, scale)``, ``(q, scale, h)``): see ``layer_norm``.
    """
    if dropout_p != 0.0 or seed is not None or return_dropout_mask:
        _dropout_alone(memory_efficient, out_dtype, scale)
        return _dropout_norm(x, normalized_shape, weight, None, residual,
                             NormOptions(eps, True, zero_centered_gamma, casting, out_dtype),
                             return_residual, out, residual_out, dropout_p, seed,
                             return_dropout_mask)
    fast = _dispatch._fast or _first_call(x)
    if (fast is not None and casting == "torch" and out_dtype is None and not zero_centered_gamma
            and scale is None):
        if eps is None and isinstance(x, torch.Tensor) and x.is_floating_point():
            eps = torch.finfo(x.dtype).eps
        if (type(eps) is float and 0.0 <= eps < math.inf and type(memory_efficient) is bool
                and not _is_compiling() and _tracing_state() is None):
            res = fast(x, normalized_shape, weight, None, eps, True, residual, out,
                       residual_out, memory_efficient)
            if res is not None:
                return _finish(res, x, residual, return_residual)
    if scale is not None or out_dtype in _QUANT:
        return _norm_quant(x, normalized_shape, weight, None, residual,
                           _new(NormOptions, (eps, True, zero_centered_gamma, casting, out_dtype)),
                           return_residual, residual_out, out, scale)
    return _norm(x, normalized_shape, weight, None, residual,
                 _new(NormOptions, (eps, True, zero_centered_gamma, casting, out_dtype)),
                 return_residual, out, residual_out, memory_efficient)


def _finish(res, x, residual, return_residual):
    """The fast path's result in the public form: y, or (y, h) with h = x when no residual."""
    if residual is None:
        return (res, x) if return_residual else res
    return res if return_residual else res[0]


# ----------------------------------------------------------------------------------------------
# The general path
# ----------------------------------------------------------------------------------------------


def _rows(t, m, n, flat):
    """(M, N) view of t (a copy only when the last dim is not contiguous: the kernels read rows
    with a stride but need unit stride within a row)."""
    t2 = t if flat else t.reshape(m, n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _flatten(x, weight, bias, residual, ns, n):
    """(flat, M, x rows, residual rows, γ, β as 1-D): the (M, N) views every path hands the
    kernels (flat: x was already (M, N), so the outputs need no reshape back)."""
    flat = x.dim() == 2 and len(ns) == 1
    m = x.shape[0] if flat else (x.numel() // n if n else 0)
    return (flat, m, _rows(x, m, n, flat),
            None if residual is None else _rows(residual, m, n, flat),
            weight if weight is None or weight.dim() == 1 else weight.reshape(n),
            bias if bias is None or bias.dim() == 1 else bias.reshape(n))


def _autocast(x, weight, bias, residual):
    """The tensors as the op computes them: torch's autocast runs layer_norm / rms_norm in
    float32 on accelerators (CPU: no policy)."""
    if not x.is_cpu and not x.is_meta and torch.is_autocast_enabled(x.device.type):
        return tuple(None if t is None else t.float() for t in (x, weight, bias, residual))
    return x, weight, bias, residual


def _norm(x, normalized_shape, weight, bias, residual, opts: NormOptions, return_residual, out,
          residual_out, lean=False):
    ns, n, opts = _validate(x, normalized_shape, weight, bias, residual, opts)
    if lean is not False:
        lean = _check_lean(lean, x, weight, opts)
    if out is not None:
        _check_out(out, x, weight, bias, residual, opts)
    if residual_out is not None:
        _check_residual_out(residual_out, x, weight, bias, residual)
    if (out is not None or residual_out is not None) and not torch.compiler.is_compiling():
        _check_writes(x, weight, bias, residual, out, residual_out)
    x, weight, bias, residual = _autocast(x, weight, bias, residual)
    if _tracing_state() is not None or (
            torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export()):
        # Tracing (torch.jit.trace, both ONNX exporters): a compiled call is opaque to tracers and
        # would be recorded as a constant output, so trace torch's own ops instead — on x as
        # it is, so that a dynamic batch dim stays dynamic in the graph.
        y, h = _traceable(x, ns, n, weight, bias, residual, opts)
        if out is not None:
            y = out.copy_(y)
        if residual_out is not None:
            h = residual_out.copy_(h)
        return (y, x if h is None else h) if return_residual else y
    # Flatten to rows here, never inside the autograd.Function (STYLE habit 2).
    flat, m, x2, r2, w, b = _flatten(x, weight, bias, residual, ns, n)

    if torch.compiler.is_compiling():
        y, h = _compiled_path(x2, w, b, r2, opts, lean)
    else:
        # The kernels take the options one by one; unpacked once (~0.1 µs less than ``*opts``
        # or attribute reads at each use).
        eps, rms, zc, casting, out_dtype = opts
        kern = _select(x2, w, b, casting, out_dtype) if m and n else None
        # this thread's statistics sink (one global read while no thread has one)
        sink = getattr(_dispatch._tls, "sink", None) if _dispatch._observers else None
        if kern is None:
            y, h, mean, rstd = reference.norm_forward(x2, w, b, r2, eps, rms, zc, casting,
                                                      out_dtype)
            if sink is not None:
                _report(sink, mean.detach(), rstd.detach(), eps, rms)
        elif not (torch.is_grad_enabled() and (
            x.requires_grad
            or (w is not None and w.requires_grad)
            or (b is not None and b.requires_grad)
            or (r2 is not None and r2.requires_grad)
        )):
            if (out is not None or residual_out is not None) and kern is _dispatch._cpu_module:
                y, h, stats = kern.forward(
                    x2, w, b, r2, eps, rms, zc, casting, out_dtype, sink is not None,
                    y=None if out is None else _rows(out, m, n, flat),
                    h=None if residual_out is None else _rows(residual_out, m, n, flat))
            else:
                y, h, stats = kern.forward(x2, w, b, r2, eps, rms, zc, casting, out_dtype,
                                           sink is not None)
            if sink is not None:
                _report_stats(sink, stats, eps, rms)
        else:
            res = _NormFunction.apply(x2, w, b, r2, opts, kern, sink, lean)
            y, h = res if r2 is not None else (res, None)
    if not flat:
        y = y.view(x.shape)
        h = None if h is None else h.view(x.shape)
    if out is not None:
        if y.data_ptr() != out.data_ptr():
            out.copy_(y)
        y = out
    if residual_out is not None:
        if h.data_ptr() != residual_out.data_ptr():
            residual_out.copy_(h)
        h = residual_out
    if return_residual:
        return y, (x if h is None else h)  # no residual: h is x itself
    return y


# ----------------------------------------------------------------------------------------------
# Quantized outputs (serving): out_dtype=torch.float8_e4m3fn / torch.int8
# ----------------------------------------------------------------------------------------------

_QUANT = reference.QUANT_DTYPES


def _norm_quant(x, normalized_shape, weight, bias, residual, opts: NormOptions, return_residual,
                residual_out, out, scale):
    """(q, scale) or (q, scale, h): y of "torch"/"gemma" casting in float32, quantized per row
    (``layer_norm``'s docstring), forward only."""
    eps, rms, zc, casting, q_dtype = opts
    ns, n, opts = _validate(x, normalized_shape, weight, bias, residual,
                            _new(NormOptions, (eps, rms, zc, casting, None)))
    static = _check_quant(q_dtype, opts.casting, scale, out, x, weight, bias, residual)
    if residual_out is not None:
        _check_residual_out(residual_out, x, weight, bias, residual)
        _check_writes(x, weight, bias, residual, None, residual_out)
    eps, rms, zc, casting, _ = opts
    flat, m, x2, r2, w, b = _flatten(x, weight, bias, residual, ns, n)
    kern = _select(x2, w, b, casting, None) if m and n else None
    if kern is not None and not kern.supports_quant(x2):
        if get_backend() != "auto":
            raise ValueError(f"backend {get_backend()!r} cannot compute this call ({x.dtype} x "
                             f"with out_dtype={q_dtype}); use 'auto'")
        kern = None
    sink = getattr(_dispatch._tls, "sink", None) if _dispatch._observers else None
    if kern is None:
        y, h, mean, rstd = reference.norm_forward(x2, w, b, r2, eps, rms, zc, casting,
                                                  reference.compute_dtype(x.dtype))
        q, s = reference.quantize(y, q_dtype, static)
        s = s.float().view(m)  # (M,) as the kernels give it
        if sink is not None:
            _report(sink, mean, rstd, eps, rms)
    else:
        hr = None if residual_out is None else _rows(residual_out, m, n, flat)
        q, s, h, stats = kern.forward_quant(x2, w, b, r2, eps, rms, zc, q_dtype, static,
                                            sink is not None, h=hr)
        if sink is not None:
            _report_stats(sink, stats, eps, rms)
    if flat:
        s = s.unsqueeze(1)
    else:
        q = q.view(x.shape)
        s = s.view(x.shape[:x.dim() - len(ns)] + (1,) * len(ns))
    if residual_out is not None:
        if h.data_ptr() != residual_out.data_ptr():  # the reference wrote h elsewhere
            residual_out.copy_(h.view(x.shape))
        h = residual_out
    elif h is not None:
        h = h.view(x.shape)
    if not return_residual:
        return q, s
    return q, s, (x if h is None else h)  # no residual: h is x itself


# ----------------------------------------------------------------------------------------------
# Dropout before the residual add (dropout_p=, seed=; _dropout has the mask and the autograd)
# ----------------------------------------------------------------------------------------------


def _dropout_alone(memory_efficient, out_dtype, scale):
    """Dropout is fused with the plain training op only: not (yet) with the backward from y, and
    never with a quantized output (serving, where dropout is off)."""
    if memory_efficient is not False:
        raise ValueError("dropout_p/seed/return_dropout_mask cannot be combined with "
                         "memory_efficient=True: the backward from y does not regenerate the mask")
    if scale is not None or out_dtype in _QUANT:
        raise ValueError(f"dropout_p/seed/return_dropout_mask cannot be combined with a quantized "
                         f"out_dtype ({out_dtype}) or scale=: quantized outputs are for serving, "
                         f"where dropout is off")


def _dropout_norm(x, normalized_shape, weight, bias, residual, opts: NormOptions,
                  return_residual, out, residual_out, p, seed, return_mask):
    p, seed = _dropout._check(p, seed)
    if p == 0.0:  # no dropout: the plain op, and a mask of ones
        res = _norm(x, normalized_shape, weight, bias, residual, opts, return_residual, out,
                    residual_out)
        if not return_mask:
            return res
        return (*res, torch.ones_like(x, dtype=torch.bool)) if return_residual else (
            res, torch.ones_like(x, dtype=torch.bool))
    if out is not None or residual_out is not None:
        raise ValueError("out= and residual_out= are not supported with dropout_p > 0")
    if seed is None:
        seed = _dropout._draw_seed()
    ns, n, opts = _validate(x, normalized_shape, weight, bias, residual, opts)
    x, weight, bias, residual = _autocast(x, weight, bias, residual)
    flat, m, x2, r2, w, b = _flatten(x, weight, bias, residual, ns, n)
    eps, rms, zc, casting, out_dtype = opts
    kern = None
    if m and n and not torch.compiler.is_compiling() and _tracing_state() is None:
        kern = _select(x2, w, b, casting, out_dtype)
    if kern is None:
        # The reference (also what torch.compile and tracers see): h in plain torch ops,
        # differentiable, then the norm of h.
        keep = reference.dropout_mask(seed, p, m, n, x.device)
        h = reference.dropout_add(x2, r2, keep, p).view(x.shape)
        y = _norm(h, ns, weight, bias, None, opts, False, None, None)
    else:
        spec = _dropout._spec(p, seed)
        sink = getattr(_dispatch._tls, "sink", None) if _dispatch._observers else None
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x2, w, b, r2)):
            y, h = _dropout._DropoutNormFunction.apply(x2, w, b, r2, opts, kern, sink, spec, p)
        else:
            y, h, stats = kern.forward(x2, w, b, r2, eps, rms, zc, casting, out_dtype,
                                       sink is not None, dropout=spec)
            if sink is not None:
                _report_stats(sink, stats, eps, rms)
        y, h = y.view(x.shape), h.view(x.shape)
        if return_mask:
            keep = _dropout._keep_mask(kern, spec, p, m, n, x.device)
    res = (y, h) if return_residual else (y,)
    if return_mask:
        res = (*res, keep.view(x.shape))
    return res if len(res) > 1 else res[0]
