"""The functional API's contract: validation, dtype rules, casting modes, autocast, backends,
empty input, torch.compile, lean import and cold start."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import eager_calls, max_err, run_python

import normkit
from normkit.kernels import reference

# ------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: normkit.layer_norm([1.0, 2.0], 2), TypeError, "x must be a torch.Tensor"),
        (lambda: normkit.layer_norm(torch.ones(2, 3, dtype=torch.int64), 3),
         NotImplementedError, "x must be a floating-point"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 4), RuntimeError, "normalized_shape"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), (2, 3, 1)), RuntimeError,
         "normalized_shape"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), ()), RuntimeError, "normalized_shape"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), [3.0]), TypeError, "normalized_shape"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), ["3"]), TypeError, "normalized_shape"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), (True,)), TypeError, "normalized_shape"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), "3"), TypeError, "normalized_shape"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, torch.ones(4)), RuntimeError,
         r"weight must have shape \(3,\)"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, None, torch.ones(2)), RuntimeError,
         "bias must have shape"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, torch.ones(3, dtype=torch.int32)),
         RuntimeError, "weight must be a floating-point"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, torch.ones(3, device="meta")),
         RuntimeError, "weight is on meta but x is on cpu"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, eps=-1.0), ValueError,
         "eps must be finite and >= 0"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, eps=float("nan")), ValueError, "eps"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, eps="1e-5"), TypeError,
         "eps must be a float"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, eps=None), TypeError, "eps"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, residual=torch.ones(3, 3)),
         RuntimeError, "residual must match x"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3,
                                    residual=torch.ones(2, 3, dtype=torch.float64)),
         RuntimeError, "residual must match x"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, eps=torch.tensor(1e-5)), TypeError,
         "eps must be a float"),
        (lambda: normkit.layer_norm(torch.ones(2, 3), 3, eps=True), TypeError,
         "eps must be a float"),
        (lambda: normkit.rms_norm(torch.ones(2, 3), 3, casting="fp32"), ValueError,
         "casting must be one of"),
        (lambda: normkit.rms_norm(torch.ones(2, 3), 3, casting="llama",
                                  out_dtype=torch.float16), ValueError, "out_dtype"),
        (lambda: normkit.rms_norm(torch.ones(2, 3), 3, out_dtype=torch.int32), TypeError,
         "out_dtype"),
        (lambda: normkit.use_backend("gpu"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# (x, normalized_shape, weight, bias): calls torch refuses, and the type it raises
TORCH_REFUSES = {
    "shape": (torch.ones(2, 3), (4,), None, None),
    "ndims": (torch.ones(2, 3), (2, 2, 3), None, None),
    "empty_shape": (torch.ones(2, 3), (), None, None),
    "weight_shape": (torch.ones(2, 3), (3,), torch.ones(4), None),
    "bias_shape": (torch.ones(2, 3), (3,), torch.ones(3), torch.ones(2)),
    "weight_device": (torch.ones(2, 3), (3,), torch.ones(3, device="meta"), None),
    "x_device": (torch.ones(2, 3, device="meta"), (3,), torch.ones(3), None),
    "x_dtype": (torch.ones(2, 3, dtype=torch.int64), (3,), None, None),
    "weight_dtype": (torch.ones(2, 3), (3,), torch.ones(3, dtype=torch.int32), None),
    "x_sparse": (torch.ones(2, 3).to_sparse(), (3,), None, None),
}


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("case", list(TORCH_REFUSES))
def test_errors_have_torchs_types(case, rms):
    """A torch user's ``except`` catches normkit's error where it catches torch's (shape and
    device mismatches are RuntimeError in torch; normkit raised ValueError), and normkit's own
    earlier callers still catch the ValueError / TypeError they caught before."""
    x, ns, w, b = TORCH_REFUSES[case]
    if rms and b is not None:
        pytest.skip("RMSNorm has no bias")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            F.rms_norm(x, ns, w) if rms else F.layer_norm(x, ns, w, b)
    except Exception as e:  # noqa: BLE001 - the type is what the test compares
        theirs = e
    else:
        pytest.skip("torch takes this call (an integer γ for rms_norm); normkit refuses it")
    with pytest.raises(Exception) as ours:
        if rms:
            normkit.rms_norm(x, ns, w)
        else:
            normkit.layer_norm(x, ns, w, b)
    assert isinstance(ours.value, type(theirs)), (ours.value, theirs)
    name = case.split("_")[0]
    assert (name if name in ("weight", "bias", "x") else "normalized_shape") in str(ours.value)


def test_errors_keep_the_types_normkit_raised_before():
    with pytest.raises(ValueError, match="normalized_shape"):
        normkit.layer_norm(torch.ones(2, 3), 4)
    with pytest.raises(ValueError, match="weight must have shape"):
        normkit.layer_norm(torch.ones(2, 3), 3, torch.ones(4))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        normkit.layer_norm(torch.ones(2, 3, dtype=torch.int64), 3)


def test_numpy_scalars_are_taken_as_torch_takes_them():
    """``normalized_shape=np.int64(8)`` and ``eps=np.float32(1e-5)``: torch takes anything with
    ``__index__`` for a dim and any real number for eps."""
    np = pytest.importorskip("numpy")
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    want = F.layer_norm(x, (8,), w, b, float(np.float32(1e-5)))
    for ns in (np.int64(8), (np.int64(8),), [np.int32(8)], torch.tensor(8), torch.Size([8])):
        torch.testing.assert_close(normkit.layer_norm(x, ns, w, b, np.float32(1e-5)), want)
    torch.testing.assert_close(normkit.rms_norm(x, np.int64(8), w, np.float32(1e-5)),
                               F.rms_norm(x, (8,), w, float(np.float32(1e-5))))
    assert torch.equal(normkit.rms_norm(x, 8, w, np.float64(1e-5)), normkit.rms_norm(x, 8, w, 1e-5))
    assert torch.equal(normkit.layer_norm(x, 8, eps=np.int64(1)), normkit.layer_norm(x, 8, eps=1.0))


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_meta_tensors_give_meta_outputs_like_torch(rms, backend):
    """Shape propagation, as torch's layer_norm / rms_norm on the meta device: right shape and
    dtype, every option, gradients too, and no data touched."""
    x = torch.randn(2, 5, 8, dtype=torch.bfloat16, device="meta", requires_grad=True)
    w = torch.randn(8, device="meta", requires_grad=True)
    b = None if rms else torch.randn(8, device="meta")
    r = torch.randn(2, 5, 8, dtype=torch.bfloat16, device="meta")
    op = normkit.rms_norm if rms else normkit.layer_norm
    args = (x, 8, w) if rms else (x, 8, w, b)
    with normkit.use_backend(backend):
        y = op(*args)
        assert (y.device.type, y.shape, y.dtype) == ("meta", x.shape, torch.bfloat16)
        torch_y = (F.rms_norm(x, (8,), w.bfloat16()) if rms
                   else F.layer_norm(x, (8,), w.bfloat16(), b.bfloat16()))
        assert (y.shape, y.dtype) == (torch_y.shape, torch_y.dtype)
        y, h = op(*args, residual=r, return_residual=True, casting="llama")
        assert (y.shape, y.dtype, h.shape, h.dtype) == (x.shape, torch.float32, x.shape,
                                                        torch.bfloat16)
        y = op(*args, out_dtype=torch.float32, zero_centered_gamma=True)
        assert y.dtype == torch.float32 and y.is_meta
        dx, dw = torch.autograd.grad(op(*args).sum(), (x, w))
        assert dx.is_meta and dx.shape == x.shape and dw.shape == w.shape
        with torch.no_grad():
            out = torch.empty(2, 5, 8, dtype=torch.bfloat16, device="meta")
            assert op(*args, out=out) is out


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_nested_and_sparse_tensors_are_refused_by_name(rms):
    """Not an internal error from deep inside: the argument, what it is, and what to do."""
    op = normkit.rms_norm if rms else normkit.layer_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors warn that they are a prototype
        jagged = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)],
                                            layout=torch.jagged)
        strided = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])
        csr = torch.randn(3, 8).to_sparse_csr()
    cases = [
        (lambda: op(jagged, 8), "x must be a dense.*nested.*values()"),
        (lambda: op(strided, 8), "x must be a dense.*nested"),
        (lambda: op(torch.randn(3, 8).to_sparse(), 8), "x must be a dense.*sparse_coo"),
        (lambda: op(csr, 8), "x must be a dense.*sparse_csr"),
        (lambda: op(torch.randn(3, 8), 8, torch.ones(8).to_sparse()),
         "weight must be a dense.*sparse_coo"),
        (lambda: op(torch.randn(3, 8), 8, residual=torch.randn(3, 8).to_sparse()),
         "residual must be a dense.*sparse_coo"),
    ]
    for call, match in cases:
        with pytest.raises(NotImplementedError, match=match):
            call()


def test_cpu_backend_refuses_what_it_cannot_compute():
    x = torch.randn(2, 8)
    w = torch.randn(8, dtype=torch.float64)  # float64 γ with float32 x: the reference's job
    with normkit.use_backend("cpu"), pytest.raises(ValueError, match="backend 'cpu' cannot"):
        normkit.layer_norm(x, 8, w)
    y = normkit.layer_norm(x, 8, w)  # auto falls back
    assert y.dtype == torch.float32


# ------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------


def test_use_backend_as_context_and_global():
    assert normkit.get_backend() == "auto"
    with normkit.use_backend("reference"):
        assert normkit.get_backend() == "reference"
        with normkit.use_backend("cpu"):
            assert normkit.get_backend() == "cpu"
        assert normkit.get_backend() == "reference"
    assert normkit.get_backend() == "auto"
    try:
        normkit.use_backend("reference")
        assert normkit.get_backend() == "reference"
    finally:
        normkit.use_backend("auto")
    assert "cpu" in normkit.available_backends()


def _in_threads(*bodies):
    """Runs each body in a thread of its own; re-raises the first failure (an assert in a thread
    would otherwise only print)."""
    errors = []

    def guarded(body):
        try:
            body()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def _reference_calls(monkeypatch):
    """Thread ids of the calls that ran on the reference backend."""
    from normkit import functional

    calls = []
    real = functional.reference.norm_forward
    monkeypatch.setattr(functional.reference, "norm_forward",
                        lambda *a: calls.append(threading.get_ident()) or real(*a))
    return calls


def test_use_backend_blocks_are_per_thread():
    """The issue's interleaving: A enters "reference", B enters "cpu", A leaves, B leaves.  Each
    block held for its own thread only, and the process was left on "reference" for good."""
    step = threading.Barrier(2)
    seen = {}

    def a():
        with normkit.use_backend("reference"):
            step.wait()  # 1: A is in its block
            step.wait()  # 2: B is in its block
            seen["a in block"] = normkit.get_backend()
        step.wait()  # 3: A has left
        step.wait()  # 4: B looked
        seen["a after"] = normkit.get_backend()

    def b():
        step.wait()  # 1
        seen["b before"] = normkit.get_backend()
        with normkit.use_backend("cpu"):
            step.wait()  # 2
            seen["b in block"] = normkit.get_backend()
            step.wait()  # 3
            seen["b after a left"] = normkit.get_backend()
            step.wait()  # 4

    _in_threads(a, b)
    assert seen == {"b before": "auto", "a in block": "reference", "b in block": "cpu",
                    "b after a left": "cpu", "a after": "auto"}
    assert normkit.get_backend() == "auto"
    from normkit import _dispatch as functional
    assert functional._fast is not None  # the fast path is back for everyone


def test_a_block_in_one_thread_does_not_move_another(monkeypatch):
    """While A computes inside a "reference" block, B (no block) keeps computing on the CPU
    kernels, and the other way round."""
    calls = _reference_calls(monkeypatch)
    step = threading.Barrier(2)
    x = torch.randn(3, 16)
    idents = {}

    def a():
        idents["a"] = threading.get_ident()
        with normkit.use_backend("reference"):
            step.wait()
            normkit.layer_norm(x, 16)
            step.wait()

    def b():
        idents["b"] = threading.get_ident()
        step.wait()
        normkit.layer_norm(x, 16)
        normkit.rms_norm(x, 16)
        step.wait()

    _in_threads(a, b)
    assert calls == [idents["a"]]


def test_a_plain_call_sets_the_process_wide_backend():
    """``normkit.use_backend(name)`` outside a block: every thread without a block of its own
    sees it; a block in a thread wins over it there and ends with the thread's own value."""
    step = threading.Barrier(2)
    seen = {}

    def worker():
        step.wait()  # 1: main set "reference" for the process
        seen["no block"] = normkit.get_backend()
        with normkit.use_backend("cpu"):
            step.wait()  # 2
            seen["in block"] = normkit.get_backend()
            step.wait()  # 3: main set "auto" again
            seen["in block after main"] = normkit.get_backend()
        seen["after block"] = normkit.get_backend()

    def main():
        normkit.use_backend("reference")
        step.wait()  # 1
        step.wait()  # 2
        seen["main"] = normkit.get_backend()
        normkit.use_backend("auto")
        step.wait()  # 3

    try:
        _in_threads(worker, main)
    finally:
        normkit.use_backend("auto")
    assert seen == {"no block": "reference", "in block": "cpu", "main": "reference",
                    "in block after main": "cpu", "after block": "auto"}


