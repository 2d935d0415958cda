"""The eager entry point (kernels/csrc/host.cpp: ``cpu.infer``): the common CPU call checked,
allocated and launched in C++, with a C++ autograd node — the same bits as the general path
(``_NormFunction`` over ``cpu.forward``/``cpu.backward``) for every call it takes, everything
else left to the general path, safe from many threads; and what happens where the compiled
kernels are missing or were built for another torch."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import DTYPES, bits, parallel_from, run_python

import normkit
from normkit import _dispatch as functional
from normkit.kernels import cpu


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits(a), bits(b))


def _call(x, n, w, b, r, rms, ret):
    if rms:
        return normkit.rms_norm(x, n, w, 1e-6, residual=r, return_residual=ret)
    return normkit.layer_norm(x, n, w, b, residual=r, return_residual=ret)


def _general(monkeypatch):
    """From here on the eager entry point is skipped: every call takes the general path."""
    monkeypatch.setattr(functional, "_fast", None)
    monkeypatch.setattr(functional, "_refresh_fast", lambda: None)


SHAPES = [(1, 1), (1, 64), (3, 33), (2, 5, 100), (8, 768), (512, 64), (16, 4096), (1100, 1000)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_inference_same_bits_as_general_path(dtype, rms, affine, residual, monkeypatch):
    """Every size (serial, parallel, and ≥ 1M elements: pooled outputs)."""
    for shape in SHAPES:
        n = shape[-1]
        x = torch.randn(shape).to(dtype)
        r = torch.randn(shape).to(dtype) if residual else None
        w = None if affine == "none" else torch.randn(n).to(dtype)
        b = torch.randn(n).to(dtype) if affine == "both" and not rms else None
        with torch.no_grad():
            before = cpu._cpu.calls()
            got = _call(x, n, w, b, r, rms, True)
            assert cpu._cpu.calls() == before + 1, shape
            with monkeypatch.context() as mp:
                _general(mp)
                want = _call(x, n, w, b, r, rms, True)
                assert cpu._cpu.calls() == before + 1
        for a, e in zip(got, want, strict=True):
            _same(a, e)


def test_parallel_launches_run_on_torchs_threads():
    """A call big enough for several threads runs on torch's intra-op threads (forward and
    backward), with the bits of the same call on one thread."""
    if torch.get_num_threads() < 2 or not cpu._cpu.openmp():
        pytest.skip("one torch thread (or no OpenMP in this build): no parallel launch")
    x = torch.randn(128, 512)
    w = torch.randn(512)
    dy = torch.randn(128, 512)

    def both():
        with torch.no_grad():
            y = normkit.layer_norm(x, 512, w)
        lx, lw = x.clone().requires_grad_(), w.clone().requires_grad_()
        return [y, *torch.autograd.grad(normkit.layer_norm(lx, 512, lw), (lx, lw), dy)]

    assert cpu._cpu.bwd_blocks(128, 512) > 1
    assert 128 * 512 >= cpu._cpu.parallel_min_elements()
    got = both()
    assert cpu._cpu.parallel_used()
    with parallel_from(1 << 62):
        want = both()
    for a, e in zip(got, want, strict=True):
        _same(a, e)


def _train(x, r, w, b, dy, dh, rms, residual, wants):
    """Outputs and gradients of one training call on fresh leaves, and y's node type."""
    lx = x.clone().requires_grad_(wants != "params_only")
    lr = None if r is None else r.clone().requires_grad_(wants != "params_only")
    lw = w.clone().requires_grad_(wants != "x_only")
    lb = None if b is None else b.clone().requires_grad_(wants != "x_only")
    out = _call(lx, x.shape[-1], lw, lb, lr, rms, r is not None)
    y, h = out if r is not None else (out, None)
    outs, grads = {"plain": ([y], [dy]), "add_y": ([y], [dy]),
                   "add_yh": ([y, h], [dy, dh]), "add_h": ([h], [dh])}[residual]
    leaves = [t for t in (lx, lr, lw, lb) if t is not None and t.requires_grad]
    g = torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    return [y] + ([] if h is None else [h]) + list(g), type(y.grad_fn).__name__


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", ["plain", "add_y", "add_yh", "add_h"])
@pytest.mark.parametrize("wants", ["all", "x_only", "params_only"])
def test_training_same_bits_as_general_path(dtype, rms, residual, wants, monkeypatch):
    """y, h and every gradient bit for bit, through the C++ autograd node: with dy only, dy and
    dh, dh only (y unused), and with only some inputs requiring grad; serial and parallel
    sizes, one and several dγ blocks; γ/β in x's dtype and, for 16-bit x, in float32 (the node
    rounds dγ/dβ to γ's dtype in the kernel, the general path with ``.to()``)."""
    cases = [(s, pdt) for s in [(1, 64), (3, 33), (2, 5, 100), (8, 4096), (300, 512)]
             for pdt in {dtype, torch.float32 if dtype.itemsize == 2 else dtype}]
    for shape, pdt in cases:
        n = shape[-1]
        x = torch.randn(shape).to(dtype)
        r = torch.randn(shape).to(dtype) if residual != "plain" else None
        w = torch.randn(n).to(pdt)
        b = None if rms else torch.randn(n).to(pdt)
        dy = torch.randn(shape).to(dtype)
        dh = torch.randn(shape).to(dtype)
        args = (x, r, w, b, dy, dh, rms, residual, wants)
        got, node = _train(*args)
        with monkeypatch.context() as mp:
            _general(mp)
            want, general_node = _train(*args)
        assert node == "CppFunction", (shape, node)
        if len(shape) == 2:  # (the general path reshapes 3-D x to rows and back: a view node)
            assert general_node == "_NormFunctionBackward", (shape, general_node)
        for a, e in zip(got, want, strict=True):
            if a is None or e is None:
                assert a is None and e is None
            else:
                _same(a, e)


