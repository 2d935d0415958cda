"""Forward and backward accuracy of the CPU kernels against the float64 reference.

Rule (helpers.ATOL): error <= 2 x torch's own error in the same dtype + a per-dtype atol.
Shapes cover M=1, odd and non-power-of-two N, N=1, large N, multi-dim normalized_shape, strided
and non-contiguous input.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    ATOL,
    DTYPES,
    HUGE_ROWS,
    assert_close_to_ref,
    check_huge_rows,
    max_err,
    ref64,
    torch_op,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import normkit
from normkit.kernels import reference

SHAPES = [(1, 1), (1, 7), (3, 64), (199, 771), (4, 1000), (2, 8192), (1, 65536 + 3)]


@pytest.fixture(autouse=True)
def _cpu_backend():
    with normkit.use_backend("cpu"):
        yield


def _params(n, dtype, affine, bias, wdtype=torch.float32):
    w = torch.randn(n, dtype=wdtype) if affine else None
    b = torch.randn(n, dtype=wdtype) if (affine and bias) else None
    return w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_forward_matches_float64(dtype, shape, rms, residual):
    m, n = shape
    x = (torch.randn(m, n) * 3 + 0.5).to(dtype)
    r = torch.randn(m, n).to(dtype) if residual else None
    w, b = _params(n, dtype, True, not rms)
    eps = 1e-5
    if rms:
        y = normkit.rms_norm(x, n, w, eps, residual=r)
    else:
        y = normkit.layer_norm(x, n, w, b, eps, residual=r)
    assert y.dtype == dtype and y.shape == x.shape
    truth = ref64(x, w, b, r, eps, rms)
    assert_close_to_ref(y, torch_op(x, w, b, r, eps, rms), truth, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine,bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("zc", [False, True], ids=["g", "1+g"])
def test_forward_options(dtype, affine, bias, zc):
    m, n = 33, 129
    x = torch.randn(m, n).to(dtype)
    w, b = _params(n, dtype, affine, bias)
    if w is not None:
        w = w * 0.1  # zero-centred γ is small
    y = normkit.layer_norm(x, n, w, b, 1e-5, zero_centered_gamma=zc)
    truth = ref64(x, w, b, None, 1e-5, False, zc)
    assert_close_to_ref(y, torch_op(x, w, b, None, 1e-5, False, zc), truth, dtype)
    y = normkit.rms_norm(x, n, w, 1e-6, zero_centered_gamma=zc)
    truth = ref64(x, w, None, None, 1e-6, True, zc)
    assert_close_to_ref(y, torch_op(x, w, None, None, 1e-6, True, zc), truth, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_weights(dtype):
    """γ/β stored in the activation dtype (the usual bf16 checkpoint) are read as 16-bit words."""
    x = torch.randn(17, 300).to(dtype)
    w = torch.randn(300).to(dtype)
    b = torch.randn(300).to(dtype)
    y = normkit.layer_norm(x, 300, w, b)
    assert y.dtype == dtype
    assert_close_to_ref(y, torch_op(x, w, b), ref64(x, w, b), dtype)


def test_float64_input():
    x = torch.randn(9, 333, dtype=torch.float64)
    w = torch.randn(333, dtype=torch.float64)
    b = torch.randn(333, dtype=torch.float64)
    y = normkit.layer_norm(x, 333, w, b)
    assert y.dtype == torch.float64
    assert max_err(y, ref64(x, w, b)) < 1e-13


def test_multidim_normalized_shape_and_leading_dims():
    x = torch.randn(2, 3, 5, 7, 11)
    w = torch.randn(7, 11)
    b = torch.randn(7, 11)
    y = normkit.layer_norm(x, (7, 11), w, b)
    t = torch.nn.functional.layer_norm(x, (7, 11), w, b)
    truth = torch.nn.functional.layer_norm(x.double(), (7, 11), w.double(), b.double())
    assert_close_to_ref(y, t, truth, torch.float32)
    y = normkit.rms_norm(x, (5, 7, 11), None, 1e-6)
    truth = torch.nn.functional.rms_norm(x.double(), (5, 7, 11), None, 1e-6)
    assert_close_to_ref(y, torch.nn.functional.rms_norm(x, (5, 7, 11), None, 1e-6), truth,
                        torch.float32)


@pytest.mark.parametrize("layout", ["row_strided", "last_dim_strided", "transposed"])
def test_strided_inputs(layout):
    base = torch.randn(64, 300)
    if layout == "row_strided":
        x = base[::2, :257]  # rows 600 floats apart, last dim contiguous: no copy needed
    elif layout == "last_dim_strided":
        x = base[:, ::2]
    else:
        x = base[:, :64].t()
    n = x.shape[-1]
    w, b = torch.randn(n), torch.randn(n)
    r = torch.randn(x.shape[1], x.shape[0]).t() if layout == "transposed" else None
    y, h = normkit.layer_norm(x, n, w, b, residual=r, return_residual=True)
    xc = x.contiguous()
    y2, h2 = normkit.layer_norm(xc, n, w, b, residual=None if r is None else r.contiguous(),
                                return_residual=True)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    assert torch.equal(x, xc)  # input untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 33), (199, 771), (64, 4096)])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_backward_matches_float64(dtype, shape, rms, residual):
    m, n = shape
    x = torch.randn(m, n).to(dtype)
    r = torch.randn(m, n).to(dtype) if residual else None
    w = torch.randn(n)
    b = None if rms else torch.randn(n)
    dy = torch.randn(m, n).to(dtype)
    dh = torch.randn(m, n).to(dtype) if residual else None

    def run(fn, xx, rr, ww, bb):
        leaves = [t.detach().requires_grad_() for t in (xx, rr, ww, bb) if t is not None]
        it = iter(leaves)
        xx = next(it)
        rr = next(it) if rr is not None else None
        ww = next(it)
        bb = next(it) if bb is not None else None
        out = fn(xx, rr, ww, bb)
        outs, grads = ([out[0], out[1]], [dy, dh]) if rr is not None else ([out], [dy])
        grads = [g.to(o.dtype) for o, g in zip(outs, grads, strict=True)]
        return torch.autograd.grad(outs, leaves, grads)

    def ours(xx, rr, ww, bb):
        if rms:
            return normkit.rms_norm(xx, n, ww, 1e-5, residual=rr, return_residual=rr is not None)
        return normkit.layer_norm(xx, n, ww, bb, 1e-5, residual=rr,
                                  return_residual=rr is not None)

    def theirs(xx, rr, ww, bb):
        h = xx + rr if rr is not None else xx
        if rms:
            y = torch.nn.functional.rms_norm(h, (n,), ww, 1e-5)
        else:
            y = torch.nn.functional.layer_norm(h, (n,), ww, bb, 1e-5)
        return (y, h) if rr is not None else y

    def truth(xx, rr, ww, bb):
        # h is rounded to the input dtype (the contract); the cast passes gradients through
        h = (xx + rr).to(dtype).double() if rr is not None else xx
        if rms:
            y = torch.nn.functional.rms_norm(h, (n,), ww, 1e-5)
        else:
            y = torch.nn.functional.layer_norm(h, (n,), ww, bb, 1e-5)
        return (y, h) if rr is not None else y

    g_ours = run(ours, x, r, w, b)
    g_torch = run(theirs, x, r, w, b)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    g_true = run(truth, d(x), d(r), d(w), d(b))
    names = ["dx"] + (["dresidual"] if residual else []) + ["dweight"]
    names += ["dbias"] if b is not None else []
    for name, a, t, g in zip(names, g_ours, g_torch, g_true, strict=True):
        scale = math.sqrt(m) if name in ("dweight", "dbias") else 1.0
        # dx is computed from the rounded y's upstream gradient; its scale grows with |γ|·rstd
        assert a.dtype == (dtype if name in ("dx", "dresidual") else torch.float32)
        assert_close_to_ref(a, t, g, dtype, atol_scale=scale * 4, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_weight_only_and_input_only(dtype):
    """Gradients wanted for only some inputs: the others are None and nothing breaks."""
    x = torch.randn(40, 96).to(dtype)
    w = torch.randn(96, requires_grad=True)
    b = torch.randn(96)
    y = normkit.layer_norm(x, 96, w, b)
    (gw,) = torch.autograd.grad(y.float().sum(), [w])
    xt = x.double()
    yt = torch.nn.functional.layer_norm(xt, (96,), w.double(), b.double())
    (gt,) = torch.autograd.grad(yt.sum(), [w])
    assert max_err(gw, gt) < ATOL[dtype] * 40
    xg = x.clone().requires_grad_()
    y = normkit.rms_norm(xg, 96, w.detach())
    (gx,) = torch.autograd.grad(y.float().sum(), [xg])
    assert gx.shape == x.shape and torch.isfinite(gx).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
@pytest.mark.parametrize("m", [1, 7, 70])
@pytest.mark.parametrize("params", ["float32", "like_x"])
def test_training_fast_path_equals_general_path(dtype, rms, residual, m, params):
    """A contiguous x takes the eager entry point (a C++ autograd node), a row-strided one the
    general path (``_NormFunction``): same kernels, so y, h and every gradient agree bit for
    bit, for leading dims too (2, m, n), with one or several dγ blocks (2×70 rows: eight), and
    with γ/β in float32 or in x's dtype (the node rounds dγ/dβ to bfloat16 in the kernel, the
    general path with ``.to()``)."""
    from normkit._autograd import _NormFunction
    from normkit.kernels import cpu

    n = 37
    x = torch.randn(2, m, n).to(dtype)
    r = torch.randn(2, m, n).to(dtype) if residual else None
    pdt = torch.float32 if params == "float32" else dtype
    w, b = torch.randn(n).to(pdt), (None if rms else torch.randn(n).to(pdt))
    dy = torch.randn(2, m, n).to(dtype)
    dh = torch.randn(2, m, n).to(dtype) if residual else None

    def run(strided):
        def leaf(t):
            if t is None:
                return None
            if strided:  # same values, rows 3 elements apart
                t = torch.cat([t, torch.zeros(*t.shape[:-1], 3, dtype=t.dtype)], -1)[..., :n]
            return t.detach().requires_grad_()

        xx, rr, ww, bb = leaf(x), leaf(r), w.clone().requires_grad_(), leaf(b)
        seen = []
        eager = cpu._cpu.calls()
        with pytest.MonkeyPatch.context() as mp:
            real = _NormFunction.forward
            mp.setattr(_NormFunction, "forward", staticmethod(
                lambda *a: (seen.append("general"), real(*a))[1]))
            if rms:
                out = normkit.rms_norm(xx, n, ww, 1e-5, residual=rr, return_residual=residual)
            else:
                out = normkit.layer_norm(xx, n, ww, bb, residual=rr, return_residual=residual)
        seen += ["eager"] * (cpu._cpu.calls() - eager)
        outs, grads = ((list(out), [dy, dh]) if residual else ([out], [dy]))
        leaves = [t for t in (xx, rr, ww, bb) if t is not None]
        return seen, outs, torch.autograd.grad(outs, leaves, grads)

    seen_fast, out_fast, g_fast = run(False)
    seen_general, out_general, g_general = run(True)
    assert seen_fast == ["eager"] and seen_general == ["general"]
    for a, b_ in zip(out_fast + list(g_fast), out_general + list(g_general), strict=True):
        assert a.shape == b_.shape and a.dtype == b_.dtype and torch.equal(a, b_)


def test_double_backward_falls_back_to_reference():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: normkit.layer_norm(a[0], 9, a[1], a[2]), (x, w, b))
    assert torch.autograd.gradgradcheck(
        lambda x, w, b, r: normkit.layer_norm(x, 9, w, b, residual=r, return_residual=True),
        (x, w, b, r),
    )
    assert torch.autograd.gradgradcheck(lambda x, w: normkit.rms_norm(x, 9, w, 1e-6), (x, w))
    # Leading dims on the lean training path (its double backward works on rows of x)
    x3 = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    r3 = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b, r: normkit.layer_norm(x, 9, w, b, residual=r, return_residual=True),
        (x3, w, b, r3),
    )


# ------------------------------------------------------------------------------------------
# Robust statistics
# ------------------------------------------------------------------------------------------


def _exact_layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Row-wise LayerNorm of the given (already rounded) values in extended precision."""
    import numpy as np

    a = x.double().numpy().astype(np.longdouble)
    mu = a.mean(-1, keepdims=True)
    d = a - mu
    var = (d * d).mean(-1, keepdims=True)
    return torch.from_numpy((d / np.sqrt(var + eps)).astype(np.float64))