def test_use_backend_objects_made_in_two_threads_before_either_block_starts():
    """``use_backend(name)`` sets the process-wide value at once (it cannot know a ``with``
    follows); entering withdraws that, whatever other threads did in between."""
    made = threading.Barrier(2)
    step = threading.Barrier(2)

    def body(name):
        def run():
            ctx = normkit.use_backend(name)
            made.wait()
            with ctx:
                step.wait()
                assert normkit.get_backend() == name
                step.wait()
        return run

    _in_threads(body("reference"), body("cpu"))
    assert normkit.get_backend() == "auto"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_backends_agree(backend):
    x = torch.randn(20, 100)
    w, b = torch.randn(100), torch.randn(100)
    with normkit.use_backend(backend):
        y = normkit.layer_norm(x, 100, w, b)
    assert max_err(y, F.layer_norm(x.double(), (100,), w.double(), b.double())) < 1e-5


def test_auto_uses_cpu_kernels_for_cpu_tensors(monkeypatch):
    from normkit.kernels import cpu

    calls = []
    real_forward = cpu.forward
    monkeypatch.setattr(cpu, "forward", lambda *a: calls.append(1) or real_forward(*a))
    eager = eager_calls()
    normkit.layer_norm(torch.randn(1, 8), 8)
    normkit.layer_norm(torch.randn(1000, 8), 8)
    normkit.rms_norm(torch.randn(1, 8), 8, torch.randn(8), residual=torch.randn(1, 8))
    normkit.layer_norm(torch.randn(8, 1000).t(), 8)  # not contiguous: the general path
    # chosen for M=1 and M=1000 alike: never by the number of rows
    assert len(calls) + eager_calls() - eager == 4 and len(calls) == 1


