"""Pure-torch reference for the normkit op family: the spec every backend is tested against.

Everything here is plain differentiable torch, so it also serves as

* the fallback for devices/dtypes no fast backend covers (CUDA until the Triton backend lands),
* double backward (autograd through these formulas),
* the float64 ground truth in tests (call it on ``x.double()``).

The math (per row ``v`` of length N, after the optional residual add ``h = x + residual``):

    LayerNorm: m1 = mean(v); d = v - m1; dm = mean(d); var = mean(d*d) - dm*dm
               y  = (d - dm) * rsqrt(var + eps) * g + b
    RMSNorm:   y  = v * rsqrt(mean(v*v) + eps) * g

with ``g = weight`` or ``1 + weight`` (zero-centred γ).  The shift by the first-pass mean ``m1`` is
what makes the statistics robust: for a row like ``1e4 + 1e-2*randn`` in float32, ``v - m1`` is
exact (Sterbenz), whereas the textbook ``E[x²] - E[x]²`` cancels every significant digit and
torch's Welford loses several.  The mean is kept as the pair (m1, dm); folding it into one float32
would round it to ulp(1e4) ≈ 1e-3, a tenth of the row's standard deviation.  Any shift near the
mean has these properties; the CPU kernels use a cheaper one (cpu.py's module docstring).

Statistics are computed in float32 for 16/32-bit inputs and in float64 for float64 inputs.
"""

from __future__ import annotations

import struct

import torch

__all__ = ["norm_forward", "norm_backward_graph", "compute_dtype", "output_dtype", "group_norm"]

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the statistics are accumulated in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def output_dtype(
    x_dtype: torch.dtype,
    w_dtype: torch.dtype | None,
    casting: str,
    out_dtype: torch.dtype | None,
) -> torch.dtype:
    """The output dtype rule (see ``normkit.layer_norm``)."""
    if casting in ("torch", "gemma"):
        return out_dtype or x_dtype
    if w_dtype is None:
        return x_dtype if casting == "llama" else compute_dtype(x_dtype)
    if casting == "llama":
        return torch.promote_types(x_dtype, w_dtype)
    # t5: the normalized value is float32 (or cast to a half weight's dtype), times weight
    return w_dtype if w_dtype in _HALF else torch.promote_types(compute_dtype(x_dtype), w_dtype)


def param_dtype(x_dtype, wd, bd):
    """The one storage type the kernels read γ and β with (wd/bd: their dtypes or None)."""
    if x_dtype == torch.float64:
        return torch.float64
    if wd is None:
        return bd or torch.float32
    if bd is None or bd == wd:
        return wd
    return torch.float32  # "torch"/"gemma": both are used in float32 anyway; exact upcast


def cast_dtype(x_dtype, wd, casting):
    """Storage type the kernels round the normalized value to before γ, or None for none:
    x's 16-bit dtype for "llama", a 16-bit γ's for "t5" (as ``_apply_affine`` below)."""
    if casting == "llama" and x_dtype in _HALF:
        return x_dtype
    if casting == "t5" and wd in _HALF:
        return wd
    return None


def kernel_dtypes(x_dtype, w_dtype, b_dtype, casting, out_dtype):
    """(γ/β storage dtype, output dtype, x̂ rounding dtype or None) as the CPU and Triton
    kernels compute the op, or None for the combination both leave to the reference:
    "llama"/"t5" casting with γ and β of different dtypes (each applies in its own dtype).
    Which storage dtypes a backend takes is for the backend to check."""
    if casting in ("llama", "t5") and None not in (w_dtype, b_dtype) and w_dtype != b_dtype:
        return None
    pd = param_dtype(x_dtype, w_dtype, b_dtype)
    w_used = None if w_dtype is None else pd
    od = output_dtype(x_dtype, w_used if casting in ("llama", "t5") else w_dtype, casting,
                      out_dtype)
    return pd, od, cast_dtype(x_dtype, w_used, casting)


