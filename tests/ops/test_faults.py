"""normkit.faults: each fault has its effect while active, and on exit — also when the body
raises — every bit of the model is back and every hook gone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normkit
from normkit import faults


class Net(nn.Module):
    """Linear → LayerNorm → Linear → RMSNorm → head; float input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.ln = normkit.nn.LayerNorm(16)
        self.mid = nn.Linear(16, 16)
        self.rms = nn.RMSNorm(16, eps=1e-6)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.rms(self.mid(self.ln(self.fc(x)))))


class Tokens(nn.Module):
    """Token ids → embedding → LayerNorm (int64 input, as the demo's model)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.ln = nn.LayerNorm(16)

    def forward(self, idx):
        return self.ln(self.emb(idx))


def _snapshot(model):
    """Every bit of the state, every attribute of every module, and the hook counts."""
    state = {k: v.detach().clone().view(torch.uint8) for k, v in model.state_dict().items()}
    attrs = {n: {k: v for k, v in vars(m).items() if not k.startswith("_")}
             for n, m in model.named_modules()}
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in
             model.named_modules()}
    datas = {n: p.data.data_ptr() for n, p in model.named_parameters()}
    return state, attrs, hooks, datas


def _assert_same(before, after):
    (s0, a0, h0, d0), (s1, a1, h1, d1) = before, after
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} changed bits"
    assert a0 == a1
    assert h0 == h1
    assert d0 == d1, "a parameter's tensor was replaced"


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        m.ln.weight.normal_()
        m.ln.bias.normal_()
    return m


def _faults(model_kind):
    """(name, context factory, check of the effect on (clean output, faulty output, model))."""
    inf = float("inf")
    return [
        ("weight-inf", lambda m: faults.nonfinite(m, "ln", where="weight", value=inf, index=3),
         lambda y0, y, m: not torch.isfinite(y).all() and m.ln.weight[3].item() == inf),
        ("bias-nan", lambda m: faults.nonfinite(m, "ln", where="bias", value=float("nan")),
         lambda y0, y, m: torch.isnan(y).all(dim=-1).all() and torch.isnan(m.ln.bias[0])),
        ("output-nan", lambda m: faults.nonfinite(m, "rms", where="output",
                                                  value=float("nan"), index=5),
         lambda y0, y, m: torch.isnan(y[0]).all() and torch.isfinite(y[1:]).all()),
        ("fp16", lambda m: faults.precision(m, "ln", dtype=torch.float16),
         lambda y0, y, m: 0 < (y - y0).abs().max() < 0.05 and y.dtype == y0.dtype),
        ("eps-all", lambda m: faults.eps(m, 1e-2),
         lambda y0, y, m: m.ln.eps == 1e-2 and m.rms.eps == 1e-2 and not torch.equal(y, y0)),
        ("eps-one", lambda m: faults.eps(m, 0.5, layers=["rms"]),
         lambda y0, y, m: m.ln.eps == 1e-5 and m.rms.eps == 0.5 and not torch.equal(y, y0)),
        ("drop", lambda m: faults.affine(m, "ln", mode="drop"),
         lambda y0, y, m: bool((m.ln.weight == 1).all() and (m.ln.bias == 0).all())
         and not torch.equal(y, y0)),
        ("zero", lambda m: faults.affine(m, "ln", mode="zero"),
         lambda y0, y, m: bool((m.ln.weight == 0).all() and (m.ln.bias == 0).all())
         and torch.allclose(y, m.head(m.rms(m.mid(torch.zeros(1, 16)))).expand_as(y))),
        ("scale", lambda m: faults.scale_inputs(m, 3.0),
         lambda y0, y, m: not torch.equal(y, y0)),
    ]


@pytest.mark.parametrize("name,make,effect", _faults("net"), ids=[f[0] for f in _faults("net")])
def test_each_fault_has_its_effect_and_exit_restores_every_bit(net, name, make, effect):
    x = torch.randn(5, 8)
    with torch.no_grad():
        y0 = net(x)
    before = _snapshot(net)
    with make(net), torch.no_grad():
        y = net(x)
        assert effect(y0, y, net), name
    _assert_same(before, _snapshot(net))
    with torch.no_grad():
        assert torch.equal(net(x), y0)


@pytest.mark.parametrize("name,make,effect", _faults("net"), ids=[f[0] for f in _faults("net")])
def test_exit_restores_every_bit_when_the_body_raises(net, name, make, effect):
    before = _snapshot(net)
    with pytest.raises(RuntimeError, match="boom"), make(net), torch.no_grad():
        net(torch.randn(2, 8))
        raise RuntimeError("boom")
    _assert_same(before, _snapshot(net))


def test_a_forward_that_raises_inside_a_precision_fault_is_restored(net):
    before = _snapshot(net)
    with pytest.raises(RuntimeError), faults.precision(net, "ln"), torch.no_grad():
        net.ln(torch.randn(2, 7))  # wrong width: the layer raises after the pre-hook ran
    _assert_same(before, _snapshot(net))


def test_precision_fault_overflows_big_activations(net):
    x = torch.full((2, 16), 1e5)
    x[:, 0] = 2e5
    assert torch.isfinite(net.ln(x)).all()
    with faults.precision(net, "ln", dtype=torch.float16), torch.no_grad():
        assert not torch.isfinite(net.ln(x)).all()


def test_scale_inputs_scales_the_embeddings_of_a_token_model():
    torch.manual_seed(0)
    m = Tokens()
    idx = torch.tensor([[1, 2, 3]])
    seen = []
    h = m.ln.register_forward_pre_hook(lambda mod, a: seen.append(a[0].clone()))
    with torch.no_grad():
        m(idx)
        with faults.scale_inputs(m, 3.0):
            m(idx)
        m(idx)
    h.remove()
    assert torch.equal(seen[1], seen[0] * 3.0)
    assert torch.equal(seen[2], seen[0])


def test_scale_inputs_scales_float_inputs_only_once(net):
    seen = []
    h = net.fc.register_forward_pre_hook(lambda mod, a: seen.append(a[0].clone()))
    x = torch.randn(3, 8)
    with faults.scale_inputs(net, 3.0), torch.no_grad():
        net(x)
    h.remove()
    assert torch.equal(seen[0], x * 3.0)


def test_zero_centred_gamma_drop_means_gamma_one():
    m = nn.Sequential(normkit.nn.RMSNorm(8, zero_centered_gamma=True))
    with torch.no_grad():
        m[0].weight.normal_()
    x = torch.randn(3, 8)
    with faults.affine(m, "0", mode="drop"), torch.no_grad():
        assert torch.equal(m[0].weight, torch.zeros(8))
        plain = normkit.rms_norm(x, (8,), None, m[0].eps)
        assert torch.allclose(m(x), plain, atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda m: faults.nonfinite(m, "nope"), r"faults.nonfinite: the model has no module 'nope' "
                                           r"\(its norms: ln, rms\)"),
    (lambda m: faults.precision(m, "fc"), r"a Linear, not a norm, as 'fc'"),
    (lambda m: faults.nonfinite(m, "ln", where="grad"), r"where must be"),
    (lambda m: faults.nonfinite(m, "ln", value=1.0), r"value must be NaN or ±Inf"),
    (lambda m: faults.nonfinite(m, "ln", index=16), r"index 16 is outside ln.weight"),
    (lambda m: faults.eps(m, -1.0), r"faults.eps: value must be a finite number >= 0"),
    (lambda m: faults.eps(m, 1e-3, layers="ln"), r"list of layer names"),
    (lambda m: faults.affine(m, "ln", mode="half"), r"mode must be 'drop' or 'zero'"),
    (lambda m: faults.scale_inputs(m, float("nan")), r"factor must be a finite number"),
    (lambda m: faults.precision(m, "ln", dtype=torch.int8), r"floating torch.dtype"),
])
def test_bad_arguments_are_clear_errors_and_change_nothing(net, call, match):
    before = _snapshot(net)
    with pytest.raises((ValueError, TypeError), match=match):
        with call(net):
            pass
    _assert_same(before, _snapshot(net))
