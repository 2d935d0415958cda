"""The vector conversions of kernels/_simd.py, bit for bit: every bfloat16 and float16 word, and
float32 values chosen to hit every rounding case, against torch's own conversions and against
the scalar conversions of the kernels' row heads and tails.  Run twice where the machine has
AVX-512BW: with the vpermw (and vcvtneps2bf16) spelling and with the generic one
(``_simd.PERMW = False``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import exact_fma
from numba import njit

from normkit.kernels import _simd, cpu
from normkit.kernels._simd import (
    W,
    fma,
    prefetch,
    ptr,
    vload,
    vload_even,
    vload_odd,
    vstore,
    vstore_pair,
    vstream_pair,
)

QNAN_BF16 = 0x7FC0


@pytest.fixture(params=["auto", "generic"])
def spelling(request, monkeypatch):
    monkeypatch.setattr(_simd, "PERMW", None if request.param == "auto" else False)
    return request.param


def _fresh_kernels():
    """Compiled in the test, after the fixture chose the spelling (never from numba's cache)."""

    @njit
    def widen(words, out):
        for j in range(0, words.size, W):
            vstore(out, j, vload(words, j, out))

    @njit
    def narrow(values, words):
        for j in range(0, values.size, W):
            vstore(words, j, vload(values, j, values))

    @njit
    def narrow_scalar(values, words):
        for j in range(values.size):
            words[j] = cpu._st(values[j], words)

    return widen, narrow, narrow_scalar


def _pair_kernels():
    """Pairs (2W elements: the even ones, the odd ones) in and out, compiled in the test."""

    @njit
    def widen(words, out):
        for j in range(0, words.size, 2 * W):
            vstore(out, j, vload_even(words, j, out))
            vstore(out, j + W, vload_odd(words, j, out))

    @njit
    def narrow(values, words, stream):
        # values in the pair layout (evens then odds) → words in the natural order
        for j in range(0, values.size, 2 * W):
            e = vload(values, j, values)
            o = vload(values, j + W, values)
            if stream:
                vstream_pair(ptr(words), j, e, o)
            else:
                vstore_pair(words, j, e, o)

    return widen, narrow


def _as_pairs(a: np.ndarray) -> np.ndarray:
    """a (a multiple of 2W long) with each run of 2W laid out as its even then its odd
    elements."""
    r = a.reshape(-1, W, 2)
    return np.concatenate([r[:, :, 0], r[:, :, 1]], axis=1).reshape(-1)


def _aligned(n: int, dtype) -> np.ndarray:
    buf = np.zeros(n + 64, dtype)
    off = (-buf.ctypes.data % 64) // buf.itemsize
    return buf[off:off + n]


def _rounding_cases(n: int) -> np.ndarray:
    """float32 values: random bit patterns, exact ties (even and odd kept bit), one ulp either
    side of a tie, the largest finite values (rounding up to Inf), subnormals, ±0, ±Inf, NaNs
    with payloads that a carry would turn into Inf.  Most W-lane vectors hold no NaN and no
    subnormal, some hold one (vcvtneps2bf16's spelling takes a different branch for those)."""
    rng = np.random.default_rng(7)
    random = rng.integers(0, 2**32, n, dtype=np.uint32)
    kept = rng.integers(0, 2**16, 4096, dtype=np.uint32) << 16
    ties = kept | 0x8000
    specials = np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF,
                         0x7F7F8000, 0x00000001, 0x807FFFFF, 0x00008000, 0x00018000,
                         0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FBFFFFF],
                        dtype=np.uint32)
    bits = np.concatenate([random, ties, ties - 1, ties + 1, kept | 0x7FFF, specials])
    bits = np.concatenate([bits, np.zeros(-bits.size % W, np.uint32)])
    values = bits.view(np.float32)
    odd = (np.isnan(values) | ((values != 0) & (np.abs(values) < np.finfo(np.float32).tiny)))
    per_vector = odd.reshape(-1, W).any(axis=1)
    assert per_vector.any() and not per_vector.all()
    return values


def test_bfloat16_words_widen_exactly(spelling):
    widen, _, _ = _fresh_kernels()
    words = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(words.size, np.float32)
    widen(words, out)
    want = torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).float()
    assert np.array_equal(out.view(np.uint32), want.numpy().view(np.uint32))


def test_float32_to_bfloat16_rounds_as_torch_and_the_scalar_path(spelling):
    _, narrow, narrow_scalar = _fresh_kernels()
    values = _rounding_cases(1 << 18)
    vec = np.empty(values.size, np.uint16)
    scalar = np.empty(values.size, np.uint16)
    narrow(values, vec)
    narrow_scalar(values, scalar)
    assert np.array_equal(vec, scalar)
    nan = np.isnan(values)
    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(vec[~nan], want[~nan])
    assert nan.any() and (vec[nan] == QNAN_BF16).all()


