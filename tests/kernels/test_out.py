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
    with pytest.raises(RuntimeError, match="out must have x's shape"):
        normkit.layer_norm(x, 8, w, b, out=torch.empty(4, 9))
    with pytest.raises(RuntimeError, match="dtype torch.float32"):
        normkit.layer_norm(x, 8, w, b, out=torch.empty(4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="out must be contiguous"):
        normkit.layer_norm(x, 8, w, b, out=torch.empty(8, 4).t())
    with pytest.raises(RuntimeError, match="autograd"):
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
    with pytest.raises(RuntimeError, match="residual_out must have x's shape"):
        normkit.layer_norm(x, 8, w, b, residual=r, residual_out=torch.empty(4, 9))
    with pytest.raises(RuntimeError, match="dtype torch.float32"):
        normkit.layer_norm(x, 8, w, b, residual=r,
                           residual_out=torch.empty(4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="residual_out must be contiguous"):
        normkit.layer_norm(x, 8, w, b, residual=r, residual_out=torch.empty(8, 4).t())
    with pytest.raises(RuntimeError, match="autograd"):
        normkit.layer_norm(x, 8, w.requires_grad_(), b, residual=r,
                           residual_out=torch.empty(4, 8))


# ------------------------------------------------------------------------------------------
# Memory overlap: as torch's out= arguments, a written-to tensor must not share memory with an
# input (or the other output), except the in-place forms above (the same elements exactly)
# ------------------------------------------------------------------------------------------

OVERLAP = "some elements of the input tensor and the written-to tensor refer to a single memory"

# Each case: (kwargs of the call from a (12, 8) float32 buffer, the two arguments named).
# ``b`` is the buffer; x is rows 0-3 unless the case says otherwise.
OVERLAP_CASES = {
    "out_over_x": (lambda b: dict(x=b[:4], out=b[1:5]), "out", "x"),
    "out_under_x": (lambda b: dict(x=b[1:5], out=b[:4]), "out", "x"),
    "out_over_residual": (lambda b: dict(x=b[:4], residual=b[4:8], out=b[6:10]),
                          "out", "residual"),
    "out_is_residual": (lambda b: dict(x=b[:4], residual=b[4:8], out=b[4:8]), "out", "residual"),
    "out_over_weight": (lambda b: dict(x=b[:4], weight=b[5], out=b[4:8]), "out", "weight"),
    "out_over_bias": (lambda b: dict(x=b[:4], bias=b[9], out=b[8:12]), "out", "bias"),
    "residual_out_over_x": (lambda b: dict(x=b[:4], residual=b[4:8], residual_out=b[2:6]),
                            "residual_out", "x"),
    "residual_out_over_residual": (lambda b: dict(x=b[:4], residual=b[4:8],
                                                  residual_out=b[5:9]),
                                   "residual_out", "residual"),
    "residual_out_over_weight": (lambda b: dict(x=b[:4], residual=b[4:8], weight=b[8],
                                                residual_out=b[8:12]),
                                 "residual_out", "weight"),
    "residual_out_over_out": (lambda b: dict(x=b[:4], residual=b[4:8], out=b[8:12],
                                             residual_out=b[7:11]),
                              "out", "residual_out"),
    "residual_out_is_out": (lambda b: dict(x=b[:4], residual=b[4:8], out=b[8:12],
                                           residual_out=b[8:12]),
                            "out", "residual_out"),
}


@pytest.mark.parametrize("path", ["fast", "general", "reference"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("case", list(OVERLAP_CASES))
def test_overlapping_out_raises_as_torch(case, rms, path):
    """The issue's example, ``layer_norm(buf[:4], 8, out=buf[1:])``, returned an error of 3.6
    without a word: row 1 of out is row 2 of x, overwritten before it was read."""
    make, first, second = OVERLAP_CASES[case]
    if rms and "bias" in case:
        pytest.skip("RMSNorm has no bias")
    buf = torch.randn(12, 8)
    kw = make(buf)
    x = kw.pop("x")
    w, b = kw.pop("weight", torch.randn(8)), kw.pop("bias", torch.randn(8))
    if path == "general":
        kw["zero_centered_gamma"] = True  # not the compiled entry point
    before = buf.clone()
    with normkit.use_backend("reference" if path == "reference" else "auto"), \
            pytest.raises(RuntimeError, match=OVERLAP) as info:
        _call(rms, x, w, b, kw.pop("residual", None), **kw)
    assert f"{first}=" in str(info.value) or f"{first} " in str(info.value)
    assert second in str(info.value)
    assert torch.equal(buf, before)  # nothing was written


def test_disjoint_parts_of_one_buffer_are_fine():
    """Overlap means shared elements, not a shared allocation: rows 0-3 in, rows 4-7 out; and a
    row-strided x whose gaps hold out (a byte-range test would call that an overlap)."""
    buf = torch.randn(8, 8)
    want = normkit.layer_norm(buf[:4].clone(), 8)
    assert torch.equal(normkit.layer_norm(buf[:4], 8, out=buf[4:]), want)
    wide = torch.randn(4, 64)
    x = wide[:, :8]  # rows 64 elements apart: elements 8..63 of each row are not x
    out = wide.view(-1)[16:48].view(4, 8)  # inside the gap after x's first row
    want = normkit.layer_norm(x.clone(), 8)
    assert torch.equal(normkit.layer_norm(x, 8, out=out), want)
    # touching one element of x's second row is an overlap
    with pytest.raises(RuntimeError, match=OVERLAP):
        normkit.layer_norm(x, 8, out=wide.view(-1)[33:65].view(4, 8))


def test_the_same_memory_under_another_dtype_is_an_overlap():
    """out= in float32 over bfloat16 x starting at the same address: not the in-place form."""
    raw = torch.empty(64, dtype=torch.float32)
    x = raw.view(torch.bfloat16)[:32].view(4, 8).copy_(torch.randn(4, 8))
    out = raw[:32].view(4, 8)
    with pytest.raises(RuntimeError, match=OVERLAP):
        normkit.layer_norm(x, 8, out=out, out_dtype=torch.float32)


def test_memory_shared_through_numpy_is_an_overlap():
    """Two tensors over one numpy array have separate storages but the same memory."""
    np = pytest.importorskip("numpy")
    a = np.random.default_rng(0).standard_normal(48).astype(np.float32)
    x = torch.from_numpy(a[:32]).view(4, 8)
    with pytest.raises(RuntimeError, match=OVERLAP):
        normkit.layer_norm(x, 8, out=torch.from_numpy(a[8:40]).view(4, 8))


@pytest.mark.parametrize("which", ["out", "residual_out"])
def test_out_overlapping_itself_raises_as_torch(which):
    x, w, b, r = _args(False, (4, 8), torch.float32, True)
    expanded = torch.empty(8).expand(4, 8)  # one row, written four times
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"
                                           ".*" + which):
        _call(False, x, w, b, r, **{which: expanded})


def test_the_compiled_entry_point_serves_the_in_place_forms_and_declines_overlaps():
    """The eager fast path (host.cpp ``run``) keeps out=x / residual_out=residual at its cost
    and passes every overlapping call to the general path, which raises."""
    from normkit.kernels import cpu

    x, w, b, r = _args(False, (1, 768), torch.float32, True)
    flat = torch.randn(4 * 768)
    with torch.no_grad():
        for kw in (dict(out=x, residual_out=r), dict(residual_out=x),
                   dict(out=flat[:768].view(1, 768), residual_out=flat[768:1536].view(1, 768))):
            before = cpu._cpu.calls()
            _call(False, x, w, b, r, **kw)
            assert cpu._cpu.calls() == before + 1, kw
        before = cpu._cpu.calls()
        with pytest.raises(RuntimeError, match=OVERLAP):
            _call(False, flat[:768].view(1, 768), w, b, r, out=flat[1:769].view(1, 768))
        assert cpu._cpu.calls() == before
