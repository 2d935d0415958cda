"""Bit-for-bit batch invariance, run-to-run determinism and thread safety of the CPU kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from helpers import DTYPES, bits, exact_fma, parallel_from, run_python, stream_from

import normkit
from normkit.kernels import cpu


@pytest.fixture(autouse=True)
def _cpu_backend():
    with normkit.use_backend("cpu"):
        yield


def _both(x, w, b, r, rms):
    if rms:
        return normkit.rms_norm(x, x.shape[-1], w, 1e-6, residual=r, return_residual=True)
    return normkit.layer_norm(x, x.shape[-1], w, b, residual=r, return_residual=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 64, 771, 4096])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_row_bits_do_not_depend_on_batch(dtype, n, rms):
    """A row alone, at any position of batches of several sizes (on one thread and on
    several), with 1 or all threads: identical bits."""
    big = max(3, (2 << 12) // n + 5)  # large enough for a parallel launch from 4K elements
    x = torch.randn(big, n).to(dtype)
    r = torch.randn(big, n).to(dtype)
    w, b = torch.randn(n), torch.randn(n)
    with parallel_from(1 << 12):  # small batches go parallel too
        batch_y, batch_h = _both(x, w, b, r, rms)
        for i in (0, 1, big // 2, big - 1):
            y1, h1 = _both(x[i : i + 1], w, b, r[i : i + 1], rms)
            assert torch.equal(bits(y1[0]), bits(batch_y[i]))
            assert torch.equal(bits(h1[0]), bits(batch_h[i]))
        # a sub-batch starting at an odd row: other alignment, other batch size
        sub_y, _ = _both(x[3:], w, b, r[3:], rms)
        assert torch.equal(bits(sub_y), bits(batch_y[3:]))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one_y, _ = _both(x, w, b, r, rms)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(bits(one_y), bits(batch_y))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 333, 4096])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_serial_and_parallel_launches_agree(dtype, n, rms, affine, residual):
    """Each variant of the row loops (γ/β present or not, residual or not) gives the same bits
    on the calling thread and split over torch's threads."""
    x = torch.randn(50, n).to(dtype)
    r = torch.randn(50, n).to(dtype) if residual else None
    w = None if affine == "none" else torch.randn(n)
    b = torch.randn(n) if affine == "both" else None

    def run():
        if rms:
            return normkit.rms_norm(x, n, w, 1e-6, residual=r, return_residual=True)
        return normkit.layer_norm(x, n, w, b, residual=r, return_residual=True)

    if not cpu._cpu.openmp():
        pytest.skip("built without OpenMP: every launch runs on the calling thread")
    with parallel_from(1 << 62):
        serial = run()
    before = torch.get_num_threads()
    regions = cpu._cpu.parallel_regions()
    torch.set_num_threads(2)
    try:
        with parallel_from(0):
            parallel = run()
    finally:
        torch.set_num_threads(before)
    assert cpu._cpu.parallel_regions() > regions  # a region really ran
    for a, c in zip(serial, parallel, strict=True):
        assert torch.equal(bits(a), bits(c))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 771, 2048, 4099])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_backward_row_bits_do_not_depend_on_batch(dtype, n, rms):
    """dx of a row: identical alone and at any position of a batch, whichever way the batch
    takes it — in a group of rows (N ≤ 512; float32/float64 rows of N ≥ 2048, four at a time,
    here with a last group of three) or row by row — and with the groups shifted by a row."""
    m = 11
    x = torch.randn(m, n).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    w, b = torch.randn(n), torch.randn(n)

    def dx(lo, hi):
        xx = x[lo:hi].clone().requires_grad_()
        y = normkit.rms_norm(xx, n, w, 1e-6) if rms else normkit.layer_norm(xx, n, w, b)
        return torch.autograd.grad(y, xx, dy[lo:hi])[0]

    full = dx(0, m)
    for i in (0, 3, 4, 10):
        assert torch.equal(bits(dx(i, i + 1)[0]), bits(full[i]))
    assert torch.equal(bits(dx(1, m)), bits(full[1:]))


