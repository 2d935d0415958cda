"""The tests' shared helpers: the one tolerance table, the float64 ground truth, torch's own
error, raw bits, the compiled kernels' settings, and a fresh interpreter.

Imported by name (``from helpers import ...``) from every folder of ``tests/``; the fixtures
live in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
import torch.nn.functional as F

import normkit
from normkit.kernels import reference

# The accuracy rule (flash-attention's): a normkit result's max error against the float64
# reference must be at most 2x the error of PyTorch's own op in the same dtype, plus ATOL.
# ATOL covers the cases where torch happens to be exact by luck (e.g. tiny rows), and is a few
# units in the last place of a typical |y| ~ 1-4 output:
#   float32: 2^-23 * 4 ≈ 5e-7, times a few for the row-length dependent sums
#   bfloat16: one bf16 ulp at |y| ≈ 1 is 2^-7 ≈ 8e-3
#   float16: one fp16 ulp at |y| ≈ 1 is 2^-10 ≈ 1e-3
#   float64: statistics in float64, a few ulps
ATOL = {
    torch.float32: 2e-6,
    torch.bfloat16: 8e-3,
    torch.float16: 1e-3,
    torch.float64: 1e-12,
}

# Gradients of γ/β are sums over M rows: their error grows like sqrt(M) (random-walk rounding),
# so their atol is ATOL * sqrt(M) (quack's rule).  dx stays per-row and uses ATOL.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference in float64; NaN anywhere (or mismatched non-finite) counts as inf."""
    a = a.double()
    b = b.double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    same_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    d = (a - b).abs()
    d = torch.where(both_nan | same_inf, torch.zeros_like(d), d)
    d = torch.where(torch.isnan(d), torch.full_like(d, float("inf")), d)
    return float(d.max()) if d.numel() else 0.0


def assert_close_to_ref(ours, torch_out, ref64, dtype, atol_scale=1.0, what="y"):
    """ours vs ref64 within 2x torch's own error + ATOL; NaN never passes."""
    e_ours = max_err(ours, ref64)
    e_torch = max_err(torch_out, ref64)
    bound = 2 * e_torch + ATOL[dtype] * atol_scale
    assert e_ours <= bound, (
        f"{what}: normkit error {e_ours:.3g} > 2 x torch error {e_torch:.3g} + atol "
        f"{ATOL[dtype] * atol_scale:.3g} ({dtype})"
    )


def ref64(x, weight=None, bias=None, residual=None, eps=1e-5, rms=False, zc=False,
          casting="torch"):
    """The float64 ground truth on the same (rounded) inputs, on rows (..., N) flattened."""
    n = x.shape[-1]
    d = lambda t: None if t is None else t.double()  # noqa: E731
    r = d(residual)
    xx = x.double()
    if residual is not None:
        # h is rounded to x's dtype before normalizing (the contract), so the truth does too.
        xx = (x.double() + r).to(x.dtype).double()
        r = None
    y, _, _, _ = reference.norm_forward(xx.reshape(-1, n), d(weight), d(bias), r, eps, rms, zc,
                                        "torch" if casting in ("torch", "gemma") else casting)
    return y.reshape(x.shape)


def torch_op(x, weight=None, bias=None, residual=None, eps=1e-5, rms=False, zc=False):
    """PyTorch's own op in the input dtype (the comparison baseline)."""
    n = x.shape[-1]
    h = x + residual if residual is not None else x
    w = weight
    if zc and weight is not None:
        w = weight + 1
    if w is not None and w.dtype != x.dtype and x.dtype == torch.float32:
        w = w.float()
    b = bias
    if b is not None and b.dtype != x.dtype and x.dtype == torch.float32:
        b = b.float()
    if rms:
        return F.rms_norm(h, (n,), w, eps)
    return F.layer_norm(h, (n,), w, b, eps)


def exact_fma(a, b, c):
    """a·b + c rounded once to the dtype of numpy array a (float32 or float64), element-wise, by
    exact rationals: the reference for the kernels' ``fma`` and for its numpy emulation."""
    from fractions import Fraction

    out = np.empty_like(a)
    for k, (x, y, z) in enumerate(zip(a.tolist(), b.tolist(), c.tolist(), strict=True)):
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        near = a.dtype.type(float(exact))  # within an ulp: pick the nearest, ties to even
        cands = [near, np.nextafter(near, a.dtype.type(np.inf)),
                 np.nextafter(near, a.dtype.type(-np.inf))]
        out[k] = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact),
                                           int(np.array(v).view(f"i{a.itemsize}")) & 1))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 != 0.0 and NaN payloads count)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@contextlib.contextmanager
def _setting(name: str, value: int):
    """The compiled kernels' setting ``name`` (read by ``name()``, written by ``set_name()``)
    at ``value`` inside the block."""
    from normkit.kernels import cpu

    before = getattr(cpu._cpu, name)()
    getattr(cpu._cpu, "set_" + name)(value)
    try:
        yield
    finally:
        getattr(cpu._cpu, "set_" + name)(before)


