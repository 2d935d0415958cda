"""Dropout fused into the residual add (``dropout_p=``, ``seed=``): the mask, its keying and its
statistics, forward and backward on every backend against the float64 reference given the same
mask, reproducibility across threads and instruction sets, batch invariance, NaN rows, p = 0 and
p = 1, and the argument checks.

The mask takes, for the flat index k, word k % 4 of Triton's ``tl.randint4x(seed, k // 4)`` and
``tl.rand``'s threshold > float32(p): the pure-torch Philox of the reference is checked against
``tl.randint4x`` / ``tl.rand`` themselves (in the interpreter on CPU), and the cpu and triton
backends against the reference bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, assert_close_to_ref, bits, parallel_from, ref64

import normkit
from normkit.kernels import reference

pytest.importorskip("triton")

BACKENDS = ["cpu", "triton"]


def _norm(rms, *args, **kw):
    return normkit.rms_norm(*args, **kw) if rms else normkit.layer_norm(*args, **kw)


def _call(backend, rms, x, w, b, r, p, seed, **kw):
    with normkit.use_backend(backend):
        return _norm(rms, x, (x.shape[-1],), w, *(() if rms else (b,)), residual=r,
                     dropout_p=p, seed=seed, **kw)


def test_reference_philox_is_tl_randint4x_and_tl_rand():
    import triton
    import triton.language as tl

    @triton.jit
    def draw(U, F32, seed, n, BLOCK: tl.constexpr):
        k = tl.arange(0, BLOCK).to(tl.int64) * 1000003 + 4294967000  # crosses 2^32
        m = tl.arange(0, BLOCK) < n
        u0, u1, u2, u3 = tl.randint4x(seed, k)
        tl.store(U + tl.arange(0, BLOCK), u0.to(tl.int64), mask=m)
        tl.store(U + BLOCK + tl.arange(0, BLOCK), u1.to(tl.int64), mask=m)
        tl.store(U + 2 * BLOCK + tl.arange(0, BLOCK), u2.to(tl.int64), mask=m)
        tl.store(U + 3 * BLOCK + tl.arange(0, BLOCK), u3.to(tl.int64), mask=m)
        tl.store(F32 + tl.arange(0, BLOCK), tl.rand(seed, k), mask=m)

    k = torch.arange(300, dtype=torch.int64) * 1000003 + 4294967000
    for seed in (0, 12345, 2**40 + 7, 2**63 - 1):
        u, f = torch.zeros(4, 512, dtype=torch.int64), torch.empty(300)
        draw[(1,)](u, f, seed, 300, BLOCK=512)
        ref = reference.philox(seed, k)
        for w in range(4):
            assert torch.equal(u[w, :300] & 0xFFFFFFFF, ref[w])
        v31 = reference._rand31(ref[0])
        assert torch.equal(reference._uniform(v31), f)  # tl.rand: word 0's value, scaled
        # the integer threshold is tl.rand > float32(p)
        for p in (1e-9, 0.1, 0.5, 0.9, 1 - 1e-8, float(f[7]), 1.0):
            assert torch.equal(v31 > reference.keep_above(p),
                               f > torch.tensor(p, dtype=torch.float32))


def test_mask_takes_word_k_mod_4_of_counter_k_div_4():
    # Spelled out for 4 elements straddling two rows of N = 3 (k = 2..5 → counters 0 and 1).
    seed, p = 77, 0.5
    words = [reference.philox(seed, torch.tensor([c]))[w].item() for c in (0, 1) for w in range(4)]
    v31 = reference._rand31(torch.tensor(words[2:6]))
    assert torch.equal(reference.dropout_mask(seed, p, 2, 3).flatten()[2:6],
                       v31 > reference.keep_above(p))


def test_keep_above_is_the_exact_boundary():
    for p in (0.1, 0.25, 0.5, 0.7, 0.999):
        t = reference.keep_above(p)
        p32 = torch.tensor(p, dtype=torch.float32)
        assert bool(reference._uniform(t) <= p32) and bool(reference._uniform(t + 1) > p32)
    assert reference.keep_above(1.0) == 2**31 - 1  # nothing is above: all dropped


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_fraction_is_binomial(p):
    m, n = 256, 257
    x = torch.ones(m, n)
    _, h, keep = _call("cpu", False, x, None, None, None, p, 1234, return_residual=True,
                       return_dropout_mask=True)
    kept = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / (m * n))
    assert abs(kept - (1 - p)) < 5 * sigma
    # kept elements scaled by 1/(1-p) in float32, dropped ones 0
    s = torch.tensor(1 / (1 - p), dtype=torch.float32)
    assert torch.equal(h, torch.where(keep, s, torch.zeros(())))
    # another seed, another mask
    _, _, other = _call("cpu", False, x, None, None, None, p, 1235, return_residual=True,
                        return_dropout_mask=True)
    assert not torch.equal(keep, other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_mask_past_two_to_the_32(dtype):
    # Flat indices past 2^32 (tensors of 16 GiB and more) carry into Philox's second counter
    # word, as tl.randint's int64 offsets do: the kernel from an offset just below 2^32.
    from normkit.kernels import cpu

    k0, n, p, seed = 2**32 - 21, 301, 0.5, 9  # k0 % 4 = 3: the row starts mid-counter
    spec = (seed, reference.keep_above(p), 2.0)
    out = cpu._cpu.dropout_apply(torch.ones(n, dtype=dtype), None, k0, spec)
    k = torch.arange(k0, k0 + n, dtype=torch.int64)
    assert torch.equal(out != 0, reference._rand31(reference.dropout_words(seed, k))
                       > reference.keep_above(p))


def test_cpu_mask_is_the_reference_on_every_isa():
    # Rows of N = 299 start at every k % 4 and span several of the kernel's 128-element chunks
    # of Philox counters; each instruction set draws the reference's mask.
    from normkit.kernels import cpu

    m, n, p, seed = 5, 299, 0.3, 2**40 + 3
    want = reference.dropout_mask(seed, p, m, n)
    isa = cpu.isa()
    try:
        for isa_name in cpu.available_isas():
            cpu.set_isa(isa_name)
            # h = 1·m, drawn row by row in the forward; the mask, by one flat pass
            _, h, keep = _call("cpu", True, torch.ones(m, n, dtype=torch.bfloat16), None, None,
                               None, p, seed, return_residual=True, return_dropout_mask=True)
            assert torch.equal(h != 0, want) and torch.equal(keep, want), isa_name
    finally:
        cpu.set_isa("auto" if isa == cpu.available_isas()[0] else isa)


def test_triton_mask_on_rows_of_several_blocks():
    # N = 1029 > the 1024-element block, rows starting at k % 4 = 0, 1, 2, 3: the tiles of
    # whole Philox counters, shifted by k % 4, cover each row and no more.
    m, n, p, seed = 4, 1029, 0.5, 31
    x, r = torch.ones(m, n), torch.randn(m, n)
    _, h = _call("triton", False, x, None, None, r, p, seed, return_residual=True)
    assert torch.equal(bits(h), bits(reference.dropout_add(x, r, reference.dropout_mask(
        seed, p, m, n), p)))


def _inputs(m, n, dtype, residual, affine=True):
    x = torch.randn(m, n).to(dtype)
    r = torch.randn(m, n).to(dtype) if residual else None
    w = (1 + 0.1 * torch.randn(n)).to(dtype) if affine else None
    b = (0.1 * torch.randn(n)).to(dtype) if affine else None
    return x, w, b, r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms,residual,shape", [(False, True, (3, 37)), (True, False, (1, 1)),
                                                (False, False, (4, 128)),
                                                (True, True, (2, 100))])
def test_forward_matches_float64(backend, dtype, rms, residual, shape):
    x, w, b, r = _inputs(*shape, dtype, residual)
    p, seed = 0.3, 99
    y, h, keep = _call(backend, rms, x, w, b, r, p, seed, return_residual=True,
                       return_dropout_mask=True)
    ref_keep = reference.dropout_mask(seed, p, *shape)
    assert torch.equal(keep, ref_keep)  # the same mask on every backend
    assert torch.equal(bits(h), bits(reference.dropout_add(x, r, ref_keep, p)))
    # y: the norm of that h, within the suite's rule
    torch_y = (F.rms_norm(h, (shape[1],), w) if rms
               else F.layer_norm(h, (shape[1],), w, b))
    assert_close_to_ref(y, torch_y, ref64(h, w, None if rms else b, rms=rms), dtype)


def _grads(backend, rms, x, w, b, r, p, seed, dy, dh):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (x, w, b, r)]
    xx, ww, bb, rr = leaves
    if backend == "torch":  # torch's own ops in the input dtype, on the same mask
        keep = reference.dropout_mask(seed, p, *x.shape)
        h = xx * (keep.to(x.dtype) / (1 - p))
        h = h + rr if rr is not None else h
        y = (F.rms_norm(h, (x.shape[1],), ww) if rms
             else F.layer_norm(h, (x.shape[1],), ww, bb))
    else:
        y, h = _call(backend, rms, xx, ww, bb, rr, p, seed, return_residual=True)
    torch.autograd.backward([y, h], [dy.to(y.dtype), dh.to(h.dtype)])
    return [None if t is None or t.grad is None else t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rms,residual", [(False, True), (True, False)])
def test_backward_matches_float64(backend, dtype, rms, residual):
    m, n = 5, 33
    x, w, b, r = _inputs(m, n, dtype, residual)
    if rms:
        b = None
    p, seed = 0.25, 5
    dy, dh = torch.randn(m, n), torch.randn(m, n)
    ours = _grads(backend, rms, x, w, b, r, p, seed, dy, dh)
    theirs = _grads("torch", rms, x, w, b, r, p, seed, dy, dh)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    with normkit.use_backend("reference"):
        truth = _grads("reference", rms, *(d(t) for t in (x, w, b, r)), p, seed, dy.double(),
                       dh.double())
    for name, o, t, g in zip(("dx", "dw", "db", "dresidual"), ours, theirs, truth, strict=True):
        if g is None:
            assert o is None
            continue
        assert_close_to_ref(o, t, g, dtype, atol_scale=math.sqrt(m) if name in ("dw", "db")
                            else 1.0, what=name)


def test_dx_is_mask_times_dresidual():
    x, w, b, r = _inputs(4, 50, torch.float32, True)
    x.requires_grad_()
    r.requires_grad_()
    y, keep = normkit.layer_norm(x, (50,), w, b, residual=r, dropout_p=0.4, seed=3,
                                 return_dropout_mask=True)
    y.sum().backward()
    s = torch.tensor(1 / 0.6, dtype=torch.float32)
    assert torch.equal(x.grad, torch.where(keep, r.grad * s, torch.zeros(())))


# (dtype, M, N): the backward's paths — short rows in groups (f32 N ≤ 512; 16-bit N ≤ 256 on
# AVX2), rows one by one (16-bit: dy and x̂ kept), a tail of N % 16 elements, N = 1, M = 1
_BWD_PATHS = [(torch.float32, 40, 24), (torch.float32, 7, 1), (torch.float32, 3, 1001),
              (torch.bfloat16, 40, 24), (torch.bfloat16, 5, 777), (torch.float16, 1, 300),
              (torch.float64, 6, 45)]


@pytest.mark.parametrize("fuse,streamed", [(1, False), (1, True), (0, True)])
@pytest.mark.parametrize("dtype,m,n", _BWD_PATHS)
def test_fused_backward_dx_is_the_mask_applied_to_the_residual_gradient(dtype, m, n, fuse,
                                                                         streamed):
    """The cpu backward writes dx = m·dh_total in the pass that writes dh_total (the residual's
    gradient; ``fuse`` 1) or in a pass of its own (0: 16-bit rows by default):
    bit for bit what ``dropout_apply`` gives from the stored dh_total, on every instruction set
    and thread count, with and without dγ/dβ and streamed stores."""
    from helpers import fuse_dropout, stream_from

    from normkit.kernels import cpu

    torch.manual_seed(7)
    x, w, b, r = _inputs(m, n, dtype, True)
    dy = torch.randn(m, n).to(dtype)
    spec = normkit._dropout._spec(0.3, 12)
    threads, isa = torch.get_num_threads(), cpu.isa()
    try:
        with parallel_from(64), stream_from(0 if streamed else 1 << 62), fuse_dropout(fuse):
            for isa_name in cpu.available_isas():
                cpu.set_isa(isa_name)
                for t, want_w in ((1, True), (2, False)):
                    torch.set_num_threads(t)
                    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
                    wg = w.clone().requires_grad_(want_w)
                    y = _call("cpu", False, xg, wg, b, rg, 0.3, 12)
                    y.backward(dy)
                    assert torch.equal(bits(xg.grad), bits(cpu.dropout_apply(rg.grad, spec))), \
                        (isa_name, t)
                    assert (xg.grad == 0).any() and (xg.grad != 0).any()
    finally:
        torch.set_num_threads(threads)
        cpu.set_isa("auto" if isa == cpu.available_isas()[0] else isa)


@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("dtype,m,n", [(torch.float32, 3, 37), (torch.bfloat16, 4, 70),
                                       (torch.float16, 1, 9)])
def test_triton_fused_backward_dx_is_the_mask_applied_to_the_residual_gradient(
        dtype, m, n, looped, monkeypatch):
    """Triton's backward stores m·dx in dx's pass (rows in registers, and rows in chunks): the
    bits of the cpu backend's dx, and of dropout_apply from the stored residual gradient."""
    from normkit.kernels import triton as tk

    if looped:
        monkeypatch.setattr(tk, "_MAX_BLOCK", 16)
        monkeypatch.setattr(tk, "_CHUNK", 16)
    x, w, b, r = _inputs(m, n, dtype, True)
    dy = torch.randn(m, n).to(dtype)
    spec = normkit._dropout._spec(0.3, 2**40 + 9)
    grads = {}
    for backend in BACKENDS:
        xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
        _call(backend, False, xg, w, b, rg, 0.3, 2**40 + 9).backward(dy)
        grads[backend] = xg.grad, rg.grad
    dx, dr = grads["triton"]
    assert torch.equal(bits(dx), bits(tk.dropout_apply(dr, spec)))
    assert torch.equal(bits(dx), bits(normkit.kernels.cpu.dropout_apply(dr, spec)))
    assert torch.equal(dx == 0, grads["cpu"][0] == 0) and (dx == 0).any()


