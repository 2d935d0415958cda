"""``memory_efficient=True``: training keeps the output y (not the normalized input) and the
backward recomputes x̂ = (y − β)/γ (RMSNorm: y/γ) from it, as Apex's ``memory_efficient`` — on
the eager C++ node, the general path (``_NormFunction``), the Triton kernels (interpreted on the
CPU without CUDA) and the custom op under ``torch.compile``.

Gradients are held to the suite's rule against float64 (helpers.py) with γ = 1 + 0.25·randn
and β = 0.5·randn: x̂'s extra error is about ulp(y)/|γ|, so a γ near 0 next to a large β costs
digits (docs/kernels.md says so).  Where γ (1 + γ zero-centred) is exactly 0, x̂ is lost and the
backward raises; so does ``create_graph=True`` (y fixes x only up to its scale).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from helpers import assert_close_to_ref, bits

import normkit
from normkit import _dispatch


@pytest.fixture(params=["eager", "general", "triton"])
def route(request, monkeypatch):
    """The name of the node a training call leaves in the graph, on this route."""
    if request.param == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available() or not _dispatch._interpreting():
            pytest.skip("the interpreted Triton kernels run on CPU tensors (TRITON_INTERPRET=1)")
        with normkit.use_backend("triton"):
            yield "_NormFunctionBackward"
    else:
        if request.param == "general":  # the eager entry point skipped: the general path
            monkeypatch.setattr(_dispatch, "_fast", None)
            monkeypatch.setattr(_dispatch, "_refresh_fast", lambda: None)
        yield "_NormFunctionBackward" if request.param == "general" else "CppFunction"


def _params(n, rms, dtype=torch.float32, zc=False):
    g = torch.Generator().manual_seed(n)
    w = (0.25 * torch.randn(n, generator=g)) if zc else 1 + 0.25 * torch.randn(n, generator=g)
    b = None if rms else 0.5 * torch.randn(n, generator=g)
    return w.to(dtype), None if b is None else b.to(dtype)


def _norm(x, w, b, r, rms, lean, zc=False):
    kw = dict(residual=r, return_residual=r is not None, zero_centered_gamma=zc,
              memory_efficient=lean)
    if rms:
        return normkit.rms_norm(x, x.shape[-1], w, 1e-5, **kw)
    return normkit.layer_norm(x, x.shape[-1], w, b, 1e-5, **kw)


def _grads(fn, tensors, dy, dh):
    """Gradients of fn(*leaves) against (dy, dh) for every tensor given (None: absent)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    outs, gs = ((out[0], out[1]), (dy, dh)) if isinstance(out, tuple) else ((out,), (dy,))
    wrt = [t for t in leaves if t is not None]
    grads = [g.to(o.dtype) for o, g in zip(outs, gs, strict=True)]
    return out, torch.autograd.grad(outs, wrt, grads)


# (dtype, M, N, rms, residual): N=1, odd N, N not a power of two, M=1, each dtype, both norms
CASES = [
    (torch.float32, 1, 1, False, False),
    (torch.float32, 37, 67, False, True),
    (torch.float32, 9, 128, True, False),
    (torch.bfloat16, 37, 67, False, False),
    (torch.bfloat16, 5, 300, True, True),
    (torch.float16, 1, 45, False, True),
    (torch.float16, 21, 96, True, False),
]


@pytest.mark.parametrize("dtype, m, n, rms, residual", CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}x{c[2]}-{'rms' if c[3] else 'ln'}"
                              f"{'-add' if c[4] else ''}" for c in CASES])
