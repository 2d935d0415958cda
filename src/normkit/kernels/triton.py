"""Triton kernels for LayerNorm / RMSNorm (+ fused residual add), forward and backward.

Layout (STYLE habit 1): kernels first, then the host functions that allocate outputs and pick
launch settings; the interface is the one of ``kernels/cpu.py`` (``supports``, ``forward``,
``backward``; statistics (M, 3) = [m1, dm, rstd] with mean = m1 + dm).  The math is the one in
``reference.py``.  This module imports triton at the top and is itself imported only when a CUDA
tensor (or, in tests, the interpreter: ``TRITON_INTERPRET=1`` set before this import) needs it.

Design points, each with the reason:

* **Everything that shapes a row's reduction is a function of N alone** (``config(n)``): the
  block size, whether the row is looped over in chunks, the rows per program and the warps.
  M only changes the grid and the masks, so a row's bits do not depend on the batch size, on its
  position or on its neighbours (vllm #48271 is the counter-example: a block size chosen from
  the number of tokens).
* **Rows up to ``_MAX_BLOCK`` elements are held whole in registers** (one read of x, one write
  of y).  Longer rows (any N; the tests reach the looped path in the interpreter with small
  blocks, and one row of 4·``_MAX_BLOCK`` + 3 at the real settings — no GPU has run them yet)
  are **looped over in chunks of ``_CHUNK``**: one pass computes the statistics, a second
  re-reads the row (from L2 for the rows in flight) and writes y.  Holding a 65K row in
  registers is what makes other Triton norms spill and collapse at 65K.
* **Robust statistics in one pass over chunks.**  m1 is the mean of the first chunk (the exact
  row mean when the row fits one block, as in the reference); each chunk contributes
  ``Σ(v - m1)`` and its own centred sum of squares, merged with Chan's formula.  So
  ``var`` never comes from ``E[x²] - E[x]²``, and ``x̂ = ((v - m1) - dm)·rstd`` keeps the
  reference's (m1, dm) pair: a chunk of n_b elements has |mean_b - mean| <= σ·sqrt(N/n_b)
  (variance decomposition), so the shift costs at most sqrt(N/_CHUNK) ulps relative to σ
  (8 at N = 262,144), never the cancellation of a far-off shift.
* **fp32 accumulation** for every input dtype: x² of an fp16 |x| ~ 300 is 9e4 > 65504, so the
  square is taken after the conversion to fp32 (pytorch#133085).  No fast-math: a NaN row
  stays NaN.  A finite row whose fp32 sum of squares overflows (|v| ≳ 1e19) is taken again
  scaled by a power of two (``_moments`` with SCALED), only in the tiles that hold one.
* **Backward** in one pass over x and dy for rows held in registers (row dots, dx, and this
  program's dγ/dβ partials); for looped rows a first kernel computes the two row dots, a second
  (grid: row blocks × column chunks) writes dx and the partials.  **dγ/dβ are deterministic**:
  the rows are split into ``nblk`` contiguous blocks fixed by M alone (``bwd_blocks``), each
  program sums its block's rows in row order into its own partial row (no atomics), and the
  partial rows are added in block order, in fixed groups of 64 per level.  Run-to-run bitwise,
  whatever the device's SM count.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

try:  # triton >= 3.2
    from triton import knobs as _knobs

    _INTERPRET = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # pragma: no cover - older triton
    import os

    _INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

import torch

from .reference import cast_dtype, effective_gamma, kernel_dtypes, param_dtype

__all__ = ["forward", "backward", "supports", "plan", "config", "INTERPRET", "supports_quant",
           "forward_quant", "dropout_add", "dropout_apply"]

# True when the kernels below were created by the interpreter (TRITON_INTERPRET=1 at import):
# then they run on CPU tensors (slowly, for tests) and not on CUDA ones.
INTERPRET = _INTERPRET

# Launch settings, all functions of N (tests shrink _MAX_BLOCK/_CHUNK so that the looped path runs
# on small rows in the interpreter).
# 8192 fp32 per row with 16 warps is 16 values per thread for x (32 with x and y live): no spills.
_MAX_BLOCK = 8192
_CHUNK = 4096
# Forward rows per program for short rows: a program moves at least ~4096 elements, so N = 256
# launches 16 rows per program instead of 16 programs of one mostly idle warp each.
_MIN_TILE = 4096
_MAX_ROWS = 16
# Backward row partition (dγ/dβ partial rows): blocks of at least _MIN_BLOCK_ROWS rows, at most
# _MAX_BWD_BLOCKS blocks.  64 rows per block keep the partials (2 × 4 B per column and block,
# written and read once) under 1/24 of the rows' own traffic (≥ 3 × 2 B per element for bf16)
# while M = 2^27/N rows still make thousands of programs to fill 132 SMs (N = 768: 2731).
_MIN_BLOCK_ROWS = 64
_MAX_BWD_BLOCKS = 4096
# The partial rows are summed in fixed groups of _REDUCE_GROUP, level by level (4096 blocks:
# 64 + 1 row sums per column) so that the final reduction is parallel, not 4096 dependent loads.
_REDUCE_GROUP = 64
_REDUCE_BLOCK = 256

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# x̂ rounding kind for "llama"/"t5" casting: 0 none, 1 bfloat16, 2 float16.
_NK = {None: 0, torch.bfloat16: 1, torch.float16: 2}
# Triton's interpreter (3.9) converts float32 to bfloat16 by truncation, whatever the rounding
# mode asked for; the GPU's cvt.rn.bf16.f32 rounds to nearest even, as torch does.  Under the
# interpreter the kernels round in integer arithmetic instead (same bits as torch, NaN kept).
_EMULATE_BF16 = tl.constexpr(INTERPRET)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bf16_rne(v):
    """v (fp32) → bfloat16, round to nearest even, in integer arithmetic (interpreter only)."""
    u = v.to(tl.uint32, bitcast=True)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    u = tl.where(v != v, 0x7FC00000, u)  # a NaN's bits must not carry into Inf
    return u.to(tl.float32, bitcast=True).to(tl.bfloat16)  # exact: the low bits are zero


# Conversions are written out at each call site as
#     if _EMULATE_BF16 and T == tl.bfloat16: _bf16_rne(v)  else: v.to(T)
# (constant-folded when compiled) because every call of a nested jit function costs the
# interpreter ~2 ms of re-patching: a helper called per row made the tests 3x slower.


@triton.jit
def _round(v, NK: tl.constexpr):
    """v (fp32) rounded to bfloat16 (NK=1) or float16 (NK=2) and back (round to nearest even)."""
    if NK == 1:
        if _EMULATE_BF16:
            v = _bf16_rne(v).to(tl.float32)
        else:
            v = v.to(tl.bfloat16).to(tl.float32)
    elif NK == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _load_rows(X, R, H, rows, rmask, cols, N, sx, sr, HAS_RES: tl.constexpr):
    """The [ROWS, BLOCK] tile of v (= x, or h = x + r rounded to x's dtype and stored) in fp32."""
    mask = rmask[:, None] & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * sr + cols[None, :], mask=mask, other=0.0)
        if _EMULATE_BF16 and X.dtype.element_ty == tl.bfloat16:
            x = _bf16_rne(x.to(tl.float32) + r.to(tl.float32))
        else:
            x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(H + rows[:, None] * N + cols[None, :], x, mask=mask)
    return x.to(tl.float32), mask


