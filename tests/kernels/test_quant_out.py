"""Quantized outputs for serving: ``out_dtype=torch.float8_e4m3fn`` / ``torch.int8`` on
``layer_norm`` / ``rms_norm``, returning ``(q, scale)`` (``(q, scale, h)`` with the residual).

The truth is the float64 normalized output quantized by ``reference.quantize`` in float64 (with
its own float64 scale): every q is within one quantization step of it (one place on the e4m3 or
int8 grid) and nearly all are equal, and every scale is within a few float32 ulps of it.  The
fp8 conversion of both backends is checked bit for bit against torch's ``.to(float8_e4m3fn)`` on
every rounding case; the Triton kernels run in the interpreter (conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import parallel_from, ref64

import normkit
from normkit import _dispatch
from normkit.kernels import reference

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402  (after the skip)

from normkit.kernels.triton import _q_bytes  # noqa: E402  (interpreted: conftest.py)

BACKENDS = ["cpu", "triton"]
QDTYPES = [torch.float8_e4m3fn, torch.int8]
FP8, INT8 = QDTYPES


def _call(rms, x, w, b, **kw):
    n = x.shape[-1]
    if rms:
        return normkit.rms_norm(x, n, w, 1e-6, **kw)
    return normkit.layer_norm(x, n, w, b, 1e-5, **kw)


def _args(rms, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (3 * torch.randn(shape, generator=g) + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype)
    b = None if rms else (0.3 * torch.randn(n, generator=g)).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, r


def _ordinal(q):
    """Each q's place on its grid (int8: the value; e4m3: ±magnitude bits, monotone in the
    value), so that one quantization step is a difference of 1."""
    if q.dtype == INT8:
        return q.long()
    u = q.view(torch.uint8).long()
    return torch.where(u >= 128, -(u & 0x7F), u & 0x7F)


def _check(q, s, y64, q_dtype, static, what):
    """q within one step of the float64 truth (and equal in >= 99%), s within 8 float32 ulps.
    Returns the count of q equal to the truth's."""
    n = y64.shape[-1]
    qt, st = reference.quantize(y64.reshape(-1, n), q_dtype, static)
    q = q.reshape(-1, n)
    assert s.dtype == torch.float32
    s = s.reshape(-1, 1).double()
    rel = ((s - st) / st).abs().max().item()
    assert rel <= 8 * 2.0**-24, f"{what}: scale off by {rel:.3g} (relative)"
    steps = (_ordinal(q) - _ordinal(qt)).abs()
    assert steps.max().item() <= 1, f"{what}: q off by {steps.max().item()} steps"
    exact = int((steps == 0).sum())
    assert exact >= 0.99 * q.numel(), f"{what}: only {exact}/{q.numel()} q exact"
    return exact


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_dtype", QDTYPES)
@pytest.mark.parametrize("rms", [False, True])
def test_matches_the_float64_truth(rms, q_dtype, dtype, backend):
    """Dynamic and static scale, with and without the residual, γ/β in x's dtype; 7 rows of 45
    (odd N, not a power of two)."""
    x, w, b, r = _args(rms, (7, 45), dtype)
    static = torch.tensor(0.01 if q_dtype == FP8 else 0.03)
    with torch.no_grad(), normkit.use_backend(backend):
        for scale in (None, static):
            for res in (None, r):
                out = _call(rms, x, w, b, residual=res, return_residual=True, out_dtype=q_dtype,
                            scale=scale)
                q, s, h = out
                assert q.dtype == q_dtype and q.shape == x.shape and s.shape == (7, 1)
                if res is None:
                    assert h is x
                else:
                    assert torch.equal(h, (x.float() + res.float()).to(dtype))
                y64 = ref64(x, w, b, res, 1e-6 if rms else 1e-5, rms)
                if scale is not None:
                    assert torch.equal(s, static.expand(7, 1))
                _check(q, s, y64, q_dtype, scale, f"{backend} scale={scale} res={res is not None}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_n1_m1_strided_and_several_normalized_dims(backend):
    with torch.no_grad(), normkit.use_backend(backend):
        for rms in (False, True):
            for n in (1, 2, 17, 300):
                x, w, b, _ = _args(rms, (3, n), torch.bfloat16, seed=n)
                q, s = _call(rms, x, w, b, out_dtype=FP8)
                _check(q, s, ref64(x, w, b, None, 1e-6 if rms else 1e-5, rms), FP8, None,
                       f"N={n}")
        big = torch.randn(5, 80, dtype=torch.bfloat16)
        x = big[:, 3:67]  # rows 80 apart, unit stride within: read in place
        for q_dtype in QDTYPES:
            want = normkit.rms_norm(x.contiguous(), 64, out_dtype=q_dtype)
            got = normkit.rms_norm(x, 64, out_dtype=q_dtype)
            assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                       for a, b in zip(got[:1], want[:1], strict=True))
            assert torch.equal(got[1], want[1])
            xt = torch.randn(64, 5).t()  # no unit stride: copied
            q, s = normkit.rms_norm(xt, 64, out_dtype=q_dtype)
            q2, s2 = normkit.rms_norm(xt.contiguous(), 64, out_dtype=q_dtype)
            assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
        x3 = torch.randn(2, 3, 4, 5)
        q, s = normkit.layer_norm(x3, (4, 5), out_dtype=INT8)
        assert q.shape == x3.shape and s.shape == (2, 3, 1, 1)
        _check(q, s, ref64(x3.reshape(6, 20)), INT8, None, "normalized_shape (4, 5)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_dtype", QDTYPES)
