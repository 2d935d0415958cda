"""numba CPU kernels for LayerNorm / RMSNorm (+ fused residual add), forward and backward.

Layout of this file (STYLE habit 1): dtype plumbing (typed pointers, 16-bit conversions in
registers), row kernels, serial/parallel drivers, then the host functions that take torch tensors,
allocate outputs and launch.  The math is the one in ``reference.py``; read that first.

Design points, each with the reason:

* Tensors reach numba as raw addresses plus zero-size "marker" arrays that carry the element type.
  ``Tensor.numpy()`` costs ~1.1 µs per tensor and torch's whole LayerNorm at M=1 takes ~4.5 µs,
  so converting five tensors would lose the single-request case before any math is done.
* bfloat16 / float16 are read and written as 16-bit words and converted in registers: bf16 by a
  shift, fp16 by LLVM ``fpext``/``fptrunc`` (F16C on x86).  No extra pass over memory, and the
  rounding of finite values is bit-identical to torch's ``.to()`` (round to nearest even); a
  NaN stays a NaN.
* Statistics accumulate in float32 (float64 for float64 input) with the shifted scheme of the
  reference, ``d = v − m1``, ``dm = mean(d)``, ``var = mean(d²) − dm²``, where the shift m1 is
  the mean of the row's first W elements — exact ``v − m1`` for rows far from zero, one pass
  over the row for both moments.  Where that shift is far from the row's mean (dm² > var: the
  first elements are not typical of the row) the moments are taken again about m1 + dm, as
  close to the mean as the full first pass of the reference would be; rows shorter than W shift
  by their mean.  Either way a function of the row alone.
* No fast-math flag at all.  Row sums run on explicit 16-lane vectors in a fixed order
  (``_simd.py``); element-wise loops vectorize without help.  So LLVM may only make changes that
  keep every bit, and a row's result cannot depend on how the code was compiled: inlined or not,
  serial or parallel driver, compiled in this process or loaded from numba's cache (with
  ``reassoc`` it did, in the last bit of dx).  No ``nnan``/``ninf`` either: a NaN row stays NaN.
* Fused multiply-adds are written out (``_simd.fma``, never the compiler's ``contract``), at
  fixed places: the second row sum (Σd², Σg·dy·x̂) accumulates by FMA, y = x̂·γ + β is one FMA
  (LayerNorm with γ and β, outside "llama"/"t5" casting), dx = rstd·(g·dy − c1 − x̂·c2) + dh is
  three, and dγ += dy·x̂ one.  One rounding instead of two, and fewer instructions on the adder
  ports that bound a bfloat16 row in the caches (Zen 4, one core, 256x4096: LN forward 0.220 →
  0.186 ms, RMSNorm 0.182 → 0.125, LN backward 0.485 → 0.422).
* A row's bits depend only on the row, γ, β, ε and N: the serial and the parallel drivers run the
  same row function, rows never share a reduction, and the dγ/dβ reduction uses a partition of
  the rows that depends on M alone (never on the thread count), summed in a fixed order.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload
from numba.np.ufunc.parallel import _iget_num_threads  # the launching thread's count

from ._simd import (
    STREAM_ALIGN,
    Vec,
    W,
    address,
    fast_pairs,
    fast_widening,
    fma,
    prefetch,
    ptr,
    sfence,
    vload,
    vload_even,
    vload_odd,
    vround,
    vstore,
    vstore_pair,
    vstream,
    vstream_pair,
    vsum,
    vzero,
)
from .reference import cast_dtype, effective_gamma, kernel_dtypes, param_dtype

__all__ = ["forward", "backward", "infer", "train_forward", "train_backward", "supports", "plan",
           "release_buffers", "PARALLEL_MIN_ELEMENTS"]

_CACHE = os.environ.get("NORMKIT_NUMBA_CACHE", "1") != "0"

# Markers: zero-size arrays whose dtype tells numba how to read a pointer.
# int16 stands for float16 words, uint16 for bfloat16 words.
_MARKER = {
    torch.float32: np.empty(0, np.float32),
    torch.float64: np.empty(0, np.float64),
    torch.bfloat16: np.empty(0, np.uint16),
    torch.float16: np.empty(0, np.int16),
}

# Below this many elements a row loop runs serially on the calling thread.  A parallel launch on
# numba's OpenMP layer costs ~2 µs (its threads spin briefly between regions) and 32K elements
# of float32 are ~15 µs of work per core, so both cores pay off from here on (torch's own CPU
# grain is 32K elements too).  On the workqueue layer a launch wakes sleeping threads (~40-100
# µs on a 2-core VM), so there the threshold is 2M elements.  Serial and parallel drivers give
# identical bits (tested), so this is speed only.
PARALLEL_MIN_ELEMENTS = 1 << 15

# Flags passed as one int.  _NOSUM: a backward driver runs its row blocks and leaves the
# partial dγ/dβ rows unsummed (the native entry point's parallel launches sum them after).
_RES, _W, _B, _ZC, _NROUND, _STATS, _DW, _STREAM, _NOSUM = 1, 2, 4, 8, 16, 32, 128, 256, 512

# Backward: rows are split into contiguous blocks of at least _MIN_BLOCK_ROWS rows, at most
# _MAX_BLOCKS of them — or, for fewer rows than two such blocks, into blocks of at least
# _MIN_BLOCK_ELEMENTS elements (a few long rows: 16x8192 is eight blocks) — and a partition of
# fewer than _MIN_PAR_BLOCKS blocks is one block.  A function of M and N only, so dγ/dβ (one
# partial row per block, summed in block order) have the same bits whatever the thread count.
# Blocks are also the unit of parallel work, with or without dγ/dβ; a single block runs on the
# calling thread and writes dγ/dβ directly.
_MAX_BLOCKS = 64
_MIN_BLOCK_ROWS = 16
_MIN_BLOCK_ELEMENTS = 1 << 14
# A backward of fewer blocks than this (fewer than 128 rows, or a few long ones) runs on one
# thread whatever its size: two threads gained at most 15% at M = 8 in quiet runs, and twice a
# full grid had the two-thread 8x8192 backward at 0.69-0.71x torch where one thread is 1.2-1.4x.
# On one thread the blocks would only cost: each zeroes its partial rows and the driver sums
# them, so such a backward is one block (8x8192 float32, one core: 4 blocks 37.6 µs, one 27.5).
_MIN_PAR_BLOCKS = 8

# Row sums add W-lane vectors within blocks of this many elements, then the blocks in order
# (see _row_sums): a fixed order that keeps every lane's chain of additions short.
_BLOCK = 1024

# The backward takes rows of N ≤ _GROUP_ELEMENTS / 2 in groups of min(_GROUP_ROWS,
# _GROUP_ELEMENTS // N) rows (see _bwd_rows).  Larger groups (2048 elements) made 4096x768 a
# third slower; 32 rows of 128 spilled out of L1.
_GROUP_ROWS = 16
_GROUP_ELEMENTS = 1024
# float32/float64 rows of N ≥ _LONG_GROUP_MIN go in groups of _LONG_GROUP_ROWS rows (see
# _bwd_groups): there the dγ/dβ partial rows no longer share L1 with the row.  One core, serial
# driver, one block, in µs (row by row → in groups of 4): float32 8x8192 27.3 → 20.5, 192x4096
# 303 → 244, 768x4096 2478 → 1804, 1536x2048 2290 → 1834; 3072x1024 and 4096x768 the same.
# Not for 16-bit rows: bfloat16 4096x768 927 → 1190-1210 and 192x4096 219 → 257 (without
# dγ/dβ), whatever the cause (the interleaved rows' stores and loads, or their conversions).
_LONG_GROUP_ROWS = 4
_LONG_GROUP_MIN = 2048


def _bwd_blocks(m, n):
    """The number of row blocks of an (m, n) backward (see above): 1, or at least
    _MIN_PAR_BLOCKS."""
    if m >= 2 * _MIN_BLOCK_ROWS:
        nblk = min(_MAX_BLOCKS, m // _MIN_BLOCK_ROWS)
    else:
        nblk = max(1, min(m, m * n // _MIN_BLOCK_ELEMENTS))
    return nblk if nblk >= _MIN_PAR_BLOCKS else 1


# ----------------------------------------------------------------------------------------------
# dtype plumbing
# ----------------------------------------------------------------------------------------------


@intrinsic
def _ptr(typingctx, addr, marker):
    """Typed pointer from an integer address; the element type comes from ``marker.dtype``."""
    ptrty = types.CPointer(marker.dtype)
    sig = ptrty(types.intp, marker)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptrty))

    return sig, codegen


@intrinsic
def _f16_to_f32(typingctx, w):
    sig = types.float32(types.int16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f32_to_f16(typingctx, f):
    sig = types.int16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@intrinsic
def _f32_bits(typingctx, f):
    sig = types.uint32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _bits_f32(typingctx, u):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=_CACHE, error_model="numpy")
def _row(addr, offset, n, marker):  # pragma: no cover - compiled
    """The n elements starting ``offset`` elements past ``addr``, typed as ``marker``."""
    return carray(_ptr(addr + offset * marker.itemsize, marker), n)


def _ld(v):  # pragma: no cover - typed by the overload below
    """Storage element → compute value (float32, or float64 for float64 storage)."""


def _st(v, marker):  # pragma: no cover - typed by the overload below
    """Compute value → storage element of ``marker``'s type (round to nearest even)."""


def _c(v, marker):  # pragma: no cover - typed by the overload below
    """``v`` converted to the compute type of ``marker``'s storage type (float32 or float64).

    Every constant and scalar argument goes through this: numba types ``float32 + int`` and
    ``float32 * 1.0`` as float64, which silently turns a float32 row loop into a mixed-precision
    one at a third of the speed.
    """


@overload(_ld)
def _ld_impl(v):
    if v in (types.float32, types.float64):
        return lambda v: v
    if v == types.uint16:  # bfloat16: the high half of a float32
        return lambda v: _bits_f32(np.uint32(v) << np.uint32(16))
    if v == types.int16:  # float16
        return lambda v: _f16_to_f32(v)
    return None


@overload(_st)
def _st_impl(v, marker):
    dt = marker.dtype
    if dt == types.float32:
        return lambda v, marker: np.float32(v)
    if dt == types.float64:
        return lambda v, marker: np.float64(v)
    if dt == types.int16:
        return lambda v, marker: _f32_to_f16(np.float32(v))
    if dt == types.uint16:

        def st_bf16(v, marker):
            f = np.float32(v)
            u = _f32_bits(f)
            # Round to nearest even on the dropped 16 bits; NaN becomes the quiet NaN 0x7FC0, as
            # in torch's scalar conversion (rounding a NaN's bits could carry it into Inf).
            # Testing NaN on the float (f == f) rather than on the bits keeps this 2.4x cheaper
            # in the vectorized loop (0.23 vs 0.56 ns per element on AVX2).
            rne = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            return np.uint16(rne if f == f else np.uint32(0x7FC0))

        return st_bf16
    return None


@overload(_c)
def _c_impl(v, marker):
    if marker.dtype == types.float64:
        return lambda v, marker: np.float64(v)
    return lambda v, marker: np.float32(v)