def test_grad_and_no_grad_paths_give_same_bits():
    x = torch.randn(5, 77)
    w = torch.randn(77, requires_grad=True)
    with torch.no_grad():
        a = normkit.layer_norm(x, 77, w)
    b = normkit.layer_norm(x, 77, w)
    assert b.requires_grad and torch.equal(a, b)
    r = torch.randn(5, 77)
    with torch.no_grad():  # the inference fast path with a residual
        ya, ha = normkit.rms_norm(x, 77, w, residual=r, return_residual=True)
    yb, hb = normkit.rms_norm(x, 77, w, residual=r, return_residual=True)
    assert torch.equal(ya, yb) and torch.equal(ha, hb) and torch.equal(ha, x + r)
    with torch.no_grad():
        assert torch.equal(normkit.rms_norm(x, 77, w, residual=r), ya)


# ------------------------------------------------------------------------------------------
# Empty input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 16), (3, 0, 16)])
def test_empty_input(shape, monkeypatch):
    from normkit.kernels import cpu

    monkeypatch.setattr(cpu, "forward", lambda *a, **k: pytest.fail("launched a kernel"))
    eager = eager_calls()
    x = torch.randn(shape)
    r = torch.randn(shape)
    y, h = normkit.layer_norm(x, 16, torch.ones(16), torch.zeros(16), residual=r,
                              return_residual=True)
    assert y.shape == shape and h.shape == shape and y.dtype == x.dtype
    y = normkit.rms_norm(x.to(torch.bfloat16), 16)
    assert y.shape == shape and y.dtype == torch.bfloat16
    assert eager_calls() == eager