def test_batch_invariance(backend, q_dtype):
    """A row's q and scale bits do not depend on M or its position (M=1 included)."""
    x, w, b, r = _args(False, (37, 96), torch.bfloat16, seed=3)
    with torch.no_grad(), normkit.use_backend(backend):
        q, s, h = normkit.layer_norm(x, 96, w, b, residual=r, return_residual=True,
                                     out_dtype=q_dtype)
        for i in (0, 17, 36):
            qi, si, hi = normkit.layer_norm(x[i:i + 1], 96, w, b, residual=r[i:i + 1],
                                            return_residual=True, out_dtype=q_dtype)
            assert torch.equal(qi.view(torch.uint8), q[i:i + 1].view(torch.uint8))
            assert torch.equal(si, s[i:i + 1]) and torch.equal(hi, h[i:i + 1])
        if backend == "cpu":  # rows split over torch's threads: the same bits
            with parallel_from(1):
                qp, sp, hp = normkit.layer_norm(x, 96, w, b, residual=r, return_residual=True,
                                                out_dtype=q_dtype)
            assert torch.equal(qp.view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(sp, s) and torch.equal(hp, h)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("q_dtype", QDTYPES)
def test_nan_rows_and_zero_rows(backend, q_dtype):
    """Dynamic: a row holding a NaN has a NaN scale, e4m3 q all NaN and int8 q all 0; an
    all-zero row has the floor scale and q all 0.  Static: the NaN row's q likewise, its scale
    the static one.  The other rows are as alone."""
    x = torch.randn(4, 33)
    x[1, 5] = float("nan")
    x[2] = 0.0
    floor = reference.QFLOOR[q_dtype]
    with torch.no_grad(), normkit.use_backend(backend):
        for rms in (False, True):
            for scale in (None, 0.02):
                q, s = _call(rms, x, None, None, out_dtype=q_dtype, scale=scale)
                if scale is None:
                    assert math.isnan(s[1, 0]) and s[2, 0] == torch.tensor(floor)
                else:
                    assert (s == torch.tensor(scale)).all()
                nan_row = q[1].float()
                assert (nan_row.isnan().all() if q_dtype == FP8 else (nan_row == 0).all())
                assert (q[2].float() == 0).all()
                q3, s3 = _call(rms, x[3:], None, None, out_dtype=q_dtype, scale=scale)
                assert torch.equal(q3.view(torch.uint8), q[3:].view(torch.uint8))
                assert torch.equal(s3, s[3:])


def test_saturation_with_a_static_scale():
    """A static scale smaller than the row needs: e4m3 saturates to ±448, int8 to [-128, 127]
    (the reference's rule, and torch's composition: clamp, then convert)."""
    x = torch.randn(3, 64)
    with torch.no_grad():
        for backend in BACKENDS:
            with normkit.use_backend(backend):
                q8, _ = normkit.rms_norm(x, 64, out_dtype=FP8, scale=1e-3)
                qi, _ = normkit.rms_norm(x, 64, out_dtype=INT8, scale=1e-3)
            assert q8.float().abs().max() == 448 and not q8.float().isnan().any()
            assert qi.max() == 127 and qi.min() == -128


def _dense_floats(high):
    """Every float32 whose ``high`` (>= 8) high significand bits take every value, with each of
    5 patterns below them (0, 1, the top one alone, all but the top one, all): every round and
    sticky case of e4m3's 3 significand bits (7 on the subnormals' grid), in every exponent and
    sign, subnormals, Inf and NaN included: 2·256·2^high·5 values."""
    low_bits = 23 - high
    hi = torch.arange(2 * 256 << high, dtype=torch.int64) << low_bits
    top = 1 << (low_bits - 1)
    low = torch.tensor([0, 1, top, top - 1, 2 * top - 1], dtype=torch.int64)
    bits = (hi[:, None] | low[None, :]).reshape(-1)
    return bits.to(torch.int32).view(torch.float32)  # int32 wraps the sign bit in


def _int8_truth(t):
    return torch.nan_to_num(t, nan=0.0).clamp(-128, 127).round().to(INT8)


@pytest.fixture
def each_isa():
    """Runs the block for each instruction-set path of the CPU kernels (they must agree)."""
    from normkit.kernels import cpu

    def run(fn):
        previous = cpu.isa()
        try:
            for name in cpu.available_isas():
                cpu.set_isa(name)
                fn(name)
        finally:
            cpu.set_isa(previous)

    return run


def test_cpu_conversion_gives_torch_bits(each_isa):
    from normkit.kernels import cpu

    v = _dense_floats(12)  # 10.5M values
    want = v.to(FP8).view(torch.uint8)
    t = torch.linspace(-140, 140, 2**16) + torch.tensor([0.0, float("nan"), float("inf"),
                                                         -float("inf")]).repeat(2**14)

    def check(isa):
        q = torch.empty(v.shape, dtype=FP8)
        cpu._cpu._quant_convert(v, q)
        assert torch.equal(q.view(torch.uint8), want), isa
        qi = torch.empty(t.shape, dtype=INT8)
        cpu._cpu._quant_convert(t, qi)
        assert torch.equal(qi, _int8_truth(t)), isa

    each_isa(check)


def test_cpu_paths_give_the_same_bits(each_isa):
    """Every instruction-set path: the same q and scales (tails of N % 16 included)."""
    x, w, b, r = _args(False, (9, 83), torch.bfloat16, seed=5)
    got = {}

    def run(isa):
        with torch.no_grad(), normkit.use_backend("cpu"):
            for q_dtype in QDTYPES:
                for rms in (False, True):
                    q, s = _call(rms, x, w, b, residual=r, out_dtype=q_dtype)
                    got.setdefault((q_dtype, rms), []).append((isa, q.view(torch.uint8), s))

    each_isa(run)
    for runs in got.values():
        for isa, q, s in runs[1:]:
            assert torch.equal(q, runs[0][1]) and torch.equal(s, runs[0][2]), isa


@triton.jit
def _convert(T, Q, QK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Q + offs, _q_bytes(tl.load(T + offs), QK))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, on the NaN lanes
def test_triton_conversion_gives_torch_bits():
    v = _dense_floats(8)  # 655K values: the interpreter takes 1 s per million
    q = torch.empty(v.shape, dtype=torch.uint8)
    _convert[(v.numel() // 2**15,)](v, q, QK=1, BLOCK=2**15)
    assert torch.equal(q, v.to(FP8).view(torch.uint8))
    t = torch.linspace(-140, 140, 2**16) + torch.tensor([0.0, float("nan"), float("inf"),
                                                         -float("inf")]).repeat(2**14)
    qi = torch.empty(t.shape, dtype=torch.uint8)
    _convert[(1,)](t, qi, QK=2, BLOCK=2**16)
    assert torch.equal(qi.view(INT8), _int8_truth(t))


def test_float64_input_is_left_to_the_reference():
    x = torch.randn(3, 40, dtype=torch.float64)
    with torch.no_grad():
        q, s = normkit.layer_norm(x, 40, out_dtype=INT8)
        _check(q, s, ref64(x), INT8, None, "float64")
        with normkit.use_backend("cpu"), pytest.raises(ValueError, match="backend 'cpu'"):
            normkit.layer_norm(x, 40, out_dtype=INT8)


def test_residual_out_updates_the_residual_in_place():
    x, w, _, r = _args(True, (5, 64), torch.bfloat16)
    want_h = (x.float() + r.float()).to(torch.bfloat16)
    for backend in ("auto", "reference"):
        with torch.no_grad(), normkit.use_backend(backend):
            rr = r.clone()
            q, s, h = normkit.rms_norm(x, 64, w, residual=rr, residual_out=rr,
                                       return_residual=True, out_dtype=FP8)
            assert h is rr and torch.equal(rr, want_h)
            rr = r.clone()
            normkit.rms_norm(x, 64, w, residual=rr, residual_out=rr, out_dtype=FP8)
            assert torch.equal(rr, want_h)


def test_statistics_reach_the_sink():
    x = torch.randn(6, 32)
    seen = []
    previous = _dispatch._set_stats_sink(lambda mean, rstd, eps, rms: seen.append(rstd))
    try:
        with torch.no_grad():
            for backend in ("auto", "reference"):
                with normkit.use_backend(backend):
                    normkit.rms_norm(x, 32, eps=1e-6, out_dtype=INT8)
    finally:
        _dispatch._set_stats_sink(previous)
    want = torch.rsqrt(x.double().pow(2).mean(-1) + 1e-6)
    assert len(seen) == 2 and all(torch.allclose(r.double(), want, rtol=1e-6) for r in seen)


def test_bad_arguments():
    x = torch.randn(4, 16)
    with torch.no_grad():
        for bad in (0.0, -1.0, float("nan"), float("inf"), torch.tensor([0.0]), 1e-50):
            with pytest.raises(ValueError, match="scale must be finite and > 0"):
                normkit.rms_norm(x, 16, out_dtype=FP8, scale=bad)
        with pytest.raises(TypeError, match="scale must be a float or a 1-element float32"):
            normkit.rms_norm(x, 16, out_dtype=FP8, scale="0.1")
        for bad in (torch.tensor(0.1, dtype=torch.float64), torch.ones(2)):
            with pytest.raises(ValueError, match="1-element float32 tensor"):
                normkit.rms_norm(x, 16, out_dtype=FP8, scale=bad)
        for od in (None, torch.float32):
            with pytest.raises(ValueError, match="scale= is for a quantized out_dtype"):
                normkit.layer_norm(x, 16, out_dtype=od, scale=0.1)
        with pytest.raises(ValueError, match="casting 'llama'"):
            normkit.rms_norm(x, 16, torch.ones(16), casting="llama", out_dtype=INT8)
        with pytest.raises(ValueError, match="out= is not supported"):
            normkit.rms_norm(x, 16, out_dtype=INT8, out=torch.empty(4, 16, dtype=INT8))
        with pytest.raises(ValueError, match="residual_out needs residual"):
            normkit.rms_norm(x, 16, out_dtype=INT8, residual_out=torch.empty(4, 16))
        with pytest.raises(RuntimeError, match="unsupported operation"):
            normkit.rms_norm(x, 16, residual=torch.randn(4, 16), residual_out=x[:, :],
                             out_dtype=INT8, weight=x[0])
    w = torch.ones(16, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward-only"):
        normkit.rms_norm(x, 16, w, out_dtype=FP8)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        normkit.rms_norm([1.0], 1, out_dtype=FP8)
