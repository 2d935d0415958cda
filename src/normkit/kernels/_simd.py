"""Fixed-width vectors for the numba kernels: row reductions whose bits no compiler can change.

A row sum vectorizes only if the compiler may reassociate it, and with that freedom (numba's
``fastmath={"reassoc"}``) LLVM picks the lane count and the order of the final additions per
compilation: the same kernel inlined into another function, or loaded from numba's cache
rather than compiled in this process, summed in another order, and dx moved in the last bit
(measured: the serial and the parallel driver, and a compiling and a cache-loading process,
disagreed).  So the kernels use no fast-math flag at all, and a reduction is written here as
what it is meant to be:

* ``W`` = 16 lanes; lane k accumulates elements k, k+16, k+32, ... of the row's first
  ``n - n % W`` elements, in order;
* ``vsum`` adds the lanes pairwise (k with k+8, then k with k+4, ...), a fixed tree;
* the caller adds the remaining ``n % W`` elements one by one after that.

Without fast-math flags LLVM may only make changes that keep every result bit (IEEE semantics),
so a row's result is a function of the row, its length and these rules alone — on every
machine, in every compilation.  Sixteen lanes are one AVX-512 register or two AVX2 registers of
float32; both keep a memory-bound loop fed (one vector add in flight per 16 elements).

``Vec`` is the numba type of a vector of compute values (float32, or float64 for float64
storage); ``vload`` reads W elements of any storage type (float32, float64, bfloat16 as uint16
words, float16 as int16 words) and converts them in registers to the compute dtype of a
marker array; ``+``, ``-``, ``*`` work on two
vectors of one dtype or a vector and a scalar of its dtype (a float64 scalar with a float32
vector is a typing error, not a silent promotion).
"""

from __future__ import annotations

import operator

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, overload, register_model

__all__ = ["W", "Vec", "vzero", "vload", "vstore", "vsum"]

W = 16

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


def _splat(builder, scalar, vt):
    v = builder.insert_element(ir.Constant(vt, ir.Undefined), scalar, ir.IntType(32)(0))
    return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), W), [0] * W))


def _element_ptr(context, builder, arrty, arr, j, jty):
    a = context.make_array(arrty)(context, builder, arr)
    return builder.gep(a.data, [context.cast(builder, j, jty, types.intp)])


@intrinsic
def vzero(typingctx, marker):
    """A zero vector of the compute dtype of ``marker``'s (an array's) storage dtype."""
    ct = _compute(getattr(marker, "dtype", None))
    if ct is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(ir.VectorType(_LL[ct], W), None)

    return Vec(ct)(marker), codegen


@intrinsic
def vload(typingctx, arr, j, like):
    """arr[j : j + W] converted to the compute dtype of ``like`` (an array: float64 for float64
    storage, else float32).  No bounds check: j + W <= arr.size is the caller's.  bfloat16
    words are shifted into the high half of a float32, float16 words widened by ``fpext`` (F16C
    on x86), float32 widened to float64 where asked — all exact, as ``_ld`` one element at a
    time."""
    if (not isinstance(arr, types.Array) or not isinstance(j, types.Integer)
            or not isinstance(like, types.Array)):
        return None
    st = arr.dtype
    cs, ct = _compute(st), _compute(like.dtype)
    if cs is None or ct is None or (cs == types.float64 and ct == types.float32):
        return None  # never a silent narrowing

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        svt = ir.VectorType(context.get_data_type(st), W)
        v = builder.load(builder.bitcast(p, svt.as_pointer()), typ=svt)
        v.align = st.bitwidth // 8
        if st == types.uint16:
            wide = builder.zext(v, ir.VectorType(ir.IntType(32), W))
            wide = builder.shl(wide, ir.Constant(ir.VectorType(ir.IntType(32), W), [16] * W))
            v = builder.bitcast(wide, ir.VectorType(ir.FloatType(), W))
        elif st == types.int16:
            v = builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), W)),
                              ir.VectorType(ir.FloatType(), W))
        if cs != ct:
            v = builder.fpext(v, ir.VectorType(_LL[ct], W))
        return v

    return Vec(ct)(arr, j, like), codegen


@intrinsic
def vstore(typingctx, arr, j, v):
    """arr[j : j + W] = v, for an array of v's own dtype (compute-dtype scratch rows)."""
    if (not isinstance(arr, types.Array) or not isinstance(j, types.Integer)
            or not isinstance(v, Vec) or arr.dtype != v.dtype):
        return None

    def codegen(context, builder, sig, args):
        p = _element_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        s = builder.store(args[2], builder.bitcast(p, args[2].type.as_pointer()))
        s.align = v.dtype.bitwidth // 8
        return context.get_dummy_value()

    return types.none(arr, j, v), codegen


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
            vt = ir.VectorType(_LL[vec.dtype], W)
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