@pytest.mark.parametrize(
    "dtype,offset,scale",
    [(torch.float32, 1e4, 1e-2), (torch.float32, 1e6, 1.0), (torch.float64, 1e8, 1.0)],
)
@pytest.mark.parametrize("n", [768, 4097])
def test_robust_statistics(dtype, offset, scale, n):
    """Rows far from zero normalize to within a few float32 ulps; torch's op loses digits."""
    x = (offset + scale * torch.randn(8, n, dtype=torch.float64)).to(dtype)
    assert (x.std(-1) > 0).all()
    truth = _exact_layer_norm(x, 1e-12)
    y = normkit.layer_norm(x, n, None, None, 1e-12)
    t = torch.nn.functional.layer_norm(x, (n,), None, None, 1e-12)
    e_ours = max_err(y, truth)
    e_torch = max_err(t, truth)
    ulp = torch.finfo(torch.float32).eps * float(truth.abs().max())
    limit = 4 * ulp if dtype == torch.float32 else 1e-9
    assert e_ours <= limit, f"normkit error {e_ours:.3g} > {limit:.3g}"
    if dtype == torch.float32:
        assert e_ours < e_torch, f"torch ({e_torch:.3g}) was not worse than normkit ({e_ours:.3g})"


def test_rms_no_fp16_overflow():
    """Squares of large fp16 values overflow fp16 (65504) but not the float32 accumulator."""
    x = torch.full((2, 512), 300.0, dtype=torch.float16)
    x[1] = -20000.0
    y = normkit.rms_norm(x, 512, None, 1e-6)
    assert torch.isfinite(y).all()
    assert torch.allclose(y.float(), torch.sign(x.float()), atol=1e-3)


