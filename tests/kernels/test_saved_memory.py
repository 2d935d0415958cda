"""What the fused add+norm keeps for backward: the normalized input (h with a residual, x
without), γ, β and the per-row statistics — one (M, N) tensor, on every route (the eager C++
node, the general path's ``_NormFunction``, the Triton kernels' ``_NormFunction``, the custom op
under ``torch.compile``) — and nothing that keeps x or the residual alive.  Double backward,
now derived from h, is checked on the eager, general and Triton routes (torch.compile's aot_autograd
does not support double backward)."""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch

import normkit
from normkit import _dispatch

M, N = 6, 40


def _general(monkeypatch):
    """From here on the eager entry point is skipped: every call takes the general path."""
    monkeypatch.setattr(_dispatch, "_fast", None)
    monkeypatch.setattr(_dispatch, "_refresh_fast", lambda: None)


@pytest.fixture(params=["eager", "general", "triton"])
def route(request, monkeypatch):
    """(the name of the node a training call must leave in the graph, the device to use)."""
    if request.param == "triton":
        pytest.importorskip("triton")
        if not (torch.cuda.is_available() or _dispatch._interpreting()):
            pytest.skip("triton needs CUDA or TRITON_INTERPRET=1 (conftest sets it without CUDA)")
        with normkit.use_backend("triton"):
            yield "_NormFunctionBackward", "cuda" if torch.cuda.is_available() else "cpu"
    elif request.param == "general":
        _general(monkeypatch)
        yield "_NormFunctionBackward", "cpu"
    else:
        yield "CppFunction", "cpu"


def _fused(x, w, b, r, rms):
    if rms:
        return normkit.rms_norm(x, N, w, 1e-6, residual=r, return_residual=r is not None)
    return normkit.layer_norm(x, N, w, b, residual=r, return_residual=r is not None)


def _saved_while(fn):
    """(fn's result, the tensors autograd saved for backward while it ran)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _check_lean(saved, x, params):
    """At most one (M, N) tensor, of x's dtype, plus γ/β and the (M, 3) statistics."""
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) <= 1 and all(t.dtype == x.dtype for t in big), [t.shape for t in saved]
    stats = M * 3 * 4  # float32 [m1, dm, rstd] per row
    bound = x.numel() * x.element_size() + stats + sum(p.nbytes for p in params)
    assert sum(t.nbytes for t in saved) <= bound, [(t.shape, t.dtype) for t in saved]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [True, False], ids=["add", "plain"])
def test_one_call_saves_one_row_block(route, dtype, rms, residual):
    node, dev = route
    x = torch.randn(M, N, dtype=dtype, device=dev, requires_grad=True)
    r = torch.randn(M, N, dtype=dtype, device=dev, requires_grad=True) if residual else None
    w = torch.randn(N, dtype=dtype, device=dev, requires_grad=True)
    b = None if rms else torch.randn(N, dtype=dtype, device=dev, requires_grad=True)
    out, saved = _saved_while(lambda: _fused(x, w, b, r, rms))
    y = out[0] if residual else out
    assert type(y.grad_fn).__name__ == node
    _check_lean(saved, x, [p for p in (w, b) if p is not None])
    if residual:  # what is kept is h, the output: not x, not the residual
        assert any(t.data_ptr() == out[1].data_ptr() for t in saved)
        assert not any(t.data_ptr() in (x.data_ptr(), r.data_ptr()) for t in saved)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_x_and_residual_die_with_the_caller(route, rms):
    """x and a residual made by earlier ops, dropped by the caller after the forward, are
    freed: the graph holds h, not them."""
    node, dev = route
    leaf = torch.randn(M, N, device=dev, requires_grad=True)
    w = torch.randn(N, device=dev, requires_grad=True)
    x, r = leaf * 2, leaf + 1  # not leaves: nothing but a saved tensor keeps their data
    gone = [weakref.ref(x), weakref.ref(r)]
    y, h = _fused(x, w, None, r, rms)
    assert type(y.grad_fn).__name__ == node
    del x, r
    gc.collect()
    assert [g() for g in gone] == [None, None]
    (y.sum() + h.sum()).backward()  # and backward still works
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def _second_order(inputs, rms, residual, node=None):
    """The gradient of a scalar of the first-order gradients (taken with create_graph=True) of
    a fused add+norm with x, γ, (β), (residual) = inputs."""
    x, w = inputs[:2]
    b = None if rms else inputs[2]
    r = inputs[-1] if residual else None
    out = _fused(x, w, b, r, rms)
    outs = out if residual else (out,)
    if node is not None:
        assert type(outs[0].grad_fn).__name__ == node
    loss = sum((o * o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device)
                .view(o.shape)).sum() for o in outs)
    first = torch.autograd.grad(loss, inputs, create_graph=True)
    return torch.autograd.grad(sum((g * g.detach().sign()).sum() for g in first), inputs)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [True, False], ids=["add", "plain"])
def test_double_backward_from_what_is_saved(route, rms, residual):
    """With a residual the backward's own graph starts from h (what is saved), and the
    second-order terms reach x and the residual through the node's dh.  gradgradcheck in
    float64 where the route takes float64 (the Triton kernels do not: there the second-order
    gradients of float32 rows are compared with the float64 reference's)."""
    node, dev = route
    triton = normkit.get_backend() == "triton"
    dtype = torch.float32 if triton else torch.float64
    shapes = [(3, N), (N,)] + ([] if rms else [(N,)]) + ([(3, N)] if residual else [])
    inputs = tuple(torch.randn(s, dtype=dtype, device=dev, requires_grad=True) for s in shapes)
    if not triton:
        def f(*a):
            x, w = a[:2]
            out = _fused(x, w, None if rms else a[2], a[-1] if residual else None, rms)
            assert type((out[0] if residual else out).grad_fn).__name__ == node
            return out

        assert torch.autograd.gradgradcheck(f, inputs)
        return
    got = _second_order(inputs, rms, residual, node)
    want_in = tuple(t.detach().cpu().double().requires_grad_() for t in inputs)
    with normkit.use_backend("reference"):
        want = _second_order(want_in, rms, residual)
    for g, e in zip(got, want, strict=True):
        assert torch.allclose(g.cpu().double(), e, rtol=1e-3, atol=1e-3 * float(e.abs().max()))


def test_compiled_call_saves_one_row_block():
    """Under torch.compile (the custom op's setup_context and the partitioner): h, γ, β and the
    statistics, not x and the residual."""
    torch._dynamo.reset()

    def step(x, w, b, r):
        return normkit.layer_norm(x, N, w, b, residual=r, return_residual=True)

    x, r = (torch.randn(M, N, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(N, requires_grad=True) for _ in range(2))
    want = step(x, w, b, r)  # (also loads the CPU kernels: a first call under dynamo breaks)
    compiled = torch.compile(step, fullgraph=True)
    start = time.perf_counter()
    compiled(x, w, b, r)  # compiled outside the hooks
    if time.perf_counter() - start > 30:
        pytest.skip("torch.compile took > 30 s on this machine")
    (y, h), saved = _saved_while(lambda: compiled(x, w, b, r))
    assert saved, "the hooks saw nothing: the compiled graph's saves were not observed"
    _check_lean(saved, x, [w, b])
    g = torch.autograd.grad((y.sum(), (h * h).sum()), [x, r, w, b])
    g_want = torch.autograd.grad((want[0].sum(), (want[1] * want[1]).sum()), [x, r, w, b])
    for a, e in zip(g, g_want, strict=True):
        assert torch.equal(a, e)
