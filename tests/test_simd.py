"""The vector conversions of kernels/_simd.py, bit for bit: every bfloat16 and float16 word, and
float32 values chosen to hit every rounding case, against torch's own conversions and against
the scalar conversions of the kernels' row heads and tails.  Run twice where the machine has
AVX-512BW: with the vpermw (and vcvtneps2bf16) spelling and with the generic one
(``_simd.PERMW = False``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

from normkit.kernels import _simd, cpu
from normkit.kernels._simd import W, vload, vstore

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


_HASHES = """
import hashlib, torch, normkit
from normkit.kernels import cpu
cpu._native = None  # the Python path: the native build would compile with the default spelling
torch.manual_seed(0)
out = []
for dt in (torch.bfloat16, torch.float16):
    for shape in ((3, 33), (67, 771)):
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