def _weight_marker(WK, SK):  # pragma: no cover - typed by the overload below
    """The marker the row loops read γ/β with: SK (the compute dtype) for 16-bit γ/β, which
    the caller widens first, else WK itself."""


@overload(_weight_marker)
def _weight_marker_impl(WK, SK):
    if WK.dtype in (types.uint16, types.int16):
        return lambda WK, SK: SK
    return lambda WK, SK: WK


def _same_kind(a, b):  # pragma: no cover - typed by the overload below
    """Whether markers a and b stand for one element type: a constant of the compiled code."""


@overload(_same_kind)
def _same_kind_impl(a, b):
    same = a.dtype == b.dtype
    return lambda a, b: same


# One spelling of the element-wise math for the scalar head/tail of a row and its vector body:
# ``tag`` is a compute-dtype scalar (one element at j) or a Vec (W elements from j), and these
# dispatch on it.  Scalar and vector operations round identically, so every element gets the
# same bits whichever part of the row it falls in.


def _get(arr, j, tag):  # pragma: no cover - typed by the overload below
    """arr[j] (tag a scalar) or arr[j : j + W] (tag a Vec), in tag's compute dtype."""


def _put(arr, j, v):  # pragma: no cover - typed by the overload below
    """arr[j] = v or arr[j : j + W] = v, rounded to arr's storage dtype.

    Not inlined by numba (LLVM inlines it): numba's dead-code elimination of inlined code does
    not know that a store through a pointer argument is visible outside, and dropped it."""


def _round(v, marker):  # pragma: no cover - typed by the overload below
    """v rounded to ``marker``'s storage dtype and back."""


@overload(_get, inline="always")
def _get_impl(arr, j, tag):
    if isinstance(tag, Vec):
        return lambda arr, j, tag: vload(arr, j, tag)
    if tag == types.float64:
        return lambda arr, j, tag: np.float64(_ld(arr[j]))
    return lambda arr, j, tag: _ld(arr[j])


@overload(_put)
def _put_impl(arr, j, v):
    if isinstance(v, Vec):
        return lambda arr, j, v: vstore(arr, j, v)

    def put(arr, j, v):
        arr[j] = _st(v, arr)

    return put


@overload(_round, inline="always")
def _round_impl(v, marker):
    if isinstance(v, Vec):
        return lambda v, marker: vround(v, marker)
    return lambda v, marker: _ld(_st(v, marker))


def _spans(p, n, stream):  # pragma: no cover - typed by the overload below
    """(j0, j1): a row of n elements at pointer p is split into a scalar head [0, j0), whole
    vectors [j0, j1) and a scalar tail [j1, n).  With ``stream`` the vectors start at a
    multiple of STREAM_ALIGN bytes, as streamed stores need; else j0 = 0."""