def test_double_backward_through_the_cpp_node():
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    assert type(normkit.layer_norm(x, 9, w, b).grad_fn).__name__ == "CppFunction"
    assert torch.autograd.gradgradcheck(
        lambda x, w, b, r: normkit.layer_norm(x, 9, w, b, residual=r, return_residual=True),
        (x, w, b, r))
    assert torch.autograd.gradgradcheck(lambda x, w: normkit.rms_norm(x, 9, w, 1e-6), (x, w))


def test_what_it_does_not_take_goes_to_the_general_path():
    class Sub(torch.Tensor):
        pass

    x = torch.randn(4, 32)
    w = torch.randn(32)
    with torch.no_grad():
        want = normkit.layer_norm(x, 32, w)
        cases = [
            lambda: normkit.layer_norm(x.as_subclass(Sub), 32, w),  # a subclass may override
            lambda: normkit.layer_norm(torch.randn(32, 4).t(), 32),  # not contiguous
            lambda: normkit.layer_norm(x, (4, 32), None),  # two normalized dims
            lambda: normkit.layer_norm(x, 32, w.double()),  # γ needs a conversion first
            lambda: normkit.layer_norm(x, 32, w, casting="llama"),
            lambda: normkit.layer_norm(x, 32, w, out_dtype=torch.float64),
        ]
        for case in cases:
            before = cpu._cpu.calls()
            case()
            assert cpu._cpu.calls() == before
    assert torch.equal(normkit.layer_norm(x.as_subclass(Sub), 32, w).as_subclass(torch.Tensor),
                       want)
    # training with out= is the general path's named error
    with pytest.raises(ValueError, match="out= does not support autograd"):
        normkit.layer_norm(x.requires_grad_(), 32, w, out=torch.empty(4, 32))
    # bad arguments still get the general path's named errors
    with pytest.raises(TypeError, match="normalized_shape"):
        normkit.layer_norm(x, True, w)
    with pytest.raises(ValueError, match="weight"):
        normkit.layer_norm(x, 32, torch.randn(31))


@pytest.mark.parametrize("rows", [6, 128], ids=["serial", "parallel"])
def test_threads_share_it_safely(rows):
    """8 Python threads at once: the same bits as alone.  At 128x512 each launch is parallel
    where it finds no other region running, serial where it does (launch.h)."""
    x = torch.randn(rows, 512)
    w = torch.randn(512, requires_grad=True)
    dy = torch.randn(rows, 512)
    with torch.no_grad():
        want_y = normkit.layer_norm(x, 512, w)
    want_g = torch.autograd.grad(normkit.layer_norm(x, 512, w), w, dy)[0]
    errors = []

    def work():
        try:
            for _ in range(200):
                with torch.no_grad():
                    assert torch.equal(normkit.layer_norm(x, 512, w), want_y)
                g = torch.autograd.grad(normkit.layer_norm(x, 512, w), w, dy)[0]
                assert torch.equal(g, want_g)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    before = cpu._cpu.calls()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert cpu._cpu.calls() - before == 8 * 200 * 2


_MISSING = """
    import sys, warnings
    {setup}
    import torch, normkit
    x = torch.randn(4, 16, requires_grad=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = normkit.layer_norm(x, 16)
        y = normkit.rms_norm(x, 16)
        y.sum().backward()
    ref = torch.nn.functional.rms_norm(x.detach(), (16,))
    print("cpu" in normkit.available_backends(), bool(torch.allclose(y, ref, atol=1e-5)))
    print(len([w for w in seen if "compiled CPU kernels" in str(w.message)]))
    print([str(w.message) for w in seen][0])
"""


@pytest.mark.parametrize("why", ["missing", "other_torch"])
def test_without_the_compiled_kernels_the_reference_serves(why):
    """The extension not installed (a checkout that was never built), or built for another
    torch: ``import normkit`` works, "auto" serves CPU tensors from the reference, and one
    warning says how to rebuild."""
    setup = {
        # what Python does when the shared library is absent
        "missing": "sys.modules['normkit.kernels._cpu'] = None",
        # the version the library records must match torch's own
        "other_torch": "import torch; torch.__version__ = '9.9.9'",
    }[why]
    out = run_python(_MISSING.format(setup=setup)).splitlines()
    assert out[0] == "False True"
    assert out[1] == "1"
    assert "--no-build-isolation" in out[2]
    if why == "other_torch":
        assert "built for torch" in out[2] and "9.9.9" in out[2]
