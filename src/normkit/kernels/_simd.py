"""Fixed-width vectors for the numba kernels: row reductions whose bits no compiler can change.

A row sum vectorizes only if the compiler may reassociate it, and with that freedom (numba's
``fastmath={"reassoc"}``) LLVM picks the lane count and the order of the final additions per
compilation: the same kernel inlined into another function, or loaded from numba's cache
rather than compiled in this process, summed in another order, and dx moved in the last bit
(measured: the serial and the parallel driver, and a compiling and a cache-loading process,
disagreed).  So the kernels use no fast-math flag at all, and a reduction is written here as
what it is meant to be:

* ``W`` = 16 lanes; the row's first ``n - n % W`` elements are added as W-element vectors
  in an order the caller writes down (cpu._row_sums: blocks of 1024 elements, four
  accumulators per block, combined in a fixed pattern);
* ``vsum`` adds the lanes pairwise (k with k+8, then k with k+4, ...), a fixed tree;
* the caller adds the remaining ``n % W`` elements one by one after that.

Without fast-math flags LLVM may only make changes that keep every result bit (IEEE semantics),
so a row's result is a function of the row, its length and these rules alone — on every
machine, in every compilation.  Sixteen lanes are one AVX-512 register or two AVX2 registers of
float32.

``Vec`` is the numba type of a vector of compute values (float32, or float64 for float64
storage); ``vload`` reads W elements of any storage type (float32, float64, bfloat16 as uint16
words, float16 as int16 words) and converts them in registers to the compute dtype of a
marker; ``vstore`` rounds and writes them back (round to nearest even, bit for bit as the
scalar conversions of cpu.py); ``vstream`` does so with a non-temporal store, for outputs too
large for the caches.  ``+``, ``-``, ``*`` work on two vectors of one dtype or a vector and a
scalar of its dtype (a float64 scalar with a float32 vector is a typing error, not a silent
promotion).  ``fma(a, b, c)`` is a·b + c rounded once, for vectors and scalars alike: the
kernels fuse a product into an addition only where they say so.  Loads and stores take arrays
or typed pointers (``ptr``); the kernels' loops use pointers, which carry no reference count.
"""

from __future__ import annotations

import operator

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, overload, register_model

__all__ = ["W", "Vec", "STREAM_ALIGN", "ptr", "address", "vzero", "vload", "vstore", "vstream",
           "vround", "vsum", "sfence", "fast_widening", "vload_even", "vload_odd", "vstore_pair",
           "vstream_pair", "fast_pairs", "fma"]

W = 16
STREAM_ALIGN = 64  # bytes: where a streamed store of a vector must start

_LL = {types.float32: ir.FloatType(), types.float64: ir.DoubleType()}


class Vec(types.Type):
    """W compute values (float32 or float64) in one LLVM vector."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"normkit.Vec({dtype} x {W})")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_LL[fe_type.dtype], W))


def _compute(storage):
    """The compute dtype of a storage dtype (None where there is none)."""
    if storage == types.float64:
        return types.float64
    if storage in (types.float32, types.uint16, types.int16):
        return types.float32
    return None


def _like_dtype(like):
    """The compute dtype a ``like`` argument asks for: a marker array's or a typed pointer's (by
    its storage dtype), a vector's, or a float scalar's own."""
    if isinstance(like, (types.Array, types.CPointer)):
        return _compute(like.dtype)
    if isinstance(like, Vec):
        return like.dtype
    if like in (types.float32, types.float64):
        return like
    return None


def _vt(dtype):
    return ir.VectorType(_LL[dtype], W)


def _ivec(bits, values=None):
    t = ir.VectorType(ir.IntType(bits), W)
    return t if values is None else ir.Constant(t, [values] * W)


def _splat(builder, scalar, vt):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), scalar, ir.IntType(32)(0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W))


def _is_ref(t):
    """An array, or a typed pointer (``ptr``), of a storage dtype."""
    return isinstance(t, (types.Array, types.CPointer)) and _compute(t.dtype) is not None


def _element_ptr(context, builder, arrty, arr, j, jty):
    if isinstance(arrty, types.CPointer):
        base = arr
    else:
        base = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(base, [context.cast(builder, j, jty, types.intp)])


@intrinsic
def ptr(typingctx, arr):
    """The typed pointer to an array's first element.  Kernels index pointers, not arrays, in
    their loops: a pointer carries no reference count, so no NRT_incref/decref (atomic
    instructions, which also drain the streamed stores' write-combining buffers) is left in a
    loop whose body branches."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        return context.make_array(sig.args[0])(context, builder, args[0]).data

    return types.CPointer(arr.dtype)(arr), codegen


@intrinsic
def address(typingctx, p):
    """A typed pointer's address as an integer."""
    if not isinstance(p, types.CPointer):
        return None

    def codegen(context, builder, sig, args):
        return builder.ptrtoint(args[0], context.get_value_type(types.intp))

    return types.intp(p), codegen


# Whether bfloat16 conversions may use vpermw (AVX-512BW): None = when the target machine has
# it; False = never (tests compare the two spellings bit for bit).
PERMW = None


def _avx512bw(context):
    """Whether the code being compiled may use AVX-512BW instructions: the features of the
    target machine numba compiles (and caches) for."""
    if PERMW is False:
        return False
    return "+avx512bw" in getattr(context.codegen(), "_tm_features", "")


def _avx512bf16(context):
    """Whether the code being compiled may use vcvtneps2bf16 (AVX512_BF16); never with the
    generic spellings (``PERMW = False``)."""
    return _avx512bw(context) and "+avx512bf16" in getattr(context.codegen(), "_tm_features", "")


class _BFloat(ir.types.Type):
    """LLVM's ``bfloat``, which llvmlite's IR builder does not spell."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


@intrinsic
def fast_widening(typingctx):
    """Whether 16-bit loads widen in one shuffle here (vpermw, AVX-512BW; F16C's vcvtph2ps
    beside it): a compile-time constant of the target machine, so a branch on it folds away."""

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(1), int(_avx512bw(context)))

    return types.boolean(), codegen


def _permw(builder, words, idx):
    """vpermw: the 32 16-bit words of ``words`` rearranged by the index vector ``idx``.

    Why: a bfloat16 load is a widening and a shift, a store a shift and a narrowing — two
    shuffle-unit operations each way, and the shuffle unit, not memory, bounds a bfloat16 row's
    output loop on AVX-512 cores (Zen 4: 0.21 → 0.19 ns per element in L1, and 8-9% off a
    whole LayerNorm).  vpermw does either in one.  The index is read from a global that LLVM
    may not assume constant: from a constant, InstCombine turns the intrinsic back into a
    generic shuffle and the backend lowers that to the two operations again.  The load is
    marked invariant so that it is hoisted out of the loops."""
    mod = builder.module
    vt = ir.VectorType(ir.IntType(16), 2 * W)
    name = "normkit.permw." + ".".join(map(str, idx))
    g = mod.globals.get(name)
    if g is None:
        g = ir.GlobalVariable(mod, vt, name)
        g.initializer = ir.Constant(vt, list(idx))
        g.linkage = "linkonce_odr"
    fn = mod.declare_intrinsic("llvm.x86.avx512.permvar.hi.512", (),
                               ir.FunctionType(vt, [vt, vt]))
    index = builder.load(g)
    index.set_metadata("invariant.load", mod.add_metadata([]))
    return builder.call(fn, [words, index])


def _to_compute(builder, v, st, ct, context):
    """Storage words → compute values, exact: a bfloat16 word shifted into the high half of a
    float32 (with AVX-512BW: word k moved to the high half of lane k by vpermw, the low halves
    zeroed), a float16 word widened by ``fpext`` (F16C on x86), float32 → float64 widened."""
    if st == types.uint16 and _avx512bw(context):
        i32 = ir.IntType(32)
        wide = builder.shuffle_vector(v, ir.Constant(v.type, None),
                                      ir.Constant(ir.VectorType(i32, 2 * W), list(range(2 * W))))
        p = _permw(builder, wide, [k // 2 for k in range(2 * W)])
        high = ir.Constant(ir.VectorType(ir.IntType(1), 2 * W), [k % 2 for k in range(2 * W)])
        p = builder.select(high, p, ir.Constant(p.type, None))
        v = builder.bitcast(p, _vt(types.float32))
    elif st == types.uint16:
        v = builder.bitcast(builder.shl(builder.zext(v, _ivec(32)), _ivec(32, 16)),
                            _vt(types.float32))
    elif st == types.int16:
        v = builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), W)), _vt(types.float32))
    if _compute(st) != ct:
        v = builder.fpext(v, _vt(ct))
    return v


def _to_storage(builder, v, ct, st, context):
    """Compute values → storage words, rounding to nearest even exactly as the scalar ``_st``
    of cpu.py does: bfloat16 as ``_bfloat16_by_addition`` (or ``_bfloat16_by_cvt``, which
    gives the same words), float16 and float32 (from float64) by ``fptrunc``.  W values; any
    number of them for the storages other than bfloat16 (pairs store 2W)."""
    n = v.type.count
    if st == types.uint16:
        if ct != types.float32:
            v = builder.fptrunc(v, _vt(types.float32))
        if _avx512bf16(context):
            return _bfloat16_by_cvt(builder, v, context)
        return _bfloat16_by_addition(builder, v, context)
    if st == types.int16:
        if ct != types.float32:
            v = builder.fptrunc(v, ir.VectorType(ir.FloatType(), n))
        return builder.bitcast(builder.fptrunc(v, ir.VectorType(ir.HalfType(), n)),
                               ir.VectorType(ir.IntType(16), n))
    if st != ct:
        return builder.fptrunc(v, ir.VectorType(_LL[st], n))
    return v


def _bfloat16_high(builder, v):
    """float32 → its bfloat16 rounding (nearest even) in the high half of each 32-bit lane, the
    low half left as garbage; a NaN becomes 0x7FC0 (see ``_bfloat16_by_addition``)."""
    u = builder.bitcast(v, _ivec(32))
    odd = builder.and_(builder.lshr(u, _ivec(32, 16)), _ivec(32, 1))
    r = builder.add(builder.add(u, _ivec(32, 0x7FFF)), odd)
    return builder.select(builder.fcmp_unordered("uno", v, v), _ivec(32, 0x7FC00000), r)


def _bfloat16_by_addition(builder, v, context):
    """float32 → bfloat16 words: add 0x7FFF plus the lowest kept bit and drop 16 bits, a NaN
    becoming the quiet NaN 0x7FC0 (rounding its bits could carry it into Inf).  With AVX-512BW
    the same words come from the same sum, the lowest kept bit tested rather than shifted down,
    and vpermw picks the high halves."""
    u = builder.bitcast(v, _ivec(32))
    if _avx512bw(context):
        odd = builder.icmp_unsigned("!=", builder.and_(u, _ivec(32, 0x10000)), _ivec(32, 0))
        r = builder.add(u, builder.select(odd, _ivec(32, 0x8000), _ivec(32, 0x7FFF)))
        r = builder.select(builder.fcmp_unordered("uno", v, v), _ivec(32, 0x7FC00000), r)
        h = _permw(builder, builder.bitcast(r, ir.VectorType(ir.IntType(16), 2 * W)),
                   [2 * k + 1 for k in range(W)] * 2)
        return builder.shuffle_vector(h, h, ir.Constant(ir.VectorType(ir.IntType(32), W),
                                                        list(range(W))))
    return builder.trunc(builder.lshr(_bfloat16_high(builder, v), _ivec(32, 16)), _ivec(16))


def _rare_lanes(builder, v):
    """Whether any lane of v is a NaN or a subnormal (vfpclassps), as a W-bit mask: the lanes
    vcvtneps2bf16 would round otherwise than the addition."""
    fpclass = builder.module.declare_intrinsic(
        "llvm.x86.avx512.fpclass.ps.512", (),
        ir.FunctionType(ir.VectorType(ir.IntType(1), W), [v.type, ir.IntType(32)]))
    lanes = builder.call(fpclass, [v, ir.IntType(32)(0x01 | 0x20 | 0x80)])  # NaN, subnormal
    return builder.bitcast(lanes, ir.IntType(W))


def _bfloat16_by_cvt(builder, v, context):
    """float32 → bfloat16 words by vcvtneps2bf16 (AVX512_BF16): one instruction where the
    addition takes five and a shuffle (bfloat16 LayerNorm forward, 2 cores, Zen 4: 512x4096
    256 → 222 µs, 4096x768 414 → 360 µs; backward 4-9% faster).  It rounds to nearest even as
    the addition does, but flushes subnormals to zero and keeps a NaN's sign and payload, so a
    vector with such a lane (vfpclassps tells: a branch that is all but never taken) is rounded
    by the addition: the same words either way."""
    rare = builder.icmp_unsigned("!=", _rare_lanes(builder, v), ir.IntType(W)(0))
    with builder.if_else(rare, likely=False) as (slow, fast):
        with slow:
            by_addition = _bfloat16_by_addition(builder, v, context)
            slow_block = builder.block
        with fast:
            by_cvt = builder.bitcast(builder.fptrunc(v, ir.VectorType(_BFloat(), W)), _ivec(16))
            fast_block = builder.block
    words = builder.phi(_ivec(16))
    words.add_incoming(by_addition, slow_block)
    words.add_incoming(by_cvt, fast_block)
    return words




# Pairs: 2W consecutive elements as two vectors, the even-indexed ones and the odd-indexed ones.
# For bfloat16 this spelling needs no shuffle to widen: 2W words read as W 32-bit lanes hold
# element 2k in the low half of lane k and element 2k+1 in the high half, so a shift gives the
# even elements and a mask the odd ones (a shuffle-unit operation per W elements saved, and
# the shuffle unit bounds a bfloat16 output loop on Zen 4).  Element-wise loops may use it:
# they compute every element alike whatever its lane.  Row sums may not (their lane order is
# part of the bits).


# lane k of the pair's natural order is lane k // 2 of the even (k even) or odd vector of
# (even, odd) laid end to end
_INTERLEAVE = [k // 2 + (k % 2) * W for k in range(2 * W)]


def _pair_load_codegen(odd):
    def codegen(context, builder, sig, args):
        arrty, jty, _ = sig.args
        st, ct = arrty.dtype, sig.return_type.dtype
        p = _element_ptr(context, builder, arrty, args[0], args[1], jty)
        if st == types.uint16:  # the 2W words as W 32-bit lanes
            u = builder.load(builder.bitcast(p, _ivec(32).as_pointer()), typ=_ivec(32))
            u.align = 2
            u = builder.and_(u, _ivec(32, 0xFFFF0000)) if odd else builder.shl(u, _ivec(32, 16))
            v = builder.bitcast(u, _vt(types.float32))
            return v if ct == types.float32 else builder.fpext(v, _vt(ct))
        # any other storage: two vectors, then their even or odd lanes
        halves = [_load_vector(context, builder, builder.gep(p, [ir.IntType(64)(k * W)]), st, ct)
                  for k in range(2)]
        idx = [2 * k + int(odd) for k in range(W)]
        return builder.shuffle_vector(halves[0], halves[1],
                                      ir.Constant(ir.VectorType(ir.IntType(32), W), idx))

    return codegen


@intrinsic
def vload_even(typingctx, arr, j, like):
    """arr[j], arr[j + 2], ..., arr[j + 2W − 2] as one vector (see ``vload`` for ``like``);
    with ``vload_odd`` the two halves of the pair at j."""
    vt = _loaded(arr, j, like)
    return None if vt is None else (vt(arr, j, like), _pair_load_codegen(False))


@intrinsic
def vload_odd(typingctx, arr, j, like):
    """arr[j + 1], arr[j + 3], ..., arr[j + 2W − 1] as one vector."""
    vt = _loaded(arr, j, like)
    return None if vt is None else (vt(arr, j, like), _pair_load_codegen(True))


def _bfloat16_pair(builder, even, odd, context):
    """Two float32 vectors → the 2W bfloat16 words of a pair, interleaved again (the words of
    ``_bfloat16_by_addition`` for every element).  With AVX512_BF16: vcvtne2ps2bf16 and one
    vpermw; a pair with a NaN or subnormal lane (vfpclassps) takes the addition, whose two
    halves interleave by a shift and a mask."""
    words = ir.VectorType(ir.IntType(16), 2 * W)

    def by_addition():
        e = builder.lshr(_bfloat16_high(builder, even), _ivec(32, 16))
        o = builder.and_(_bfloat16_high(builder, odd), _ivec(32, 0xFFFF0000))
        return builder.bitcast(builder.or_(e, o), words)

    if not _avx512bf16(context):
        return by_addition()
    lanes = builder.or_(_rare_lanes(builder, even), _rare_lanes(builder, odd))
    rare = builder.icmp_unsigned("!=", lanes, ir.IntType(W)(0))
    with builder.if_else(rare, likely=False) as (slow, fast):
        with slow:
            slow_words = by_addition()
            slow_block = builder.block
        with fast:
            # the intrinsic, not fptrunc of the 2W lanes: LLVM lowers that to two vcvtneps2bf16
            # and a vinsertf64x4
            cvt2 = builder.module.declare_intrinsic(
                "llvm.x86.avx512bf16.cvtne2ps2bf16.512", (),
                ir.FunctionType(ir.VectorType(_BFloat(), 2 * W), [even.type, even.type]))
            cvt = builder.bitcast(builder.call(cvt2, [odd, even]), words)  # even in the low half
            fast_words = _permw(builder, cvt, _INTERLEAVE)
            fast_block = builder.block
    out = builder.phi(words)
    out.add_incoming(slow_words, slow_block)
    out.add_incoming(fast_words, fast_block)
    return out


def _pair_store_codegen(streaming):
    def codegen(context, builder, sig, args):
        arrty, jty, vty, _ = sig.args
        st, ct = arrty.dtype, vty.dtype
        p = _element_ptr(context, builder, arrty, args[0], args[1], jty)
        even, odd = args[2], args[3]
        if st == types.uint16:
            if ct != types.float32:
                even = builder.fptrunc(even, _vt(types.float32))
                odd = builder.fptrunc(odd, _vt(types.float32))
            words = _bfloat16_pair(builder, even, odd, context)
        else:
            both = builder.shuffle_vector(even, odd, ir.Constant(
                ir.VectorType(ir.IntType(32), 2 * W), _INTERLEAVE))
            words = _to_storage(builder, both, ct, st, context)
        _store_words(builder, words, p, st, streaming)
        return context.get_dummy_value()

    return codegen


def _pair_storable(arr, j, even, odd):
    return _storable(arr, j, even) and odd == even


@intrinsic
def vstore_pair(typingctx, arr, j, even, odd):
    """arr[j : j + 2W] = the pair (even, odd) interleaved, each element rounded as ``vstore``
    rounds it."""
    if not _pair_storable(arr, j, even, odd):
        return None
    return types.none(arr, j, even, odd), _pair_store_codegen(False)


@intrinsic
def vstream_pair(typingctx, arr, j, even, odd):
    """``vstore_pair`` with a non-temporal store; arr[j] must be STREAM_ALIGN-aligned."""
    if not _pair_storable(arr, j, even, odd):
        return None
    return types.none(arr, j, even, odd), _pair_store_codegen(True)


@intrinsic
def prefetch(typingctx, arr, j):
    """Ask for the cache line of arr[j] (a typed pointer) to be loaded into L2 (x86
    prefetcht1); never faults, whatever the address.

    Why: a row loop reads its row twice, the second time from L1, and the hardware prefetchers
    stop at each 4 KiB page; fetching the next row during the second pass overlaps its memory
    latency with arithmetic.  Into L2, not L1: a float32 row of 4096 and the next would fill
    Zen 4's 32 KiB L1 (LayerNorm 4096x4096 float32 on 2 cores, ms: none 3.2, L1 3.6, L2 2.9)."""
    if not isinstance(arr, types.CPointer) or not isinstance(j, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch.p0", (), ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        builder.call(fn, [builder.bitcast(p, i8p), i32(0), i32(2), i32(1)])  # read, "L2"
        return context.get_dummy_value()

    return types.none(arr, j), codegen


@intrinsic
def fast_pairs(typingctx):
    """Whether bfloat16 pairs store by vcvtne2ps2bf16 here (AVX512_BF16): a compile-time
    constant of the target machine, like ``fast_widening``."""

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.IntType(1), int(_avx512bf16(context)))

    return types.boolean(), codegen


def _storable(arr, j, v):
    return _is_ref(arr) and isinstance(j, types.Integer) and isinstance(v, Vec)


def _loaded(arr, j, like):
    """The vector type a load of arr at j converts to (see ``vload``), None where there is
    none."""
    if not _is_ref(arr) or not isinstance(j, types.Integer):
        return None
    cs, ct = _compute(arr.dtype), _like_dtype(like)
    if cs is None or ct is None or (cs == types.float64 and ct == types.float32):
        return None  # never a silent narrowing
    return Vec(ct)


def _load_vector(context, builder, p, st, ct):
    """The W storage elements at pointer p, converted to compute dtype ct."""
    svt = ir.VectorType(context.get_data_type(st), W)
    v = builder.load(builder.bitcast(p, svt.as_pointer()), typ=svt)
    v.align = st.bitwidth // 8
    return _to_compute(builder, v, st, ct, context)


def _store_words(builder, words, p, st, streaming):
    """Store a vector of storage-dtype st words at pointer p, non-temporal when ``streaming``."""
    s = builder.store(words, builder.bitcast(p, words.type.as_pointer()))
    size = st.bitwidth // 8
    if streaming:
        # A non-temporal store writes around the caches: no read-for-ownership of the
        # destination line, a third of a fresh output's memory traffic.
        s.align = min(STREAM_ALIGN, words.type.count * size)
        s.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
    else:
        s.align = size


@intrinsic
def vzero(typingctx, like):
    """A zero vector of the compute dtype ``like`` asks for (see ``vload``)."""
    ct = _like_dtype(like)
    if ct is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(_vt(ct), None)

    return Vec(ct)(like), codegen


@intrinsic
def vload(typingctx, arr, j, like):
    """arr[j : j + W] (an array or a typed pointer) converted exactly to a compute dtype: that
    of ``like``, a marker array or pointer (float64 for float64 storage, else float32), a vector
    or a float scalar.  No bounds check: j + W <= arr.size is the caller's."""
    vt = _loaded(arr, j, like)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return _load_vector(context, builder, p, arr.dtype, vt.dtype)

    return vt(arr, j, like), codegen


def _store_codegen(streaming):
    def codegen(context, builder, sig, args):
        arrty, _, vty = sig.args
        p = _element_ptr(context, builder, arrty, args[0], args[1], sig.args[1])
        words = _to_storage(builder, args[2], vty.dtype, arrty.dtype, context)
        _store_words(builder, words, p, arrty.dtype, streaming)
        return context.get_dummy_value()

    return codegen


@intrinsic
def vstore(typingctx, arr, j, v):
    """arr[j : j + W] = v rounded to arr's storage dtype (see ``_to_storage``)."""
    if not _storable(arr, j, v):
        return None
    return types.none(arr, j, v), _store_codegen(False)



@intrinsic
def vstream(typingctx, arr, j, v):
    """``vstore`` with a non-temporal store, for outputs too large to stay in the caches.  The
    address of arr[j] must be a multiple of STREAM_ALIGN bytes; call ``sfence`` after the last
    streamed store of a thread, before another thread may read what it wrote."""
    if not _storable(arr, j, v):
        return None
    return types.none(arr, j, v), _store_codegen(True)


@intrinsic
def vround(typingctx, v, marker):
    """v rounded to the storage dtype of ``marker`` (an array or a typed pointer) and back: what
    storing and loading again would give."""
    if not isinstance(v, Vec) or not _is_ref(marker):
        return None
    st = marker.dtype
    if _compute(st) is None:
        return None

    def codegen(context, builder, sig, args):
        return _to_compute(builder, _to_storage(builder, args[0], v.dtype, st, context), st,
                           v.dtype, context)

    return v(v, marker), codegen


@intrinsic
def sfence(typingctx):
    """Order this thread's streamed stores before its later stores (x86 ``sfence``; a full
    fence elsewhere)."""

    def codegen(context, builder, sig, args):
        if builder.module.triple.startswith(("x86_64", "i686", "i386")):
            fn = builder.module.declare_intrinsic("llvm.x86.sse.sfence", (), ir.FunctionType(
                ir.VoidType(), []))
            builder.call(fn, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def vsum(typingctx, v):
    """The lanes' sum by a fixed pairwise tree: lane k + lane k+8, then k + k+4, k + k+2,
    k + k+1 (see the module docstring)."""
    if not isinstance(v, Vec):
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        w = W
        while w > 1:
            h = w // 2
            lo = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), h),
                                                          list(range(h))))
            hi = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), h),
                                                          list(range(h, w))))
            x = builder.fadd(lo, hi)
            w = h
        return builder.extract_element(x, ir.IntType(32)(0))

    return v.dtype(v), codegen