@triton.jit
def _store_y(Y, W, B, v, m1, dm, rstd, rows, cols, mask, N,
             HAS_W: tl.constexpr, HAS_B: tl.constexpr, ZC: tl.constexpr, NK: tl.constexpr):
    """y = x̂·g + b with x̂ = ((v - m1) - dm)·rstd; "llama"/"t5" (NK > 0) round x̂ to the
    storage type first and x̂·g to y's type (torch's promotion), exactly as kernels/cpu.py."""
    xh = ((v - m1[:, None]) - dm[:, None]) * rstd[:, None]
    cmask = cols < N
    t = xh
    if NK != 0:
        t = _round(xh, NK)
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        if ZC:
            w = w + 1.0
        t = t * w[None, :]
        if NK != 0:
            if _EMULATE_BF16 and Y.dtype.element_ty == tl.bfloat16:
                t = _bf16_rne(t).to(tl.float32)
            else:
                t = t.to(Y.dtype.element_ty).to(tl.float32)
    if HAS_B:
        t = t + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if _EMULATE_BF16 and Y.dtype.element_ty == tl.bfloat16:
        t = _bf16_rne(t)
    tl.store(Y + rows[:, None] * N + cols[None, :], t.to(Y.dtype.element_ty), mask=mask)


_F32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _reload_rows(X, H, rows, rmask, cols, N, sx, HAS_RES: tl.constexpr):
    """The [ROWS, BLOCK] tile of v again, in fp32 (h as this program stored it; 0 outside),
    and its mask."""
    mask = rmask[:, None] & (cols[None, :] < N)
    if HAS_RES:
        v = tl.load(H + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    else:
        v = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0)
    return v.to(tl.float32), mask


@triton.jit
def _moments(X, R, H, v, rows, rmask, cols, N, sx, sr, nchunk, sc, BLOCK: tl.constexpr,
             LOOP: tl.constexpr, RMS: tl.constexpr, HAS_RES: tl.constexpr, SCALED: tl.constexpr):
    """(m1, s1, ss) of the rows, or of sc·rows (SCALED; sc a power of two per row):
    RMS: ss = Σv², m1 = s1 = 0.  LN: m1 = mean(first chunk), s1 = Σ(v - m1), ss = M2, the
    Chan merge of the chunks' centred sums of squares.  v is the first chunk's tile."""
    mask = rmask[:, None] & (cols[None, :] < N)
    if SCALED:
        v = v * sc[:, None]
    n0 = tl.minimum(N, BLOCK) * 1.0
    if RMS:
        ss = tl.sum(v * v, axis=1)
        m1 = tl.zeros_like(ss)
        s1 = m1
    else:
        m1 = tl.sum(v, axis=1) / n0
        d = tl.where(mask, v - m1[:, None], 0.0)
        s1 = tl.sum(d, axis=1)
        mb = s1 / n0
        e = tl.where(mask, d - mb[:, None], 0.0)
        ss = tl.sum(e * e, axis=1)
    if LOOP:
        # Fresh names in the loop body: a name bound before the loop and rebound inside would
        # become a loop-carried [ROWS, BLOCK] value, kept live in registers across iterations.
        for c in range(1, nchunk):
            cc = c * BLOCK + cols
            if SCALED:  # a second look: h is stored already
                vc, mc = _reload_rows(X, H, rows, rmask, cc, N, sx, HAS_RES)
                vc = vc * sc[:, None]
            else:
                vc, mc = _load_rows(X, R, H, rows, rmask, cc, N, sx, sr, HAS_RES)
            if RMS:
                ss += tl.sum(vc * vc, axis=1)
            else:
                na = (c * BLOCK) * 1.0
                nb = tl.minimum(N - c * BLOCK, BLOCK) * 1.0
                dc = tl.where(mc, vc - m1[:, None], 0.0)
                sb = tl.sum(dc, axis=1)
                mbc = sb / nb
                ec = tl.where(mc, dc - mbc[:, None], 0.0)
                delta = mbc - s1 / na
                ss = ss + tl.sum(ec * ec, axis=1) + delta * delta * (na * nb / (na + nb))
                s1 = s1 + sb
    return m1, s1, ss


