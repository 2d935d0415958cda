"""The CPU backend: normkit's compiled C++ kernels behind the interface functional.py calls.

The kernels (``kernels/csrc``) are built when the package is installed (``setup.py``) into the
extension module ``normkit.kernels._cpu``: nothing compiles at import or at the first call, and
nothing is cached at run time.  Its layers, arrows pointing down:

* ``host.cpp``: tensors in, tensors out — the eager entry point with its C++ autograd node
  (``infer``), and the forward/backward of the general path (``forward``, ``backward``);
* ``launch.cpp`` (torch's intra-op threads), ``buffers.cpp`` (the output pool, huge pages,
  streamed-store threshold, scratch), ``dispatch.cpp`` (which instruction-set path runs);
* ``rows.h`` on ``simd.h``: the row kernels, one source compiled per instruction set
  (``isa_*.cpp``: AVX-512 with and without AVX512_BF16, AVX2, and a portable path), which give
  the same bits on every path; ``quant.h`` beside them: norm + quantize (float8_e4m3fn / int8
  outputs), in the same per-path tables.

This module only maps dtypes and casting options to what the kernels take (``plan``), and says
where the extension is missing or was built for another torch: then ``import normkit`` still
works, "auto" serves CPU tensors from the reference, and one warning says how to rebuild.
"""

from __future__ import annotations

import functools
import os

import torch

from .reference import cast_dtype, compute_dtype, effective_gamma, kernel_dtypes, param_dtype

__all__ = ["forward", "backward", "infer", "supports", "plan", "release_buffers", "isa",
           "available_isas", "set_isa", "configure", "status", "group_forward",
           "group_backward", "supports_quant", "forward_quant", "dropout_apply"]

_KIND = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

REBUILD = ('rebuild them against this torch: pip install --no-build-isolation --no-deps '
           '--force-reinstall -e <your normkit checkout> (or install the normkit wheel built '
           'for it)')


def _load():
    try:
        from . import _cpu
    except ImportError as e:
        raise ImportError(f"normkit's compiled CPU kernels are not installed or do not load "
                          f"({e}); {REBUILD}") from e
    if _cpu.torch_version != torch.__version__:
        raise ImportError(f"normkit's compiled CPU kernels were built for torch "
                          f"{_cpu.torch_version}, and this is torch {torch.__version__}; "
                          f"{REBUILD}")
    return _cpu


_cpu = _load()

infer = _cpu.run
release_buffers = _cpu.release_buffers


def configure(double_backward) -> None:
    """Give the C++ autograd node the function it calls for ``create_graph=True`` backward
    (functional's, on the reference formulas): functional sits above the kernels, so it hands
    this down rather than the kernels importing it."""
    _cpu.configure(torch.nn.Parameter, double_backward)


def isa() -> str:
    """The instruction-set path the kernels run on: "avx512bf16", "avx512", "avx2" or
    "generic".  Chosen as the best one this machine has, or by ``NORMKIT_CPU_ISA``."""
    return _cpu.isa()


def available_isas() -> list[str]:
    """The paths this machine can run, best first (each gives the same bits)."""
    return _cpu.available_isas()


def set_isa(name: str) -> None:
    """Run the kernels on path ``name`` ("auto" for the best one), process-wide."""
    if not _cpu.set_isa(name):
        raise ValueError(f"CPU path {name!r} is not available here: this machine runs "
                         f"{available_isas()} (and 'auto')")


def status() -> dict:
    """What the kernels run on, for bug reports and benchmark records."""
    return {"isa": _cpu.isa(), "available": _cpu.available_isas(),
            "cpu_features": _cpu.cpu_features(), "openmp": _cpu.openmp(),
            "built_for_torch": _cpu.torch_version}


_env_isa = os.environ.get("NORMKIT_CPU_ISA", "auto")
if _env_isa not in ("auto", "", *available_isas()):
    import warnings

    warnings.warn(f"NORMKIT_CPU_ISA={_env_isa!r} is not a path this machine runs "
                  f"({available_isas()}); using {isa()!r}", RuntimeWarning, stacklevel=2)


