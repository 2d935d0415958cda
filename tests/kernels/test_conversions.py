"""The CPU kernels' conversions in registers (kernels/csrc/simd.h), bit for bit, on every
instruction-set path this machine runs: every bfloat16 and float16 word widened, and float32 (and
float64) values chosen to hit every rounding case — ties either way, the largest finite values
rounding to Inf, subnormals, ±0, ±Inf, NaNs whose payload a carry would turn into Inf — rounded,
against torch's own conversions, by the vector spelling and the scalar one (a row's body and
its head/tail)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normkit.kernels import cpu

W = 16
KIND = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


@pytest.fixture(params=cpu.available_isas(), autouse=True)
def isa(request):
    previous = cpu.isa()
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(previous)


def convert(src: torch.Tensor, dtype: torch.dtype, vector: bool) -> torch.Tensor:
    dst = torch.empty(src.shape, dtype=dtype)
    cpu._cpu._convert(src, dst, -1, 0 if vector else 1)
    return dst


def rounded(src: torch.Tensor, dtype: torch.dtype, vector: bool) -> torch.Tensor:
    """src rounded to dtype and back, in the compute type (x̂ for "llama"/"t5" casting)."""
    dst = torch.empty(src.shape, dtype=torch.float64 if src.dtype == torch.float64
                      else torch.float32)
    cpu._cpu._convert(src, dst, KIND[dtype], 2 if vector else 3)
    return dst


def words(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def rounding_cases() -> torch.Tensor:
    """float32 values: random bit patterns, exact ties (even and odd kept bit), one ulp either
    side of a tie, float16 ties and the edges of its range, the largest finite float32 values,
    subnormals, ±0, ±Inf, NaNs; most 16-lane vectors hold no NaN and no subnormal, some hold
    one (AVX512_BF16's vcvtneps2bf16 spelling takes another branch for those)."""
    rng = np.random.default_rng(7)
    random = rng.integers(0, 2**32, 1 << 16, dtype=np.uint32)
    kept = rng.integers(0, 2**16, 4096, dtype=np.uint32) << 16
    ties = kept | 0x8000
    half = np.array([1 + 2**-11, 1 + 3 * 2**-11, 65504.0, 65519.996, 65520.0, 2**-14, 2**-24,
                     2**-25, 3 * 2**-25, 6e-8, 1e-8, 2**-15 + 2**-25], np.float32).view(np.uint32)
    specials = np.array([0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF,
                         0x7F7F8000, 0x00000001, 0x807FFFFF, 0x00008000, 0x00018000,
                         0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FBFFFFF],
                        dtype=np.uint32)
    bits = np.concatenate([random, ties, ties - 1, ties + 1, kept | 0x7FFF, half,
                           half | 0x80000000, specials])
    bits = np.concatenate([bits, np.zeros(-bits.size % W, np.uint32)])
    values = bits.view(np.float32)
    odd = np.isnan(values) | ((values != 0) & (np.abs(values) < np.finfo(np.float32).tiny))
    per_vector = odd.reshape(-1, W).any(axis=1)
    assert per_vector.any() and not per_vector.all()
    return torch.from_numpy(values.copy())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vector", [True, False], ids=["vector", "scalar"])
def test_every_16bit_word_widens_exactly(dtype, vector):
    w = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    got = convert(w, torch.float32, vector)
    want = w.to(torch.float32)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(words(got[~nan]), words(want[~nan]))
    if dtype == torch.bfloat16:  # the high half of a float32: even a NaN's bits
        assert torch.equal(words(got), words(want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vector", [True, False], ids=["vector", "scalar"])
def test_float32_rounds_to_16bit_as_torch(dtype, vector):
    f = rounding_cases()
    got = convert(f, dtype, vector)
    want = f.to(dtype)
    nan = torch.isnan(f)
    assert torch.equal(words(got[~nan]), words(want[~nan]))
    if dtype == torch.bfloat16:  # the quiet NaN 0x7FC0, whatever the payload
        assert (words(got[nan]) == 0x7FC0).all()
    else:
        assert torch.isnan(got[nan]).all()
    # rounded and back, in registers: what storing and loading would give
    back = rounded(f, dtype, vector)
    assert torch.equal(words(back[~nan]), words(want[~nan].float()))
    assert torch.isnan(back[nan]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vector", [True, False], ids=["vector", "scalar"])
def test_float64_rounds_through_float32(dtype, vector):
    """float64 statistics written to a narrower output: rounded to float32, then to the output
    dtype (as the numba kernels did; a double rounding, documented)."""
    rng = np.random.default_rng(3)
    d = torch.from_numpy(np.concatenate([
        rng.standard_normal(4096) * 10.0 ** rng.integers(-40, 40, 4096),
        rounding_cases().double().numpy()]))
    d = torch.cat([d, torch.zeros(-d.numel() % W, dtype=torch.float64)])
    got = convert(d, dtype, vector)
    want = d.to(torch.float32).to(dtype)
    nan = torch.isnan(d)
    assert torch.equal(words(got[~nan]), words(want[~nan]))
    assert torch.isnan(got[nan]).all()


@pytest.mark.parametrize("vector", [True, False], ids=["vector", "scalar"])
def test_float32_widens_to_float64_exactly(vector):
    f = rounding_cases()
    got = convert(f, torch.float64, vector)
    nan = torch.isnan(f)
    assert torch.equal(words(got[~nan]), words(f[~nan].double()))
    assert torch.isnan(got[nan]).all()
