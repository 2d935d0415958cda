"""normkit.nn: drop-in LayerNorm / RMSNorm against torch's own modules."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from helpers import eager_calls

import normkit
from normkit.nn import FusedAddLayerNorm, FusedAddRMSNorm, LayerNorm, RMSNorm

# Forward tolerances, normkit vs torch in the same dtype (assert_close: |a-b| <= atol + rtol*|b|).
# Both compute in float32 and round once to the output dtype, but sum in different orders
# (torch: Welford / one-pass; normkit: shifted two-pass), so the float32 results differ by a few
# float32 ulps and, in 16-bit, an output sitting on a rounding boundary may land one ulp apart.
FWD_TOL = {
    # a few float32 ulps of outputs up to ~10 (|x̂·γ| + |β|): 1e-5 absolute, 1e-5 relative.
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # one bfloat16 ulp (8 significant bits: 2^-7 relative at worst); atol covers the float32
    # error of an output that cancels to ~0 (x̂·γ ≈ -β) before its final rounding.
    torch.bfloat16: dict(atol=1e-5, rtol=2**-7),
    # one float16 ulp (11 significant bits: 2^-10 relative at worst); atol as for bfloat16.
    torch.float16: dict(atol=1e-5, rtol=2**-10),
}
# Gradient tolerance, float32 only: dγ and dβ are sums over M rows, so their rounding error grows
# like √M float32 ulps of the O(1) terms; dx is a per-row sum of N terms.
GRAD_TOL = dict(atol=2e-5, rtol=1e-5)
DTYPES = list(FWD_TOL)

# (input shape, normalized_shape): single row, N=1, odd N, a 3-D input, multi-dim normalized_shape.
SHAPES = [
    ((1, 64), (64,)),
    ((5, 1), (1,)),
    ((7, 33), (33,)),
    ((2, 3, 129), (129,)),
    ((3, 4, 6, 10), (6, 10)),
]
SHAPE_IDS = ["M1", "N1", "N33", "3d", "multidim"]

# (torch class, normkit class, constructor kwargs)
CONFIGS = [
    (torch.nn.LayerNorm, LayerNorm, {}),
    (torch.nn.LayerNorm, LayerNorm, {"bias": False}),
    (torch.nn.LayerNorm, LayerNorm, {"elementwise_affine": False}),
    (torch.nn.LayerNorm, LayerNorm, {"eps": 1e-3}),
    (torch.nn.RMSNorm, RMSNorm, {}),
    (torch.nn.RMSNorm, RMSNorm, {"eps": 1e-6}),
    (torch.nn.RMSNorm, RMSNorm, {"elementwise_affine": False}),
]
CONFIG_IDS = ["ln", "ln-nobias", "ln-noaffine", "ln-eps", "rms", "rms-eps", "rms-noaffine"]


def _pair(torch_cls, nk_cls, shape, kwargs, dtype=torch.float32):
    """A torch module with random γ/β and a normkit module loaded from its state_dict."""
    ref = torch_cls(shape, **kwargs, dtype=dtype)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "weight" else 0.0))
    mod = nk_cls(shape, **kwargs, dtype=dtype)
    mod.load_state_dict(ref.state_dict(), strict=True)
    return ref, mod


def _float64(ref, dtype):
    """A float64 copy of torch module ``ref``: the ground truth, with the eps ``ref`` uses on
    ``dtype`` input (RMSNorm's eps=None means finfo(x.dtype).eps)."""
    ref64 = copy.deepcopy(ref).double()
    if ref64.eps is None:
        ref64.eps = torch.finfo(dtype).eps
    return ref64


def _assert_close_to_exact_and_torch(got, exact, want, tol):
    """``got`` is within ``tol`` of the float64 answer ``exact`` (rounded to got's dtype), and
    within ``tol`` of torch's ``want`` beyond torch's own error.  torch's LayerNorm, e.g., computes
    x·rstd - mean·rstd: at N=1 it returns up to 4e-5 (bfloat16 forward) or 3e-5 (float32 dx)
    where the answer is exactly 0."""
    torch.testing.assert_close(got, exact.to(got.dtype), **tol)
    loose = dict(tol)
    loose["atol"] += (want.double() - exact).abs().max().item()
    torch.testing.assert_close(got, want, **loose)


# ----------------------------------------------------------------------------------------------
# Parameters and state dicts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("torch_cls", "nk_cls", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_parameters_and_state_dict_match_torch(torch_cls, nk_cls, kwargs):
    torch.manual_seed(0)
    ref, mod = _pair(torch_cls, nk_cls, (6, 10), kwargs)
    assert isinstance(mod, torch_cls)
    assert [n for n, _ in mod.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(mod.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        assert torch.equal(mod.state_dict()[key], value)
    # and back: normkit → torch, strict
    back = torch_cls((6, 10), **kwargs)
    back.load_state_dict(mod.state_dict(), strict=True)
    for key, value in mod.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert (mod.normalized_shape, mod.eps, mod.elementwise_affine) == (
        ref.normalized_shape, ref.eps, ref.elementwise_affine,
    )


def test_constructor_defaults_match_torch():
    assert LayerNorm(8).eps == torch.nn.LayerNorm(8).eps == 1e-5
    assert RMSNorm(8).eps is None and torch.nn.RMSNorm(8).eps is None
    ln = LayerNorm(8, device="meta", dtype=torch.bfloat16)
    assert ln.weight.is_meta and ln.weight.dtype == torch.bfloat16
    assert torch.equal(RMSNorm(8).weight, torch.ones(8))  # torch's reset_parameters, untouched


def test_load_state_dict_strict_rejects_missing_bias():
    mod = LayerNorm(8)
    with pytest.raises(RuntimeError, match="Missing key"):
        mod.load_state_dict(torch.nn.LayerNorm(8, bias=False).state_dict(), strict=True)


def test_options_are_class_defaults_and_shown_only_when_set():
    assert (LayerNorm.casting, LayerNorm.zero_centered_gamma) == ("torch", False)
    assert (RMSNorm.casting, RMSNorm.zero_centered_gamma) == ("torch", False)
    mod = RMSNorm(8, eps=1e-6)
    assert repr(mod) == "normkit.nn." + repr(torch.nn.RMSNorm(8, eps=1e-6))
    mod.casting, mod.zero_centered_gamma = "gemma", True
    assert "casting='gemma'" in repr(mod) and "zero_centered_gamma=True" in repr(mod)
    assert RMSNorm.casting == "torch"  # the instance attribute did not touch the class
    assert repr(LayerNorm(4)) == "normkit.nn." + repr(torch.nn.LayerNorm(4))


def test_a_converted_model_prints_which_norms_are_normkits():
    """torch's format, with the class's home in front: ``print(model)`` after
    ``normkit.convert`` shows what was replaced (before, it read exactly as torch's)."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.LayerNorm(16),
                                torch.nn.RMSNorm(16, eps=1e-6), torch.nn.BatchNorm1d(16))
    before = str(model)
    normkit.convert(model)
    after = str(model)
    # e.g. "(1): normkit.nn.LayerNorm((16,), eps=1e-05, elementwise_affine=True, bias=True)"
    assert f"(1): normkit.nn.{torch.nn.LayerNorm(16)!r}" in after
    assert f"(2): normkit.nn.{torch.nn.RMSNorm(16, eps=1e-6)!r}" in after
    assert after.replace("normkit.nn.", "") == before  # otherwise torch's print, unchanged
    assert repr(FusedAddRMSNorm(8, casting="llama")) == (
        f"normkit.nn.FusedAdd{torch.nn.RMSNorm(8)!r}"[:-1] + ", casting='llama')")

    class Mine(LayerNorm):  # a user's subclass is the user's: named as torch names it
        pass

    assert repr(Mine(4)) == "Mine" + repr(torch.nn.LayerNorm(4))[len("LayerNorm"):]


ALL_MODULES = [LayerNorm, RMSNorm, FusedAddLayerNorm, FusedAddRMSNorm]


def _run(mod, x, r):
    return mod(x, r)[0] if isinstance(mod, (FusedAddLayerNorm, FusedAddRMSNorm)) else mod(x)


@pytest.mark.parametrize("casting", ["torch", "gemma", "llama", "t5"])
@pytest.mark.parametrize("nk_cls", ALL_MODULES, ids=lambda c: c.__name__)
def test_every_functional_option_is_a_constructor_argument(nk_cls, casting):
    """casting and zero_centered_gamma, as in the functional API: the same bits as the
    functional call, kept in extra_repr, config not state (torch's state_dict keys) and
    carried by a state_dict round trip into a module built alike, by deepcopy and pickle."""
    torch.manual_seed(0)
    rms = nk_cls in (RMSNorm, FusedAddRMSNorm)
    mod = nk_cls(16, eps=1e-6, dtype=torch.bfloat16, casting=casting, zero_centered_gamma=True)
    assert (mod.casting, mod.zero_centered_gamma) == (casting, True)
    assert torch.equal(mod.weight, torch.zeros(16, dtype=torch.bfloat16))  # 1 + 0: identity
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    r = torch.randn(5, 16, dtype=torch.bfloat16)
    h = x + r if nk_cls in (FusedAddLayerNorm, FusedAddRMSNorm) else x
    if rms:
        want = normkit.rms_norm(h, 16, mod.weight, 1e-6, casting=casting, zero_centered_gamma=True)
    else:
        want = normkit.layer_norm(h, 16, mod.weight, mod.bias, 1e-6, casting=casting,
                                  zero_centered_gamma=True)
    with torch.no_grad():
        assert torch.equal(_run(mod, x, r), want)
    assert "zero_centered_gamma=True" in repr(mod)
    assert (f"casting={casting!r}" in repr(mod)) == (casting != "torch")
    torch_cls = torch.nn.RMSNorm if rms else torch.nn.LayerNorm
    assert list(mod.state_dict()) == list(torch_cls(16).state_dict())
    twin = nk_cls(16, eps=1e-6, dtype=torch.bfloat16, casting=casting, zero_centered_gamma=True)
    twin.load_state_dict(mod.state_dict(), strict=True)
    for other in (twin, copy.deepcopy(mod), pickle.loads(pickle.dumps(mod))):
        assert (other.casting, other.zero_centered_gamma) == (casting, True)
        with torch.no_grad():
            assert torch.equal(_run(other, x, r), want)


@pytest.mark.parametrize("nk_cls", [LayerNorm, RMSNorm])
def test_zero_centered_gamma_against_float64(nk_cls):
    """With zero_centered_gamma the stored weight is γ - 1 (Gemma): y = x̂·(1 + w) (+ b)."""
    torch.manual_seed(0)
    mod = nk_cls(24, eps=1e-5, zero_centered_gamma=True)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(6, 24) * 3 + 1
    x64 = x.double()
    if nk_cls is LayerNorm:
        xhat = (x64 - x64.mean(-1, keepdim=True)) * torch.rsqrt(x64.var(-1, unbiased=False,
                                                                        keepdim=True) + 1e-5)
        exact = xhat * (1 + mod.weight.double()) + mod.bias.double()
    else:
        exact = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5)
        exact = exact * (1 + mod.weight.double())
    with torch.no_grad():
        torch.testing.assert_close(mod(x), exact.float(), **FWD_TOL[torch.float32])


@pytest.mark.parametrize("nk_cls", ALL_MODULES, ids=lambda c: c.__name__)
def test_bad_options_are_named(nk_cls):
    with pytest.raises(ValueError, match="casting must be one of"):
        nk_cls(8, casting="fp32")
    with pytest.raises(TypeError, match="zero_centered_gamma must be a bool"):
        nk_cls(8, zero_centered_gamma="yes")
    with pytest.raises(ValueError, match="zero_centered_gamma=True needs elementwise_affine"):
        nk_cls(8, elementwise_affine=False, zero_centered_gamma=True)
    with pytest.raises(TypeError, match="eps must be a float"):
        nk_cls(8, eps="1e-5")
    with pytest.raises(ValueError, match="eps must be finite"):
        nk_cls(8, eps=-1.0)
    with pytest.raises(TypeError, match="normalized_shape"):
        nk_cls(8.0)


@pytest.mark.parametrize("nk_cls", [LayerNorm, RMSNorm])
def test_numpy_scalars_in_the_constructor(nk_cls):
    """As torch's modules take them, and onto the compiled entry point (plain ints, a float)."""
    np = pytest.importorskip("numpy")

    mod = nk_cls(np.int64(8), eps=np.float32(1e-5))
    assert mod.normalized_shape == (8,) and type(mod.normalized_shape[0]) is int
    assert type(mod.eps) is float and mod.eps == float(np.float32(1e-5))
    x = torch.randn(3, 8)
    ref = (torch.nn.LayerNorm if nk_cls is LayerNorm else torch.nn.RMSNorm)(8, eps=mod.eps)
    with torch.no_grad():
        before = eager_calls()
        got = mod(x)
        assert eager_calls() == before + 1
        torch.testing.assert_close(got, ref(x), **FWD_TOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("xshape", "nshape"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("torch_cls", "nk_cls", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_forward_matches_torch(torch_cls, nk_cls, kwargs, xshape, nshape, dtype):
    torch.manual_seed(0)
    ref, mod = _pair(torch_cls, nk_cls, nshape, kwargs, dtype)
    x = (torch.randn(xshape) * 3 + 1).to(dtype)
    with torch.no_grad():
        want, got = ref(x), mod(x)
        exact = _float64(ref, dtype)(x.double())
    assert got.dtype == want.dtype == dtype
    assert got.shape == want.shape
    _assert_close_to_exact_and_torch(got, exact, want, FWD_TOL[dtype])


@pytest.mark.parametrize("nk_cls", [LayerNorm, RMSNorm])
def test_output_dtype_follows_input_with_float32_params(nk_cls):
    # "torch" casting: float32 γ/β with bfloat16 activations give bfloat16, as torch does.
    torch.manual_seed(0)
    mod = nk_cls(16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    ref = torch.nn.LayerNorm(16) if nk_cls is LayerNorm else torch.nn.RMSNorm(16)
    got = mod(x)
    assert got.dtype == torch.bfloat16
    with warnings.catch_warnings():
        # torch warns that its fused rms_norm cannot take mixed dtypes (and falls back)
        warnings.simplefilter("ignore", UserWarning)
        want = ref(x)
    torch.testing.assert_close(got, want, **FWD_TOL[torch.bfloat16])


@pytest.mark.parametrize(
    ("casting", "w_dtype", "out_dtype"),
    [
        ("llama", torch.float32, torch.float32),  # promote_types(bf16, f32)
        ("llama", torch.bfloat16, torch.bfloat16),
        ("t5", torch.float32, torch.float32),  # no cast, multiply in float32
        ("t5", torch.bfloat16, torch.bfloat16),
        ("gemma", torch.float32, torch.bfloat16),  # one cast at the end, to x.dtype
    ],
)
def test_casting_modes_output_dtype_and_value(casting, w_dtype, out_dtype):
    torch.manual_seed(0)
    mod = RMSNorm(16, eps=1e-6, dtype=w_dtype)
    mod.casting = casting
    with torch.no_grad():
        mod.weight.normal_(1.0, 0.5)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    got = mod(x)
    assert got.dtype == out_dtype
    # An independent formula: x̂ = normalize(x) * sqrt(N), in float32.
    xhat = torch.nn.functional.normalize(x.float(), dim=-1, eps=0.0) * math.sqrt(16)
    w = mod.weight
    if casting == "llama":
        want = w * xhat.to(x.dtype)
    elif casting == "t5":
        want = w * (xhat.to(w.dtype) if w.dtype != torch.float32 else xhat)
    else:
        want = (xhat * w.float()).to(x.dtype)
    torch.testing.assert_close(got, want, **FWD_TOL[out_dtype])


def test_zero_centered_gamma_multiplies_by_one_plus_weight():
    torch.manual_seed(0)
    mod = RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        mod.weight.normal_(0.0, 0.5)
    ref = torch.nn.RMSNorm(12, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(1.0 + mod.weight)
    x = torch.randn(4, 12)
    mod.zero_centered_gamma = True
    torch.testing.assert_close(mod(x), ref(x), **FWD_TOL[torch.float32])


@pytest.mark.parametrize(("torch_cls", "nk_cls"), [(torch.nn.LayerNorm, LayerNorm),
                                                   (torch.nn.RMSNorm, RMSNorm)])
def test_empty_input(torch_cls, nk_cls):
    mod, ref = nk_cls(8), torch_cls(8)
    x = torch.randn(0, 8)
    assert mod(x).shape == ref(x).shape == (0, 8)


@pytest.mark.parametrize("nk_cls", [LayerNorm, RMSNorm])
def test_wrong_trailing_shape_is_rejected(nk_cls):
    with pytest.raises(ValueError, match="normalized_shape"):
        nk_cls(8)(torch.randn(2, 7))


@pytest.mark.parametrize("nk_cls", [LayerNorm, RMSNorm])
def test_traces_without_graph_breaks(nk_cls):
    # backend="eager": dynamo traces the module (fullgraph fails on any graph break) but nothing
    # is compiled, which keeps this test fast.
    torch.manual_seed(0)
    mod = nk_cls(16)
    x = torch.randn(3, 16)
    compiled = torch.compile(mod, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("xshape", "nshape"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("torch_cls", "nk_cls", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_gradients_match_torch(torch_cls, nk_cls, kwargs, xshape, nshape):
    torch.manual_seed(0)
    ref, mod = _pair(torch_cls, nk_cls, nshape, kwargs)
    x = torch.randn(xshape) * 3 + 1
    dy = torch.randn(xshape)
    ref64 = _float64(ref, x.dtype)
    xr, xm, x64 = (x.clone().to(dt).requires_grad_() for dt in (x.dtype, x.dtype, torch.float64))
    (ref(xr) * dy).sum().backward()
    (mod(xm) * dy).sum().backward()
    (ref64(x64) * dy.double()).sum().backward()
    _assert_close_to_exact_and_torch(xm.grad, x64.grad, xr.grad, GRAD_TOL)
    params = zip(mod.named_parameters(), ref.parameters(), ref64.parameters(), strict=True)
    for (name, pm), pr, p64 in params:
        assert pm.grad is not None, name
        _assert_close_to_exact_and_torch(pm.grad, p64.grad, pr.grad, GRAD_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nk_cls", [LayerNorm, RMSNorm])
def test_gradients_flow_in_half_precision(nk_cls, dtype):
    torch.manual_seed(0)
    mod = nk_cls(24, dtype=dtype)
    x = torch.randn(5, 24, dtype=dtype, requires_grad=True)
    mod(x).float().square().sum().backward()
    for t in (x, *mod.parameters()):
        assert t.grad is not None and t.grad.dtype == dtype
        assert torch.isfinite(t.grad).all()


# ----------------------------------------------------------------------------------------------
# Fused residual add
# ----------------------------------------------------------------------------------------------

FUSED = [
    (torch.nn.LayerNorm, FusedAddLayerNorm, {}),
    (torch.nn.LayerNorm, FusedAddLayerNorm, {"bias": False}),
    (torch.nn.RMSNorm, FusedAddRMSNorm, {"eps": 1e-6}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("torch_cls", "nk_cls", "kwargs"), FUSED, ids=["ln", "ln-nobias", "rms"])
def test_fused_add_returns_norm_and_residual_stream(torch_cls, nk_cls, kwargs, dtype):
    torch.manual_seed(0)
    ref, mod = _pair(torch_cls, nk_cls, (40,), kwargs, dtype)
    assert list(mod.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 7, 40).to(dtype)
    r = torch.randn(3, 7, 40).to(dtype)
    with torch.no_grad():
        y, h = mod(x, r)
        want_h = x + r  # torch rounds the sum to x.dtype, as normkit does
        want_y = ref(want_h)
    assert torch.equal(h, want_h)
    assert h.dtype == dtype and y.dtype == want_y.dtype
    torch.testing.assert_close(y, want_y, **FWD_TOL[dtype])


@pytest.mark.parametrize(("torch_cls", "nk_cls", "kwargs"), FUSED, ids=["ln", "ln-nobias", "rms"])
def test_fused_add_gradients(torch_cls, nk_cls, kwargs):
    torch.manual_seed(0)
    ref, mod = _pair(torch_cls, nk_cls, (40,), kwargs)
    x, r = torch.randn(9, 40), torch.randn(9, 40)
    dy, dh = torch.randn(9, 40), torch.randn(9, 40)

    xm, rm = x.clone().requires_grad_(), r.clone().requires_grad_()
    y, h = mod(xm, rm)
    ((y * dy).sum() + (h * dh).sum()).backward()

    xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    hr = xr + rr
    ((ref(hr) * dy).sum() + (hr * dh).sum()).backward()

    torch.testing.assert_close(xm.grad, xr.grad, **GRAD_TOL)
    torch.testing.assert_close(rm.grad, rr.grad, **GRAD_TOL)
    for pm, pr in zip(mod.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(pm.grad, pr.grad, **GRAD_TOL)