@functools.cache
def plan(x_dtype, w_dtype, b_dtype, casting, out_dtype):
    """How the kernels compute operands of these dtypes, or None when they do not.

    Returns (param_dtype, output_dtype, cast_kind): γ/β are converted to param_dtype first
    (exact), and cast_kind is the storage kind x̂ is rounded to before γ ("llama"/"t5"
    casting), or -1.  Cached per combination.
    """
    if x_dtype not in _KIND or any(d is not None and d not in _KIND for d in (w_dtype, b_dtype)):
        return None
    if x_dtype != torch.float64 and torch.float64 in (w_dtype, b_dtype):
        return None
    dts = kernel_dtypes(x_dtype, w_dtype, b_dtype, casting, out_dtype)
    if dts is None or dts[1] not in _KIND:
        return None
    pd, od, nd = dts
    return pd, od, -1 if nd is None else _KIND[nd]


def supports(x, weight, bias, casting, out_dtype) -> bool:
    """Whether this backend computes the op for these operands (else the caller falls back)."""
    if (not x.is_cpu or (weight is not None and not weight.is_cpu)
            or (bias is not None and not bias.is_cpu)):
        return False
    wd = None if weight is None else weight.dtype
    bd = None if bias is None else bias.dtype
    return plan(x.dtype, wd, bd, casting, out_dtype) is not None


def forward(x, weight, bias, residual, eps, rms, zero_centered, casting, out_dtype, need_stats,
            y=None, h=None, dropout=None):
    """Forward on rows.

    Args:
        x: (M, N) with ``x.stride(1) == 1`` (rows may be strided).  residual: like x or None.
        weight, bias: (N,) contiguous, or None.  Other args as in ``reference.norm_forward``.
        need_stats: also return the (M, 3) statistics [m1, dm, rstd] that backward needs.
        y: a contiguous (M, N) output buffer of the output dtype (checked by the caller), or
            None to allocate one.  It may be x: every row is read before it is written.
        h: likewise for h (x's dtype), with a residual; it may be x or the residual.
        dropout: None, or (seed, keep_above, scale) (``reference.keep_above``): h = dropout(x)
            (+ residual) is written and normalized, in one pass (kernels/csrc/dropout.h).

    Returns:
        (y, h, stats): y (M, N) contiguous; h (M, N) in x.dtype or None; stats or None.
    """
    pd, od, nk = plan(x.dtype, None if weight is None else weight.dtype,
                      None if bias is None else bias.dtype, casting, out_dtype)
    if weight is None:
        zero_centered = False
    else:
        if weight.dtype != pd:
            weight = weight.to(pd)
        weight, zero_centered = effective_gamma(weight.contiguous(), zero_centered, nk >= 0)
    if bias is not None:
        bias = (bias if bias.dtype == pd else bias.to(pd)).contiguous()
    return _cpu.forward(x, weight, bias, residual, eps, rms, zero_centered, nk, od, need_stats,
                        y, h, dropout)


def backward(dy, dh, x, weight, has_bias, stats, rms, zero_centered, casting, need_dw,
             bias=None, from_y=False, dropout=None):
    """Backward on rows.

    Args:
        dy: (M, N) gradient of y (y's dtype).  dh: gradient of the returned h, or None.
        x: (M, N): the normalized input (h when a residual was added).
        weight: (N,) or None.  has_bias: whether dβ is wanted.  stats: forward's (M, 3).
        need_dw: whether dγ/dβ are wanted at all.
        bias, from_y: the memory-efficient backward: x is the forward's output y (x's dtype,
            "torch"/"gemma" casting), bias its β (or None), and x̂ = (y − β)/γ.  Raises
            ValueError where γ (1 + γ zero-centred) is 0.
        dropout: the spec (seed, keep_above, scale) of a dropout before the fused residual add
            (``_dropout``), or None.

    Returns:
        (dx, dweight, dbias): dx in x.dtype (also the residual's gradient); dweight/dbias in the
        statistics dtype (float32, float64 for float64 input) or None.  With ``dropout``, a
        fourth: m·dx, the dropout input's gradient (``dropout_apply(dx, dropout)``'s bits),
        written in the same pass as dx.
    """
    wd = None if weight is None else weight.dtype
    nd = cast_dtype(x.dtype, wd, casting)
    if weight is None:
        zero_centered = False
    else:
        pd = param_dtype(x.dtype, wd, None)
        if weight.dtype != pd:
            weight = weight.to(pd)
        weight, zero_centered = effective_gamma(weight.contiguous(), zero_centered,
                                                nd is not None)
    if from_y and bias is not None:
        bias = bias.to(param_dtype(x.dtype, None, bias.dtype)).contiguous()
    return _cpu.backward(dy, dh, x, weight, stats, rms, zero_centered,
                         -1 if nd is None else _KIND[nd], need_dw and weight is not None,
                         need_dw and has_bias, stats.dtype, bias if from_y else None,
                         bool(from_y), dropout)