@overload(_spans, inline="always")
def _spans_impl(p, n, stream):
    size = p.dtype.bitwidth // 8

    def spans(p, n, stream):
        j0 = min(n, (-address(p) % STREAM_ALIGN) // size) * int(stream)
        return j0, j0 + (n - j0) - (n - j0) % W

    return spans


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _fwd_row(
    i, n, rms, flags, eps, xa, xrs, ra, rrs, ha, ya, wa, ba, XK, OK, WK, NK, pairs
):  # pragma: no cover - compiled
    """One row: optional h = x + r, statistics, y.  Returns (m1, dm, rstd).

    Addresses are element-0 pointers; ``xrs``/``rrs`` are row strides in elements (the last dim
    is contiguous); h and y are contiguous (M, N).  XK/OK/WK/NK mark the element types of x (and
    residual, h), y, γ/β, and of the cast applied to the normalized value ("llama"/"t5").
    With ``pairs`` (see _fwd_rows) y is written in pairs and γ/β are laid out for them.
    """
    z = _c(0, XK)
    nf = _c(n, XK)
    e = _c(eps, XK)
    one = _c(1, XK)
    # Per-row arrays indexed by the bare loop variable: numba then knows the index is >= 0 and
    # emits no negative-index wraparound, which would otherwise keep LLVM from vectorizing.
    # In-place calls (h into the residual or x, y into its source) loop over the one array they
    # write: with two arrays at one address LLVM's overlap check sends the loop to its scalar
    # version (1.7x slower at 1024x4096 float32).
    if flags & _RES:
        x = _row(xa, i * xrs, n, XK)
        r = _row(ra, i * rrs, n, XK)
        src = _row(ha, i * n, n, XK)
        # h is rounded to x's dtype and then normalized as stored
        into_r = ha + i * n * XK.itemsize == ra + i * rrs * XK.itemsize
        into_x = not into_r and ha + i * n * XK.itemsize == xa + i * xrs * XK.itemsize
        if _pairable(XK, XK):
            _add_pairs(ptr(x), ptr(r), ptr(src), n, XK)
        elif into_r:
            for j in range(n):
                r[j] = _st(_ld(x[j]) + _ld(r[j]), XK)
        elif into_x:
            for j in range(n):
                x[j] = _st(_ld(x[j]) + _ld(r[j]), XK)
        else:
            for j in range(n):
                src[j] = _st(_ld(x[j]) + _ld(r[j]), XK)
        if into_r:
            src = r
        elif into_x:
            src = x
    else:
        src = _row(xa, i * xrs, n, XK)

    if rms:
        m1 = z
        dm = z
        q = _row_moments(src, n, z, XK)[1]
        rstd = one / np.sqrt(q / nf + e)
    else:
        # The shift m1: the mean of the row's first W elements (one pass over the row saved),
        # moved to m1 + dm for a second pass where that is far from the row's mean (see the
        # module docstring); rows shorter than W shift by their mean.
        if n >= W:
            m1 = vsum(vload(src, 0, XK)) / _c(W, XK)
        else:
            m1 = _row_moments(src, n, z, XK)[0] / nf
        s1, s2 = _row_moments(src, n, m1, XK)
        dm = s1 / nf
        var = s2 / nf - dm * dm
        if n >= W and dm * dm > var:
            m1 = m1 + dm
            s1, s2 = _row_moments(src, n, m1, XK)
            dm = s1 / nf
            var = s2 / nf - dm * dm
        rstd = one / np.sqrt(max(var, z) + e)

    y = _row(ya, i * n, n, OK)
    w = _row(wa, 0, n, WK)
    b = _row(ba, 0, n if flags & _B else 0, WK)
    # the next row's inputs, fetched while this row's output loop runs (see _fwd_out)
    px = ptr(_row(xa, (i + 1) * xrs, n, XK))
    pr = ptr(_row(ra, (i + 1) * rrs, n, XK)) if flags & _RES else px
    if _same_kind(XK, OK) and ya + i * n * OK.itemsize == src.ctypes.data:
        _fwd_out(y, y, w, b, rms, m1, dm, rstd, flags, XK, NK, pairs, px, pr)
    else:
        _fwd_out(src, y, w, b, rms, m1, dm, rstd, flags, XK, NK, pairs, px, pr)
    return m1, dm, rstd


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _row_moments(src, n, shift, XK):  # pragma: no cover - compiled
    """(Σd, Σd²) over the row, d = src[j] − shift, in the compute dtype and _row_sums's order
    (d² fused into its addition).
    A sum the caller drops is dead code: the compiler removes it."""
    return _row_sums(n, (ptr(src), shift), XK)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _row_sums(n, a, CK):  # pragma: no cover - compiled
    """The two row sums of ``_terms(j, ·, a)`` over j < n, in the compute dtype of marker CK,
    in one fixed order:

    * the row's first n − n % W elements as W-lane vectors, in blocks of _BLOCK elements; within
      a block, vector k (elements jb + kW ... jb + kW + W − 1) adds into accumulator k % 4, and
      the block's accumulators are combined as (A0 + A1) + (A2 + A3), then added to the row's
      running vector (blocks in order);
    * the lanes by vsum's pairwise tree;
    * then the n % W tail one element at a time.

    Four accumulators keep four independent chains of additions in flight (one chain waits for
    each addition's latency: a third of the speed of a loop that is not memory-bound), and two
    levels keep each lane's chain short (≤ 16 additions within a block, N/1024 across blocks),
    which matters at large N: one chain of N/16 float32 additions lost a digit against torch at
    N = 65539.  The second sum's summands are products p·q, each fused into its addition
    (``fma(p, q, acc)``: one rounding)."""
    nv = n - n % W
    vec = vzero(CK)
    s1v = vec
    s2v = vec
    for jb in range(0, nv, _BLOCK):
        e = min(jb + _BLOCK, nv)
        a1 = b1 = c1 = d1 = a2 = b2 = c2 = d2 = vec
        j = jb
        while j + 4 * W <= e:
            t1, p, q = _terms(j, vec, a)
            a1 += t1
            a2 = fma(p, q, a2)
            t1, p, q = _terms(j + W, vec, a)
            b1 += t1
            b2 = fma(p, q, b2)
            t1, p, q = _terms(j + 2 * W, vec, a)
            c1 += t1
            c2 = fma(p, q, c2)
            t1, p, q = _terms(j + 3 * W, vec, a)
            d1 += t1
            d2 = fma(p, q, d2)
            j += 4 * W
        if j < e:
            t1, p, q = _terms(j, vec, a)
            a1 += t1
            a2 = fma(p, q, a2)
            j += W
        if j < e:
            t1, p, q = _terms(j, vec, a)
            b1 += t1
            b2 = fma(p, q, b2)
            j += W
        if j < e:
            t1, p, q = _terms(j, vec, a)
            c1 += t1
            c2 = fma(p, q, c2)
        s1v += (a1 + b1) + (c1 + d1)
        s2v += (a2 + b2) + (c2 + d2)
    s1 = vsum(s1v)
    s2 = vsum(s2v)
    elem = _c(0, CK)
    for j in range(nv, n):
        t1, p, q = _terms(j, elem, a)
        s1 += t1
        s2 = fma(p, q, s2)
    return s1, s2


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _row_sums_pair(n, a, b, CK):  # pragma: no cover - compiled
    """``_row_sums`` of two rows at once, for n ≤ _BLOCK (one block): for each row the same
    additions in the same order (_add_terms is _row_sums's step), so the same bits, the two
    rows' instructions interleaved, so that one row's reductions (combining the accumulators,
    the lanes' tree) overlap the other's loads and products (see _bwd_groups: ~4%).  _row_sums
    itself is left as it was written: the same steps through _add_terms measured ~6% slower on
    the 4096x4096 bfloat16 backward."""
    nv = n - n % W
    vec = vzero(CK)
    a1 = b1 = c1 = d1 = a2 = b2 = c2 = d2 = vec
    e1 = f1 = g1 = h1 = e2 = f2 = g2 = h2 = vec
    j = 0
    while j + 4 * W <= nv:
        a1, a2 = _add_terms(j, vec, a, a1, a2)
        e1, e2 = _add_terms(j, vec, b, e1, e2)
        b1, b2 = _add_terms(j + W, vec, a, b1, b2)
        f1, f2 = _add_terms(j + W, vec, b, f1, f2)
        c1, c2 = _add_terms(j + 2 * W, vec, a, c1, c2)
        g1, g2 = _add_terms(j + 2 * W, vec, b, g1, g2)
        d1, d2 = _add_terms(j + 3 * W, vec, a, d1, d2)
        h1, h2 = _add_terms(j + 3 * W, vec, b, h1, h2)
        j += 4 * W
    if j < nv:
        a1, a2 = _add_terms(j, vec, a, a1, a2)
        e1, e2 = _add_terms(j, vec, b, e1, e2)
        j += W
    if j < nv:
        b1, b2 = _add_terms(j, vec, a, b1, b2)
        f1, f2 = _add_terms(j, vec, b, f1, f2)
        j += W
    if j < nv:
        c1, c2 = _add_terms(j, vec, a, c1, c2)
        g1, g2 = _add_terms(j, vec, b, g1, g2)
    sa1 = vsum(vec + ((a1 + b1) + (c1 + d1)))
    sa2 = vsum(vec + ((a2 + b2) + (c2 + d2)))
    sb1 = vsum(vec + ((e1 + f1) + (g1 + h1)))
    sb2 = vsum(vec + ((e2 + f2) + (g2 + h2)))
    elem = _c(0, CK)
    for j in range(nv, n):
        sa1, sa2 = _add_terms(j, elem, a, sa1, sa2)
        sb1, sb2 = _add_terms(j, elem, b, sb1, sb2)
    return sa1, sa2, sb1, sb2


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _add_terms(j, tag, a, s1, s2):  # pragma: no cover - compiled
    """(s1 + t1, fma(p, q, s2)) with (t1, p, q) = _terms(j, tag, a): one step of both sums."""
    t1, p, q = _terms(j, tag, a)
    return s1 + t1, fma(p, q, s2)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _xhat(v, m1, dm, rstd):  # pragma: no cover - compiled
    """x̂ = ((v − m1) − dm)·rstd: one spelling for the forward and every backward loop, so that
    they all round it alike."""
    return ((v - m1) - dm) * rstd


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _neg_means(c1, c2, n, rms, SK):  # pragma: no cover - compiled
    """(−c1/N, −c2/N) from a row's two backward sums, as _dx takes them; RMSNorm has no c1
    term: −0, so that fma(dy, g, −0) is g·dy exactly."""
    nf = _c(n, SK)
    return (-_c(0, SK) if rms else -(c1 / nf)), -(c2 / nf)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _dx(d, xh, g, nc1, nc2, rstd, dh):  # pragma: no cover - compiled
    """dx = rstd·(g·dy − c1 − x̂·c2) + dh (see _bwd_rows), given nc1 = −c1 and nc2 = −c2: three
    fused multiply-adds, in one spelling for both second passes."""
    return fma(rstd, fma(xh, nc2, fma(d, g, nc1)), dh)


def _terms(j, tag, a):  # pragma: no cover - typed by the overload below
    """The summands of a row sum at j (one element or a vector, as ``tag``): (t1, p, q), the
    first sum's term and the second's as a product p·q that _row_sums fuses into its addition.
    a = (src, shift): d and d·d with d = src[j] − shift (the forward's moments).  a = (dy, x, g,
    m1, dm, rstd, ds, xs, keep_d, keep_x): g·dy and g·dy·x̂ with x̂ = ((x − m1) − dm)·rstd (the
    backward's), dy kept in ds when ``keep_d`` and x̂ in xs when ``keep_x``."""


@overload(_terms, inline="always")
def _terms_impl(j, tag, a):
    if len(a) == 2:

        def moments(j, tag, a):
            d = _get(a[0], j, tag) - a[1]
            return d, d, d

        return moments

    def grads(j, tag, a):
        dy, x, g, m1, dm, rstd, ds, xs, keep_d, keep_x = a
        d = _get(dy, j, tag)
        xh = _xhat(_get(x, j, tag), m1, dm, rstd)
        gdy = d * _get(g, j, tag)
        if keep_d:
            _put(ds, j, d)
        if keep_x:
            _put(xs, j, xh)
        return gdy, gdy, xh

    return grads


def _pairable(XK, OK):  # pragma: no cover - typed by the overload below
    """Whether loops that read XK and write OK elements may go by pairs (see _simd): bfloat16
    both, on a machine with AVX512_BF16.  A constant of the compiled code."""


@overload(_pairable, inline="always")
def _pairable_impl(XK, OK):
    bf16 = XK.dtype == types.uint16 and OK.dtype == types.uint16
    return lambda XK, OK: bf16 and fast_pairs()


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _widen(src, dst, CK, pairs):  # pragma: no cover - compiled
    """dst = src widened to CK's compute dtype; with ``pairs`` each whole run of 2W elements
    from the start stored as its even elements, then its odd ones (how the pairs of _fwd_out
    read γ/β)."""
    n = dst.size
    sp, dp, vec = ptr(src), ptr(dst), vzero(CK)
    jp = n - n % (2 * W) if pairs else 0
    for j in range(0, jp, 2 * W):
        vstore(dp, j, vload_even(sp, j, vec))
        vstore(dp, j + W, vload_odd(sp, j, vec))
    for j in range(jp, n):
        dst[j] = _ld(src[j])


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _add_pairs(xp, rp, hp, n, XK):  # pragma: no cover - compiled
    """h = x + r rounded to XK, by pairs; h may be x or r (each pair is read before it is
    written)."""
    vec = vzero(XK)
    jp = n - n % (2 * W)
    for j in range(0, jp, 2 * W):
        e = vload_even(xp, j, vec) + vload_even(rp, j, vec)
        o = vload_odd(xp, j, vec) + vload_odd(rp, j, vec)
        vstore_pair(hp, j, e, o)
    for j in range(jp, n):
        hp[j] = _st(_ld(xp[j]) + _ld(rp[j]), XK)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _fwd_next_row(px, pr, j, flags):  # pragma: no cover - compiled
    """Prefetch the next row's x (and residual) at j: see _simd.prefetch."""
    prefetch(px, j)
    if flags & _RES:
        prefetch(pr, j)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _fwd_out(
    src, y, w, b, rms, m1, dm, rstd, flags, XK, NK, pairs, px, pr
):  # pragma: no cover - compiled
    """y = ((src − m1) − dm)·rstd·γ + β, as the flags and casting say; src may be y.

    Vectors in the body of the row, single elements in its head and tail (see ``_spans``);
    with _STREAM the vectors are streamed (non-temporal stores).  The flag tests are constant
    over the row: a predictable branch per W elements, not a scalar loop.  With ``pairs`` the
    body starts with the row's whole pairs (2W elements: the even ones, then the odd ones, as
    γ/β are laid out; see _simd's pairs), from j = 0."""
    n = y.size
    sp, yp, wp, bp, nk = ptr(src), ptr(y), ptr(w), ptr(b), ptr(NK)  # see _simd.ptr
    elem = _c(0, XK)
    vec = vzero(XK)
    stream = (flags & _STREAM) != 0
    jp = n - n % (2 * W) if pairs else 0
    for j in range(0, jp, 2 * W):
        _fwd_next_row(px, pr, j, flags)
        ye = _y_of(vload_even(sp, j, vec), j, vec, wp, bp, rms, m1, dm, rstd, flags, yp, nk)
        yo = _y_of(vload_odd(sp, j, vec), j + W, vec, wp, bp, rms, m1, dm, rstd, flags, yp,
                   nk)
        if stream:
            vstream_pair(yp, j, ye, yo)
        else:
            vstore_pair(yp, j, ye, yo)
    if pairs:  # what is left is not streamed (see _fwd_rows)
        j0, j1 = jp, n - n % W
    else:
        j0, j1 = _spans(yp, n, stream)
    for j in range(jp, j0):
        _put(yp, j, _y_at(j, elem, sp, wp, bp, rms, m1, dm, rstd, flags, yp, nk))
    for j in range(j0, j1, W):
        _fwd_next_row(px, pr, j, flags)
        _emit(yp, j, _y_at(j, vec, sp, wp, bp, rms, m1, dm, rstd, flags, yp, nk), stream)
    for j in range(j1, n):
        _put(yp, j, _y_at(j, elem, sp, wp, bp, rms, m1, dm, rstd, flags, yp, nk))


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _y_at(j, tag, src, w, b, rms, m1, dm, rstd, flags, OK, NK):  # pragma: no cover
    """y at j (one element or a vector, as ``tag``), before its rounding to OK."""
    return _y_of(_get(src, j, tag), j, tag, w, b, rms, m1, dm, rstd, flags, OK, NK)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _y_of(v, j, tag, w, b, rms, m1, dm, rstd, flags, OK, NK):  # pragma: no cover
    """y of the source value(s) v, with γ/β at j, before its rounding to OK: x̂·γ + β in one
    FMA, or x̂·γ without β (w holds γ, 1 + γ for a zero-centred γ, or ones: see _fwd_rows).
    "llama"/"t5" casting (_NROUND) rounds x̂ to NK and x̂·γ to OK before β is added.  The
    branches are constant over a row, and there are few of them: each one LLVM does not hoist
    out of the loop is a test and a jump per vector (a bfloat16 LayerNorm's output loop with
    one per flag, W/B/ZC/NROUND, ran at 0.22 ms for 256x4096 on one core, 0.186 with these).
    The ``rms`` branch skips RMSNorm's ``(v − 0) − 0`` (−0 − 0 is −0, so it cannot be dropped
    by the compiler)."""
    t = v * rstd if rms else _xhat(v, m1, dm, rstd)
    if flags & _NROUND:
        t = _round(t, NK)
        if flags & _W:
            t = _round(t * _get(w, j, tag), OK)
        return t + _get(b, j, tag) if flags & _B else t
    g = _get(w, j, tag)
    return fma(t, g, _get(b, j, tag)) if flags & _B else t * g


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _fwd_rows(
    lo, hi, n, rms, flags, eps, xa, xrs, ra, rrs, ha, ya, wa, ba, sa, XK, OK, WK, NK, SK
):  # pragma: no cover - compiled
    """Rows [lo, hi), their statistics into sa when asked, then a store fence when y was
    streamed (before the launch returns and another thread reads y).

    16-bit γ/β are widened to the compute dtype once for these rows (exact), so the rows' output
    loops convert only x: a conversion is a shift and a shuffle, and the shuffle unit, not
    memory, bounds a bfloat16 row's output loop (0.20 → 0.16 ns per element in L1, Zen 4).

    bfloat16 in and out, on a machine with AVX512_BF16, the output loops go by pairs (see
    _simd), which widen x with no shuffle at all (LayerNorm 256x4096 in the caches, one core:
    0.232 → 0.191 ns per element).  γ/β are then copied (widened) with each run of 2W split
    into its even and its odd elements, as the pairs read them.  The pairs start at j = 0, so
    they are not used where a streamed row would not start on a STREAM_ALIGN boundary.  Every
    element is computed as without pairs: the same bits.

    The output loops read γ from one array in every case: γ itself where it needs no copy, else
    its copy here, with 1 added for a zero-centred γ (the value the loop would add: the same
    bits) or ones without a γ (x̂·1 is x̂), so that they test no γ flag."""
    st = _row(sa, 0, 3 * hi if flags & _STATS else 0, SK)
    WM = _weight_marker(WK, SK)
    pairs = _pairable(XK, OK) and n >= 2 * W and (
        not flags & _STREAM or (ya % STREAM_ALIGN == 0 and n % (2 * W) == 0))
    copy = pairs or not _same_kind(WM, WK)
    copy_w = copy or (flags & (_W | _ZC)) != _W
    gw = np.empty(n if copy_w else 0, WM.dtype)
    gb = np.empty(n if copy and flags & _B else 0, WM.dtype)
    if flags & _W:
        _widen(_row(wa, 0, gw.size, WK), gw, WM, pairs)
        if flags & _ZC:
            for j in range(n):
                gw[j] += _c(1, WM)
    else:
        gw[:] = _c(1, WM)
    _widen(_row(ba, 0, gb.size, WK), gb, WM, pairs)
    for i in range(lo, hi):
        m1, dm, rstd = _fwd_row(
            i, n, rms, flags, eps, xa, xrs, ra, rrs, ha, ya,
            gw.ctypes.data if copy_w else wa, gb.ctypes.data if copy else ba, XK, OK, WM, NK,
            pairs
        )
        if flags & _STATS:
            st[3 * i] = m1
            st[3 * i + 1] = dm
            st[3 * i + 2] = rstd
    if flags & _STREAM:
        sfence()


@njit(cache=_CACHE, error_model="numpy")
def _fwd_serial(
    m, n, rms, flags, eps, xa, xrs, ra, rrs, ha, ya, wa, ba, sa, XK, OK, WK, NK, SK
):  # pragma: no cover - compiled
    _fwd_rows(0, m, n, rms, flags, eps, xa, xrs, ra, rrs, ha, ya, wa, ba, sa, XK, OK, WK, NK, SK)


@njit(cache=_CACHE, parallel=True, error_model="numpy")
def _fwd_parallel(
    m, n, rms, flags, eps, xa, xrs, ra, rrs, ha, ya, wa, ba, sa, XK, OK, WK, NK, SK
):  # pragma: no cover - compiled
    # One contiguous block of rows per thread, ended by its fence (rows are independent: the
    # split changes no bit).  prange hands each thread an equal share of the blocks anyway;
    # more blocks would only repeat each block's set-up (16-bit γ/β widened per block: at 8
    # rows, once per row; 8x4096 bfloat16 10.8 → 8.3 µs).
    nblk = max(1, min(m, _iget_num_threads()))
    rpb = (m + nblk - 1) // nblk
    for k in prange(nblk):
        _fwd_rows(k * rpb, min(m, (k + 1) * rpb), n, rms, flags, eps, xa, xrs, ra, rrs, ha, ya,
                  wa, ba, sa, XK, OK, WK, NK, SK)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@njit(cache=_CACHE, error_model="numpy")
def _bwd_rows(
    k0, k1, rpb, m, n, rms, flags, xa, dya, dha, dhrs, dxa, wa, sa, pwa, pba, XK, OK, WK, NK, SK
):  # pragma: no cover - compiled
    """Row blocks [k0, k1) (block k: rows [k·rpb, (k + 1)·rpb) ∩ [0, m)): dx, and each block's
    dγ/dβ partial sums (rows k of pwa/pba, in the compute dtype).  The set-up (γ converted, the
    work rows) is made once for all these blocks: ~0.1 µs a block, 20% of a 1024x64 backward.

    With x̂ = (v - m1 - dm)·rstd (LN) or v·rstd (RMS) and g = γ (or 1+γ), per row:
        dx = rstd · (g·dy − mean(g·dy) − x̂·mean(g·dy·x̂)) + dh   (RMS drops the mean(g·dy) term)
        dγ += dy · x̂  (x̂ cast as in the forward for "llama"/"t5"),  dβ += dy
    dh is the gradient that reached the returned pre-norm sum h.  The host always passes a γ
    (ones when there is none: dy·1 is exact) and a dh (one zero row read with stride ``dhrs=0``
    when there is none: +0 is exact), so the row loops have no branches to keep them scalar.

    Per row, a first pass reads x and dy for the two row sums, a second computes dx and adds
    into dγ/dβ.  For 16-bit x on machines without AVX-512BW the first pass also keeps dy and x̂
    in compute-dtype rows of this block (a row fits in L1), so the second converts nothing
    again: there the conversions (a widening and a shift each), not memory, bound this loop.
    With vpermw (one shuffle per conversion) reading the 16-bit rows again is cheaper than
    storing and reloading float32 ones (4096x4096 bf16 LN backward, 2 cores, Zen 4: 5.7-6.2 →
    4.9-5.2 ms; fp16 6.3 → 5.1 ms), as float32/float64 rows always are.  γ (+1) is converted
    once per block.

    Short rows (N ≤ _GROUP_ELEMENTS / 2, not streamed, no such copies) go in groups of up to
    _GROUP_ROWS rows: the first pass over the group's rows, then the second column by column
    through the group's rows (still in L1), four vectors at a time, each column's dγ/dβ partial
    sums kept in registers — the same operations and additions in the same order as row by row,
    without loading and storing the partial sums for every row (a second pass of 3 loads and a
    store per vector, not 6 and 3: 4096x64 float32, 2 cores, Zen 4: 87.7 → 72.7 µs, 16384x64
    255 → 200 µs).  The group's first pass also keeps each row's x̂ for the second (see
    _bwd_groups).  float32/float64 rows of N ≥ _LONG_GROUP_MIN go in groups of
    _LONG_GROUP_ROWS the same way, x̂ computed again from x (streamed too, where every row
    starts alike): there the partial rows, 8 bytes a column, spill out of L1 beside the row.
    """
    z = _c(0, XK)
    acc_w = (flags & _DW) != 0 and (flags & _NROUND) == 0  # dγ against x̂ in this loop
    acc_b = (flags & _B) != 0
    zc = _c(1, XK) if flags & _ZC else z
    w = _row(wa, 0, n, WK)
    st = _row(sa, 0, 3 * m, SK)
    g = np.empty(n, SK.dtype)  # γ (+1) in the compute dtype, converted once
    for j in range(n):
        g[j] = _ld(w[j]) + zc if flags & _ZC else _ld(w[j])  # γ + 0 would turn −0 into +0
    cache = not _same_kind(XK, SK) and not fast_widening()
    ds = np.empty(n if cache else 0, SK.dtype)
    xs = np.empty(n if cache else 0, SK.dtype)
    stream = (flags & _STREAM) != 0
    short = n <= _GROUP_ELEMENTS // 2
    long = n >= _LONG_GROUP_MIN and _same_kind(XK, SK)
    if cache or stream and (short or n * XK.itemsize % STREAM_ALIGN):
        grp = 1  # streamed rows of a group must all start alike: see _bwd_groups
    elif short:
        grp = max(1, min(_GROUP_ROWS, _GROUP_ELEMENTS // n))
    elif long:
        grp = _LONG_GROUP_ROWS
    else:
        grp = 1
    q = np.empty(3 * grp if grp > 1 else 0, SK.dtype)  # a group's rows: rstd, −c1/N, −c2/N
    xg = np.empty(grp * n if grp > 1 and short else 0, SK.dtype)  # a group's rows of x̂
    for k in range(k0, k1):
        lo = k * rpb
        hi = min(m, lo + rpb)
        dw = _row(pwa + k * n * SK.itemsize, 0, n if (flags & _DW) else 0, SK)
        db = _row(pba + k * n * SK.itemsize, 0, n if acc_b else 0, SK)
        for j in range(dw.size):  # this block's partial rows start from zero
            dw[j] = z
        for j in range(db.size):
            db[j] = z
        if grp > 1 and short:
            _bwd_groups(lo, hi, grp, n, rms, flags, xa, dya, dha, dhrs, dxa, st, g, dw, db,
                        ptr(q), ptr(xg), None, False, XK, OK, NK, SK)
        elif grp > 1:
            _bwd_groups(lo, hi, grp, n, rms, flags, xa, dya, dha, dhrs, dxa, st, g, dw, db,
                        ptr(q), ptr(xg), ptr(st), stream, XK, OK, NK, SK)
        else:
            _bwd_each_row(lo, hi, n, rms, flags, xa, dya, dha, dhrs, dxa, st, g, dw, db, ds, xs,
                          cache, stream, acc_w, acc_b, XK, OK, NK, SK)
    if stream:
        sfence()


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _bwd_groups(
    lo, hi, grp, n, rms, flags, xa, dya, dha, dhrs, dxa, st, g, dw, db, qp, xgp, sp, stream, XK,
    OK, NK, SK
):  # pragma: no cover - compiled
    """Rows [lo, hi) in groups of grp rows (see _bwd_rows): a first pass over each row of the
    group, then the second column by column through the group's rows, each column's dγ/dβ
    partial sums in registers (a load and a store for the group, not for every row).

    Short rows (``sp`` None): the first pass takes the group's rows two at a time
    (_row_sums_pair) and keeps each row's x̂ in the group's rows xgp (in L1): the second pass
    loads it instead of computing it again from x — two subtractions and a multiplication a
    vector fewer, and for 16-bit x no widening.  2048x64 backward, one core, in the caches:
    bfloat16 57.8 → 50.8 µs (x̂ kept alone: 53), float32 41.5 → 39.8 µs.

    Long rows (``sp`` the statistics): x̂ is computed again from x and the row's statistics
    (read through sp), as row by row; the group's rows are in L1/L2 from the first pass.  With
    ``stream`` (every row then starts at the same offset from a STREAM_ALIGN boundary) dx is
    streamed after the head that aligns it.  The next group's rows are fetched into L2 during
    the second pass (see _simd.prefetch).

    The same bits as row by row, either way."""
    elem = _c(0, SK)
    vec = vzero(SK)
    xga = address(xgp)
    keep = _is_none(sp)  # a constant of the compiled code
    for i0 in range(lo, hi, grp):
        i1 = min(hi, i0 + grp)
        if keep:
            for i in range(i0, i1, 2):  # rows by pairs, a last odd one alone
                ra = _bwd_terms(i, i0, n, xa, dya, st, g, xga, XK, OK, SK)
                if i + 1 < i1:
                    rb = _bwd_terms(i + 1, i0, n, xa, dya, st, g, xga, XK, OK, SK)
                    c1, c2, e1, e2 = _row_sums_pair(n, ra, rb, SK)
                    k = 3 * (i + 1 - i0)
                    qp[k] = st[3 * i + 5]  # row i + 1's rstd
                    qp[k + 1], qp[k + 2] = _neg_means(e1, e2, n, rms, SK)
                else:
                    c1, c2 = _row_sums(n, ra, SK)
                k = 3 * (i - i0)
                qp[k] = st[3 * i + 2]
                qp[k + 1], qp[k + 2] = _neg_means(c1, c2, n, rms, SK)
        else:
            for i in range(i0, i1):
                c1, c2 = _row_sums(n, (ptr(_row(dya, i * n, n, OK)), ptr(_row(xa, i * n, n, XK)),
                                       ptr(g), st[3 * i], st[3 * i + 1], st[3 * i + 2], ptr(g),
                                       ptr(g), False, False), SK)
                k = 3 * (i - i0)
                qp[k] = st[3 * i + 2]
                qp[k + 1], qp[k + 2] = _neg_means(c1, c2, n, rms, SK)
        dxg = dxa + i0 * n * XK.itemsize
        r = (i1 - i0, n, _group_x(sp, i0, n, xga, xa, XK, SK), dya + i0 * n * OK.itemsize,
             dha + i0 * dhrs * XK.itemsize, dhrs, dxg, qp, ptr(g), ptr(dw), ptr(db), flags, XK,
             OK, ptr(NK), SK, stream, _group_next(sp, i1, n, xa, dya, XK, OK))
        j0 = _spans(ptr(_row(dxg, 0, n, XK)), n, stream)[0]
        nv = n - (n - j0) % W
        nc = n - (n - j0) % (4 * W)
        for j in range(j0):
            _bwd_col(j, elem, r)
        for j in range(j0, nc, 4 * W):
            _bwd_col4(j, vec, r)
        for j in range(nc, nv, W):
            _bwd_col(j, vec, r)
        for j in range(nv, n):
            _bwd_col(j, elem, r)


def _is_none(v):  # pragma: no cover - typed by the overload below
    """Whether v is None: a constant of the compiled code."""


@overload(_is_none, inline="always")
def _is_none_impl(v):
    none = isinstance(v, types.NoneType)
    return lambda v: none


def _group_x(sp, i0, n, xga, xa, XK, SK):  # pragma: no cover - typed by the overload below
    """The x̂ source of a group from row i0 (see _bwd_groups), as (rows' address, marker of
    their dtype, statistics of the group's first row or None): the kept x̂ rows (``sp`` None),
    or x and its statistics."""


@overload(_group_x, inline="always")
def _group_x_impl(sp, i0, n, xga, xa, XK, SK):
    if isinstance(sp, types.NoneType):
        return lambda sp, i0, n, xga, xa, XK, SK: (xga, SK, None)
    return lambda sp, i0, n, xga, xa, XK, SK: (xa + i0 * n * XK.itemsize, XK, (sp, 3 * i0))


def _group_next(sp, i1, n, xa, dya, XK, OK):  # pragma: no cover - typed by the overload below
    """Long rows: typed pointers to x and dy from row i1 (the next group's rows), for
    _bwd_col4 to fetch during the second pass (past the last row, a prefetch is only wasted:
    it never faults); else None."""


@overload(_group_next, inline="always")
def _group_next_impl(sp, i1, n, xa, dya, XK, OK):
    if isinstance(sp, types.NoneType):
        return lambda sp, i1, n, xa, dya, XK, OK: None
    return lambda sp, i1, n, xa, dya, XK, OK: (ptr(_row(xa, i1 * n, 0, XK)),
                                               ptr(_row(dya, i1 * n, 0, OK)))


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _bwd_terms(i, i0, n, xa, dya, st, g, xga, XK, OK, SK):  # pragma: no cover - compiled
    """The ``_terms`` argument of row i of the group from row i0: its dy, x, γ, statistics, and
    its row of the group's x̂ to fill (dy not kept)."""
    return (ptr(_row(dya, i * n, n, OK)), ptr(_row(xa, i * n, n, XK)), ptr(g), st[3 * i],
            st[3 * i + 1], st[3 * i + 2], ptr(g), ptr(_row(xga, (i - i0) * n, n, SK)), False,
            True)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _bwd_each_row(
    lo, hi, n, rms, flags, xa, dya, dha, dhrs, dxa, st, g, dw, db, ds, xs, cache, stream, acc_w,
    acc_b, XK, OK, NK, SK
):  # pragma: no cover - compiled
    """Rows [lo, hi) one by one (see _bwd_rows)."""
    elem = _c(0, SK)
    vec = vzero(SK)
    for i in range(lo, hi):
        x = _row(xa, i * n, n, XK)
        dy = _row(dya, i * n, n, OK)
        dh = _row(dha, i * dhrs, n, XK)
        dx = _row(dxa, i * n, n, XK)
        m1 = st[3 * i]
        dm = st[3 * i + 1]
        rstd = st[3 * i + 2]
        # First pass: the two row sums in _row_sums's fixed order; with ``cache`` (16-bit rows
        # without vpermw) dy and x̂ are kept for the second pass.
        c1, c2 = _row_sums(n, (ptr(dy), ptr(x), ptr(g), m1, dm, rstd, ptr(ds), ptr(xs), cache,
                               cache), SK)
        nc1, nc2 = _neg_means(c1, c2, n, rms, SK)
        # Second pass, element-wise: dx, and dγ/dβ accumulated per column; vectors in the
        # body of the row, single elements in its head and tail (see _fwd_out).
        p = (ptr(ds), ptr(xs), ptr(dy), ptr(x), ptr(g), ptr(dh), ptr(dx), ptr(dw), ptr(db),
             ptr(NK))  # see _simd.ptr
        j0, j1 = _spans(p[6], n, stream)
        # the next row's inputs, fetched during this pass (see _simd.prefetch)
        px = ptr(_row(xa, (i + 1) * n, n, XK))
        pdy = ptr(_row(dya, (i + 1) * n, n, OK))
        pdh = ptr(_row(dha, (i + 1) * dhrs, n, XK))
        for j in range(j0):
            _bwd_at(j, elem, False, cache, p, m1, dm, rstd, nc1, nc2, flags, acc_w, acc_b)
        for j in range(j0, j1, W):
            prefetch(px, j)
            prefetch(pdy, j)
            if dhrs:
                prefetch(pdh, j)
            _bwd_at(j, vec, stream, cache, p, m1, dm, rstd, nc1, nc2, flags, acc_w, acc_b)
        for j in range(j1, n):
            _bwd_at(j, elem, False, cache, p, m1, dm, rstd, nc1, nc2, flags, acc_w, acc_b)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _bwd_at(
    j, tag, stream, cache, p, m1, dm, rstd, nc1, nc2, flags, acc_w, acc_b
):  # pragma: no cover - compiled
    """dx at j (one element or a vector, as ``tag``), and its dγ/dβ terms; p holds the row's
    pointers.  dy and x̂ come from the first pass's rows or are computed again: the same
    operations, the same bits."""
    ds, xs, dy, x, g, dh, dx, dw, db, NK = p
    if cache:
        d = _get(ds, j, tag)
        xh = _get(xs, j, tag)
    else:
        d = _get(dy, j, tag)
        xh = _xhat(_get(x, j, tag), m1, dm, rstd)
    if acc_w:
        _put(dw, j, fma(d, xh, _get(dw, j, tag)))
    elif flags & _DW:  # "llama"/"t5": dγ against x̂ as the forward rounded it
        _put(dw, j, fma(d, _round(xh, NK), _get(dw, j, tag)))
    if acc_b:
        _put(db, j, _get(db, j, tag) + d)
    v = _dx(d, xh, _get(g, j, tag), nc1, nc2, rstd, _get(dh, j, tag))
    _emit(dx, j, v, stream)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _bwd_cell(j, tag, q, k, xs, sm, dy, dh, dx, gv, wv, bv, flags, NK, stream):  # pragma: no cover
    """dx at j of one row of a group (rstd, −c1/N, −c2/N in q[k : k + 3]; x̂ in xs, or x in xs
    and the row's statistics where sm says; dx streamed with ``stream``), and that row's dγ/dβ
    terms added to wv/bv: always both (a few additions), so that the loop over rows has no
    branch; the caller stores only what the flags ask for."""
    rstd = q[k]
    d = _get(dy, j, tag)
    xh = _x_hat_at(j, tag, xs, sm, rstd)
    xw = _round(xh, NK) if flags & _NROUND else xh  # "llama"/"t5": x̂ as the forward cast it
    v = _dx(d, xh, gv, q[k + 1], q[k + 2], rstd, _get(dh, j, tag))
    _emit(dx, j, v, stream)
    return fma(d, xw, wv), bv + d


def _x_hat_at(j, tag, xs, sm, rstd):  # pragma: no cover - typed by the overload below
    """x̂ at j: xs[j] (sm None: x̂ kept), or computed from x = xs and the row's statistics at
    sm, as row by row."""


@overload(_x_hat_at, inline="always")
def _x_hat_at_impl(j, tag, xs, sm, rstd):
    if isinstance(sm, types.NoneType):
        return lambda j, tag, xs, sm, rstd: _get(xs, j, tag)
    def x_hat(j, tag, xs, sm, rstd):
        st, k = sm
        return _xhat(_get(xs, j, tag), st[k], st[k + 1], rstd)

    return x_hat


def _row_stats(sp, i):  # pragma: no cover - typed by the overload below
    """Where row i of the group finds its statistics: (pointer, index) from the group's
    (pointer, index) ``sp``, or None for None."""


@overload(_row_stats, inline="always")
def _row_stats_impl(sp, i):
    if isinstance(sp, types.NoneType):
        return lambda sp, i: None
    return lambda sp, i: (sp[0], sp[1] + 3 * i)


def _fetch_rows(nxt, i, n, j):  # pragma: no cover - typed by the overload below
    """Ask for x and dy of row i after the group at the four vectors from j (see _group_next);
    nothing for None."""


@overload(_fetch_rows, inline="always")
def _fetch_rows_impl(nxt, i, n, j):
    if isinstance(nxt, types.NoneType):
        return lambda nxt, i, n, j: None

    def fetch(nxt, i, n, j):
        for a in range(4):
            prefetch(nxt[0], i * n + j + a * W)
            prefetch(nxt[1], i * n + j + a * W)

    return fetch


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _bwd_col(j, tag, r):  # pragma: no cover - compiled
    """Column j (one element or a vector, as ``tag``) of a group of rows (``r``, see
    ``_bwd_groups``): dx, with this column's dγ/dβ partial sums kept in registers across the
    rows (added in row order, as row by row)."""
    rows, n, xsrc, dya, dha, dhrs, dxa, q, g, dw, db, flags, XK, OK, NK, SK, stream, nxt = r
    xsa, XSK, sp = xsrc
    gv = _get(g, j, tag)
    wv = _get(dw, j, tag) if flags & _DW else tag
    bv = _get(db, j, tag) if flags & _B else tag
    for i in range(rows):
        wv, bv = _bwd_cell(
            j, tag, q, 3 * i, ptr(_row(xsa, i * n, n, XSK)), _row_stats(sp, i),
            ptr(_row(dya, i * n, n, OK)), ptr(_row(dha, i * dhrs, n, XK)),
            ptr(_row(dxa, i * n, n, XK)), gv, wv, bv, flags, NK, stream)
    if flags & _DW:
        _put(dw, j, wv)
    if flags & _B:
        _put(db, j, bv)


@njit(cache=_CACHE, error_model="numpy", inline="always")
def _bwd_col4(j, vec, r):  # pragma: no cover - compiled
    """``_bwd_col`` for the four vector columns from j: a row's statistics loaded once for
    four vectors."""
    rows, n, xsrc, dya, dha, dhrs, dxa, q, g, dw, db, flags, XK, OK, NK, SK, stream, nxt = r
    xsa, XSK, sp = xsrc
    g0 = _get(g, j, vec)
    g1 = _get(g, j + W, vec)
    g2 = _get(g, j + 2 * W, vec)
    g3 = _get(g, j + 3 * W, vec)
    w0 = w1 = w2 = w3 = b0 = b1 = b2 = b3 = vec
    if flags & _DW:
        w0 = _get(dw, j, vec)
        w1 = _get(dw, j + W, vec)
        w2 = _get(dw, j + 2 * W, vec)
        w3 = _get(dw, j + 3 * W, vec)
    if flags & _B:
        b0 = _get(db, j, vec)
        b1 = _get(db, j + W, vec)
        b2 = _get(db, j + 2 * W, vec)
        b3 = _get(db, j + 3 * W, vec)
    for i in range(rows):
        _fetch_rows(nxt, i, n, j)
        xs = ptr(_row(xsa, i * n, n, XSK))
        sm = _row_stats(sp, i)
        dy = ptr(_row(dya, i * n, n, OK))
        dh = ptr(_row(dha, i * dhrs, n, XK))
        dx = ptr(_row(dxa, i * n, n, XK))
        k = 3 * i
        w0, b0 = _bwd_cell(j, vec, q, k, xs, sm, dy, dh, dx, g0, w0, b0, flags, NK, stream)
        w1, b1 = _bwd_cell(j + W, vec, q, k, xs, sm, dy, dh, dx, g1, w1, b1, flags, NK, stream)
        w2, b2 = _bwd_cell(j + 2 * W, vec, q, k, xs, sm, dy, dh, dx, g2, w2, b2, flags, NK,
                           stream)
        w3, b3 = _bwd_cell(j + 3 * W, vec, q, k, xs, sm, dy, dh, dx, g3, w3, b3, flags, NK,
                           stream)
    if flags & _DW:
        _put(dw, j, w0)
        _put(dw, j + W, w1)
        _put(dw, j + 2 * W, w2)
        _put(dw, j + 3 * W, w3)
    if flags & _B:
        _put(db, j, b0)
        _put(db, j + W, b1)
        _put(db, j + 2 * W, b2)
        _put(db, j + 3 * W, b3)


def _emit(arr, j, v, stream):  # pragma: no cover - typed by the overload below
    """``_put``, streamed when ``stream`` and v is a vector."""


@overload(_emit)
def _emit_impl(arr, j, v, stream):
    if isinstance(v, Vec):

        def emit(arr, j, v, stream):
            if stream:
                vstream(arr, j, v)
            else:
                vstore(arr, j, v)

        return emit
    return lambda arr, j, v, stream: _put(arr, j, v)


@njit(cache=_CACHE, error_model="numpy")
def _bwd_serial(
    k0, k1, m, nblk, n, rms, flags, xa, dya, dha, dhrs, dxa, wa, sa, pwa, pba, dwa, dba,
    XK, OK, WK, NK, SK, GK,
):  # pragma: no cover - compiled
    """Blocks [k0, k1) of the nblk-block partition of the m rows, then (unless _NOSUM) dγ/dβ
    summed from all nblk partial rows.  The host passes [0, nblk); the native entry point
    runs ranges of blocks on several threads with _NOSUM, then the sum alone ([0, 0))."""
    if k1 > k0:
        _bwd_rows(k0, k1, (m + nblk - 1) // nblk, m, n, rms, flags, xa, dya, dha, dhrs, dxa, wa,
                  sa, pwa, pba, XK, OK, WK, NK, SK)
    if not flags & _NOSUM:
        _sum_blocks(nblk, n, flags, pwa, pba, dwa, dba, SK, GK)


@njit(cache=_CACHE, parallel=True, error_model="numpy")
def _bwd_parallel(
    k0, k1, m, nblk, n, rms, flags, xa, dya, dha, dhrs, dxa, wa, sa, pwa, pba, dwa, dba,
    XK, OK, WK, NK, SK, GK,
):  # pragma: no cover - compiled
    # _bwd_serial's work, the blocks on numba's threads.  Each thread takes a contiguous run of
    # blocks (the blocks, and so the bits, are the same whatever the thread count) and makes
    # its set-up once.  The same run every launch: a repeated backward finds its rows in the
    # same core's caches.  Handing blocks out from a shared counter instead (so that the master
    # takes more while a worker wakes: ~3 µs on this VM inside autograd, against ~1 µs in a
    # tight loop) was slower, with or without each thread taking its own run first: 512x64
    # float32 inside autograd.grad 33.9 → 36.9 µs.
    rpb = (m + nblk - 1) // nblk
    nt = max(1, min(k1 - k0, _iget_num_threads()))
    bpt = (k1 - k0 + nt - 1) // nt
    for t in prange(nt):
        _bwd_rows(k0 + t * bpt, min(k1, k0 + (t + 1) * bpt), rpb, m, n, rms, flags, xa, dya, dha,
                  dhrs, dxa, wa, sa, pwa, pba, XK, OK, WK, NK, SK)
    if not flags & _NOSUM:
        _sum_blocks(nblk, n, flags, pwa, pba, dwa, dba, SK, GK)


@njit(cache=_CACHE, error_model="numpy")
def _sum_blocks(nblk, n, flags, pwa, pba, dwa, dba, SK, GK):  # pragma: no cover - compiled
    """dγ[j] = Σ_k partial[k, j] (dβ alike), k in order, then rounded once to GK: a fixed
    summation order, so dγ/dβ are bitwise reproducible from run to run whatever the thread
    count.  Where the host let the single block write the output itself there is nothing to do.
    """
    for which in range(2):
        if which == 0 and (flags & _DW) == 0 or which == 1 and (flags & _B) == 0:
            continue
        pa = pwa if which == 0 else pba
        oa = dwa if which == 0 else dba
        if pa == oa:
            continue
        acc = _row(pa, 0, n, SK)
        for k in range(1, nblk):
            p = _row(pa, k * n, n, SK)
            for j in range(n):
                acc[j] += p[j]
        out = _row(oa, 0, n, GK)
        for j in range(n):
            out[j] = _st(acc[j], GK)


# ----------------------------------------------------------------------------------------------
# Host functions: torch tensors in, torch tensors out
# ----------------------------------------------------------------------------------------------

# Threading layer: OpenMP where numba has it (GNU OpenMP on Linux), TBB next, numba's own
# workqueue last; a layer the user chose (NUMBA_THREADING_LAYER) is kept.  OpenMP launches in
# ~2 µs against ~40 µs for workqueue, which is what lets mid-sized batches (4096x64, 512x768)
# use both cores at all.  GNU OpenMP is not fork-safe: numba kills a forked child that starts a
# parallel region when the parent had already run one ("fork() called from a process already
# using GNU OpenMP") — every DataLoader worker, every pre-forking server.  So a child forked
# after the parent's first parallel launch runs every kernel on the serial driver (same bits:
# serial and parallel drivers agree bit for bit), see ``_after_fork_in_child``.  One parallel
# region at a time (``_PAR_LOCK``): concurrent callers would oversubscribe the cores anyway.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    numba.config.THREADING_LAYER = "default"
elif os.environ["NUMBA_THREADING_LAYER"] == "workqueue":
    PARALLEL_MIN_ELEMENTS = 1 << 21

_parallel_used = False  # this process has launched a parallel region
_serial_only = False  # forked after the parent had: parallel regions would be fatal here


def _after_fork_in_child():
    global _serial_only
    if _parallel_used or _native is not None and _native.parallel_used():
        _serial_only = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _first_parallel_launch():
    """Once per process: note the launch (see the fork handling above) and, should numba have
    fallen back to its workqueue layer, raise the threshold to what pays off there."""
    global _parallel_used, PARALLEL_MIN_ELEMENTS
    _parallel_used = True
    if numba.threading_layer() == "workqueue":
        PARALLEL_MIN_ELEMENTS = max(PARALLEL_MIN_ELEMENTS, 1 << 21)
        if _native is not None:
            from . import native

            native._sync_limits(_native)

_PAR_LOCK = threading.Lock()
_threads = threading.local()  # .n: the numba thread count last set from this Python thread

# Large outputs: ask for transparent huge pages before the first write.  A fresh output above
# glibc's mmap threshold is fresh pages, and faulting them in 4 KiB at a time costs more than the
# op: allocating + filling 64 MiB took 39 ms here against 7 ms for the copy alone; with
# MADV_HUGEPAGE, 11 ms.  (torch does the same for its own allocations only when the
# THP_MEM_ALLOC_ENABLE environment variable is set.)  Only the 2 MiB-aligned interior is advised;
# where madvise or THP is unavailable this is a no-op.
_HUGE_MIN_ELEMENTS = 1 << 20
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_madvise = None


def _hugepages(t: torch.Tensor) -> torch.Tensor:
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _madvise = libc.madvise
            except (OSError, AttributeError):
                pass
    if _madvise:
        start = -(-t.data_ptr() // _HUGE) * _HUGE
        end = (t.data_ptr() + t.nbytes) // _HUGE * _HUGE
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)
    return t



# Outputs (y, dx) of at least _STREAM_MIN_BYTES are written with streaming (non-temporal)
# stores, unless y overwrites x in place (and h never: the row's statistics read it right back).
# A plain store first reads the destination's cache line from memory (read-for-ownership), so an
# output costs twice its size in traffic — a memory-bound op then runs at ~2/3 of a copy
# (measured: a 4096x4096 float32 output loop 7.3 ms with plain stores, 5.4 ms streamed,
# np.copyto 5.5 ms, one core).  Streamed lines bypass the caches, so outputs that would still be
# cached for the next op are stored plainly: the threshold is 3/4 of the last-level cache, as
# glibc's memcpy does (NORMKIT_STREAM_MIN_MB overrides; 0 streams all).
def _stream_min_bytes():
    mib = os.environ.get("NORMKIT_STREAM_MIN_MB")
    if mib is not None:
        return int(float(mib) * (1 << 20))
    size = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        indices = [d for d in os.listdir(base) if d.startswith("index")]
    except OSError:
        indices = []
    for index in indices:  # the largest cache level's size, e.g. "32768K"
        try:
            with open(os.path.join(base, index, "size")) as f:
                text = f.read().strip()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            size = max(size, int(text.rstrip("KMG")) * unit)
        except (OSError, ValueError):
            continue
    return (size or (32 << 20)) * 3 // 4


_STREAM_MIN_BYTES = _stream_min_bytes()


def _stream_flag(elements, dtype):
    """_STREAM for a fresh output of this size, else 0."""
    return _STREAM if elements * dtype.itemsize >= _STREAM_MIN_BYTES else 0


# Large outputs (y, h, dx) come from a pool of buffers that earlier outputs left behind.  A fresh
# 64 MiB tensor costs its page faults — the kernel zeroing every new page — even with huge
# pages: ~3 ms here, as much as the whole op on a 2-core VM, and torch's CPU allocator hands
# such sizes straight to mmap/munmap, so every call pays again.  A pooled buffer is a numpy
# array the tensor is built on (torch.from_numpy keeps a reference to it); it is free again
# exactly when no tensor uses its memory any more, which its reference count says (the pool's
# entry and the loop's name are the only references then).  Buffers are reused only for the
# same byte size; the pool holds at most NORMKIT_CPU_POOL_MB MiB (default: an eighth of the
# machine's memory, at most 2 GiB; 0 turns it off), and ``normkit.empty_cache()`` empties it.
# Tensors from the pool have storage that cannot be resized (resize_ raises), as any tensor
# from torch.from_numpy.
_POOL: list = []  # [numpy uint8 array, byte offset of the 64-byte aligned start, nbytes]
_POOL_LOCK = threading.Lock()


def _pool_max_bytes():
    mib = os.environ.get("NORMKIT_CPU_POOL_MB")
    if mib is not None:
        return int(mib) << 20
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        memory = 16 << 30
    return min(2 << 30, memory // 8)


_POOL_MAX_BYTES = _pool_max_bytes()


def _count_free_refs():
    """sys.getrefcount of a pooled array that no tensor uses, as ``_big_empty`` sees it: the
    pool's entry, the loop's name and the call's argument on CPython 3.11, but versions count
    borrowed references differently, so it is measured, not assumed.  None (no pool) should a
    tensor on the array not show in the count."""
    pool = [[np.empty(1, np.uint8), 0, 1]]
    for entry in pool:
        a = entry[0]
        free = sys.getrefcount(a)
        held = torch.from_numpy(a[0:1])
        used = sys.getrefcount(a)
        del held
        return free if used > free and sys.getrefcount(a) == free else None
    return None


_FREE_REFS = _count_free_refs()
if _FREE_REFS is None:
    _POOL_MAX_BYTES = 0


def _big_empty(shape, dtype):
    """An uninitialized contiguous CPU tensor of at least _HUGE_MIN_ELEMENTS elements, from the
    pool when a free buffer of its byte size is there (a plain torch tensor when the pool is
    full or off)."""
    nbytes = math.prod(shape) * dtype.itemsize
    with _POOL_LOCK:
        for entry in _POOL:
            a = entry[0]
            if entry[2] == nbytes and sys.getrefcount(a) == _FREE_REFS:
                return _view(a, entry[1], nbytes, shape, dtype)
        pooled = sum(e[2] for e in _POOL)
        if pooled + nbytes > _POOL_MAX_BYTES:
            return _hugepages(torch.empty(shape, dtype=dtype))
        a = np.empty(nbytes + 64, np.uint8)
        off = -a.ctypes.data % 64  # torch's own alignment
        _POOL.append([a, off, nbytes])
        t = _view(a, off, nbytes, shape, dtype)
    return _hugepages(t)


def _view(a, off, nbytes, shape, dtype):
    return torch.from_numpy(a[off:off + nbytes]).view(dtype).view(shape)


def release_buffers():
    """Forget every pooled buffer; the memory of those no tensor uses is freed now."""
    with _POOL_LOCK:
        _POOL.clear()


def _empty_like_rows(x, dtype=None):
    """A contiguous tensor shaped like x (or (M, N) when x is strided) for an output."""
    dtype = x.dtype if dtype is None else dtype
    contiguous = x.is_contiguous()
    shape = x.shape if contiguous else (x.shape[0], x.shape[1])
    if x.numel() >= _HUGE_MIN_ELEMENTS:
        return _big_empty(shape, dtype)
    # empty_like is ~1 µs cheaper than empty(shape, dtype=...) where it applies
    if contiguous and dtype == x.dtype:
        return torch.empty_like(x)
    return torch.empty(shape, dtype=dtype)


@functools.cache
def plan(x_dtype, w_dtype, b_dtype, casting, out_dtype):
    """How the kernels compute operands of these dtypes, or None when they do not.

    Returns (param_dtype, output_dtype, rounds, markers): ``rounds`` says whether x̂ is rounded
    before γ ("llama"/"t5" casting), markers = (x, y, γ/β, cast, stats).
    Cached per combination: the eager path pays one dict look-up instead of the promotion logic.
    """
    result = None
    if (x_dtype in _MARKER and all(d is None or d in _MARKER for d in (w_dtype, b_dtype))
            and (x_dtype == torch.float64 or torch.float64 not in (w_dtype, b_dtype))):
        dts = kernel_dtypes(x_dtype, w_dtype, b_dtype, casting, out_dtype)
        if dts is not None and dts[1] in _MARKER:
            pd, od, nd = dts
            sd = torch.float64 if x_dtype == torch.float64 else torch.float32
            markers = (_MARKER[x_dtype], _MARKER[od], _MARKER[pd], _MARKER[nd or x_dtype],
                       _MARKER[sd])
            result = (pd, od, nd is not None, markers)
    return result



def supports(x, weight, bias, casting, out_dtype) -> bool:
    """Whether this backend computes the op for these operands (else the caller falls back)."""
    if not x.is_cpu or any(p is not None and not p.is_cpu for p in (weight, bias)):
        return False
    wd = None if weight is None else weight.dtype
    bd = None if bias is None else bias.dtype
    return plan(x.dtype, wd, bd, casting, out_dtype) is not None


def forward(x, weight, bias, residual, eps, rms, zero_centered, casting, out_dtype, need_stats,
            y=None, h=None):
    """Forward on rows.

    Args:
        x: (M, N) with ``x.stride(1) == 1`` (rows may be strided).  residual: like x or None.
        weight, bias: (N,) contiguous, or None.  Other args as in ``reference.norm_forward``.
        need_stats: also return the (M, 3) statistics [m1, dm, rstd] that backward needs.
        y: a contiguous (M, N) output buffer of the output dtype (checked by the caller), or
            None to allocate one.  It may be x: every row is read before it is written.
        h: likewise for h (x's dtype), with a residual; it may be x or the residual.

    Returns:
        (y, h, stats): y (M, N) contiguous; h (M, N) in x.dtype or None; stats or None.
    """
    m, n = x.shape
    pd, od, nround, mk = plan(
        x.dtype, None if weight is None else weight.dtype, None if bias is None else bias.dtype,
        casting, out_dtype,
    )
    flags = _NROUND if nround else 0
    wa = ba = ra = rrs = ha = sa = 0
    if weight is not None:
        if weight.dtype != pd:
            weight = weight.to(pd)
        weight, zero_centered = effective_gamma(weight, zero_centered, nround)
        wa = weight.data_ptr()
        flags |= _W | (_ZC if zero_centered else 0)
    if bias is not None:
        if bias.dtype != pd:
            bias = bias.to(pd)
        ba = bias.data_ptr()
        flags |= _B
    if y is None:
        y = _empty_like_rows(x, od)
    if y.data_ptr() != x.data_ptr():  # in place, the row is in the caches already
        flags |= _stream_flag(m * n, od)
    stats = None
    if residual is None:
        h = None
    else:
        if h is None:
            h = _empty_like_rows(x)
        ra, rrs, ha = residual.data_ptr(), residual.stride(0), h.data_ptr()
        flags |= _RES
    if need_stats:
        sd = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats = torch.empty((m, 3), dtype=sd)
        sa = stats.data_ptr()
        flags |= _STATS
    _launch(_fwd_serial, _fwd_parallel, m * n,
            (m, n, rms, flags, eps, x.data_ptr(), x.stride(0), ra, rrs, ha, y.data_ptr(), wa, ba,
             sa, *mk), mk)
    return y, h, stats


def infer(x, n, weight, bias, eps, rms, residual=None, out=None, h_out=None, autograd=None):
    """The eager call in its most common form, as cheap as it can be, or None.

    For an int n (or a 1-tuple, as nn.LayerNorm passes it), a contiguous CPU x whose last dim
    is n, γ/β None or contiguous (n,) in the dtype the kernels read them in, an optional
    contiguous residual like x, "torch" casting, and ``out`` (``h_out``, with a residual) None
    or a contiguous CPU tensor like x, not the same tensor.  Returns y (``out`` when given), or
    (y, h) with a residual (h is ``h_out`` when given).  When a gradient is wanted (grad mode
    and an input that requires it) the result is ``autograd(x, weight, bias, residual, eps,
    rms, plan)`` — the caller's autograd.Function, whose forward calls ``train_forward`` — or
    None without ``autograd`` or with ``out``/``h_out``.
    Anything else — including arguments that are not tensors at all — returns None, and the
    caller takes the general path, which validates everything and raises the named errors.
    The caller has checked eps, the casting options, tracing and torch.compile.
    Once the native entry point is built (native.py), it serves these calls first, with the
    same compiled drivers; what it declines continues here.
    """
    if (_native is not None and out is None and h_out is None and autograd is not None
            and PARALLEL_MIN_ELEMENTS == _native_par_min):
        res = _native.run(x, n, weight, bias, residual, eps, rms)  # see native.py
        if res is not None:
            return res
    if type(n) is not int:
        if type(n) is not tuple or len(n) != 1 or type(n[0]) is not int:  # nn.LayerNorm's form
            return None
        n = n[0]
    try:
        if x.shape[-1] != n or not x.is_cpu or not x.is_contiguous():
            return None
        grad = torch.is_grad_enabled()
        train = grad and x.requires_grad
        wd = bd = None
        wa = ba = ra = 0
        flags = 0
        if weight is not None:
            if weight.shape != (n,) or not weight.is_cpu or not weight.is_contiguous():
                return None
            train = train or (grad and weight.requires_grad)
            wd = weight.dtype
            wa = weight.data_ptr()
            flags = _W
        if bias is not None:
            if bias.shape != (n,) or not bias.is_cpu or not bias.is_contiguous():
                return None
            train = train or (grad and bias.requires_grad)
            bd = bias.dtype
            ba = bias.data_ptr()
            flags |= _B
        if residual is not None:
            if (residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_cpu
                    or not residual.is_contiguous()):
                return None
            train = train or (grad and residual.requires_grad)
            ra = residual.data_ptr()
            flags |= _RES
        if out is not None:
            if (train or out.shape != x.shape or out.dtype != x.dtype or not out.is_cpu
                    or not out.is_contiguous() or (grad and out.requires_grad)):
                return None
        if h_out is not None:
            if (train or not ra or h_out.shape != x.shape or h_out.dtype != x.dtype
                    or not h_out.is_cpu or not h_out.is_contiguous()
                    or (grad and h_out.requires_grad)
                    or (out is not None and out.data_ptr() == h_out.data_ptr())):
                return None
        m = x.numel() // n if n else 0
    except (AttributeError, IndexError, TypeError):
        return None
    key = (x.dtype, wd, bd)
    p = _INFER_PLANS.get(key)
    if p is None:
        p = _INFER_PLANS[key] = _infer_plan(*key)
    if _native is not None and p and key not in _native_keys:  # new, or made while it was off
        _native_register(_native, key, p)
    if not p or m == 0:
        return None
    if train:
        return None if autograd is None else autograd(x, weight, bias, residual, eps, rms, p)
    big = m * n >= _HUGE_MIN_ELEMENTS
    if out is None:
        y = _empty_like_rows(x) if big else torch.empty_like(x)
        flags |= _stream_flag(m * n, x.dtype)
    else:
        y = out
        if y.data_ptr() != x.data_ptr():  # in place, the row is in the caches already
            flags |= _stream_flag(m * n, x.dtype)
    h = None
    if ra:
        h = h_out
        if h is None:
            h = _empty_like_rows(x) if big else torch.empty_like(x)
        args = (m, n, rms, flags, eps, x.data_ptr(), n, ra, n, h.data_ptr(), y.data_ptr(), wa, ba,
                0, *p[0])
    else:
        args = (m, n, rms, flags, eps, x.data_ptr(), n, 0, 0, 0, y.data_ptr(), wa, ba, 0, *p[0])
    entry = p[1]
    serial = m * n < PARALLEL_MIN_ELEMENTS or _serial_only
    if entry is not None and serial:
        entry(*args)
    else:
        _launch(_fwd_serial, _fwd_parallel, m * n, args, p[0])
        if p[1] is None and serial:
            p[1] = _ENTRIES[(_fwd_serial, id(p[0]))]
    return y if h is None else (y, h)


def train_forward(x, weight, bias, residual, eps, rms, p):
    """Forward for the autograd fast path, on operands ``infer`` accepted with its plan ``p``:
    (y, h or None, stats).  Same bits as every other path (same row function); the (M, 3)
    statistics are for ``train_backward``.
    """
    n = x.shape[-1]
    m = x.numel() // n
    y = _empty_like_rows(x)
    flags = _STATS | _stream_flag(m * n, x.dtype)
    wa = ba = ra = ha = 0
    if weight is not None:
        wa = weight.data_ptr()
        flags |= _W
    if bias is not None:
        ba = bias.data_ptr()
        flags |= _B
    h = None
    if residual is not None:
        h = _empty_like_rows(x)
        ra, ha = residual.data_ptr(), h.data_ptr()
        flags |= _RES
    stats = torch.empty((m, 3), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    markers = p[0]
    _launch(_fwd_serial, _fwd_parallel, m * n,
            (m, n, rms, flags, eps, x.data_ptr(), n, ra, n, ha, y.data_ptr(), wa, ba,
             stats.data_ptr(), *markers), markers)
    return y, h, stats


def train_backward(dy, dh, v, weight, stats, rms, need_w, need_b, p):
    """Backward for the autograd fast path: v is x (or h) as ``train_forward`` read it, dy/dh
    contiguous in x's dtype, ``p`` the plan ``infer`` gave.  Returns (dx, dγ, dβ) like
    ``backward``, but dγ/dβ in γ/β's own dtype (rounded once in the kernel), None where not
    wanted."""
    flags = (_DW if need_w and weight is not None else 0) | (_B if need_b else 0)
    return _bwd_launch(stats.shape[0], v.shape[-1], rms, flags, v, dy, dh, weight, p[3], stats,
                       p[2], p[3])


# The native entry point (native.py) once its background build has finished, and the
# PARALLEL_MIN_ELEMENTS it was given: a caller that changes the limit (tests do) gets the Python
# path, which reads the limit on every call.
_native = None
_native_par_min = -1
_NATIVE_LOCK = threading.RLock()
_native_keys: set = set()


def _native_ready(mod):
    """Called by native.py when the extension is loaded: register every plan made so far."""
    global _native, _native_par_min
    with _NATIVE_LOCK:
        for key, p in list(_INFER_PLANS.items()):
            if p:
                _native_register(mod, key, p)
        _native_par_min = PARALLEL_MIN_ELEMENTS
        _native = mod


def _native_register(mod, key, p):
    from . import native

    with _NATIVE_LOCK:
        if key not in _native_keys:
            native.register(mod, key, p)
            _native_keys.add(key)


# (x dtype, γ dtype, β dtype) -> [forward markers, serial forward entry point or None, backward
# markers, γ/β dtype], or False when the fast paths do not cover the combination (γ/β need a
# conversion first).
_INFER_PLANS: dict = {}


def _infer_plan(x_dtype, wd, bd):
    p = plan(x_dtype, wd, bd, "torch", None)
    if p is None or (wd is not None and wd != p[0]) or (bd is not None and bd != p[0]):
        return False
    pd, sd = p[0], (torch.float64 if x_dtype == torch.float64 else torch.float32)
    # The autograd path's backward: x, dy, γ/β and the cast in x's dtype, dγ/dβ out in γ's.
    return [p[3], None, _bwd_markers(x_dtype, x_dtype, pd, x_dtype, sd, pd), pd]


# The compiled entry point of each (driver, dtype markers) specialization.  Calling it skips
# numba's type dispatch (~0.5 µs of the ~4.5 µs that torch's whole LayerNorm takes at M=1).
# Every other argument has a fixed type (ints, bool, float), so the markers decide the types.
_ENTRIES: dict = {}
_KEYED: list = []


def _launch(serial, parallel, elements, args, markers):
    """Run ``args`` on the serial or the parallel driver.  ``markers`` is the tuple that ends
    ``args``, one of the persistent tuples of ``plan``/``_bwd_markers``: its id is the key of the
    compiled entry point (a key of five ids would cost ~0.5 µs per call)."""
    # As many threads as torch is allowed (torch.set_num_threads), never more than numba
    # started: a worker process limited to one torch thread gets no second normkit thread.
    nt = 1
    if elements >= PARALLEL_MIN_ELEMENTS and not _serial_only:
        nt = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if nt <= 1:
        key = (serial, id(markers))
        entry = _ENTRIES.get(key)
        if entry is not None:
            entry(*args)
        else:
            _first_call(serial, key, args, markers)
        return
    key = (parallel, id(markers))
    entry = _ENTRIES.get(key)
    with _PAR_LOCK:
        if getattr(_threads, "n", None) != nt:  # numba's setting is per calling thread
            numba.set_num_threads(nt)
            _threads.n = nt
        if entry is not None:
            entry(*args)
        else:
            _first_call(parallel, key, args, markers)
        if not _parallel_used:
            _first_parallel_launch()


def _first_call(driver, key, args, markers):
    driver(*args)  # compiles or loads from the cache on first use
    sig = tuple(map(numba.typeof, args))
    _ENTRIES[key] = driver.overloads[sig].entry_point
    _KEYED.append(markers)  # an id in a key must never be reused by another tuple


def backward(dy, dh, x, weight, has_bias, stats, rms, zero_centered, casting, need_dw):
    """Backward on rows.

    Args:
        dy: (M, N) gradient of y (contiguous, y's dtype).  dh: gradient of the returned h, or None.
        x: (M, N) contiguous: the normalized input (h when a residual was added).
        weight: (N,) or None.  has_bias: whether dβ is wanted.  stats: forward's (M, 3).
        need_dw: whether dγ/dβ are wanted at all.

    Returns:
        (dx, dweight, dbias): dx in x.dtype (also the residual's gradient); dweight/dbias in the
        statistics dtype (float32, float64 for float64 input) or None.
    """
    m, n = x.shape
    pd = param_dtype(x.dtype, None if weight is None else weight.dtype, None)
    sd = stats.dtype
    nd = cast_dtype(x.dtype, None if weight is None else weight.dtype, casting)
    want_w = need_dw and weight is not None
    want_b = need_dw and has_bias
    if weight is None:
        zero_centered = False
    else:
        if weight.dtype != pd:
            weight = weight.to(pd)
        weight, zero_centered = effective_gamma(weight, zero_centered, nd is not None)
    flags = (
        (_DW if want_w else 0)
        | (_B if want_b else 0)
        | (_ZC if zero_centered else 0)
        | (_NROUND if nd is not None else 0)
    )
    return _bwd_launch(m, n, rms, flags, x, dy, dh, weight, pd, stats,
                       _bwd_markers(x.dtype, dy.dtype, pd, nd or x.dtype, sd, sd), sd)


@functools.cache
def _bwd_markers(*dtypes):
    """The markers of these dtypes as one persistent tuple (``_launch`` keys on its id)."""
    return tuple(_MARKER[d] for d in dtypes)


def _bwd_launch(m, n, rms, flags, x, dy, dh, weight, param_dtype, stats, markers, grad_dtype):
    """Allocate dx and the dγ/dβ the flags ask for (in ``grad_dtype``, marked by the last of the
    six ``markers``), launch, return (dx, dγ or None, dβ or None).

    γ (in ``param_dtype``) or dh may be None: the kernel then reads a row of ones (dy·1 is
    exact) or one zero row for every row (+0 is exact), which keeps its row loops branch-free.

    Each row block accumulates one partial row of dγ (dβ) in the statistics dtype, in this
    thread's scratch buffer; the driver sums them in block order and rounds once into the
    outputs.  A single block (see ``_bwd_blocks``) whose output needs no rounding writes it
    directly.  Every allocation saved counts at M=1: inside a backward, torch.empty costs ~2 µs.
    """
    if weight is None:
        weight = _const_row(1, n, param_dtype)
    dhrs = n
    if dh is None:
        dh, dhrs = _const_row(0, n, x.dtype), 0
    nblk = _bwd_blocks(m, n)
    sd = stats.dtype
    dx = _empty_like_rows(x)  # x is contiguous
    dw = torch.empty(n, dtype=grad_dtype) if flags & _DW else None
    db = torch.empty(n, dtype=grad_dtype) if flags & _B else None
    dwa = 0 if dw is None else dw.data_ptr()
    dba = 0 if db is None else db.data_ptr()
    pwa, pba = dwa, dba
    if (nblk > 1 or grad_dtype != sd) and (dw is not None or db is not None):
        row = nblk * n * stats.element_size()
        pwa = _scratch(2 * row)
        pba = pwa + row
    flags |= _stream_flag(m * n, x.dtype)
    args = (0, nblk, m, nblk, n, rms, flags, x.data_ptr(), dy.data_ptr(), dh.data_ptr(), dhrs,
            dx.data_ptr(), weight.data_ptr(), stats.data_ptr(), pwa, pba, dwa, dba, *markers)
    _launch(_bwd_serial, _bwd_parallel, m * n if nblk > 1 else 0, args, markers)
    return dx, dw, db


# Per Python thread: one byte buffer for the dγ/dβ block partials, grown on demand (at most
# 2·64·N float64).  Partials live only during a launch, and a launch runs on its caller's thread.
_SCRATCH = threading.local()


def _scratch(nbytes):
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < nbytes:
        buf = _SCRATCH.buf = torch.empty(max(nbytes, 1 << 16), dtype=torch.uint8)
    return buf.data_ptr()


# Read-only rows of ones / zeros, per (value, N, dtype): the backward's stand-ins for an absent
# γ or dh.  A handful of entries in practice; cleared if it ever grows large.
_CONST_ROWS: dict = {}


def _const_row(value, n, dtype):
    key = (value, n, dtype)
    row = _CONST_ROWS.get(key)
    if row is None:
        if len(_CONST_ROWS) > 64:
            _CONST_ROWS.clear()
        row = _CONST_ROWS[key] = torch.full((n,), value, dtype=dtype)
    return row


# The native entry point builds or loads in the background from the first CPU call on.
from . import native as _native_module  # noqa: E402 - it needs the names above

_native_module.start()