def test_gradients_match_float64(route, dtype, m, n, rms, residual):
    """dx (and d-residual), dγ, dβ within 2× torch's own error + ATOL of float64 autograd."""
    torch.manual_seed(m * n)
    x = torch.randn(m, n).to(dtype)
    r = torch.randn(m, n).to(dtype) if residual else None
    w, b = _params(n, rms)
    dy, dh = torch.randn(m, n).to(dtype), torch.randn(m, n).to(dtype) if residual else None

    def torch_fn(dt):
        def f(xx, rr, ww, bb):
            h = (xx + rr).to(dtype).to(dt) if rr is not None else xx
            y = (torch.nn.functional.rms_norm(h, (n,), ww, 1e-5) if rms
                 else torch.nn.functional.layer_norm(h, (n,), ww, bb, 1e-5))
            return (y, h) if rr is not None else y
        return f

    out, ours = _grads(lambda *a: _norm(*a, rms, True), (x, w, b, r), dy, dh)
    assert type((out[0] if residual else out).grad_fn).__name__ == route
    _, theirs = _grads(torch_fn(dtype), (x, r, w, b), dy, dh)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    _, truth = _grads(torch_fn(torch.float64), (d(x), d(r), d(w), d(b)), dy, dh)
    # ours: x, γ, (β), (residual); torch's and the truth's: x, (residual), γ, (β)
    order = [0] + ([len(theirs) - 1] if residual else []) + [1] + ([2] if b is not None else [])
    names = ["dx"] + (["dresidual"] if residual else []) + ["dweight"] + (["dbias"] if b
                                                                           is not None else [])
    for k, name in enumerate(names):
        scale = math.sqrt(m) if name in ("dweight", "dbias") else 1.0
        assert_close_to_ref(ours[order[k]], theirs[k], truth[k], dtype, atol_scale=scale * 4,
                            what=f"memory_efficient {name}")


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_options_without_gamma_and_zero_centered(route, rms):
    """No γ (x̂ = y − β, or y) and zero-centred γ (x̂ = (y − β)/(1 + γ)): the default mode's
    gradients within float32 rounding amplified by 1/|γ| (a few ulps here)."""
    m, n = 6, 40
    x = torch.randn(m, n)
    dy = torch.randn(m, n)
    w, b = _params(n, rms, zc=True)
    for ww, zc in ((None, False), (w, True)):
        tensors = (x, ww, b, None)
        _, lean = _grads(lambda *a, zc=zc: _norm(*a, rms, True, zc), tensors, dy, None)
        _, full = _grads(lambda *a, zc=zc: _norm(*a, rms, False, zc), tensors, dy, None)
        for a, e in zip(lean, full, strict=True):
            assert torch.allclose(a, e, rtol=1e-5, atol=1e-5), (zc, float((a - e).abs().max()))


@pytest.mark.parametrize("zc", [False, True], ids=["gamma", "zero-centred"])
def test_zero_gamma_raises_in_backward(route, zc):
    """Where γ (1 + γ) is 0, y = β whatever x̂ was: the backward raises, naming the option,
    rather than return a wrong dγ/dx there (Apex's clamp gives x̂ = 0: dγ stays 0 forever)."""
    n = 24
    x = torch.randn(4, n, requires_grad=True)
    w, b = _params(n, False, zc=zc)
    w[5] = -1.0 if zc else 0.0
    w.requires_grad_()
    y = _norm(x, w, b, None, False, True, zc)
    with pytest.raises(ValueError, match=r"memory_efficient=True.*0 at 1 of 24 entries.*index 5"):
        y.sum().backward()
    _norm(x, w, b, None, False, False, zc).sum().backward()  # the default mode is exact there


def test_double_backward_raises(route):
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    y = _norm(x, w, None, None, True, True)
    with pytest.raises((ValueError, RuntimeError), match="create_graph=True"):
        torch.autograd.grad((y * y).sum(), x, create_graph=True)


def test_nan_rows_and_batch_invariance(route):
    """A NaN row's gradient is NaN in that row only; a row's dx has the same bits alone, in
    a batch, at any position; two runs give the same bits (dγ/dβ included)."""
    n = 50
    x = torch.randn(9, n)
    x[3, 7] = float("nan")
    r = torch.randn(9, n)
    w, b = _params(n, False)
    dy, dh = torch.randn(9, n), torch.randn(9, n)
    _, g1 = _grads(lambda *a: _norm(*a, False, True), (x, w, b, r), dy, dh)
    _, g2 = _grads(lambda *a: _norm(*a, False, True), (x, w, b, r), dy, dh)
    for a, e in zip(g1, g2, strict=True):
        assert torch.equal(bits(a), bits(e))
    dx = g1[0]
    assert torch.isnan(dx[3]).all() and torch.isfinite(dx[torch.arange(9) != 3]).all()
    for i in (0, 4, 8):  # alone, and the batch's rows reversed
        _, gi = _grads(lambda *a: _norm(*a, False, True), (x[i:i + 1], w, b, r[i:i + 1]),
                       dy[i:i + 1], dh[i:i + 1])
        assert torch.equal(bits(gi[0][0]), bits(dx[i]))
    flip = lambda t: t.flip(0)  # noqa: E731
    _, gf = _grads(lambda *a: _norm(*a, False, True), (flip(x), w, b, flip(r)), flip(dy),
                   flip(dh))
    assert torch.equal(bits(flip(gf[0])), bits(dx))


def test_strided_input_and_leading_dims(route):
    """A strided x (every other row of a bigger tensor) and (B, T, N) input."""
    n = 33
    base = torch.randn(2, 5, 2 * n)
    x = base[..., :n]  # rows of stride 2n: the general path (the eager one takes contiguous x)
    w, b = _params(n, False)
    dy = torch.randn(2, 5, n)
    _, lean = _grads(lambda *a: _norm(*a, False, True), (x, w, b, None), dy, None)
    _, full = _grads(lambda *a: _norm(*a, False, False), (x, w, b, None), dy, None)
    for a, e in zip(lean, full, strict=True):
        assert torch.allclose(a, e, rtol=1e-5, atol=1e-5)


def _saved_while(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_saves_y_and_the_statistics_only(route, rms, residual):
    """One M×N tensor — y itself, never x, the residual or h — plus γ, β and (M, 3) stats."""
    m, n = 6, 40
    x = torch.randn(m, n, requires_grad=True)
    r = torch.randn(m, n, requires_grad=True) if residual else None
    w, b = _params(n, rms)
    w.requires_grad_()
    out, saved = _saved_while(lambda: _norm(x, w, b, r, rms, True))
    y = out[0] if residual else out
    big = [t for t in saved if t.numel() == m * n]
    assert len(big) == 1 and big[0].data_ptr() == y.data_ptr(), [t.shape for t in saved]
    params = sum(p.nbytes for p in (w, b) if p is not None)
    assert sum(t.nbytes for t in saved) <= y.nbytes + m * 3 * 4 + params


def test_compiled_call_saves_y():
    """Under torch.compile: the custom op saves y (not h), and the gradients are the eager
    memory-efficient path's bits (the same CPU kernels)."""
    m, n = 6, 40
    torch._dynamo.reset()

    def step(x, w, b, r):
        return normkit.layer_norm(x, n, w, b, residual=r, return_residual=True,
                                  memory_efficient=True)

    x, r = (torch.randn(m, n, requires_grad=True) for _ in range(2))
    w, b = _params(n, False)
    w.requires_grad_()
    b.requires_grad_()
    want = step(x, w, b, r)
    compiled = torch.compile(step, fullgraph=True)
    start = time.perf_counter()
    compiled(x, w, b, r)
    if time.perf_counter() - start > 30:
        pytest.skip("torch.compile took > 30 s on this machine")
    (y, h), saved = _saved_while(lambda: compiled(x, w, b, r))
    big = [t for t in saved if t.numel() == m * n]
    assert len(big) == 1 and torch.equal(big[0], y), [t.shape for t in saved]
    g = torch.autograd.grad((y * y).sum() + h.sum(), [x, r, w, b])
    g_want = torch.autograd.grad((want[0] * want[0]).sum() + want[1].sum(), [x, r, w, b])
    for a, e in zip(g, g_want, strict=True):
        assert torch.equal(a, e)


def test_compiled_call_on_the_reference_backend():
    """Under torch.compile with the reference backend the custom op's forward runs the
    reference, which then hands on the statistics, so that the backward from y runs on the
    kernels (the reference's backward needs the normalized input)."""
    n = 24
    torch._dynamo.reset()
    x, dy = torch.randn(5, n), torch.randn(5, n)
    w, b = _params(n, False)
    tensors = (x, w, b, None)
    with normkit.use_backend("reference"):
        compiled = torch.compile(lambda *a: _norm(*a, False, True), fullgraph=True)
        _, got = _grads(compiled, tensors, dy, None)
    _, want = _grads(lambda *a: _norm(*a, False, False), tensors, dy, None)
    for a, e in zip(got, want, strict=True):
        assert torch.allclose(a, e, rtol=1e-4, atol=1e-5), float((a - e).abs().max())


@pytest.mark.parametrize("kw, match", [
    (dict(casting="llama"), "casting 'torch' or 'gemma', not 'llama'"),
    (dict(casting="t5"), "not 't5'"),
    (dict(out_dtype=torch.bfloat16), "output in x's dtype"),
])
def test_options_it_cannot_serve(kw, match):
    x = torch.randn(2, 8, requires_grad=True)
    w = torch.ones(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        normkit.rms_norm(x, 8, w, memory_efficient=True, **kw)
    with pytest.raises(TypeError, match="memory_efficient must be a bool"):
        normkit.layer_norm(x, 8, memory_efficient=1)


def test_modules_take_the_option():
    """nn modules: the option in extra_repr, state_dict keys unchanged, checked when built."""
    for cls in (normkit.nn.LayerNorm, normkit.nn.RMSNorm, normkit.nn.FusedAddLayerNorm,
                normkit.nn.FusedAddRMSNorm):
        lean, plain = cls(16, memory_efficient=True), cls(16)
        assert "memory_efficient=True" in repr(lean) and "memory_efficient" not in repr(plain)
        assert lean.state_dict().keys() == plain.state_dict().keys()
        x = torch.randn(3, 16, requires_grad=True)
        args = (x, torch.randn(3, 16)) if cls.__name__.startswith("Fused") else (x,)
        _, saved = _saved_while(lambda m=lean, a=args: m(*a))
        assert sum(t.numel() == x.numel() for t in saved) == 1
        with pytest.raises(ValueError, match="memory_efficient=True needs casting"):
            cls(16, casting="llama", memory_efficient=True)
        with pytest.raises(TypeError, match="memory_efficient must be a bool"):
            cls(16, memory_efficient="yes")