@pytest.mark.parametrize("dtype,magnitude", HUGE_ROWS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("n", [7, 64, 1000, 4097])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_huge_finite_rows_stay_finite_and_accurate(dtype, magnitude, rms, n, backend):
    """Rows whose sum of squares overflows the compute type are scaled by a power of two, as
    BLAS's nrm2 does (helpers.check_huge_rows)."""
    with normkit.use_backend(backend):
        check_huge_rows(dtype, magnitude, rms, n, residual=n == 64)


# ------------------------------------------------------------------------------------------
# Non-finite input, constants, N=1
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_nonfinite_rows_propagate_and_stay_local(dtype, bad, rms):
    x = torch.randn(5, 300).to(dtype)
    w, b = torch.randn(300), torch.randn(300)
    clean = normkit.rms_norm(x, 300, w) if rms else normkit.layer_norm(x, 300, w, b)
    x[2, 17] = bad
    y = normkit.rms_norm(x, 300, w) if rms else normkit.layer_norm(x, 300, w, b)
    assert not torch.isfinite(y[2]).all(), "a non-finite input must not give a finite row"
    if not rms:
        assert not torch.isfinite(y[2]).any()  # the mean is non-finite: the whole row is
    keep = [0, 1, 3, 4]
    assert torch.equal(y[keep], clean[keep]), "other rows changed"


def test_nonfinite_in_backward():
    x = torch.randn(3, 50, requires_grad=True)
    y = normkit.layer_norm(x, 50)
    dy = torch.randn(3, 50)
    dy[1, 3] = float("nan")
    (gx,) = torch.autograd.grad(y, [x], dy)
    assert torch.isnan(gx[1]).any() and torch.isfinite(gx[[0, 2]]).all()


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_constant_rows_give_beta_exactly(dtype):
    x = torch.full((4, 129), 3.25).to(dtype)
    x[1] = -7.5
    w = torch.randn(129)
    b = torch.randn(129)
    y = normkit.layer_norm(x, 129, w, b)
    assert torch.equal(y, b.to(dtype).expand_as(y))


@pytest.mark.parametrize("dtype", DTYPES)
def test_n_equals_one(dtype):
    x = torch.randn(10, 1).to(dtype)
    w, b = torch.randn(1), torch.randn(1)
    assert torch.equal(normkit.layer_norm(x, 1, w, b), b.to(dtype).expand(10, 1))
    y = normkit.rms_norm(x, 1, w, 1e-6)
    assert_close_to_ref(y, torch_op(x, w, None, None, 1e-6, True),
                        ref64(x, w, None, None, 1e-6, True), dtype)


# ------------------------------------------------------------------------------------------
# Property test: random shapes, dtypes and options against the reference
# ------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 700),
    dtype=st.sampled_from(DTYPES),
    rms=st.booleans(),
    residual=st.booleans(),
    affine=st.booleans(),
    zc=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_forward(m, n, dtype, rms, residual, affine, zc, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, n, generator=g) * scale).to(dtype)
    r = (torch.randn(m, n, generator=g) * scale).to(dtype) if residual else None
    w = torch.randn(n, generator=g) if affine else None
    b = torch.randn(n, generator=g) if (affine and not rms) else None
    if rms:
        y = normkit.rms_norm(x, n, w, 1e-6, residual=r, zero_centered_gamma=zc)
    else:
        y = normkit.layer_norm(x, n, w, b, 1e-5, residual=r, zero_centered_gamma=zc)
    eps = 1e-6 if rms else 1e-5
    truth = ref64(x, w, b, r, eps, rms, zc)
    assert_close_to_ref(y, torch_op(x, w, b, r, eps, rms, zc), truth, dtype)