def parallel_from(elements: int):
    """Launches go parallel from ``elements`` elements (default 32K) inside the block."""
    return _setting("parallel_min_elements", elements)


def fuse_dropout(mode: int):
    """Where the cpu backward applies a dropout's mask inside the block: 1 in dx's pass, 0 in a
    pass of its own, -1 as measured fastest (the default)."""
    return _setting("fuse_dropout", mode)


def stream_from(nbytes: int):
    """Outputs of ``nbytes`` or more are written with streamed stores inside the block."""
    return _setting("stream_min_bytes", nbytes)


def eager_calls() -> int:
    """How many calls the compiled eager entry point (``cpu.infer``) has served in this
    process: the tests outside ``kernels/`` see which path a call took through this, not
    through the kernels' private names."""
    from normkit.kernels import cpu

    return cpu._cpu.calls()


def run_python(code, env=None, timeout=300):
    """Run ``code`` (dedented) in a fresh interpreter with ``env`` added to the environment;
    its stdout, after asserting that it exited cleanly."""
    full_env = dict(os.environ, **(env or {}))
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, env=full_env, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


# Rows whose squares overflow the compute type: (dtype, magnitude) pairs.
HUGE_ROWS = [(torch.float32, 1e20), (torch.float32, 1e37), (torch.bfloat16, 1e25),
             (torch.float64, 1e160)]


def check_huge_rows(dtype, magnitude, rms, n, residual=False, device="cpu"):
    """A finite row whose sum of squares overflows gives a finite, accurate y and gradients
    (the backend scales it by a power of two, as BLAS's nrm2 does), with the backend in use.

    Three rows: large, large and far from zero, ordinary.  The truth is float64 autograd on
    the same (rounded) rows scaled by 2^-k, ε by 2^-2k (LayerNorm is scale-free but for ε);
    errors are relative, row by row (dx's scale differs by row)."""
    g = torch.Generator().manual_seed(n)
    base = torch.randn(3, n, generator=g, dtype=torch.float64)
    x64 = base * magnitude
    x64[1] = (1.5 + 0.25 * base[1]) * magnitude
    x64[2] = base[2]
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    x = x64.to(dtype, copy=True).to(device).requires_grad_()
    r = (0.5 * x64).to(dtype).to(device).requires_grad_() if residual else None
    w = (1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(pd).to(device)
    w.requires_grad_()
    b = None if rms else torch.randn(n, generator=g, dtype=pd).to(device).requires_grad_()
    dy = torch.randn(3, n, generator=g, dtype=torch.float64).to(dtype).to(device)
    eps = 1e-5

    def run():
        if rms:
            return normkit.rms_norm(x, n, w, eps, residual=r)
        return normkit.layer_norm(x, n, w, b, eps, residual=r)

    y = run()
    wrt = [x, w] + ([] if rms else [b])
    grads = torch.autograd.grad(y, wrt, dy)
    with torch.no_grad():  # the inference path computes the same statistics
        assert torch.equal(run(), y.detach()), "inference and training outputs differ"

    h = x.detach() if r is None else (x.detach().double() + r.detach().double()).to(dtype)
    h = h.cpu().double()
    k = math.frexp(float(h[:2].abs().max()))[1]
    s = torch.tensor([[2.0 ** -k], [2.0 ** -k], [1.0]], dtype=torch.float64)
    hs = (h * s).requires_grad_()
    ws = w.detach().cpu().double().requires_grad_()
    bs = None if rms else b.detach().cpu().double().requires_grad_()
    eps_s = eps * s * s
    if rms:
        t = hs * torch.rsqrt((hs * hs).mean(-1, keepdim=True) + eps_s) * ws
    else:
        mu = hs.mean(-1, keepdim=True)
        t = (hs - mu) * torch.rsqrt(((hs - mu) ** 2).mean(-1, keepdim=True) + eps_s) * ws + bs
    tg = torch.autograd.grad(t, [hs, ws] + ([] if rms else [bs]), dy.cpu().double())
    truth = [t.detach(), tg[0] * s] + list(tg[1:])  # d/dh = s·d/dhs
    names = ["y", "dx", "dw", "db"][: len(truth)]
    for name, o, ref in zip(names, [y.detach(), *grads], truth, strict=True):
        o = o.cpu()
        assert torch.isfinite(o).all(), f"{name}: a finite input gave a non-finite {name}"
        for i, (oi, ri) in enumerate(zip(o.reshape(-1, n), ref.reshape(-1, n), strict=True)):
            err = max_err(oi, ri) / float(ri.abs().max())
            assert err <= 4 * ATOL[dtype], f"{name} row {i}: relative error {err:.3g}"