@intrinsic
def fma(typingctx, a, b, c):
    """a·b + c rounded once (IEEE fusedMultiplyAdd), lane by lane: vectors and scalars of one
    compute dtype, scalars broadcast, or three scalars.  Written out where the kernels want it
    (LLVM's ``llvm.fma``: one instruction where the machine has FMA, libm's exact ``fma``
    elsewhere), never left to the compiler's contraction, so the bits do not depend on it."""
    vec = next((t for t in (a, b, c) if isinstance(t, Vec)), None)
    dtype = vec.dtype if vec is not None else a
    if dtype not in _LL or any(t != dtype and t != vec for t in (a, b, c)):
        return None

    def codegen(context, builder, sig, args):
        lt = _vt(dtype) if vec is not None else _LL[dtype]
        vals = [v if isinstance(t, Vec) or vec is None else _splat(builder, v, lt)
                for v, t in zip(args, sig.args, strict=True)]
        name = (f"v{W}" if vec is not None else "") + ("f32" if dtype == types.float32
                                                         else "f64")
        fn = builder.module.declare_intrinsic("llvm.fma." + name, (),
                                              ir.FunctionType(lt, [lt] * 3))
        return builder.call(fn, vals)

    return (vec if vec is not None else dtype)(a, b, c), codegen