def test_float16_words_round_trip_and_round_as_torch(spelling):
    widen, narrow, narrow_scalar = _fresh_kernels()
    words = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    wide = np.empty(words.size, np.float32)
    widen(words, wide)
    want = torch.from_numpy(words).view(torch.float16).float().numpy()
    assert np.array_equal(wide.view(np.uint32), want.view(np.uint32))
    values = _rounding_cases(1 << 16)
    vec = np.empty(values.size, np.int16)
    scalar = np.empty(values.size, np.int16)
    narrow(values, vec)
    narrow_scalar(values, scalar)
    nan = np.isnan(values)
    torch_words = torch.from_numpy(values).to(torch.float16).view(torch.int16).numpy()
    assert np.array_equal(vec[~nan], torch_words[~nan])
    assert np.array_equal(vec[~nan], scalar[~nan])
    assert np.isnan(torch.from_numpy(vec[nan]).view(torch.float16).float().numpy()).all()


def test_pairs_widen_every_bfloat16_word_exactly(spelling):
    widen, _ = _pair_kernels()
    words = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(words.size, np.float32)
    widen(words, out)
    want = torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert np.array_equal(out.view(np.uint32), _as_pairs(want).view(np.uint32))


@pytest.mark.parametrize("stream", [False, True])
def test_pairs_round_to_bfloat16_as_the_scalar_path(spelling, stream):
    """Every rounding case, with pairs that hold a NaN or a subnormal and pairs that do not
    (vcvtne2ps2bf16's spelling takes the addition for the former), streamed or not."""
    _, narrow = _pair_kernels()
    _, _, narrow_scalar = _fresh_kernels()
    values = _rounding_cases(1 << 18)
    values = np.concatenate([values, np.zeros(-values.size % (2 * W), np.float32)])
    odd = np.isnan(values) | ((values != 0) & (np.abs(values) < np.finfo(np.float32).tiny))
    per_pair = odd.reshape(-1, 2 * W).any(axis=1)
    assert per_pair.any() and not per_pair.all()
    words = _aligned(values.size, np.uint16)
    narrow(_as_pairs(values), words, stream)
    scalar = np.empty(values.size, np.uint16)
    narrow_scalar(values, scalar)
    assert np.array_equal(words, scalar)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_pairs_of_other_storage_types(dtype):
    """The generic spelling (two vectors and a shuffle) for the other storage types: the
    element-wise loops type-check and run with them, so they must be right too."""
    widen, narrow = _pair_kernels()
    rng = np.random.default_rng(3)
    a = rng.standard_normal(8 * W).astype(dtype)
    store = a.view(np.int16) if dtype == np.float16 else a
    compute = np.float64 if dtype == np.float64 else np.float32
    out = np.empty(a.size, compute)
    widen(store, out)
    assert np.array_equal(out, _as_pairs(a.astype(compute)))
    back = np.zeros_like(store)
    narrow(out, back, False)
    assert np.array_equal(back, store)


