"""``out=`` / ``residual_out=``: y and h written into a caller's buffers (or into x and the
residual themselves), bit for bit the allocating result, on every path (the inference fast
path, the general path, the reference backend), and clear errors for a buffer that does not fit
or a call that needs autograd."""

from __future__ import annotations

import pytest
import torch

import normkit


def _args(rms, shape, dtype, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = torch.randn(shape, generator=g).to(dtype)
    w = torch.randn(n, generator=g).to(dtype)
    b = None if rms else torch.randn(n, generator=g).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype) if residual else None
    return x, w, b, r


def _call(rms, x, w, b, r, **kw):
    if rms:
        return normkit.rms_norm(x, x.shape[-1], w, 1e-6, residual=r, **kw)
    return normkit.layer_norm(x, x.shape[-1], w, b, 1e-5, residual=r, **kw)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 64), (300, 768), (0, 16)])
@pytest.mark.parametrize("rms", [False, True])
def test_out_gives_the_allocating_result_bit_for_bit(rms, shape, dtype, residual, backend):
    x, w, b, r = _args(rms, shape, dtype, residual)
    with normkit.use_backend(backend):
        want = _call(rms, x, w, b, r)
        out = torch.full_like(x, float("nan"))  # every element must be written
        got = _call(rms, x, w, b, r, out=out)
    assert got is out
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rms", [False, True])
def test_out_may_be_x_itself(rms, residual, dtype):
    """In place the kernel loops over one array (another compiled loop): same bits."""
    x, w, b, r = _args(rms, (257, 1000), dtype, residual)
    want = _call(rms, x, w, b, r)
    y = _call(rms, x, w, b, r, out=x)
    assert y is x and torch.equal(x, want)


def test_out_on_the_general_path_and_with_the_parallel_driver():
    x, w, b, _ = _args(False, (2048, 64), torch.bfloat16, False)  # 128K elements: parallel
    w32 = w.float()
    for kw in ({"casting": "llama"}, {"zero_centered_gamma": True}, {"out_dtype": torch.float32},
               {}):
        want = normkit.layer_norm(x, 64, w32, b.float(), **kw)
        out = torch.empty_like(want)
        assert normkit.layer_norm(x, 64, w32, b.float(), out=out, **kw) is out
        assert torch.equal(out, want), kw


def test_bad_out_is_named():
    x, w, b, _ = _args(False, (4, 8), torch.float32, False)
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        normkit.layer_norm(x, 8, w, b, out=[0.0] * 32)
    with pytest.raises(ValueError, match="out must have x's shape"):
        normkit.layer_norm(x, 8, w, b, out=torch.empty(4, 9))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        normkit.layer_norm(x, 8, w, b, out=torch.empty(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be contiguous"):
        normkit.layer_norm(x, 8, w, b, out=torch.empty(8, 4).t())
    with pytest.raises(ValueError, match="autograd"):
        normkit.layer_norm(x, 8, w.requires_grad_(), b, out=torch.empty(4, 8))
    with torch.no_grad():  # the same call without a gradient wanted is fine
        assert normkit.layer_norm(x, 8, w, b, out=torch.empty(4, 8)).shape == (4, 8)


def test_out_under_tracing_is_written_too():
    """torch.jit.trace takes torch's own ops (see test_export); out= must still be filled."""
    x, w, b, _ = _args(False, (4, 16), torch.float32, False)

    def f(x):
        out = torch.zeros_like(x)
        normkit.layer_norm(x, 16, w, b, out=out)
        return out

    with torch.no_grad():
        traced = torch.jit.trace(f, (x,), check_trace=False)
        assert torch.allclose(traced(x), normkit.layer_norm(x, 16, w, b), atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 64), (300, 768), (0, 16)])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("with_out", [False, True], ids=["h_only", "y_and_h"])
def test_residual_out_gives_the_allocating_result_bit_for_bit(rms, shape, dtype, backend,
                                                              with_out):
    x, w, b, r = _args(rms, shape, dtype, True)
    with normkit.use_backend(backend):
        want_y, want_h = _call(rms, x, w, b, r, return_residual=True)
        h = torch.full_like(x, float("nan"))
        y = torch.full_like(x, float("nan")) if with_out else None
        got_y, got_h = _call(rms, x, w, b, r, return_residual=True, out=y, residual_out=h)
    assert got_h is h and torch.equal(h, want_h) and torch.equal(got_y, want_y)
    assert not with_out or got_y is y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("where", ["y_in_x_h_in_r", "h_in_r", "h_in_x"])
def test_residual_stream_updated_in_place(rms, dtype, where):
    """The serving engines' step: h into the residual buffer, y into x's; or h over x."""
    x, w, b, r = _args(rms, (257, 1000), dtype, True)
    want_y, want_h = _call(rms, x, w, b, r, return_residual=True)
    out = x if where == "y_in_x_h_in_r" else None
    hbuf = x if where == "h_in_x" else r
    y, h = _call(rms, x, w, b, r, return_residual=True, out=out, residual_out=hbuf)
    assert h is hbuf and torch.equal(h, want_h) and torch.equal(y, want_y)
    assert out is None or y is x


def test_residual_out_on_the_general_path():
    x, w, b, r = _args(False, (2048, 64), torch.bfloat16, True)  # 128K elements: parallel
    w32 = w.float()
    for kw in ({"casting": "llama"}, {"zero_centered_gamma": True}, {}):
        want_y, want_h = normkit.layer_norm(x, 64, w32, b.float(), residual=r,
                                            return_residual=True, **kw)
        h = torch.empty_like(want_h)
        y, got_h = normkit.layer_norm(x, 64, w32, b.float(), residual=r, return_residual=True,
                                      residual_out=h, **kw)
        assert got_h is h and torch.equal(h, want_h) and torch.equal(y, want_y), kw


def test_bad_residual_out_is_named():
    x, w, b, r = _args(False, (4, 8), torch.float32, True)
    with pytest.raises(TypeError, match="residual_out must be a torch.Tensor"):
        normkit.layer_norm(x, 8, w, b, residual=r, residual_out=[0.0] * 32)
    with pytest.raises(ValueError, match="residual_out needs residual"):
        normkit.layer_norm(x, 8, w, b, residual_out=torch.empty(4, 8))
    with pytest.raises(ValueError, match="residual_out must have x's shape"):
        normkit.layer_norm(x, 8, w, b, residual=r, residual_out=torch.empty(4, 9))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        normkit.layer_norm(x, 8, w, b, residual=r,
                           residual_out=torch.empty(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="residual_out must be contiguous"):
        normkit.layer_norm(x, 8, w, b, residual=r, residual_out=torch.empty(8, 4).t())
    both = torch.empty(4, 8)
    with pytest.raises(ValueError, match="different tensors"):
        normkit.layer_norm(x, 8, w, b, residual=r, out=both, residual_out=both)
    with pytest.raises(ValueError, match="autograd"):
        normkit.layer_norm(x, 8, w.requires_grad_(), b, residual=r,
                           residual_out=torch.empty(4, 8))