# ------------------------------------------------------------------------------------------
# Output dtype rules and casting modes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize(
    "xd,wd,casting,expected",
    [
        (torch.bfloat16, torch.float32, "torch", torch.bfloat16),
        (torch.float32, torch.bfloat16, "torch", torch.float32),
        (torch.float16, torch.float32, "gemma", torch.float16),
        (torch.bfloat16, torch.bfloat16, "llama", torch.bfloat16),
        (torch.bfloat16, torch.float32, "llama", torch.float32),
        (torch.bfloat16, torch.float32, "t5", torch.float32),
        (torch.float32, torch.bfloat16, "t5", torch.bfloat16),
        (torch.float16, torch.float16, "t5", torch.float16),
    ],
)
def test_output_dtype_rule(backend, xd, wd, casting, expected):
    x = torch.randn(3, 40).to(xd)
    w = torch.randn(40).to(wd)
    with normkit.use_backend(backend):
        assert normkit.rms_norm(x, 40, w, 1e-6, casting=casting).dtype == expected
        if casting in ("torch", "gemma"):
            assert normkit.layer_norm(x, 40, w, casting=casting).dtype == expected
            y = normkit.layer_norm(x, 40, w, casting=casting, out_dtype=torch.float32)
            assert y.dtype == torch.float32