def test_same_bits_on_every_thread_count_and_isa():
    from normkit.kernels import cpu

    x, w, b, r = _inputs(64, 1000, torch.float32, True)
    threads, isa = torch.get_num_threads(), cpu.isa()
    results = []
    try:
        with parallel_from(1024):
            for isa_name in cpu.available_isas():
                cpu.set_isa(isa_name)
                for t in (1, 2):
                    torch.set_num_threads(t)
                    y, h = _call("cpu", False, x, w, b, r, 0.2, 11, return_residual=True)
                    results.append((bits(y), bits(h)))
    finally:
        torch.set_num_threads(threads)
        cpu.set_isa("auto" if isa == cpu.available_isas()[0] else isa)
    for y, h in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(h, results[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_do_not_depend_on_the_batch_size(backend):
    x, w, b, r = _inputs(9, 70, torch.bfloat16, True)
    full = _call(backend, False, x, w, b, r, 0.5, 21, return_residual=True)
    head = _call(backend, False, x[:4], w, b, r[:4], 0.5, 21, return_residual=True)
    for a, c in zip(full, head, strict=True):
        assert torch.equal(bits(a[:4]), bits(c))
    # (…, N) input: the mask follows the flattened rows
    y3 = _call(backend, False, x.view(3, 3, 70), w, b, r.view(3, 3, 70), 0.5, 21)
    assert torch.equal(bits(y3.view(9, 70)), bits(full[0]))


def test_strided_rows_give_the_same_bits():
    big = torch.randn(6, 80)
    x = big[:, :61]  # rows of stride 80
    y1, h1 = _call("cpu", True, x, None, None, None, 0.3, 8, return_residual=True)
    y2, h2 = _call("cpu", True, x.contiguous(), None, None, None, 0.3, 8, return_residual=True)
    assert torch.equal(bits(y1), bits(y2)) and torch.equal(bits(h1), bits(h2))


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_nan_stays_in_its_row_even_when_dropped(backend):
    x, w, b, r = _inputs(4, 40, torch.float32, True)
    keep = reference.dropout_mask(2, 0.5, 4, 40)
    j = int((~keep[1]).nonzero()[0])  # a dropped element of row 1
    x[1, j] = float("nan")
    y = _call(backend, False, x, w, b, r, 0.5, 2)
    assert torch.isnan(y[1]).all()
    assert torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_zero_is_the_plain_op_bit_for_bit(backend):
    x, w, b, r = _inputs(3, 48, torch.bfloat16, True)
    with normkit.use_backend(backend):
        plain = normkit.layer_norm(x, (48,), w, b, residual=r, return_residual=True)
    y, h, keep = _call(backend, False, x, w, b, r, 0.0, 5, return_residual=True,
                       return_dropout_mask=True)
    assert torch.equal(bits(y), bits(plain[0])) and torch.equal(bits(h), bits(plain[1]))
    assert keep.all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_p_one_drops_everything(backend):
    x, w, b, r = _inputs(3, 20, torch.float32, True)
    x.requires_grad_()
    y, h = _call(backend, False, x, w, b, r, 1.0, 5, return_residual=True)
    assert torch.equal(h, r)
    assert torch.equal(bits(y), bits(_call(backend, False, torch.zeros_like(r), w, b, r,
                                           0.0, None)))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_seed_none_draws_from_torchs_generator():
    x = torch.randn(4, 32)
    torch.manual_seed(7)
    a = normkit.layer_norm(x, (32,), dropout_p=0.5)
    b = normkit.layer_norm(x, (32,), dropout_p=0.5)
    torch.manual_seed(7)
    assert torch.equal(normkit.layer_norm(x, (32,), dropout_p=0.5), a)
    assert not torch.equal(a, b)


def test_double_backward_and_gradcheck():
    x, w, b, r = _inputs(3, 9, torch.float64, True)
    args = [t.requires_grad_() for t in (x, w, b, r)]

    def f(x, w, b, r):
        return _call("cpu", False, x, w, b, r, 0.3, 4)

    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("kw,exc,match", [
    ({"dropout_p": -0.1}, ValueError, "dropout_p must be in"),
    ({"dropout_p": 1.5}, ValueError, "dropout_p must be in"),
    ({"dropout_p": float("nan")}, ValueError, "dropout_p must be in"),
    ({"dropout_p": "0.1"}, TypeError, "dropout_p must be a float"),
    ({"dropout_p": True}, TypeError, "dropout_p must be a float"),
    ({"dropout_p": None}, TypeError, "dropout_p must be a float"),
    ({"dropout_p": 0.1, "seed": -1}, ValueError, "seed must be in"),
    ({"dropout_p": 0.1, "seed": 2**63}, ValueError, "seed must be in"),
    ({"dropout_p": 0.1, "seed": 1.5}, TypeError, "seed must be an int"),
    ({"dropout_p": 0.1, "out": torch.empty(2, 8)}, ValueError, "out= and residual_out="),
    ({"dropout_p": 0.1, "memory_efficient": True}, ValueError, "memory_efficient=True"),
    ({"dropout_p": 0.1, "out_dtype": torch.int8}, ValueError, "quantized out_dtype"),
    ({"seed": 3, "scale": 0.5}, ValueError, "quantized out_dtype"),
])
def test_bad_arguments_are_named(kw, exc, match):
    x = torch.randn(2, 8)
    for fn in (normkit.layer_norm, normkit.rms_norm):
        with pytest.raises(exc, match=match):
            fn(x, 8, **kw)


def test_torch_compile_traces_without_graph_breaks():
    # Under torch.compile h comes from the reference's torch ops (the same bits) and the norm
    # from the custom op; dynamo alone (backend="eager"): inductor's compile of the Philox
    # graph takes minutes on a CI machine.
    x, w, _, r = _inputs(4, 32, torch.float32, True)

    def f(x, r):
        return normkit.layer_norm(x, 32, w, residual=r, dropout_p=0.3, seed=4,
                                  return_residual=True)

    got = torch.compile(f, fullgraph=True, backend="eager")(x, r)
    want = f(x, r)
    assert torch.equal(bits(got[1]), bits(want[1]))
    assert_close_to_ref(got[0], want[0], ref64(want[1], w), torch.float32)
