"""The native eager entry point (kernels/_native.cpp): same bits as the Python fast path, for
every call it takes; everything else left to the Python path; built off the caller's thread."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from conftest import DTYPES, bits, native_or_skip, run_python

import normkit
from normkit.kernels import cpu, native


@pytest.fixture(scope="module")
def mod():
    return native_or_skip()


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits(a), bits(b))


def _call(x, n, w, b, r, rms, ret):
    if rms:
        return normkit.rms_norm(x, n, w, 1e-6, residual=r, return_residual=ret)
    return normkit.layer_norm(x, n, w, b, residual=r, return_residual=ret)


SHAPES = [(1, 1), (1, 64), (3, 33), (2, 5, 100), (8, 768), (512, 64), (16, 4096)]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_inference_same_bits_as_python_path(mod, dtype, rms, affine, residual, monkeypatch):
    for shape in SHAPES:
        n = shape[-1]
        x = torch.randn(shape).to(dtype)
        r = torch.randn(shape).to(dtype) if residual else None
        w = None if affine == "none" else torch.randn(n).to(dtype)
        b = torch.randn(n).to(dtype) if affine == "both" and not rms else None
        with torch.no_grad():
            _call(x, n, w, b, r, rms, True)  # makes (and registers) the dtype plan
            before = native.calls()
            got = _call(x, n, w, b, r, rms, True)
            served = native.calls() - before
            with monkeypatch.context() as mp:
                mp.setattr(cpu, "_native", None)
                want = _call(x, n, w, b, r, rms, True)
        # every size below the pooled outputs', serial or parallel
        assert served == 1, shape
        for a, e in zip(got, want, strict=True):
            _same(a, e)


def test_parallel_launches_run_on_torchs_threads_from_cpp(mod, monkeypatch):
    """A call big enough for several threads is launched from C++ on its first call, forward
    and backward (at::parallel_for over the serial driver: cpu._launch is not called, numba's
    thread count is left alone), with the bits of the serial driver on the Python path."""
    import numba

    if torch.get_num_threads() < 2:
        pytest.skip("one torch thread: no parallel launch")
    x = torch.randn(128, 512)
    w = torch.randn(512)
    dy = torch.randn(128, 512)

    def both():
        with torch.no_grad():
            y = normkit.layer_norm(x, 512, w)
        lx, lw = x.clone().requires_grad_(), w.clone().requires_grad_()
        return [y, *torch.autograd.grad(normkit.layer_norm(lx, 512, lw), (lx, lw), dy)]

    with torch.no_grad():
        normkit.layer_norm(x[:1], 512, w)  # makes (and registers) the dtype plan: serial size
    assert cpu._bwd_blocks(128, 512) > 1 and 128 * 512 >= cpu.PARALLEL_MIN_ELEMENTS
    launches = []
    launch = cpu._launch
    monkeypatch.setattr(cpu, "_launch", lambda *a: launches.append(a[1]) or launch(*a))
    before, threads = native.calls(), numba.get_num_threads()
    got = both()
    assert native.calls() == before + 2 and launches == [] and numba.get_num_threads() == threads
    monkeypatch.setattr(cpu, "_native", None)
    monkeypatch.setattr(cpu, "PARALLEL_MIN_ELEMENTS", 1 << 40)  # the Python path, serial driver
    want = both()
    assert launches and set(launches) == {cpu._fwd_parallel, cpu._bwd_parallel}
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
def test_training_same_bits_as_python_path(mod, dtype, rms, residual, wants, monkeypatch):
    """y, h and every gradient bit for bit, through the C++ autograd node: with dy only, dy and
    dh, dh only (y unused), and with only some inputs requiring grad; shapes on the serial and
    on the parallel driver; γ/β in x's dtype and, for 16-bit x, in float32."""
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

        with torch.no_grad():
            _call(x, n, w, b, r, rms, False)  # makes (and registers) the dtype plan
        args = (x, r, w, b, dy, dh, rms, residual, wants)
        got, node = _train(*args)
        with monkeypatch.context() as mp:
            mp.setattr(cpu, "_native", None)
            want, py_node = _train(*args)
        assert node == "CppFunction" and py_node == "_FastNormBackward", (shape, node, py_node)
        for a, e in zip(got, want, strict=True):
            if a is None or e is None:
                assert a is None and e is None
            else:
                _same(a, e)