def test_out_dtype_float32_keeps_precision():
    x = torch.randn(4, 64).to(torch.bfloat16)
    y = normkit.layer_norm(x, 64, out_dtype=torch.float32)
    truth = F.layer_norm(x.double(), (64,))
    assert y.dtype == torch.float32 and max_err(y, truth) < 1e-5


def _hf_llama(x, w, eps):
    """Hugging Face LlamaRMSNorm.forward, verbatim semantics."""
    h = x.to(torch.float32)
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return w * h.to(x.dtype)


def _hf_gemma(x, w, eps):
    out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + w.float())).type_as(x)


def _hf_t5(x, w, eps):
    var = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(var + eps)
    if w.dtype in (torch.float16, torch.bfloat16):
        h = h.to(w.dtype)
    return w * h


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("xd,wd", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                   (torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
@pytest.mark.parametrize("casting,hf,zc", [("llama", _hf_llama, False), ("gemma", _hf_gemma, True),
                                           ("t5", _hf_t5, False)])
def test_casting_modes_match_hugging_face(backend, xd, wd, casting, hf, zc):
    x = (torch.randn(16, 96) * 2).to(xd)
    w = (torch.randn(96) * (0.1 if zc else 1)).to(wd)
    with normkit.use_backend(backend):
        y = normkit.rms_norm(x, 96, w, 1e-6, casting=casting, zero_centered_gamma=zc)
    want = hf(x, w, 1e-6)
    assert y.dtype == want.dtype
    # The rounding happens at the same place.  The float32 statistics differ by a few float32
    # ulps (summation order, rsqrt vs 1/sqrt), which can flip a rounding of a 16-bit output: at
    # most one ulp of a 16-bit output dtype, a few ulps of a float32 one.
    ulps = 1.01 if want.dtype in (torch.float16, torch.bfloat16) else 8
    ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(1e-3)
    assert ((y.float() - want.float()).abs() <= ulp * ulps).all()
    if ulps < 2:  # 16-bit outputs: almost always the very same bits
        assert (y == want).float().mean() > 0.95


def test_weight_dtype_differs_from_input():
    x = torch.randn(8, 50).to(torch.bfloat16)
    w = torch.randn(50)  # fp32 γ with bf16 activations
    b = torch.randn(50).to(torch.bfloat16)  # and yet another dtype for β
    y = normkit.layer_norm(x, 50, w, b)
    truth = F.layer_norm(x.double(), (50,), w.double(), b.double())
    assert y.dtype == torch.bfloat16 and max_err(y, truth) < 0.02


# ------------------------------------------------------------------------------------------
# Autocast: as torch's own layer_norm / rms_norm
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("xd", [torch.float32, torch.bfloat16])
def test_cpu_autocast_behaves_like_torch(xd):
    x = torch.randn(4, 32).to(xd)
    w = torch.randn(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert normkit.layer_norm(x, 32, w).dtype == F.layer_norm(x, (32,), w).dtype
        assert normkit.rms_norm(x, 32, w).dtype == F.rms_norm(x, (32,), w).dtype
        lin = torch.nn.Linear(32, 32)
        h = lin(x.float())  # autocast makes this bf16
        assert normkit.layer_norm(h, 32, w).dtype == F.layer_norm(h, (32,), w).dtype


# ------------------------------------------------------------------------------------------
# torch.compile: no graph breaks, same results
# ------------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(d))
        self.b1 = torch.nn.Parameter(torch.randn(d))
        self.w2 = torch.nn.Parameter(torch.randn(d) * 0.1)
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x, r):
        y, h = normkit.layer_norm(x, x.shape[-1], self.w1, self.b1, residual=r,
                                  return_residual=True)
        z = normkit.rms_norm(self.lin(y), x.shape[-1], self.w2, 1e-6, zero_centered_gamma=True)
        return z + h


@pytest.mark.slow
def test_torch_compile_as_the_first_call_of_a_process(tmp_path):
    """A fresh process whose first normkit call is a compiled one: the kernels load when the
    compiled graph runs, not inside dynamo's trace (which cannot trace their set-up)."""
    out = run_python("""
        import torch, normkit
        m = normkit.nn.LayerNorm(16)
        x = torch.randn(4, 16, requires_grad=True)
        y = torch.compile(m, fullgraph=True)(x)
        y.sum().backward()
        ref = torch.nn.functional.layer_norm(x, (16,), m.weight, m.bias)
        print(torch.allclose(y, ref, atol=1e-6), x.grad is not None)
        """, env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert out.split() == ["True", "True"]


@pytest.mark.slow
def test_torch_compile_fullgraph_same_results():
    torch._dynamo.reset()
    m = _Block(48)
    x = torch.randn(2, 5, 48, requires_grad=True)
    r = torch.randn(2, 5, 48, requires_grad=True)
    eager = m(x, r)
    compiled = torch.compile(m, fullgraph=True)(x, r)  # fullgraph: a graph break is an error
    assert torch.equal(eager, compiled)
    g_eager = torch.autograd.grad(eager.sum(), [x, r, m.w1, m.b1, m.w2])
    g_comp = torch.autograd.grad(compiled.sum(), [x, r, m.w1, m.b1, m.w2])
    for a, b in zip(g_eager, g_comp, strict=True):
        assert torch.equal(a, b)


def test_custom_ops_are_registered():
    import normkit.functional  # noqa: F401  (``import normkit`` is lazy: this registers the ops)
    from normkit._ops import BWD, FWD

    assert (FWD, BWD) == ("normkit::norm_fwd_v3", "normkit::norm_bwd_v3")
    assert hasattr(torch.ops.normkit, "norm_fwd_v3") and hasattr(torch.ops.normkit, "norm_bwd_v3")
    x = torch.randn(3, 8)
    y, h, stats = torch.ops.normkit.norm_fwd_v3(x, None, None, None, 1e-5, False, False, "torch",
                                                None)
    assert torch.equal(y, normkit.layer_norm(x, 8)) and h.numel() == 0 and stats.shape == (3, 3)
    torch.library.opcheck(torch.ops.normkit.norm_fwd_v3.default,
                          (x, torch.randn(8), torch.randn(8), torch.randn(3, 8), 1e-5, False,
                           False, "torch", None))


def test_custom_op_on_the_reference_backend_matches_its_fake():
    """The op's forward on the reference backend writes the (M, 3) statistics its fake says
    (compiled code asserts the shapes: a training call under torch.compile failed with
    "wrong number of dimensions1" when it returned none), and its backward is the reference's."""
    x = torch.randn(3, 8)
    args = (x, torch.randn(8), torch.randn(8), torch.randn(3, 8), 1e-5, False, False, "torch",
            None)
    with normkit.use_backend("reference"):
        torch.library.opcheck(torch.ops.normkit.norm_fwd_v3.default, args)
        _, _, stats = torch.ops.normkit.norm_fwd_v3(*args)
    assert stats.shape == (3, 3) and torch.isfinite(stats).all()


# ------------------------------------------------------------------------------------------
# Import cost
# ------------------------------------------------------------------------------------------


def test_import_is_lean():
    out = run_python(
        """
        import sys, torch
        import normkit, normkit.nn
        heavy = ["triton", "transformers", "onnx", "onnxruntime", "matplotlib",
                 "prometheus_client", "tensorboard"]
        print([m for m in heavy if m in sys.modules], torch.cuda.is_initialized())
        """
    )
    assert out.strip() == "[] False"


def test_the_first_call_compiles_nothing(tmp_path):
    """The kernels were compiled when normkit was installed: the first call of each op, dtype
    and pass in a fresh process starts no compiler or other process, writes no cache, imports
    no JIT, and takes milliseconds (benchmarks/cold_start.py measures it against the warm call;
    the numba kernels this replaced compiled for 72-177 s per dtype here)."""
    code = """
        import os, subprocess, sys, time
        def refuse(*a, **k):
            raise AssertionError(f"normkit started a process: {a!r}")
        subprocess.Popen = refuse
        os.fork = os.posix_spawn = os.system = refuse
        import torch, normkit
        torch.manual_seed(0)
        t = time.perf_counter()
        for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for rms in (False, True):
                x = torch.randn(64, 768).to(dt).requires_grad_()
                r = torch.randn(64, 768).to(dt)
                w = torch.randn(768).to(dt).requires_grad_()
                f = normkit.rms_norm if rms else normkit.layer_norm
                y, h = f(x, 768, w, residual=r, return_residual=True)
                torch.autograd.grad(y, (x, w), torch.ones_like(y))
        print(time.perf_counter() - t, [m for m in ("numba", "llvmlite") if m in sys.modules])
    """
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    seconds, jits = run_python(code, env).split(maxsplit=1)
    assert jits.strip() == "[]"
    assert list(home.rglob("*")) == [], "the first calls wrote files"
    assert float(seconds) < 5.0, seconds  # 16 first calls; warm, each is micro- to milliseconds


def test_reference_output_dtype_function():
    assert reference.output_dtype(torch.bfloat16, torch.float32, "torch", None) == torch.bfloat16
    assert reference.output_dtype(torch.bfloat16, torch.float32, "llama", None) == torch.float32
    assert reference.output_dtype(torch.bfloat16, None, "t5", None) == torch.float32
