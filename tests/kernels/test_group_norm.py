"""``normkit.group_norm`` on the CPU kernels and the Triton ones (interpreted here) against the
float64 reference and torch's ``F.group_norm``: both memory formats, 3-D/4-D/5-D inputs, G = 1
and G = C, N = 1 and odd N, NaN in one group, batch invariance, a deterministic backward, the
same bits on every instruction-set path, gradcheck, and the errors that name the argument.

The rule is helpers.py's: error <= 2 x torch's own error in the same dtype + ATOL (dγ/dβ, sums
over B·S values: ATOL·sqrt(B·S)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ATOL,
    DTYPES,
    assert_close_to_ref,
    bits,
    max_err,
    parallel_from,
    stream_from,
)

import normkit
from normkit import _dispatch
from normkit.kernels import cpu as cpu_kernels
from normkit.kernels import reference

CL = {4: torch.channels_last, 5: torch.channels_last_3d}

# (shape, groups): 3-D/4-D/5-D, G = 1 and G = C, N = 1 and odd N, odd sizes, C not a multiple of
# the 16 vector lanes (the scalar tails of both layouts), S = 1
SHAPES = [
    ((2, 6, 5, 3), 3),
    ((3, 8, 7), 2),
    ((1, 4, 3, 2, 2), 4),
    ((5, 40, 3, 3), 1),
    ((3, 20, 5, 7), 20),
    ((2, 96, 4, 5), 32),
    ((3, 12, 1, 1), 6),
    ((2, 64, 17, 17), 8),  # channels-last: two spatial blocks (256 rows of 64 channels each)
]


def _make(shape, dtype, fmt, scale=3.0, shift=2.0):
    x = (torch.randn(shape) * scale + shift).to(dtype)
    if fmt == "cl":
        x = x.contiguous(memory_format=CL[x.dim()])
    return x


def _run(x, g, w, b, dy, backend="cpu"):
    """(y, dx, dw, db) of normkit on ``backend``."""
    xr = x.clone(memory_format=torch.preserve_format).requires_grad_()
    wr = None if w is None else w.clone().requires_grad_()
    br = None if b is None else b.clone().requires_grad_()
    with normkit.use_backend(backend):
        y = normkit.group_norm(xr, g, wr, br)
        y.backward(dy)
    return y.detach(), xr.grad, None if w is None else wr.grad, None if b is None else br.grad


def _truth(x, g, w, b, dy):
    xd = x.double().requires_grad_()
    wd = None if w is None else w.double().requires_grad_()
    bd = None if b is None else b.double().requires_grad_()
    y = reference.group_norm(xd, g, wd, bd)[0]
    y.backward(dy.double())
    return y.detach(), xd.grad, None if w is None else wd.grad, None if b is None else bd.grad


def _torch(x, g, w, b, dy):
    xt = x.clone().requires_grad_()
    wt = None if w is None else w.to(x.dtype).requires_grad_()
    bt = None if b is None else b.to(x.dtype).requires_grad_()
    y = F.group_norm(xt, g, wt, bt)
    y.backward(dy)
    return y.detach(), xt.grad, None if w is None else wt.grad, None if b is None else bt.grad


def _check_all(x, g, affine, backend):
    c = x.shape[1]
    w = torch.randn(c) if affine else None
    b = torch.randn(c) if affine else None
    dy = torch.randn(x.shape).to(x.dtype)
    ours = _run(x, g, w, b, dy, backend)
    truth = _truth(x, g, w, b, dy)
    theirs = _torch(x, g, w, b, dy)
    assert ours[0].dtype == x.dtype and ours[0].shape == x.shape
    assert ours[0].stride() == theirs[0].stride(), "y keeps x's memory format, as torch's"
    sums = math.sqrt(x.numel() / c)
    for i, what in enumerate(("y", "dx", "dweight", "dbias")):
        if ours[i] is None:
            continue
        assert_close_to_ref(ours[i], theirs[i], truth[i], x.dtype,
                            atol_scale=sums if i >= 2 else 1.0, what=what)


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,g", SHAPES)
def test_cpu_forward_backward_against_float64(shape, g, dtype, fmt):
    if fmt == "cl" and len(shape) == 3:
        pytest.skip("channels-last is a 4-D/5-D memory format")
    _check_all(_make(shape, dtype, fmt), g, affine=shape[1] != 40, backend="cpu")


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_cpu_float64(fmt):
    x = _make((3, 8, 5, 3), torch.float64, fmt)
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    with normkit.use_backend("cpu"):
        y = normkit.group_norm(x, 4, w, b)
    ref = reference.group_norm(x, 4, w, b)[0]
    assert (y - ref).abs().max() < ATOL[torch.float64]


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_gradcheck_float64(fmt):
    x = _make((2, 4, 3, 2), torch.float64, fmt).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with normkit.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, w, b: normkit.group_norm(x, 2, w, b),
                                        (x, w, b))
        assert torch.autograd.gradgradcheck(lambda x, w, b: normkit.group_norm(x, 2, w, b),
                                            (x, w, b))


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_robust_statistics(fmt):
    """1e4 + 1e-2·noise in float32 normalizes to float32 rounding of the float64 answer (the
    shift); and a group whose first values are far from its mean takes the second pass."""
    x = _make((2, 32, 8, 8), torch.float32, fmt, scale=1e-2, shift=1e4)
    far = torch.randn(2, 32, 8, 8)
    far[:, :, 0, :] += 1000.0  # the values each layout's shift is taken from
    if fmt == "cl":
        far = far.contiguous(memory_format=torch.channels_last)
    for t in (x, far):
        with normkit.use_backend("cpu"):
            y = normkit.group_norm(t, 4)
        truth = reference.group_norm(t.double(), 4)[0]
        assert_close_to_ref(y, F.group_norm(t, 4), truth, torch.float32)


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e20), (torch.bfloat16, 1e25)])
def test_groups_whose_squares_overflow(dtype, magnitude, fmt):
    """Finite groups whose float32 sum of squares overflows: y and dx as accurate as ever (the
    group is taken again scaled by a power of two)."""
    x = _make((2, 8, 5, 4), torch.float32, fmt, scale=magnitude, shift=0.0).to(dtype)
    dy = torch.randn(x.shape).to(dtype)
    y, dx, _, _ = _run(x, 2, None, None, dy)
    ty, tdx, _, _ = _truth(x, 2, None, None, dy)
    assert max_err(y, ty) <= 4 * ATOL[dtype]
    assert max_err(dx * magnitude, tdx * magnitude) <= 4 * ATOL[dtype] * 4


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_nan_stays_in_its_group(fmt):
    x = _make((3, 8, 4, 4), torch.float32, fmt)
    clean = x.clone()
    x[1, 2, 3, 1] = float("nan")  # sample 1, group 1 (channels 2-3) of 4
    with normkit.use_backend("cpu"):
        y, y0 = normkit.group_norm(x, 4), normkit.group_norm(clean, 4)
    assert torch.isnan(y[1, 2:4]).all()
    bad = torch.zeros_like(y, dtype=torch.bool)
    bad[1, 2:4] = True
    assert torch.equal(bits(y[~bad]), bits(y0[~bad]))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_batch_invariant(backend, fmt):
    """A sample's y and dx bits are the same alone or at any position of a batch."""
    c = 64 if backend == "cpu" else 24  # cpu: two channels-last blocks; the interpreter is slow
    x = _make((3, c, 17, 17) if backend == "cpu" else (3, c, 7, 5), torch.float32, fmt)
    w, b = torch.randn(c), torch.randn(c)
    dy = torch.randn(x.shape)
    with parallel_from(0):
        y, dx, _, _ = _run(x, 8, w, b, dy, backend)
        for i in (0, 2):
            yi, dxi, _, _ = _run(x[i:i + 1], 8, w, b, dy[i:i + 1], backend)
            assert torch.equal(bits(yi[0]), bits(y[i])) and torch.equal(bits(dxi[0]), bits(dx[i]))


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_backward_deterministic_and_threads_do_not_matter(fmt):
    x = _make((5, 64, 17, 17), torch.bfloat16, fmt)
    w, b = torch.randn(64), torch.randn(64)
    dy = torch.randn(x.shape).to(torch.bfloat16)
    with parallel_from(0):
        first = _run(x, 8, w, b, dy)
        again = _run(x, 8, w, b, dy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(x, 8, w, b, dy)
    finally:
        torch.set_num_threads(threads)
    for a, c, s in zip(first, again, single, strict=True):
        assert torch.equal(bits(a), bits(c)) and torch.equal(bits(a), bits(s))


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,g", [((3, 40, 5, 7), 5), ((2, 64, 8, 8), 8)])
def test_calls_beyond_the_caches_give_the_same_bits(shape, g, dtype, fmt):
    """Calls whose bytes are beyond the caches (the threshold at 0 here) write their outputs
    with non-temporal stores (single elements up to each run's first 64-byte boundary: 35
    values per channel, 40 channels per row here, and aligned runs in the second shape), and
    channels-last sums take a block row by row instead of four rows at a time (35 rows: 8
    fours and 3): the same bits as in the caches."""
    x = _make(shape, dtype, fmt)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    dy = torch.randn(shape).to(dtype)
    with stream_from(0):
        streamed = _run(x, g, w, b, dy)
    with stream_from(1 << 60):
        plain = _run(x, g, w, b, dy)
    for s, p in zip(streamed, plain, strict=True):
        assert torch.equal(bits(s), bits(p))


def _threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_whole_samples_and_phases_agree(dtype):
    """Channels-last samples run whole on one thread each (the batch's multiple of the thread
    count) or in phases split between the threads (the rest, and B below the threads): on 2
    threads a batch of 3 takes both ways, a sample alone the phases, on 1 thread every sample
    runs whole.  Every way gives a sample the same bits (two blocks a sample here)."""
    x = _make((3, 64, 17, 17), dtype, "cl")
    w, b = torch.randn(64), torch.randn(64)
    dy = torch.randn(x.shape).to(dtype)
    with parallel_from(0):
        two = _threads(2, lambda: _run(x, 8, w, b, dy))
        one = _threads(1, lambda: _run(x, 8, w, b, dy))
        three = _threads(3, lambda: _run(x, 8, w, b, dy))
        alone = [_threads(2, lambda i=i: _run(x[i:i + 1], 8, w, b, dy[i:i + 1]))
                 for i in range(3)]
    for other in (one, three):
        for a, c in zip(two, other, strict=True):
            assert torch.equal(bits(a), bits(c))
    for i, single in enumerate(alone):
        assert torch.equal(bits(single[0][0]), bits(two[0][i]))
        assert torch.equal(bits(single[1][0]), bits(two[1][i]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_batch_of_the_threads_is_one_launch(dtype):
    """A channels-last batch of a multiple of the thread count runs in one parallel region,
    forward and backward (each phase was a region of its own: on a loaded machine a region can
    wait a time slice for a thread)."""
    if not cpu_kernels._cpu.openmp() or cpu_kernels._cpu.serial_only():
        pytest.skip("no OpenMP threads in this build or process")
    x = _make((2, 64, 17, 17), dtype, "cl")
    xv = x.movedim(1, -1).reshape(2, 17 * 17, 64)
    w = torch.randn(64)

    def regions(fn):
        before = cpu_kernels._cpu.parallel_regions()
        fn()
        return cpu_kernels._cpu.parallel_regions() - before

    with parallel_from(0):
        y, stats = _threads(2, lambda: cpu_kernels.group_forward(xv, w, None, 8, 1e-5, True))
        assert _threads(2, lambda: regions(
            lambda: cpu_kernels.group_forward(xv, w, None, 8, 1e-5, True))) == 1
        assert _threads(2, lambda: regions(lambda: cpu_kernels.group_backward(
            y, xv, w, stats, 8, True, True, True))) == 1


def test_every_isa_path_gives_the_same_bits():
    cpu = _dispatch._load_cpu()
    xs = [_make((3, 40, 5, 7), dt, fmt) for dt in (torch.float32, torch.bfloat16)
          for fmt in ("nchw", "cl")]
    w, b = torch.randn(40), torch.randn(40)
    got = {}
    try:
        for isa in cpu.available_isas():
            cpu.set_isa(isa)
            got[isa] = [_run(x, 5, w, b, torch.ones(x.shape).to(x.dtype)) for x in xs]
    finally:
        cpu.set_isa("auto")
    first = next(iter(got.values()))
    for isa, runs in got.items():
        for r, f in zip(runs, first, strict=True):
            for a, c in zip(r, f, strict=True):
                assert torch.equal(bits(a), bits(c)), isa


def test_other_strides_are_copied_and_equal():
    x = torch.randn(2, 8, 6, 10)[:, :, :, ::2]
    with normkit.use_backend("cpu"):
        assert torch.equal(normkit.group_norm(x, 2), normkit.group_norm(x.contiguous(), 2))


def test_instance_norm_is_groups_equal_channels():
    x = torch.randn(3, 6, 5, 4)
    w, b = torch.randn(6), torch.randn(6)
    truth = reference.group_norm(x.double(), 6, w.double(), b.double())[0]
    assert_close_to_ref(normkit.group_norm(x, 6, w, b), F.instance_norm(x, weight=w, bias=b),
                        truth, torch.float32)


def test_empty_batch():
    y = normkit.group_norm(torch.randn(0, 4, 3), 2)
    assert y.shape == (0, 4, 3)


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_interpreted(dtype, fmt):
    pytest.importorskip("triton")
    if "triton" not in normkit.available_backends():
        pytest.skip("triton backend not available")
    for shape, g in (((2, 6, 5, 3), 3), ((1, 130, 3, 3), 1)):
        _check_all(_make(shape, dtype, fmt), g, affine=True, backend="triton")


@pytest.mark.parametrize("call,exc,match", [
    (lambda x: normkit.group_norm(x, 3), RuntimeError, r"num_groups=3 must divide .* C=8"),
    (lambda x: normkit.group_norm(x, 0), ValueError, "num_groups must be positive"),
    (lambda x: normkit.group_norm(x, 2.0), TypeError, "num_groups must be an int"),
    (lambda x: normkit.group_norm(x, True), TypeError, "num_groups must be an int"),
    (lambda x: normkit.group_norm(x, 2, torch.ones(4)), ValueError,
     r"weight must have shape \(8,\)"),
    (lambda x: normkit.group_norm(x, 2, None, torch.ones(8, 1)), ValueError,
     r"bias must have shape \(8,\)"),
    (lambda x: normkit.group_norm(x, 2, torch.ones(8, dtype=torch.int64)), TypeError,
     "weight must be a floating-point"),
    (lambda x: normkit.group_norm(x, 2, eps=-1.0), ValueError, "eps must be finite and >= 0"),
    (lambda x: normkit.group_norm(x[0, 0, 0], 2), ValueError, "at least 2 dims"),
    (lambda x: normkit.group_norm(x.long(), 2), TypeError, "x must be a floating-point"),
    (lambda x: normkit.group_norm([1.0], 2), TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(torch.randn(2, 8, 3))


def test_torch_compile_traces_the_reference_without_graph_breaks():
    x = torch.randn(2, 8, 4, 3)
    w, b = torch.randn(8), torch.randn(8)
    compiled = torch.compile(lambda x: normkit.group_norm(x, 4, w, b), backend="eager",
                             fullgraph=True)
    truth = reference.group_norm(x.double(), 4, w.double(), b.double())[0]
    assert_close_to_ref(compiled(x), F.group_norm(x, 4, w, b), truth, torch.float32)