# Quantized outputs (``_store_q``): q's largest magnitude and the smallest dynamic scale, as
# reference.QMAX / QFLOOR (QK 1: float8_e4m3fn, 2: int8).
_E4M3_MAX = tl.constexpr(448.0)
_E4M3_FLOOR = tl.constexpr(1.0 / (448.0 * 512.0))
_INT8_FLOOR = tl.constexpr(2.0**-23)


@triton.jit
def _y_f32(W, B, v, m1, dm, rstd, cols, N, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
           ZC: tl.constexpr):
    """y = x̂·g + b in float32 ("torch"/"gemma" casting, before any rounding): what the
    quantized outputs quantize."""
    cmask = cols < N
    t = ((v - m1[:, None]) - dm[:, None]) * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        if ZC:
            w = w + 1.0
        t = t * w[None, :]
    if HAS_B:
        t = t + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return t


@triton.jit
def _q_bytes(t, QK: tl.constexpr):
    """The q bytes (uint8) of t = y·(1/s), as kernels/csrc/quant.h: float8_e4m3fn saturated to
    ±448, then torch's float32 → e4m3 conversion on the bits (the interpreter's own cast neither
    rounds to nearest even nor saturates; one spelling gives the same bits on every device);
    int8: NaN → 0, saturated to [-128, 127], rounded to nearest even."""
    if QK == 1:
        t = tl.where(t < -_E4M3_MAX, -_E4M3_MAX, t)  # a NaN compares false: kept
        t = tl.where(t > _E4M3_MAX, _E4M3_MAX, t)
        u = t.to(tl.uint32, bitcast=True)
        sign = u & 0x80000000
        a = u ^ sign
        # below 2^-6: rounded onto the subnormals' grid by adding 2^14
        sub = (a.to(tl.float32, bitcast=True) + 16384.0).to(tl.uint32, bitcast=True) - (141 << 23)
        # above: the exponent rebiased (-120 << 23), rounded by 2^19 - 1 plus the lowest kept bit
        nrm = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
        nrm = tl.where(nrm == 0x7F, 0x7E, nrm)
        r = tl.where(a < (121 << 23), sub, nrm)
        r = tl.where(a >= (1087 << 20), tl.where(a > 0x7F800000, 0x7F, 0x7E), r)
        b = r | (sign >> 24)
    else:
        t = tl.where(t != t, 0.0, t)
        t = tl.minimum(tl.maximum(t, -128.0), 127.0)
        t = (t + 12582912.0) - 12582912.0  # to nearest even: |t| <= 128 < 2^22
        b = t.to(tl.int32) & 0xFF
    return b.to(tl.uint8)


@triton.jit
def _store_q(X, H, Q, W, B, QS, SC, v, m1, dm, rstd, rows, rmask, cols, mask, N, sx, nchunk,
             BLOCK: tl.constexpr, LOOP: tl.constexpr, HAS_RES: tl.constexpr,
             HAS_W: tl.constexpr, HAS_B: tl.constexpr, ZC: tl.constexpr, QK: tl.constexpr,
             STATIC: tl.constexpr):
    """q = sat(rne(y·r)), r = 1/s rounded once per row; s = SC (STATIC) or max(amax|y|/qmax,
    floor), NaN when the row holds one (tl.max drops NaN on GPUs: counted apart)."""
    if STATIC:
        s = tl.load(SC) + tl.zeros_like(rstd)
    else:
        if HAS_RES and LOOP:
            tl.debug_barrier()  # h written above by this program is read back below
        y = _y_f32(W, B, v, m1, dm, rstd, cols, N, HAS_W, HAS_B, ZC)
        amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1)
        nan = tl.max((mask & (y != y)).to(tl.int32), axis=1)
        if LOOP:
            for c in range(1, nchunk):
                cc = c * BLOCK + cols
                vc, mc = _reload_rows(X, H, rows, rmask, cc, N, sx, HAS_RES)
                yc = _y_f32(W, B, vc, m1, dm, rstd, cc, N, HAS_W, HAS_B, ZC)
                amax = tl.maximum(amax, tl.max(tl.where(mc, tl.abs(yc), 0.0), axis=1))
                nan = tl.maximum(nan, tl.max((mc & (yc != yc)).to(tl.int32), axis=1))
        if QK == 1:
            s = tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
            s = tl.where(s < _E4M3_FLOOR, _E4M3_FLOOR, s)
        else:
            s = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
            s = tl.where(s < _INT8_FLOOR, _INT8_FLOOR, s)
        s = tl.where(nan > 0, float("nan"), s)
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)  # GPU `/` is not correctly rounded
    tl.store(QS + rows, s, mask=rmask)
    if LOOP:
        if HAS_RES and STATIC:
            tl.debug_barrier()  # h written above by this program is read back below
        for c in range(0, nchunk):
            cc = c * BLOCK + cols
            vc, cmask = _reload_rows(X, H, rows, rmask, cc, N, sx, HAS_RES)
            yc = _y_f32(W, B, vc, m1, dm, rstd, cc, N, HAS_W, HAS_B, ZC)
            tl.store(Q + rows[:, None] * N + cc[None, :], _q_bytes(yc * r[:, None], QK),
                     mask=cmask)
    else:
        y = _y_f32(W, B, v, m1, dm, rstd, cols, N, HAS_W, HAS_B, ZC)
        tl.store(Q + rows[:, None] * N + cols[None, :], _q_bytes(y * r[:, None], QK), mask=mask)