def test_backward_partition():
    """The dγ/dβ row blocks: a function of (M, N) alone, one block or at least 8 (fewer would
    only cost partial rows on one thread), never more than M or 64."""
    blocks = cpu._cpu.bwd_blocks
    assert blocks(1, 64) == 1
    assert blocks(8, 8192) == 1  # four blocks of elements would be too few
    assert blocks(16, 8192) == 8
    assert blocks(127, 4096) == 1
    assert blocks(128, 64) == 8
    assert blocks(4096, 4096) == 64
    for m in range(1, 300):
        for n in (1, 64, 4096, 16384):
            k = blocks(m, n)
            assert k == 1 or 8 <= k <= min(m, 64), (m, n, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("shape", [(301, 257), (8, 16384)], ids=["many_rows", "few_long_rows"])
def test_backward_is_bitwise_reproducible(dtype, rms, shape):
    """dx, dγ, dβ identical run to run, with 1 or all threads, on one thread or several.
    Both block partitions: blocks of rows, and a few long rows split into blocks of elements."""
    m, n = shape
    x = torch.randn(m, n).to(dtype).requires_grad_()
    w = torch.randn(n, requires_grad=True)
    b = None if rms else torch.randn(n, requires_grad=True)
    dy = torch.randn(m, n).to(dtype)
    params = [x, w] + ([] if rms else [b])

    def grads():
        y = normkit.rms_norm(x, n, w) if rms else normkit.layer_norm(x, n, w, b)
        return torch.autograd.grad(y, params, dy)

    regions = cpu._cpu.parallel_regions()
    first = grads()
    runs = [grads()]
    if cpu._cpu.openmp() and torch.get_num_threads() >= 2:
        assert cpu._cpu.parallel_regions() > regions  # several threads really ran it
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runs.append(grads())
    finally:
        torch.set_num_threads(threads)
    with parallel_from(1 << 62):
        runs.append(grads())
    for run in runs:
        for a, e in zip(run, first, strict=True):
            assert torch.equal(bits(a), bits(e))


def test_eight_threads_concurrently():
    """8 Python threads calling at once (large and small calls, inference and training, so
    parallel launches from the eager forward and from autograd's backward): correct results,
    no deadlock."""
    inputs = [torch.randn(m, n) for m, n in [(1, 64), (512, 1024), (3, 4096), (64, 333)] * 2]
    weights = [torch.randn(t.shape[-1]) for t in inputs]
    pairs = list(zip(inputs, weights, strict=True))
    expected = [normkit.layer_norm(t, t.shape[-1], w) for t, w in pairs]
    expected_r = [normkit.rms_norm(t, t.shape[-1], w) for t, w in pairs]

    def grads(x, w):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = normkit.layer_norm(x, x.shape[-1], w)
        return torch.autograd.grad(y, (x, w), torch.ones_like(y) + x.detach())

    expected_g = [grads(t, w) for t, w in pairs]
    errors = []

    def work(k):
        try:
            for _ in range(20):
                y = normkit.layer_norm(inputs[k], inputs[k].shape[-1], weights[k])
                z = normkit.rms_norm(inputs[k], inputs[k].shape[-1], weights[k])
                g = grads(inputs[k], weights[k])
                if not (torch.equal(y, expected[k]) and torch.equal(z, expected_r[k])
                        and all(map(torch.equal, g, expected_g[k]))):
                    errors.append(f"thread {k}: wrong result")
                    return
        except Exception as e:  # pragma: no cover - reported below
            errors.append(f"thread {k}: {e!r}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert not errors, errors


def test_forked_child_can_run_parallel_kernels():
    """A DataLoader-style fork after a parallel kernel ran in the parent works in the child,
    with the parent's bits.  GNU OpenMP is not fork-safe (torch's own parallel ops hang in such a
    child, which is why DataLoader workers run torch.set_num_threads(1)): normkit's launches in
    the child run on the calling thread, which gives the same bits."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import multiprocessing as mp, torch, normkit
        from normkit.kernels import cpu
        x = torch.randn(2048, 1024); w = torch.randn(1024); x2 = x[:64].clone()
        y0 = normkit.layer_norm(x, 1024, w)          # a parallel launch in the parent
        z0 = normkit.layer_norm(x2, 1024, w)
        assert cpu._cpu.parallel_used() or torch.get_num_threads() == 1
        def child(q):
            z = normkit.layer_norm(x2, 1024, w)      # as many threads as the parent had
            torch.set_num_threads(1)                 # what DataLoader does in its workers
            y = normkit.layer_norm(x, 1024, w)
            q.put((bool(torch.equal(y, y0) and torch.equal(z, z0)),
                   cpu._cpu.serial_only() or not cpu._cpu.parallel_used()))
        ctx = mp.get_context("fork"); q = ctx.Queue()
        p = ctx.Process(target=child, args=(q,)); p.start(); p.join(60)
        print(p.exitcode, *(q.get(timeout=5) if p.exitcode == 0 else ()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "True", "True"], out.stdout + out.stderr


def test_normkit_uses_no_more_threads_than_torch_may():
    """torch.set_num_threads(1) (a worker process, the watch benchmark) keeps normkit on the
    calling thread too; with more torch threads large calls go parallel.  Same bits either
    way."""
    x = torch.randn(512, 1024)
    before = torch.get_num_threads()
    ys, ran = [], []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            regions = cpu._cpu.parallel_regions()
            ys.append(normkit.layer_norm(x, 1024))
            ran.append(cpu._cpu.parallel_regions() - regions)
    finally:
        torch.set_num_threads(before)
    assert ran[0] == 0
    if cpu._cpu.openmp():
        assert ran[1] == 1
    assert torch.equal(ys[0], ys[1])


def test_bits_do_not_depend_on_the_path_or_the_build():
    """Every instruction-set path gives the same bits (the golden corpus checks each path case
    by case: test_golden.py); forced by NORMKIT_CPU_ISA in a fresh process as well.  The reason
    they cannot differ is checked too: the kernels were compiled with -ffp-contract=off and no
    fast-math flag, so the compiler may only make changes that keep every bit."""
    flags = cpu._cpu.build_flags.split()
    assert "-ffp-contract=off" in flags
    assert not any(f in flags for f in ("-ffast-math", "-Ofast", "-funsafe-math-optimizations",
                                        "-fassociative-math", "-ffp-contract=fast"))
    code = """
        import hashlib, torch, normkit
        from normkit.kernels import cpu
        torch.manual_seed(0)
        out = [cpu.isa()]
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            for shape in ((3, 33), (8, 4096), (301, 257)):
                n = shape[-1]
                x = torch.randn(shape).to(dt).requires_grad_()
                w = torch.randn(n).to(dt).requires_grad_()
                b = torch.randn(n).to(dt).requires_grad_()
                y = normkit.layer_norm(x, n, w, b)
                g = torch.autograd.grad(y, (x, w, b), torch.randn(shape).to(dt))
                for t in (y, *g):
                    out.append(hashlib.sha1(t.detach().view(torch.uint8).numpy()).hexdigest())
        print(" ".join(out))
    """
    runs = [run_python(code, {"NORMKIT_CPU_ISA": isa}).split() for isa in cpu.available_isas()]
    assert [r[0] for r in runs] == cpu.available_isas()
    assert all(r[1:] == runs[0][1:] for r in runs)


def test_an_unknown_path_warns_and_keeps_the_best():
    out = run_python("""
        import warnings
        warnings.simplefilter("always")
        import torch, normkit
        from normkit.kernels import cpu
        print(cpu.isa())
    """, {"NORMKIT_CPU_ISA": "avx9000"})
    assert out.strip() == cpu.available_isas()[0]
    import pytest as _pytest

    with _pytest.raises(ValueError, match="not available here"):
        cpu.set_isa("avx9000")


def _fma32(a, b, c):
    """a·b + c rounded once to float32, element-wise (IEEE fusedMultiplyAdd; numpy has none).
    a·b is exact in float64; the float64 sum s and its error e (Knuth's TwoSum) hold a·b + c
    exactly; rounding that to odd in float64 (s, or its neighbour towards e where s is even and
    e ≠ 0) and then to nearest float32 rounds once, as 53 ≥ 24 + 2 bits allow."""
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    even = (s.view(np.int64) & 1) == 0
    odd = np.where((e != 0) & even, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return odd.astype(np.float32)


def test_fma32_rounds_once():
    """The emulation above against cases where rounding twice (float64, then float32) errs:
    a·b + c just past a float32 tie, and plain random operands against exact rationals."""
    rng = np.random.default_rng(5)
    a, b, c = (rng.standard_normal(2000).astype(np.float32) for _ in range(3))
    # ties: a·b is a float32 midpoint, c moves it by less than float64 resolves (2⁻⁶⁰)
    a[:3], b[:3] = np.float32(1 + 2**-12), np.float32(1 + 2**-12)
    c[:3] = np.float32(2**-60), np.float32(-(2**-60)), np.float32(0)
    assert np.array_equal(_fma32(a, b, c), exact_fma(a, b, c))


def _ordered_sum(v: np.ndarray, q: np.ndarray | None = None) -> np.float32:
    """The kernels' documented summation order (kernels/csrc/rows.h: row_sums), spelled out
    in numpy float32, whose element-wise operations round exactly as the kernels' do: 16-lane
    vectors in blocks of 1024 elements, vector k of a block into accumulator k % 4, a block's
    accumulators combined as (A0 + A1) + (A2 + A3) and added to the running vector, the blocks
    in order, the lanes by a pairwise tree (lane k + lane k+8, then k+4, ...), then the tail one
    element at a time.  With q, the sum of v·q, each product fused into its addition (an FMA
    into the accumulator, as the kernels' second row sum)."""
    n = v.size

    def add(acc, j, k):
        if q is None:
            return acc + v[j:k]
        return _fma32(v[j:k], q[j:k], acc)

    nv = n - n % 16
    total = np.zeros(16, np.float32)
    for jb in range(0, nv, 1024):
        acc = [np.zeros(16, np.float32) for _ in range(4)]
        for k, j in enumerate(range(jb, min(jb + 1024, nv), 16)):
            acc[k % 4] = add(acc[k % 4], j, j + 16)
        total = total + ((acc[0] + acc[1]) + (acc[2] + acc[3]))
    while total.size > 1:
        half = total.size // 2
        total = total[:half] + total[half:]
    s = total[:1]
    for j in range(nv, n):
        s = add(s, j, j + 1)
    return s[0]


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_statistics_follow_the_documented_order_exactly(rms):
    """The forward's bits — its saved statistics and y — are those of the written-down
    algorithm: the order of every row sum is part of the contract (the same on every machine and
    compiler), not a choice LLVM makes.  N spans two reduction blocks, whole vectors and a
    5-element tail; the last block ends in three lone vectors (accumulators 0-2); rows far from
    zero and heavy-tailed rows, where a changed order shows."""
    n = 2 * 1024 + 7 * 16 + 5
    f32 = np.float32
    heavy = torch.randn(4, n) * torch.exp(2 * torch.randn(4, n))
    # the first 16 elements far from the rest: the shift falls back to a second pass
    lead = torch.randn(2, n)
    lead[:, :16] += 50
    x = torch.cat([torch.randn(4, n) * 3 + 1e3, heavy, lead])
    w, b = torch.randn(n), torch.randn(n)
    eps = 1e-6 if rms else 1e-5
    xs, ws, bs = x.numpy(), w.numpy(), b.numpy()
    want_y, want_stats = np.empty_like(xs), np.zeros((x.shape[0], 3), np.float32)
    fell_back = set()
    for i, row in enumerate(xs):
        if rms:
            rstd = f32(1) / np.sqrt(_ordered_sum(row, row) / f32(n) + f32(eps))
            want_y[i] = row * rstd * ws
            want_stats[i, 2] = rstd
        else:
            # the shift: the first 16 elements' mean (their sum by the lanes' tree), and the
            # row's moments about it; about their own mean where that mean is far (dm² > var)
            m1 = _ordered_sum(row[:16]) / f32(16)
            d = row - m1
            dm = _ordered_sum(d) / f32(n)
            var = _ordered_sum(d, d) / f32(n) - dm * dm
            if dm * dm > var:
                fell_back.add(i)
                m1 = m1 + dm
                d = row - m1
                dm = _ordered_sum(d) / f32(n)
                var = _ordered_sum(d, d) / f32(n) - dm * dm
            rstd = f32(1) / np.sqrt(max(var, f32(0)) + f32(eps))
            want_y[i] = _fma32((d - dm) * rstd, ws, bs)  # x̂·γ + β rounded once
            want_stats[i] = (m1, dm, rstd)
    y, _, stats = cpu.forward(x, w, None if rms else b, None, eps, rms, False, "torch", None,
                              need_stats=True)
    assert rms or fell_back >= {8, 9}  # the rows that lead with outliers took the second pass
    assert torch.equal(bits(stats), bits(torch.from_numpy(want_stats)))
    assert torch.equal(bits(y), bits(torch.from_numpy(want_y)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [5, 33, 100, 771, 4096])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "add"])
def test_streamed_outputs_have_the_same_bits(dtype, n, rms, residual):
    """Large outputs (y, dx; fresh or a caller's ``out=``) are written with streaming stores
    after a scalar head that aligns each row; with every output streamed (threshold 0) — odd N,
    so rows start at every alignment — forward and backward give the plain stores' bits,
    serial and parallel.  Streamed, the backward goes row by row; plain, rows of N ≤ 512 go in
    groups, column by column (N = 100: multi-vector columns, a single vector and a scalar
    tail); float32 rows of N = 4096 go four at a time, streamed where every row starts alike.
    """
    def run():
        torch.manual_seed(1)
        x = torch.randn(131, n).to(dtype).requires_grad_()  # 8 row blocks: both drivers
        r = torch.randn(131, n).to(dtype).requires_grad_() if residual else None
        w = torch.randn(n).to(dtype).requires_grad_()
        b = None if rms else torch.randn(n).to(dtype).requires_grad_()
        y, h = _both(x, w, b, r, rms)
        leaves = [t for t in (x, r, w, b) if t is not None]
        grads = torch.autograd.grad(y, leaves, torch.randn_like(y))
        with torch.no_grad():
            y_inf = _both(x, w, b, r, rms)[0]
            y_out = torch.empty_like(y_inf)  # a caller's buffer is streamed too
            if rms:
                normkit.rms_norm(x, n, w, 1e-6, residual=r, out=y_out)
            else:
                normkit.layer_norm(x, n, w, b, residual=r, out=y_out)
        return [y, h, y_inf, y_out, *grads]

    plain = run()
    with stream_from(0):
        streamed = run()
        with parallel_from(1 << 8):
            parallel = run()
    for a, s_, p in zip(plain, streamed, parallel, strict=True):
        assert torch.equal(bits(a.detach()), bits(s_.detach()))
        assert torch.equal(bits(a.detach()), bits(p.detach()))


def test_stream_threshold():
    """Outputs are streamed from 3/4 of the last-level cache on (NORMKIT_STREAM_MIN_MB
    overrides), not below."""
    code = "from normkit.kernels import cpu; print(cpu._cpu.stream_min_bytes())"
    env = {k: v for k, v in os.environ.items() if k != "NORMKIT_STREAM_MIN_MB"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert int(out.stdout) >= 1 << 20
    assert int(run_python(code, {"NORMKIT_STREAM_MIN_MB": "2"})) == 2 << 20