def test_prefetch_never_faults():
    """A prefetch is a hint: the kernels fetch the row after the last one, which may be past
    the end of the tensor or of the mapping."""

    @njit
    def touch(a, far):
        p = ptr(a)
        prefetch(p, 0)
        prefetch(p, far)
        return a[0]

    a = np.ones(4, np.float32)
    assert touch(a, 1 << 40) == 1.0
    assert "prefetcht1" in touch.inspect_asm(touch.signatures[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fma_rounds_once_in_vectors_and_scalars(dtype):
    """``fma`` is IEEE fusedMultiplyAdd in every form the kernels use — vectors, a scalar
    broadcast to the lanes, and scalars (row tails) — and the same bits in each; with no
    compiler contraction anywhere else, a product the kernels do not fuse rounds on its own."""

    @njit
    def forms(a, b, c, vv, vs, sc, plain):
        s = b[0]
        for j in range(0, a.size, W):
            vstore(vv, j, fma(vload(a, j, a), vload(b, j, a), vload(c, j, a)))
            vstore(vs, j, fma(vload(a, j, a), s, vload(c, j, a)))
        for j in range(a.size):
            sc[j] = fma(a[j], b[j], c[j])
            plain[j] = a[j] * b[j] + c[j]

    rng = np.random.default_rng(3)
    a, b, c = (rng.standard_normal(4 * W).astype(dtype) for _ in range(3))
    # products whose exact sum with c sits next to a tie: where rounding twice goes wrong
    a[:4] = b[:4] = dtype(1 + 2.0 ** -(np.finfo(dtype).nmant // 2 + 1))
    c[:4] = [2.0 ** -(2 * np.finfo(dtype).nmant + 8), -(2.0 ** -(2 * np.finfo(dtype).nmant + 8)),
             0, np.nan]
    vv, vs, sc, plain = (np.empty_like(a) for _ in range(4))
    forms(a, b, c, vv, vs, sc, plain)
    want = exact_fma(a[4:], b[4:], c[4:])
    assert np.array_equal(sc[4:], want)
    assert np.array_equal(sc[:3], exact_fma(a[:3], b[:3], c[:3])) and np.isnan(sc[3])
    assert np.array_equal(vv, sc, equal_nan=True)
    keep = np.arange(a.size) != 3
    assert np.array_equal(vs[keep], exact_fma(a[keep], np.full_like(b, b[0])[keep], c[keep]))
    assert np.isnan(vs[3])
    assert not np.array_equal(plain[4:], sc[4:])  # separately rounded: other bits somewhere
    asm = forms.inspect_asm(forms.signatures[0])
    assert "vfmadd" in asm or "fma" in asm


def test_the_fast_spelling_is_used_where_the_machine_has_it(monkeypatch):
    """On an AVX-512BW machine the kernels' bfloat16 conversions are the vpermw ones the tests
    above compare, and with AVX512_BF16 the narrowing is vcvtneps2bf16 (else this checks the
    generic spelling is what runs)."""
    from numba.core.registry import cpu_target

    monkeypatch.setattr(_simd, "PERMW", None)
    widen, narrow, _ = _fresh_kernels()
    words = np.zeros(W, np.uint16)
    widen(words, np.empty(W, np.float32))
    narrow(np.zeros(W, np.float32), words)
    has_bw = _simd._avx512bw(cpu_target.target_context)
    for fn in (widen, narrow):
        asm = fn.inspect_asm(fn.signatures[0])
        assert ("vpermw" in asm) == has_bw
    has_bf16 = _simd._avx512bf16(cpu_target.target_context)
    assert ("vcvtneps2bf16" in narrow.inspect_asm(narrow.signatures[0])) == has_bf16
    # pairs: widened by a shift and a mask (no shuffle at all), narrowed by vcvtne2ps2bf16
    # and one vpermw
    pair_widen, pair_narrow = _pair_kernels()
    pair_widen(np.zeros(2 * W, np.uint16), np.empty(2 * W, np.float32))
    pair_narrow(np.zeros(2 * W, np.float32), np.zeros(2 * W, np.uint16), False)
    asm = pair_widen.inspect_asm(pair_widen.signatures[0])
    assert "vpslld" in asm and "vperm" not in asm and "vpmovzx" not in asm
    asm = pair_narrow.inspect_asm(pair_narrow.signatures[0])
    assert ("vcvtne2ps2bf16" in asm) == has_bf16


_HASHES = """
import hashlib, torch, normkit
from normkit.kernels import cpu
cpu._native = None  # the Python path: the native build would compile with the default spelling
torch.manual_seed(0)
out = []
for dt in (torch.bfloat16, torch.float16):
    for shape in ((3, 33), (5, 84), (67, 771)):
        n = shape[-1]
        for rms in (False, True):
            x = torch.randn(shape).to(dt).requires_grad_()
            r = torch.randn(shape).to(dt).requires_grad_()
            w = torch.randn(n).to(dt).requires_grad_()
            b = None if rms else torch.randn(n).to(dt).requires_grad_()
            f = normkit.rms_norm if rms else normkit.layer_norm
            y, h = f(x, n, w, b, residual=r, return_residual=True) if not rms else \\
                f(x, n, w, residual=r, return_residual=True)
            leaves = [t for t in (x, r, w, b) if t is not None]
            g = torch.autograd.grad((y, h), leaves, (torch.randn_like(y), torch.randn_like(h)))
            for t in (y, h, *g):
                out.append(hashlib.sha1(t.detach().view(torch.uint8).numpy()).hexdigest()[:12])
# streamed outputs: rows that start on 64 bytes (N = 64) and rows that do not (N = 100)
cpu._STREAM_MIN_BYTES = 0
for n in (64, 100):
    x = torch.randn(9, n).to(torch.bfloat16)
    with torch.no_grad():
        y = normkit.layer_norm(x, n, torch.randn(n), torch.randn(n))  # float32 γ/β
    out.append(hashlib.sha1(y.view(torch.uint8).numpy()).hexdigest()[:12])
print(" ".join(out))
"""


def test_kernels_give_the_same_bits_with_the_generic_conversions(tmp_path):
    """The kernels compiled with the generic 16-bit conversions — as on a machine without
    AVX-512BW, where the backward also keeps float32 copies of dy and x̂ between its passes —
    give the bits of the default build, forward and backward, LayerNorm and RMSNorm with the
    fused residual, bfloat16 and float16."""
    from conftest import run_python

    generic = run_python("import normkit.kernels._simd as s; s.PERMW = False\n" + _HASHES,
                         {"NUMBA_CACHE_DIR": str(tmp_path)}, timeout=900)
    default = run_python(_HASHES, timeout=900)  # numba's usual cache: mostly compiled by now
    assert generic == default