def effective_gamma(weight, zero_centered, rounds):
    """(γ as the kernels multiply by it, whether 1 must still be added to it).

    With "llama"/"t5" casting (``rounds``: x̂ is rounded before γ) γ applies in its own dtype,
    so a 16-bit zero-centred γ becomes ``1 + γ`` rounded to that dtype — what ``(1 + w) * x̂``
    gives in torch, and what ``_apply_affine`` below computes (adding the 1 in float32 instead
    differs in ~1/4 of bf16 outputs).  dγ is unchanged: d(1 + γ)/dγ = 1.
    """
    if zero_centered and rounds and weight is not None and weight.dtype in _HALF:
        return weight + 1, False
    return weight, zero_centered


def norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    rms: bool,
    zero_centered_gamma: bool = False,
    casting: str = "torch",
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Reference forward on rows: x (M, N) → (y, h, mean, rstd).

    Args:
        x: (M, N) input.  weight/bias: (N,) or None.  residual: (M, N) like x, or None.
        eps: added to the variance (LN) or mean square (RMS).
        rms: RMSNorm when True, LayerNorm otherwise.
        zero_centered_gamma: multiply by ``1 + weight``.
        casting: "torch" | "gemma" | "llama" | "t5" (see ``normkit.layer_norm``).
        out_dtype: output dtype for "torch"/"gemma" casting (default x.dtype).

    Returns:
        y (M, N) in the output dtype; h = x + residual in x.dtype (None without residual);
        mean (M,) and rstd (M,) in the compute dtype (mean is zeros for RMSNorm).
    """
    ct = compute_dtype(x.dtype)
    if residual is not None:
        h = (x.to(ct) + residual.to(ct)).to(x.dtype)
        v = h.to(ct)
    else:
        h = None
        v = x.to(ct)
    xhat, mean, rstd = _normalize(v, eps, rms)
    y = _apply_affine(xhat, x.dtype, weight, bias, zero_centered_gamma, casting, out_dtype)
    return y, h, mean.squeeze(-1), rstd.squeeze(-1)


def _overflow_scale(v):
    """Per row, 1, or for a finite row whose sum of squares may overflow the compute type the
    power of two 2^-k that brings its largest |v| into [1, 2) (BLAS's nrm2 scaling; the CPU
    kernels do the same where their sums overflow).  A constant of autograd: multiplying by a
    power of two is exact, and x̂ does not depend on the scale."""
    with torch.no_grad():
        amax = v.abs().amax(-1, keepdim=True)
        # below this, n·amax² + ε is finite: the row needs no scaling
        safe = (torch.finfo(v.dtype).max / (4 * max(v.shape[-1], 1))) ** 0.5
        big = (amax > safe) & torch.isfinite(amax)
        k = torch.floor(torch.log2(torch.where(big, amax, torch.ones_like(amax))))
        return torch.where(big, torch.exp2(-k), torch.ones_like(amax))


def _normalize(v, eps, rms):
    """(x̂, mean, rstd) of rows v in the compute dtype; mean is zeros for RMSNorm.  Tracers and
    exporters record the unscaled formulas (their graphs are torch's ops as before)."""
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    s = None if tracing or v.numel() == 0 else _overflow_scale(v)
    if s is not None:
        v = v * s
        eps = eps * s * s
    if rms:
        rstd = torch.rsqrt((v * v).mean(-1, keepdim=True) + eps)
        xhat, mean = v * rstd, torch.zeros_like(rstd)
    else:
        m1 = v.mean(-1, keepdim=True)
        d = v - m1
        dm = d.mean(-1, keepdim=True)
        var = ((d * d).mean(-1, keepdim=True) - dm * dm).clamp_min(0.0)
        rstd = torch.rsqrt(var + eps)
        xhat, mean = (d - dm) * rstd, m1 + dm
    if s is not None:
        rstd, mean = rstd * s, mean / s
    return xhat, mean, rstd


def _apply_affine(xhat, x_dtype, weight, bias, zero_centered, casting, out_dtype):
    """y from the normalized row, with the cast placed where ``casting`` says."""
    ct = xhat.dtype
    if casting in ("torch", "gemma"):
        y = xhat
        if weight is not None:
            g = weight.to(ct)
            y = y * (g + 1 if zero_centered else g)
        if bias is not None:
            y = y + bias.to(ct)
        return y.to(output_dtype(x_dtype, None, casting, out_dtype))
    # "llama" / "t5": cast the normalized value, then apply γ (and β) with torch's promotion.
    if casting == "llama":
        n = xhat.to(x_dtype)
    elif weight is not None and weight.dtype in _HALF:
        n = xhat.to(weight.dtype)
    else:
        n = xhat
    y = n
    if weight is not None:
        y = y * (weight + 1 if zero_centered else weight)
    if bias is not None:
        y = y + bias
    return y


def norm_backward(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    v: torch.Tensor,
    weight: torch.Tensor | None,
    has_bias: bool,
    eps: float,
    rms: bool,
    zero_centered_gamma: bool = False,
    casting: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Analytic backward on rows (for places where autograd cannot run, e.g. inside a custom op).

    With x̂ the normalized row and g = γ (or 1+γ):
        dx = rstd·(g·dy − mean(g·dy) − x̂·mean(g·dy·x̂))   (RMS: without the mean(g·dy) term)
        dγ = Σ_rows dy·x̂ (x̂ cast as the forward casts it),  dβ = Σ_rows dy
    plus dh (the gradient of the returned h).  v is the normalized input (h with a residual).

    Returns:
        dx in v.dtype, dweight and dbias in the compute dtype (None when absent).
    """
    ct = compute_dtype(v.dtype)
    xhat, _, rstd = _normalize(v.to(ct), eps, rms)
    g = dy.to(ct)
    if weight is not None:
        wt = weight.to(ct)
        g = g * (wt + 1 if zero_centered_gamma else wt)
    c2 = (g * xhat).mean(-1, keepdim=True)
    dx = rstd * (g - xhat * c2) if rms else rstd * (g - g.mean(-1, keepdim=True) - xhat * c2)
    if dh is not None:
        dx = dx + dh.to(ct)
    dw = db = None
    if weight is not None:
        if casting == "llama" and v.dtype in _HALF:
            n = xhat.to(v.dtype).to(ct)
        elif casting == "t5" and weight.dtype in _HALF:
            n = xhat.to(weight.dtype).to(ct)
        else:
            n = xhat
        dw = (dy.to(ct) * n).sum(0)
    if has_bias:
        db = dy.to(ct).sum(0)
    return dx.to(v.dtype), dw, db


def norm_backward_graph(
    need: tuple[bool, ...],
    v: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    dy: torch.Tensor | None,
    dh: torch.Tensor | None,
    eps: float,
    rms: bool,
    zero_centered_gamma: bool = False,
    casting: str = "torch",
) -> tuple[torch.Tensor | None, ...]:
    """Backward on rows that is itself differentiable (``create_graph=True``): every backend's
    backward when a graph of it is wanted (double backward).  ``norm_backward``'s formulas,
    recorded by autograd.

    It reads only what the forward saved: the normalized input ``v`` — x, or with a residual
    h = x + residual, an output of the forward — with γ, β and the options.  The gradient
    reaching x and the residual is the same, ∂y/∂h·dy + dh (h is their plain sum).  A saved h
    has the forward's own node as its ``grad_fn``, so the second-order terms that reach h flow
    on through that node to x and the residual.  (Formulas, not ``torch.autograd.grad`` of
    ``norm_forward``: a nested grad would walk from h into that node — the one running — on its
    way to γ, and run it again: a deadlock for the C++ node, endless recursion for
    ``_NormFunction``.)

    Args:
        need: whether x, weight, bias, residual (in that order) want a gradient.
        v: (M, N) x, or h with a residual.
        weight, bias, eps, rms, zero_centered_gamma, casting: the forward's, as in
            ``norm_forward``.
        dy: the gradient of y (None: zeros); dh: of h (None when h was not used).

    Returns:
        (dx, dweight, dbias, dresidual), None where not needed; dweight/dbias in their
        parameter's dtype.
    """
    dx, dw, db = norm_backward(torch.zeros_like(v) if dy is None else dy, dh, v, weight,
                               bias is not None, eps, rms, zero_centered_gamma, casting)
    return (
        dx if need[0] else None,
        dw.to(weight.dtype) if need[1] else None,
        db.to(bias.dtype) if need[2] else None,
        dx if need[3] else None,
    )


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference GroupNorm (torch's ``F.group_norm`` semantics), differentiable.

    The rows of the contract are the (sample, group) pairs: x (B, C, *) is viewed as
    (B·G, C/G·prod(*)) rows, normalized by ``_normalize`` (LayerNorm's shifted moments), then
    ``y = x̂·γ_c + β_c`` per channel c.  Call it on ``x.double()`` for the float64 truth.

    Returns:
        y like x (contiguous) in x.dtype; mean and rstd (B·G,) in the compute dtype.
    """
    b, c = x.shape[:2]
    ct = compute_dtype(x.dtype)
    rows = x.to(ct).reshape(b * num_groups, x.numel() // (b * num_groups) if b else 0)
    xhat, mean, rstd = _normalize(rows, eps, False)
    y = xhat.reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(ct).reshape(per_channel)
    if bias is not None:
        y = y + bias.to(ct).reshape(per_channel)
    return y.to(x.dtype), mean.squeeze(-1), rstd.squeeze(-1)


# ----------------------------------------------------------------------------------------------
# Quantized outputs (serving): y quantized per row to float8_e4m3fn or int8
# ----------------------------------------------------------------------------------------------

QUANT_DTYPES = (torch.float8_e4m3fn, torch.int8)
# q's largest magnitude; a dynamic scale maps a row's largest |y| to it
QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
# The smallest dynamic scale, so that an all-zero row quantizes to zeros (0·(1/s), not 0·∞):
# e4m3 1/(448·512), as vLLM's per-token fp8 quantization; int8 2^-23 (float32's eps).
QFLOOR = {torch.float8_e4m3fn: 1.0 / (448.0 * 512.0), torch.int8: 2.0**-23}


def quantize(y: torch.Tensor, q_dtype: torch.dtype, scale: torch.Tensor | None = None):
    """Rows y (M, N) quantized: (q (M, N) in q_dtype, scale (M, 1) in y's dtype).

    ``s = max(amax(|y_row|) / qmax, floor)`` per row (a NaN in the row: s is NaN), or the static
    ``scale`` (a 1-element tensor); ``q = sat(rne(y · (1/s)))``: float8_e4m3fn saturates to ±448
    (a NaN stays NaN), int8 to [-128, 127] with a NaN as 0.  Computed in y's dtype (the float64
    ground truth in the tests, float32 in the reference backend, as the kernels).
    """
    m = y.shape[0]
    if scale is None:
        amax = (y.abs().amax(-1, keepdim=True) if y.shape[-1]
                else y.new_zeros((m, 1)))  # torch's amax keeps a NaN
        s = amax / QMAX[q_dtype]
        s = torch.where(s < QFLOOR[q_dtype], QFLOOR[q_dtype], s)  # a NaN compares false: kept
    else:
        s = scale.to(y.dtype).reshape(1, 1).expand(m, 1)
    t = y * (1 / s)
    if q_dtype == torch.int8:
        q = torch.nan_to_num(t, nan=0.0).clamp(-128, 127).round().to(torch.int8)
    else:
        q = t.clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


# ----------------------------------------------------------------------------------------------
# Dropout before the residual add (``dropout_p=``): the mask every backend draws
# ----------------------------------------------------------------------------------------------
#
# Element k of the (M, N) rows (flat index k = i·N + j) is kept iff tl.rand's float32 of u is
# > float32(p), u being word k mod 4 of Triton's ``tl.randint4x(seed, k // 4)``: Philox4x32-10
# with key (seed mod 2^32, seed >> 32) and counter (c mod 2^32, c >> 32, 0, 0), c = k >> 2 — one
# Philox call for 4 consecutive elements (a group may straddle two rows: k is the flat index).
# tl.rand takes u as int32, maps a negative one to -u-1 and scales that 31-bit value by
# 4.6566127342e-10; the float is monotone in the value, so the test is one integer comparison
# against ``keep_above(p)``.  Kept elements are scaled by 1/(1-p) (the compute type), as torch's
# dropout.

_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF
_RAND_SCALE = 4.6566127342e-10  # tl.rand's: the largest with (2^31 - 1)·scale < 1 in float32


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit words of a·b for a constant a < 2^32 and b int64 holding uint32 values,
    in int64 arithmetic (a·b itself would overflow it): a = ah·2^16 + al."""
    ah, al = a >> 16, a & 0xFFFF
    p_hi, p_lo = ah * b, al * b  # < 2^48 each
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _U32
    return hi, lo


def philox(seed: int, offset: torch.Tensor):
    """Triton's ``tl.randint4x(seed, offset)`` for an int64 ``offset`` tensor (the same bits, in
    its order): the 4 words of Philox4x32-10 with key (seed lo, seed hi) and counter (offset lo,
    offset hi, 0, 0), as int64 tensors holding uint32 values."""
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    c0, c1 = offset & _U32, (offset >> 32) & _U32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mulhilo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _U32, (k1 + _PHILOX_KEY[1]) & _U32
    return c0, c1, c2, c3


def dropout_words(seed: int, k: torch.Tensor) -> torch.Tensor:
    """The 32-bit word of each flat index k (int64 tensor): word k mod 4 of
    ``philox(seed, k >> 2)``."""
    words = torch.stack(philox(seed, k >> 2), dim=-1)
    return words.gather(-1, (k & 3).unsqueeze(-1)).squeeze(-1)


def _rand31(u: torch.Tensor) -> torch.Tensor:
    """The 31-bit value ``tl.rand`` scales: u as int32, a negative one mapped to -u-1."""
    return torch.where(u >= 2**31, u ^ _U32, u)


def _uniform(v31):
    """``tl.rand``'s float32 of 31-bit values (int64 tensor or int): float32(v)·scale."""
    t = torch.as_tensor(v31, dtype=torch.int64).to(torch.float32)
    return t * torch.tensor(_RAND_SCALE, dtype=torch.float32)


def _f32(v: float) -> float:
    """v rounded to float32 (nearest, ties to even), as a Python float."""
    return struct.unpack("f", struct.pack("f", v))[0]


def keep_above(p: float) -> int:
    """The 31-bit threshold of the mask: element kept iff its 31-bit value > keep_above(p), which
    is ``tl.rand > float32(p)`` (rand is monotone in the value: a binary search for the largest
    value whose float is <= float32(p)).  2^31 - 1 (nothing kept) for p = 1.  Plain Python
    floats (no tensor, no cache), so that torch.compile traces through it: float32(v)·scale is
    the float32 rounding of an exact double product (24-bit factors).  ~30 µs; the kernels'
    callers cache it (``_dropout._spec``)."""
    p32, scale = _f32(p), _f32(_RAND_SCALE)
    lo, hi = 0, 2**31 - 1  # uniform(0) = 0 <= p32
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _f32(_f32(float(mid)) * scale) <= p32:
            lo = mid
        else:
            hi = mid - 1
    return lo


def dropout_mask(seed: int, p: float, m: int, n: int, device=None) -> torch.Tensor:
    """The (M, N) bool keep-mask of ``dropout_p=p``, ``seed=seed`` (see above)."""
    k = torch.arange(m * n, dtype=torch.int64, device=device).reshape(m, n)
    return _rand31(dropout_words(seed, k)) > keep_above(p)


def dropout_scale(p: float, dtype: torch.dtype) -> torch.Tensor:
    """1/(1-p) in the compute type of ``dtype`` (inf for p = 1: it then scales nothing)."""
    ct = compute_dtype(dtype)
    return torch.tensor(float("inf") if p == 1 else 1.0 / (1.0 - p), dtype=ct)


def dropout_add(x, residual, keep, p):
    """h = x·m (+ residual), m = 1/(1-p) where kept and 0 elsewhere, in the compute type
    (product and sum each rounded there, never fused), rounded once to x.dtype.  A multiply,
    not a select: a dropped NaN or Inf gives NaN, as with torch's dropout, and stays in its row.
    Differentiable (the reference's backward: dx = m·dh, d-residual = dh)."""
    ct = compute_dtype(x.dtype)
    s = dropout_scale(p, x.dtype).to(x.device)
    mult = torch.where(keep, s, torch.zeros((), dtype=ct, device=x.device))
    h = x.to(ct) * mult
    if residual is not None:
        h = h + residual.to(ct)
    return h.to(x.dtype)