def group_forward(x, weight, bias, num_groups, eps, channels_last):
    """GroupNorm forward (kernels/csrc/group_rows.h).

    Args:
        x: contiguous (B, C, S), or with ``channels_last`` (B, S, C); float32/64, bf16, fp16.
        weight, bias: (C,) in any float dtype, or None (converted to the compute dtype here:
            exact, C values).

    Returns:
        (y like x, stats (B·G, 3) [m1, dm, rstd] in the compute dtype).
    """
    cd = compute_dtype(x.dtype)
    w, b = (None if p is None else p.to(cd).contiguous() for p in (weight, bias))
    return _cpu.group_forward(x, w, b, num_groups, eps, channels_last)


def group_backward(dy, x, weight, stats, num_groups, channels_last, need_w, need_b):
    """GroupNorm backward: (dx like x, dγ, dβ) with dγ/dβ (C,) in the compute dtype (None
    where not wanted); dy like x (its dtype and layout)."""
    cd = compute_dtype(x.dtype)
    w = None if weight is None else weight.to(cd).contiguous()
    return _cpu.group_backward(dy, x, w, stats, num_groups, channels_last, need_w, need_b, cd)


# Norm + quantize (kernels/csrc/quant.h): float32, bfloat16 and float16 x; float64 x is left to
# the reference.
_QUANT_X = (torch.float32, torch.bfloat16, torch.float16)


def supports_quant(x) -> bool:
    """Whether ``forward_quant`` computes x's rows (the float part as ``supports`` says)."""
    return x.dtype in _QUANT_X


def forward_quant(x, weight, bias, residual, eps, rms, zero_centered, q_dtype, scale, need_stats,
                  h=None):
    """Forward on rows with a quantized output (see ``normkit.layer_norm``'s ``out_dtype``).

    Args:
        x, weight, bias, residual, eps, rms, zero_centered: as in ``forward`` ("torch" casting).
        q_dtype: torch.float8_e4m3fn or torch.int8.
        scale: the static scale, a 1-element float32 tensor, or None for each row's own.
        need_stats: also return the (M, 3) statistics.  h: as in ``forward``.

    Returns:
        (q, scale, h, stats): q (M, N) in q_dtype; scale (M,) float32; h or None; stats or None.
    """
    pd = plan(x.dtype, None if weight is None else weight.dtype,
              None if bias is None else bias.dtype, "torch", None)[0]
    if weight is None:
        zero_centered = False
    elif weight.dtype != pd:
        weight = weight.to(pd)
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = (bias if bias.dtype == pd else bias.to(pd)).contiguous()
    return _cpu.forward_quant(x, weight, bias, residual, eps, rms, zero_centered, q_dtype,
                              0.0 if scale is None else float(scale), need_stats, h)


def dropout_apply(src, dropout, out=None):
    """src·m for (M, N) rows of the dropout's rows, m = scale where kept and 0 elsewhere, rounded
    to src's dtype (the backward's dx = m·dh): into ``out`` (contiguous, src's dtype; it may
    be src itself), or a new contiguous tensor."""
    return _cpu.dropout_apply(src.contiguous(), out, 0, dropout)