def _lanewise(name):
    """An intrinsic applying ``builder.<name>`` to (vector, vector), (vector, scalar) or
    (scalar, vector) of one dtype; the scalar is broadcast to every lane."""

    @intrinsic
    def op(typingctx, a, b):
        vec = a if isinstance(a, Vec) else b
        if not isinstance(vec, Vec):
            return None
        for t in (a, b):
            if t != vec and t != vec.dtype:
                return None  # e.g. a float64 scalar with a float32 vector: no silent promotion

        def codegen(context, builder, sig, args):
            vt = _vt(vec.dtype)
            x, y = (v if isinstance(t, Vec) else _splat(builder, v, vt)
                    for v, t in zip(args, sig.args, strict=True))
            return getattr(builder, name)(x, y)

        return vec(a, b), codegen

    return op


_vadd = _lanewise("fadd")
_vsub = _lanewise("fsub")
_vmul = _lanewise("fmul")


def _register(ops, impl):
    for fn in ops:

        @overload(fn)
        def _ov(a, b):
            if isinstance(a, Vec) or isinstance(b, Vec):
                return lambda a, b: impl(a, b)
            return None


_register((operator.add, operator.iadd), _vadd)
_register((operator.sub, operator.isub), _vsub)
_register((operator.mul, operator.imul), _vmul)