def test_reference_backward_matches_autograd():
    """The analytic reference backward (used under torch.compile fallbacks) equals autograd."""
    v = torch.randn(7, 31, dtype=torch.float64, requires_grad=True)
    w = torch.randn(31, dtype=torch.float64, requires_grad=True)
    b = torch.randn(31, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(7, 31, dtype=torch.float64)
    for rms in (False, True):
        y, _, _, _ = reference.norm_forward(v, w, None if rms else b, None, 1e-5, rms, True)
        want = torch.autograd.grad(y, [v, w] + ([] if rms else [b]), dy)
        got = reference.norm_backward(dy, None, v.detach(), w.detach(), not rms, 1e-5, rms, True)
        assert (got[2] is None) == rms  # no dβ for RMSNorm
        got = [g for g in got if g is not None]
        for a, e in zip(got, want, strict=True):
            assert torch.allclose(a, e, atol=1e-12)


def test_large_outputs_take_the_hugepage_path():
    """Outputs of >= 1M elements are madvised for huge pages before the first write; results and
    gradients are those of the reference (the advice changes paging, never values)."""
    from normkit.kernels import cpu

    normkit.empty_cache()  # a buffer an earlier test left in the pool is not advised again
    advised = cpu._cpu.advised_buffers()
    m, n = 1024, 1024
    x = torch.randn(m, n, requires_grad=True)
    r = torch.randn(m, n)
    w = torch.randn(n, requires_grad=True)
    y, h = normkit.layer_norm(x, n, w, None, residual=r, return_residual=True)
    with torch.no_grad():
        y_fast = normkit.layer_norm(x, n, w)
    (gx, gw) = torch.autograd.grad(y, [x, w], torch.ones_like(y))
    assert cpu._cpu.advised_buffers() - advised >= 4  # y, h, the inference call's y, dx
    xd, wd, rd = x.detach().double(), w.detach().double().requires_grad_(), r.double()
    xd.requires_grad_()
    yd = torch.nn.functional.layer_norm((xd + rd), (n,), wd)
    gxd, gwd = torch.autograd.grad(yd, [xd, wd], torch.ones_like(yd))
    assert max_err(y, yd) < 1e-5 and max_err(y_fast, torch.nn.functional.layer_norm(
        x.detach().double(), (n,), w.detach().double())) < 1e-5
    assert max_err(gx, gxd) < 1e-4 and max_err(gw, gwd) < 1e-3


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_gradient_when_only_h_is_used(compiled):
    """y unused: x and the residual get exactly dh, γ/β get zeros (y may have another dtype)."""
    x = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(4, 24, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(24, requires_grad=True)

    def f(x, r, w):
        return normkit.layer_norm(x, 24, w, None, residual=r, return_residual=True,
                                  out_dtype=torch.float32)[1]

    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, fullgraph=True)
    h = f(x, r, w)
    dh = torch.randn_like(h)
    gx, gr, gw = torch.autograd.grad(h, [x, r, w], dh, allow_unused=True)
    assert torch.equal(gx, dh) and torch.equal(gr, dh)
    assert gw is None or torch.equal(gw, torch.zeros_like(w))


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_eps_zero_on_a_constant_row_is_nan_like_torch(rms, backend):
    """rsqrt(0) is inf and 0·inf is NaN: the row turns NaN, as in torch — never an exception,
    other rows untouched."""
    x = torch.randn(3, 16)
    x[1] = 0.0 if rms else 2.5
    x.requires_grad_()
    with normkit.use_backend(backend):
        y = (normkit.rms_norm(x, 16, None, 0.0) if rms
             else normkit.layer_norm(x, 16, None, None, 0.0))
        y.sum().backward()
    expect = torch_op(x.detach(), eps=0.0, rms=rms)
    assert torch.isnan(y[1]).all() and torch.isnan(expect[1]).all()
    torch.testing.assert_close(y[[0, 2]], expect[[0, 2]])
    assert torch.isnan(x.grad[1]).all() and torch.isfinite(x.grad[[0, 2]]).all()


@pytest.mark.parametrize("casting", ["llama", "t5"])
@pytest.mark.parametrize("wd", [torch.bfloat16, torch.float16, torch.float32])
def test_zero_centered_gamma_with_rounding_casts_is_torchs_one_plus_w(casting, wd):
    """"llama"/"t5" apply γ in its own dtype, so 1+γ is rounded there, as ``(1 + w) * x̂`` in
    torch: the kernels give the reference's bits, not a float32 1+γ."""
    x = torch.randn(32, 200, dtype=torch.bfloat16)
    w = (torch.randn(200) * 0.1).to(wd)
    with normkit.use_backend("cpu"):
        y = normkit.rms_norm(x, 200, w, 1e-6, zero_centered_gamma=True, casting=casting)
    with normkit.use_backend("reference"):
        want = normkit.rms_norm(x, 200, w, 1e-6, zero_centered_gamma=True, casting=casting)
    assert y.dtype == want.dtype
    if want.dtype == torch.float32:  # float32 output (t5, float32 γ): no 16-bit rounding to match
        torch.testing.assert_close(y, want, rtol=2e-6, atol=2e-6)
    else:
        assert (y == want).float().mean() > 0.99