def test_double_backward_through_the_native_node(mod):
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        normkit.layer_norm(x, 9, w, b)
        normkit.rms_norm(x, 9, w, 1e-6)
    assert type(normkit.layer_norm(x, 9, w, b).grad_fn).__name__ == "CppFunction"
    assert torch.autograd.gradgradcheck(
        lambda x, w, b, r: normkit.layer_norm(x, 9, w, b, residual=r, return_residual=True),
        (x, w, b, r))
    assert torch.autograd.gradgradcheck(lambda x, w: normkit.rms_norm(x, 9, w, 1e-6), (x, w))


def test_what_it_does_not_take_goes_to_the_python_path(mod):
    class Sub(torch.Tensor):
        pass

    x = torch.randn(4, 32)
    w = torch.randn(32)
    with torch.no_grad():
        want = normkit.layer_norm(x, 32, w)
        cases = [
            lambda: normkit.layer_norm(x.as_subclass(Sub), 32, w),  # a subclass may override
            lambda: normkit.layer_norm(torch.randn(32, 4).t(), 32),  # not contiguous
            lambda: normkit.layer_norm(x, 32, w, out=torch.empty(4, 32)),  # out=
        ]
        for case in cases:
            before = native.calls()
            case()
            assert native.calls() == before
        # big training calls keep the pooled output buffers of the Python path
        big = torch.randn(1024, 1024, requires_grad=True)
    assert type(normkit.layer_norm(big, 1024).grad_fn).__name__ == "_FastNormBackward"
    assert torch.equal(normkit.layer_norm(x.as_subclass(Sub), 32, w).as_subclass(torch.Tensor),
                       want)
    # Bad arguments still get the general path's named errors
    with pytest.raises(TypeError, match="normalized_shape"):
        normkit.layer_norm(x, True, w)
    with pytest.raises(ValueError, match="weight"):
        normkit.layer_norm(x, 32, torch.randn(31))


@pytest.mark.parametrize("rows", [6, 128], ids=["serial", "parallel"])
def test_threads_share_it_safely(mod, rows):
    """8 Python threads at once: the same bits as alone.  At 128x512 each launch is parallel
    where it finds no other region running, serial where it does (see try_region)."""
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

    before = native.calls()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert native.calls() - before == 8 * 200 * 2


def test_NORMKIT_NATIVE_0_turns_it_off():
    out = run_python("""
        import torch, normkit
        from normkit.kernels import native
        normkit.layer_norm(torch.randn(2, 8), 8)
        print(native.wait(), native.calls(), native.status())
    """, {"NORMKIT_NATIVE": "0"})
    assert out.split() == ["None", "0", "unavailable:", "off", "(NORMKIT_NATIVE=0)"]


def test_a_broken_toolchain_leaves_the_python_path(tmp_path):
    """No compiler: the build fails in the background, the calls are served all the same."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("c++", "g++", "gcc", "cc"):  # compilers that always fail
        p = bindir / tool
        p.write_text("#!/bin/sh\nexit 1\n")
        p.chmod(0o755)
    out = run_python("""
        import torch, normkit
        from normkit.kernels import native
        y = normkit.layer_norm(torch.randn(2, 8), 8)
        print(native.wait(), native.calls(), bool(torch.isfinite(y).all()))
        print(native.status())
    """, {"NORMKIT_CACHE_DIR": str(tmp_path / "cache"), "CXX": str(bindir / "c++"),
          "PATH": f"{bindir}:{os.environ['PATH']}", "NORMKIT_NATIVE": "1"}, timeout=600)
    first, status = out.strip().splitlines()
    assert first.split() == ["None", "0", "True"]
    assert status.startswith("unavailable:")