# M (and the backward's rows per block) are never specialized: Triton would compile M = 1 as a
# constant into its own kernel, and a row's bits must not depend on which kernel ran it.
@triton.jit(do_not_specialize=["M"])
def _fwd_kernel(
    X, R, H, Y, W, B, S, M, N, sx, sr, eps, nchunk,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, LOOP: tl.constexpr, RMS: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ZC: tl.constexpr,
    NK: tl.constexpr, STATS: tl.constexpr,
    QS=None, SC=None, QK: tl.constexpr = 0, STATIC: tl.constexpr = False,
):
    """ROWS rows per program: optional h = x + r, statistics, y (QK > 0: y quantized, see
    ``_store_q``; Y then holds q's bytes, QS the rows' scales, SC a static scale).

    LN:  m1 = mean(first chunk); d = v - m1; dm = Σd/N; var = M2/N with M2 the Chan merge of the
         chunks' centred sums of squares; rstd = 1/sqrt(var + eps).
    RMS: rstd = 1/sqrt(Σv²/N + eps); m1 = dm = 0.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    cols = tl.arange(0, BLOCK)
    # "* 1.0", not ".to(tl.float32)": Triton passes an int argument equal to 1 as a constant
    # (N = 1 is legal), which has no .to().
    nf = N * 1.0

    v, mask = _load_rows(X, R, H, rows, rmask, cols, N, sx, sr, HAS_RES)
    m1, s1, ss = _moments(X, R, H, v, rows, rmask, cols, N, sx, sr, nchunk, 1.0,
                          BLOCK, LOOP, RMS, HAS_RES, False)
    t = ss / nf + eps
    if tl.max((~(t <= _F32_MAX)).to(tl.int32), axis=0) > 0:
        # A row's sum of squares overflowed (or the row holds Inf/NaN): finite rows are taken
        # again scaled by the power of two that brings their largest |v| into [1, 2), as the
        # CPU kernels do; the other rows of the tile again with a scale of 1 (the same bits).
        if HAS_RES:
            tl.debug_barrier()  # h written above by this program is read back
        amax = tl.max(tl.where(mask, tl.abs(v), 0.0), axis=1)
        if LOOP:
            for c in range(1, nchunk):
                cc = c * BLOCK + cols
                vc, _ = _reload_rows(X, H, rows, rmask, cc, N, sx, HAS_RES)
                amax = tl.maximum(amax, tl.max(tl.abs(vc), axis=1))
        ok = (~(t <= _F32_MAX)) & (amax <= _F32_MAX) & (amax > 0.0)
        k = tl.minimum(((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, 126)
        sc = tl.where(ok, ((127 - k) << 23).to(tl.float32, bitcast=True), 1.0)
        m1, s1, ss = _moments(X, R, H, v, rows, rmask, cols, N, sx, sr, nchunk, sc,
                              BLOCK, LOOP, RMS, HAS_RES, True)
        m1 = m1 / sc
        s1 = s1 / sc
        rstd = (1.0 / tl.sqrt_rn(ss / nf + eps * sc * sc)) * sc
    else:
        rstd = 1.0 / tl.sqrt_rn(t)
    if RMS:
        dm = m1
    else:
        dm = s1 / nf
    if STATS:
        tl.store(S + rows * 3, m1, mask=rmask)
        tl.store(S + rows * 3 + 1, dm, mask=rmask)
        tl.store(S + rows * 3 + 2, rstd, mask=rmask)
    if QK != 0:
        _store_q(X, H, Y, W, B, QS, SC, v, m1, dm, rstd, rows, rmask, cols, mask, N, sx, nchunk,
                 BLOCK, LOOP, HAS_RES, HAS_W, HAS_B, ZC, QK, STATIC)
    elif LOOP:
        if HAS_RES:
            tl.debug_barrier()  # h written above by this program is read back below
        for c in range(0, nchunk):
            cc = c * BLOCK + cols
            vc, cmask = _reload_rows(X, H, rows, rmask, cc, N, sx, HAS_RES)  # h: as just written
            _store_y(Y, W, B, vc, m1, dm, rstd, rows, cc, cmask, N, HAS_W, HAS_B, ZC, NK)
    else:
        _store_y(Y, W, B, v, m1, dm, rstd, rows, cols, mask, N, HAS_W, HAS_B, ZC, NK)


@triton.jit
def _bwd_x_hat(x, B, cols, cmask, m1, dm, rstd, ginv, FROM_Y: tl.constexpr,
               HAS_YB: tl.constexpr):
    """x̂ in the backward: from the normalized input and the row's statistics, or with FROM_Y
    (memory-efficient mode: x is the forward's output y) (y − β)·(1/γ), y·(1/γ) without β."""
    if FROM_Y:
        if HAS_YB:
            x = x - tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        xh = x * ginv
    else:
        xh = ((x - m1) - dm) * rstd
    return tl.where(cmask, xh, 0.0)


@triton.jit
def _bwd_dots_kernel(
    X, DY, W, S, C, N, nchunk,
    BLOCK: tl.constexpr, RMS: tl.constexpr, HAS_W: tl.constexpr, ZC: tl.constexpr,
    B, FROM_Y: tl.constexpr, HAS_YB: tl.constexpr,
):
    """Looped rows: C[i] = (mean(g·dy), mean(g·dy·x̂)) (first 0 for RMS), chunk sums in order."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m1 = tl.load(S + i * 3)
    dm = tl.load(S + i * 3 + 1)
    rstd = tl.load(S + i * 3 + 2)
    c1 = tl.zeros([], dtype=tl.float32)
    c2 = tl.zeros([], dtype=tl.float32)
    for c in range(0, nchunk):
        cc = c * BLOCK + cols
        cmask = cc < N
        x = tl.load(X + i * N + cc, mask=cmask, other=0.0).to(tl.float32)
        g = tl.load(DY + i * N + cc, mask=cmask, other=0.0).to(tl.float32)
        ginv = 1.0
        if HAS_W:
            w = tl.load(W + cc, mask=cmask, other=0.0).to(tl.float32)
            if ZC:
                w = w + 1.0
            g = g * w
            if FROM_Y:
                ginv = 1.0 / tl.where(cmask, w, 1.0)
        xh = _bwd_x_hat(x, B, cc, cmask, m1, dm, rstd, ginv, FROM_Y, HAS_YB)
        c1 += tl.sum(g, axis=0)
        c2 += tl.sum(g * xh, axis=0)
    nf = N * 1.0
    if RMS:
        c1 = 0.0
    tl.store(C + i * 2, c1 / nf)
    tl.store(C + i * 2 + 1, c2 / nf)


@triton.jit(do_not_specialize=["M", "rpb", "seed", "keep_above"])
def _bwd_kernel(
    X, DY, DH, DX, W, S, C, PW, PB, M, N, rpb,
    BLOCK: tl.constexpr, LOOP: tl.constexpr, RMS: tl.constexpr, HAS_DH: tl.constexpr,
    HAS_W: tl.constexpr, ZC: tl.constexpr, NK: tl.constexpr, WANT_W: tl.constexpr,
    WANT_B: tl.constexpr, B, FROM_Y: tl.constexpr, HAS_YB: tl.constexpr,
    DXD, seed, keep_above, scale, DROP: tl.constexpr,
):
    """Rows [blk·rpb, (blk+1)·rpb) × one column chunk: dx, and this block's dγ/dβ partial row.

    dx = rstd·(g·dy − c1 − x̂·c2) + dh with c1 = mean(g·dy) (0 for RMS), c2 = mean(g·dy·x̂);
    dγ += dy·x̂ (x̂ rounded as the forward rounds it), dβ += dy, rows in order.  DROP: also
    dxd = m·dx (dx as stored), the mask of element k = i·N + j from word k % 4 of
    tl.randint4x(seed, k // 4), as _dropout_kernel's.
    """
    blk = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    ginv = 1.0
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        if ZC:
            w = w + 1.0
        if FROM_Y:
            ginv = 1.0 / tl.where(cmask, w, 1.0)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK], dtype=tl.float32)
    lo = blk * rpb
    hi = tl.minimum(lo + rpb, M)
    nf = N * 1.0
    for i in range(lo, hi):
        i64 = tl.cast(i, tl.int64)
        x = tl.load(X + i64 * N + cols, mask=cmask, other=0.0).to(tl.float32)
        dy = tl.load(DY + i64 * N + cols, mask=cmask, other=0.0).to(tl.float32)
        m1 = tl.load(S + i64 * 3)
        dm = tl.load(S + i64 * 3 + 1)
        rstd = tl.load(S + i64 * 3 + 2)
        xh = _bwd_x_hat(x, B, cols, cmask, m1, dm, rstd, ginv, FROM_Y, HAS_YB)
        g = dy
        if HAS_W:
            g = dy * w
        if LOOP:
            c1 = tl.load(C + i64 * 2)
            c2 = tl.load(C + i64 * 2 + 1)
        else:
            c2 = tl.sum(g * xh, axis=0) / nf
            if RMS:
                c1 = 0.0
            else:
                c1 = tl.sum(g, axis=0) / nf
        dx = rstd * (g - c1 - xh * c2)
        if HAS_DH:
            dx += tl.load(DH + i64 * N + cols, mask=cmask, other=0.0).to(tl.float32)
        if _EMULATE_BF16 and DX.dtype.element_ty == tl.bfloat16:
            dx = _bf16_rne(dx)
        tl.store(DX + i64 * N + cols, dx.to(DX.dtype.element_ty), mask=cmask)
        if DROP:
            k = i64 * N + cols
            u0, u1, u2, u3 = tl.randint4x(seed, k >> 2)
            w4 = k & 3
            u = tl.where(w4 == 0, u0, tl.where(w4 == 1, u1, tl.where(w4 == 2, u2, u3)))
            u = u.to(tl.int32, bitcast=True)
            keep = (u ^ (u >> 31)) > keep_above
            v = dx.to(DX.dtype.element_ty).to(tl.float32) * tl.where(keep, scale, 0.0)
            if _EMULATE_BF16 and DX.dtype.element_ty == tl.bfloat16:
                v = _bf16_rne(v)
            tl.store(DXD + i64 * N + cols, v.to(DX.dtype.element_ty), mask=cmask)
        if WANT_W:
            if NK != 0:
                acc_w += dy * _round(xh, NK)
            else:
                acc_w += dy * xh
        if WANT_B:
            acc_b += dy
    if WANT_W:
        tl.store(PW + blk.to(tl.int64) * N + cols, acc_w, mask=cmask)
    if WANT_B:
        tl.store(PB + blk.to(tl.int64) * N + cols, acc_b, mask=cmask)


@triton.jit
def _sum_partials_kernel(P, OUT, nrows, N, G, BLOCK: tl.constexpr):
    """OUT[g, j] = Σ_k P[k, j] over the group k ∈ [g·G, min((g+1)·G, nrows)), k in order: a
    fixed summation tree (a function of M and N), which makes dγ/dβ bitwise reproducible."""
    g = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    lo = g * G
    hi = tl.minimum(lo + G, nrows)
    acc = tl.load(P + lo.to(tl.int64) * N + cols, mask=cmask, other=0.0)
    for k in range(lo + 1, hi):
        acc += tl.load(P + tl.cast(k, tl.int64) * N + cols, mask=cmask, other=0.0)
    tl.store(OUT + g.to(tl.int64) * N + cols, acc, mask=cmask)


# ----------------------------------------------------------------------------------------------
# Host functions: torch tensors in, torch tensors out
# ----------------------------------------------------------------------------------------------


def config(n: int) -> tuple[int, bool, int, int]:
    """(BLOCK, LOOP, ROWS, num_warps) for rows of n elements — a function of n alone, which is
    what makes a row's bits independent of the batch (see the module docstring)."""
    if n <= _MAX_BLOCK:
        block = triton.next_power_of_2(n)
        loop = False
        rows = max(1, min(_MAX_ROWS, _MIN_TILE // block))
    else:
        block, loop, rows = _CHUNK, True, 1
    tile = block * rows
    # ptxas (sm_90, checked offline): backward at BLOCK=8192 needs 227 registers per thread with
    # 8 warps (one CTA per SM) and fits 16 warps; no configuration here spills.
    warps = 4 if tile <= 1024 else 8 if tile <= 4096 else 16
    return block, loop, rows, warps


def bwd_blocks(m: int, n: int) -> int:
    """Number of row blocks (dγ/dβ partial rows) of the backward: a function of M only (``n``
    is accepted so that a future size rule can use it), never of the device or the thread
    count, so dγ/dβ are the same bits on every run."""
    nblk = max(1, min(_MAX_BWD_BLOCKS, -(-m // _MIN_BLOCK_ROWS), m))
    rpb = -(-m // nblk)
    return -(-m // rpb)  # no empty blocks



@functools.cache
def plan(x_dtype, w_dtype, b_dtype, casting, out_dtype):
    """(param dtype, output dtype, x̂ rounding dtype or None), or None when not covered.

    Covered: float32/bfloat16/float16 x, γ, β and output, every casting mode; "llama"/"t5" with
    γ and β of different dtypes are left to the reference (as on the CPU).  float64 is left to
    the reference: it is not a GPU training dtype and fp64 throughput is 1/2–1/64 of fp32.
    """
    result = None
    if x_dtype in _DTYPES and all(d is None or d in _DTYPES for d in (w_dtype, b_dtype)):
        dts = kernel_dtypes(x_dtype, w_dtype, b_dtype, casting, out_dtype)
        if dts is not None and dts[1] in _DTYPES:
            result = dts
    return result


def supports(x, weight, bias, casting, out_dtype) -> bool:
    """Whether this backend computes the op for these operands (else the caller falls back).

    CUDA tensors with compiled kernels; CPU tensors only when the kernels were created by the
    interpreter (``TRITON_INTERPRET=1`` before normkit imported this module).
    """
    dev = x.device
    if dev.type != ("cpu" if INTERPRET else "cuda"):
        return False
    if any(p is not None and p.device != dev for p in (weight, bias)):
        return False
    wd = None if weight is None else weight.dtype
    bd = None if bias is None else bias.dtype
    return plan(x.dtype, wd, bd, casting, out_dtype) is not None


def _param(p, pd):
    """γ/β as the kernel reads them: pd, contiguous (N-sized, so a conversion is cheap)."""
    if p is None:
        return None
    if p.dtype != pd:
        p = p.to(pd)
    return p.contiguous()


def forward(x, weight, bias, residual, eps, rms, zero_centered, casting, out_dtype, need_stats,
            dropout=None):
    """Forward on rows.

    Args:
        x: (M, N) with ``x.stride(1) == 1`` (rows may be strided: read in place, no copy).
        residual: like x (its own row stride) or None.  weight, bias: (N,) or None.
        Other args as in ``reference.norm_forward``.
        need_stats: also return the (M, 3) float32 statistics [m1, dm, rstd].
        dropout: None, or (seed, keep_above, scale): h = dropout(x) (+ residual) is written
            (``dropout_add``) and normalized — two kernels, the second one the plain norm of h.

    Returns:
        (y, h, stats): y (M, N) contiguous; h (M, N) in x.dtype or None; stats or None.
    """
    if dropout is not None:
        h = dropout_add(x, residual, dropout)
        y, _, stats = forward(h, weight, bias, None, eps, rms, zero_centered, casting, out_dtype,
                              need_stats)
        return y, h, stats
    m, n = x.shape
    pd, od, nd = plan(x.dtype, None if weight is None else weight.dtype,
                      None if bias is None else bias.dtype, casting, out_dtype)
    if n > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have a contiguous last dim, got strides {tuple(x.stride())}")
    w, zero_centered = effective_gamma(_param(weight, pd), zero_centered, nd is not None)
    b = _param(bias, pd)
    dev = x.device
    y = torch.empty((m, n), dtype=od, device=dev)
    h = stats = None
    if residual is not None:
        if n > 1 and residual.stride(1) != 1:
            residual = residual.contiguous()
        h = torch.empty((m, n), dtype=x.dtype, device=dev)
    if need_stats:
        stats = torch.empty((m, 3), dtype=torch.float32, device=dev)
    if m == 0 or n == 0:
        if stats is not None and n == 0:
            stats.zero_()
        return y, h, stats
    block, loop, rows, warps = config(n)
    r = residual if residual is not None else x
    _fwd_kernel[(triton.cdiv(m, rows),)](
        x, r, x if h is None else h, y, x if w is None else w, x if b is None else b,
        y if stats is None else stats,
        m, n, x.stride(0), r.stride(0), float(eps), triton.cdiv(n, block),
        ROWS=rows, BLOCK=block, LOOP=loop, RMS=bool(rms), HAS_RES=residual is not None,
        HAS_W=w is not None, HAS_B=b is not None, ZC=bool(zero_centered) and w is not None,
        NK=_NK[nd], STATS=stats is not None, num_warps=warps,
    )
    return y, h, stats


def backward(dy, dh, x, weight, has_bias, stats, rms, zero_centered, casting, need_dw,
             bias=None, from_y=False, dropout=None):
    """Backward on rows.

    Args:
        dy: (M, N) gradient of y (contiguous, y's dtype).  dh: gradient of the returned h
            (contiguous, like x) or None.  x: (M, N) contiguous: the normalized input (h when a
            residual was added).  weight: (N,) or None.  has_bias: whether dβ is wanted.
        stats: forward's (M, 3) [m1, dm, rstd] (from this backend or any other: same layout).
        need_dw: whether dγ/dβ are wanted at all.
        bias, from_y: the memory-efficient backward: x is the forward's output y, bias its β
            (or None), and x̂ = (y − β)/γ.  Raises ValueError where γ (1 + γ zero-centred) is 0
            (a check that waits for the device).
        dropout: the spec of a dropout before the fused residual add, or None.

    Returns:
        (dx, dweight, dbias): dx in x.dtype (also the residual's gradient); dweight/dbias
        float32 (N,) or None.  With ``dropout``, a fourth: m·dx, the dropout input's gradient
        (``dropout_apply(dx, dropout)``'s bits), stored by the pass that stores dx.
    """
    m, n = x.shape
    dev = x.device
    wd = None if weight is None else weight.dtype
    pd = param_dtype(x.dtype, wd, None)
    nd = cast_dtype(x.dtype, None if wd is None else pd, casting)
    w, zero_centered = effective_gamma(_param(weight, pd), zero_centered, nd is not None)
    yb = _param(bias, param_dtype(x.dtype, None, bias.dtype)) if from_y and bias is not None \
        else None
    if from_y:
        _check_lean_gamma(w, zero_centered)
    # B: β of the memory-efficient backward (x stands in for an absent one, as for W)
    lean = {"B": x if yb is None else yb, "FROM_Y": bool(from_y), "HAS_YB": yb is not None}
    want_w = bool(need_dw) and w is not None
    want_b = bool(need_dw) and bool(has_bias)
    dy = dy.contiguous()
    x = x.contiguous()
    dh = None if dh is None else dh.contiguous()
    stats = stats.float().contiguous()
    dx = torch.empty((m, n), dtype=x.dtype, device=dev)
    dxd = None if dropout is None else torch.empty_like(dx)
    if m == 0 or n == 0:
        z = torch.zeros(n, dtype=torch.float32, device=dev)
        return (dx, z if want_w else None, z.clone() if want_b else None,
                *(() if dxd is None else (dxd,)))
    block, loop, _, warps = config(n)
    nchunk = triton.cdiv(n, block) if loop else 1
    nblk = bwd_blocks(m, n)
    rpb = -(-m // nblk)
    # Separate buffers: with one block, dγ and dβ are these very rows, and outputs of a custom
    # op must not alias each other.
    pw = torch.empty((nblk, n), dtype=torch.float32, device=dev) if want_w else dx
    pb = torch.empty((nblk, n), dtype=torch.float32, device=dev) if want_b else dx
    dots = dx
    if loop:
        dots = torch.empty((m, 2), dtype=torch.float32, device=dev)
        _bwd_dots_kernel[(m,)](
            x, dy, x if w is None else w, stats, dots, n, nchunk,
            BLOCK=block, RMS=bool(rms), HAS_W=w is not None,
            ZC=bool(zero_centered) and w is not None, num_warps=warps, **lean,
        )
    seed, keep_above, scale = (0, 0, 1.0) if dropout is None else dropout
    _bwd_kernel[(nblk, nchunk)](
        x, dy, dx if dh is None else dh, dx, x if w is None else w, stats, dots, pw, pb,
        m, n, rpb,
        BLOCK=block, LOOP=loop, RMS=bool(rms), HAS_DH=dh is not None, HAS_W=w is not None,
        ZC=bool(zero_centered) and w is not None, NK=_NK[nd], WANT_W=want_w, WANT_B=want_b,
        num_warps=warps, **lean, DXD=dx if dxd is None else dxd, seed=seed,
        keep_above=keep_above, scale=float(scale), DROP=dropout is not None,
    )
    dw = _reduce(pw, nblk, n) if want_w else None
    db = _reduce(pb, nblk, n) if want_b else None
    return (dx, dw, db, *(() if dxd is None else (dxd,)))


def _check_lean_gamma(w, zero_centered):
    """The memory-efficient backward's check (as the CPU kernels'): x̂ = (y − β)/γ is lost
    where γ (1 + γ zero-centred) is 0."""
    if w is None:
        return
    zero = (w == -1) if zero_centered else (w == 0)
    count = int(zero.sum())
    if count:
        first = int(zero.nonzero()[0, 0])
        raise ValueError(f"memory_efficient=True: the effective weight (gamma, or 1 + gamma with "
                         f"zero_centered_gamma) is 0 at {count} of {w.numel()} entries (the first "
                         f"at index {first}), where x_hat = (y - beta) / gamma cannot be "
                         f"recovered from the saved output; use memory_efficient=False for this "
                         f"layer")


def _reduce(partial, nblk, n):
    """Σ over the nblk partial rows, in groups of _REDUCE_GROUP, level by level, in order."""
    while nblk > 1:
        groups = triton.cdiv(nblk, _REDUCE_GROUP)
        out = torch.empty((groups, n), dtype=torch.float32, device=partial.device)
        _sum_partials_kernel[(groups, triton.cdiv(n, _REDUCE_BLOCK))](
            partial, out, nblk, n, _REDUCE_GROUP, BLOCK=_REDUCE_BLOCK, num_warps=2
        )
        partial, nblk = out, groups
    return partial[0]


# ----------------------------------------------------------------------------------------------
# Quantized outputs: _fwd_kernel with QK > 0
# ----------------------------------------------------------------------------------------------

_QK = {torch.float8_e4m3fn: 1, torch.int8: 2}


def supports_quant(x) -> bool:
    """Whether ``forward_quant`` computes x's rows: every x ``supports`` takes."""
    return x.dtype in _DTYPES


def forward_quant(x, weight, bias, residual, eps, rms, zero_centered, q_dtype, scale, need_stats,
                  h=None):
    """Forward on rows with a quantized output, as ``kernels.cpu.forward_quant``.

    Returns:
        (q, scale, h, stats): q (M, N) in q_dtype; scale (M,) float32; h or None; stats or None.
    """
    m, n = x.shape
    if n > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have a contiguous last dim, got strides {tuple(x.stride())}")
    pd = plan(x.dtype, None if weight is None else weight.dtype,
              None if bias is None else bias.dtype, "torch", None)[0]
    w, b = _param(weight, pd), _param(bias, pd)
    dev = x.device
    q = torch.empty((m, n), dtype=q_dtype, device=dev)
    s = torch.empty(m, dtype=torch.float32, device=dev)
    stats = torch.empty((m, 3), dtype=torch.float32, device=dev) if need_stats else None
    r = x
    if residual is not None:
        r = residual if n == 1 or residual.stride(1) == 1 else residual.contiguous()
        if h is None:
            h = torch.empty((m, n), dtype=x.dtype, device=dev)
    block, loop, rows, warps = config(n)
    _fwd_kernel[(triton.cdiv(m, rows),)](
        x, r, x if h is None else h, q.view(torch.uint8), x if w is None else w,
        x if b is None else b, s if stats is None else stats,
        m, n, x.stride(0), r.stride(0), float(eps), triton.cdiv(n, block),
        ROWS=rows, BLOCK=block, LOOP=loop, RMS=bool(rms), HAS_RES=residual is not None,
        HAS_W=w is not None, HAS_B=b is not None, ZC=bool(zero_centered) and w is not None,
        NK=0, STATS=stats is not None, QS=s, SC=s if scale is None else scale,
        QK=_QK[q_dtype], STATIC=scale is not None, num_warps=warps,
    )
    return q, s, (h if residual is not None else None), stats


# ----------------------------------------------------------------------------------------------
# Dropout before the residual add (``dropout_p=``; the mask is reference.py's)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "k0", "keep_above"])
def _dropout_kernel(X, R, H, N, sx, sr, k0, seed, keep_above, scale,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """h = x·m (+ r) on a [1, BLOCK] tile: m = scale where the 31-bit value of word k % 4 of
    tl.randint4x(seed, k // 4) is > keep_above (tl.rand > float32(p)), else 0; k = k0 + i·N + j.
    The tile is BLOCK // 4 whole counters, from the one holding the row's first element on (so
    it starts k % 4 columns before the row): each counter's 4 words are its 4 elements.
    Product and sum each rounded in fp32, then h rounded once to H's dtype."""
    i = tl.program_id(0).to(tl.int64)
    base = k0 + i * N  # the row's first element
    g = (base >> 2) + tl.program_id(1).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    u0, u1, u2, u3 = tl.randint4x(seed, g)
    u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), [BLOCK])  # u0 u1 u2 u3 per counter
    u = u.to(tl.int32, bitcast=True)
    cols = 4 * (base >> 2) + tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK) - base
    mask = (cols >= 0) & (cols < N)
    keep = (u ^ (u >> 31)) > keep_above  # tl.rand's value: a negative u becomes -u-1 = ~u
    v = tl.load(X + i * sx + cols, mask=mask, other=0.0).to(tl.float32)
    v = v * tl.where(keep, scale, 0.0)
    if HAS_RES:
        v = v + tl.load(R + i * sr + cols, mask=mask, other=0.0).to(tl.float32)
    if _EMULATE_BF16 and H.dtype.element_ty == tl.bfloat16:
        v = _bf16_rne(v)
    tl.store(H + i * N + cols, v.to(H.dtype.element_ty), mask=mask)


def _dropout_launch(x, residual, out, k0, dropout):
    m, n = x.shape
    if m == 0 or n == 0:
        return out
    seed, keep_above, scale = dropout
    block = min(max(triton.next_power_of_2(n), 4), 1024)  # whole counters: 4 elements each
    r = x if residual is None else residual
    # No fused multiply-add on the GPU either: h = round(round(x·m) + r), as the CPU and the
    # reference compute it (the interpreter never fuses).
    launch = {} if INTERPRET else {"enable_fp_fusion": False}
    _dropout_kernel[(m, triton.cdiv(n + 3, block))](  # + 3: a row may start mid-counter
        x, r, out, n, x.stride(0), r.stride(0), k0, seed, keep_above, float(scale),
        HAS_RES=residual is not None, BLOCK=block, **launch)
    return out


def dropout_add(x, residual, dropout):
    """h = dropout(x) (+ residual), (M, N) in x.dtype.  x and residual: rows of unit stride."""
    if residual is not None and x.shape[1] > 1 and residual.stride(1) != 1:
        residual = residual.contiguous()
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _dropout_launch(x, residual, h, 0, dropout)


def dropout_apply(src, dropout, out=None):
    """src·m for (M, N) contiguous rows of the dropout's rows (backward: dx = m·dh), into
    ``out`` (it may be src) or a new tensor."""
    return _dropout_launch(src, None, torch.empty_like(src) if out is None else out, 0, dropout)
