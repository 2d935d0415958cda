"""The pool of large CPU output buffers: a buffer is reused only once no tensor uses it (not a
view, not autograd's saved tensors), results are the same bits as fresh outputs, the size cap
holds, and ``normkit.empty_cache()`` empties it."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import run_python

import normkit
from normkit.kernels import cpu

BIG = (1024, 1024)  # 1M elements: pooled


@pytest.fixture(autouse=True)
def empty_pool():
    normkit.layer_norm(torch.ones(1, 2), 2)  # loads the CPU backend
    normkit.empty_cache()
    yield
    normkit.empty_cache()


def test_a_dead_output_is_reused_a_live_one_never():
    x = torch.randn(BIG)
    want = normkit.layer_norm(x.clone(), BIG[1])
    y1 = normkit.layer_norm(x, BIG[1])
    view = y1[3:5]  # a view keeps the buffer in use
    p1 = y1.data_ptr()
    del y1
    y2 = normkit.layer_norm(x, BIG[1])
    assert y2.data_ptr() != p1 and not y2.data_ptr() <= view.data_ptr() < y2.data_ptr() + 8
    del view
    gc.collect()
    y3 = normkit.layer_norm(x * 2, BIG[1])  # p1 is free now: taken again, fully rewritten
    assert y3.data_ptr() == p1
    assert torch.equal(y3, normkit.layer_norm((x * 2).clone(), BIG[1]))
    assert torch.equal(y2, want)


def test_saved_tensors_keep_their_buffers():
    """autograd keeps h (saved for backward) and y alive; dx buffers must not overwrite them."""
    x = torch.randn(BIG, requires_grad=True)
    r = torch.randn(BIG, requires_grad=True)
    w = torch.randn(BIG[1], requires_grad=True)
    y, h = normkit.rms_norm(x, BIG[1], w, residual=r, return_residual=True)
    h_before = h.detach().clone()
    for _ in range(3):  # outputs come and go while the graph holds h
        normkit.layer_norm(torch.randn(BIG), BIG[1])
    assert torch.equal(h, h_before)
    dy = torch.randn(BIG)
    gx, gw = torch.autograd.grad(y, [x, w], dy)
    y_ref = normkit.rms_norm(h_before.requires_grad_(), BIG[1], w)
    gh, gw_ref = torch.autograd.grad(y_ref, [h_before, w], dy)
    assert torch.equal(gx, gh) and torch.equal(gw, gw_ref)


@pytest.fixture
def pool_cap():
    before = cpu._cpu.pool_max_bytes()
    yield cpu._cpu.set_pool_max_bytes
    cpu._cpu.set_pool_max_bytes(before)


def test_the_cap_holds_and_zero_turns_the_pool_off(pool_cap):
    x = torch.randn(BIG)
    pool_cap(x.nbytes)  # room for one buffer
    ys = [normkit.layer_norm(x, BIG[1]) for _ in range(3)]  # all alive: one pooled, two not
    assert cpu._cpu.pooled_buffers() == 1
    assert all(torch.equal(y, ys[0]) for y in ys)
    with pytest.raises(RuntimeError):
        ys[0].resize_(2 * BIG[0], BIG[1])  # a pooled buffer cannot grow under the pool
    pool_cap(0)
    normkit.empty_cache()
    y = normkit.layer_norm(x, BIG[1])
    assert cpu._cpu.pooled_buffers() == 0 and torch.equal(y, ys[1])
    y.resize_(4)  # a plain torch allocation: resizable


def test_empty_cache_forgets_free_buffers():
    x = torch.randn(BIG)
    normkit.layer_norm(x, BIG[1])  # dies at once
    assert cpu._cpu.pooled_buffers() == 1
    normkit.empty_cache()
    assert cpu._cpu.pooled_buffers() == 0


def test_the_cap_comes_from_the_environment():
    code = "from normkit.kernels import cpu; print(cpu._cpu.pool_max_bytes())"
    assert run_python(code, {"NORMKIT_CPU_POOL_MB": "7"}).strip() == str(7 << 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_outputs_are_aligned_contiguous_and_right(dtype):
    x = torch.randn(2, 512, 1024).to(dtype)
    w, b = torch.randn(1024).to(dtype), torch.randn(1024).to(dtype)
    r = torch.randn_like(x)
    with torch.no_grad():
        y, h = normkit.layer_norm(x, 1024, w, b, residual=r, return_residual=True)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert y.data_ptr() % 64 == 0 and h.data_ptr() % 64 == 0
    with normkit.use_backend("reference"):
        y_ref, h_ref = normkit.layer_norm(x, 1024, w, b, residual=r, return_residual=True)
    assert torch.equal(h, h_ref)
    assert (y.float() - y_ref.float()).abs().max() < 0.05


def test_threads_never_share_a_live_buffer():
    """Four threads take and drop pooled outputs at once; each result stays its own."""
    import threading

    xs = [torch.randn(BIG) for _ in range(4)]
    with torch.no_grad():
        wants = [normkit.layer_norm(x.clone(), BIG[1]) for x in xs]
    bad = []

    def work(k):
        with torch.no_grad():
            for _ in range(6):
                y = normkit.layer_norm(xs[k], BIG[1])
                if not torch.equal(y, wants[k]):
                    bad.append(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []
