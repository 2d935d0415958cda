"""normkit.nn.LayerNormLSTMCell / LayerNormLSTM against a plain-torch transcription of Ba et al.
2016, §3.2, eq. 20–22, written here with torch's own F.layer_norm (no normkit), in float64:
forward, backward (gradcheck), float32/bfloat16 within the suite's accuracy rule, the
nn.LSTM-shaped API (layers, batch_first, unbatched, initial states, dropout), the state_dict,
errors, batch invariance, and the norms being visible to normkit.watch."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref, bits
from torch.func import functional_call

import normkit
from normkit import _inventory
from normkit.monitor import AlertRules, watch
from normkit.nn import LayerNorm, LayerNormLSTM, LayerNormLSTMCell

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EPS = 1e-5


# ----------------------------------------------------------------------------------------------
# The paper's equations, in plain torch
# ----------------------------------------------------------------------------------------------


def _ln(z, gain, bias, eps):
    return F.layer_norm(z, z.shape[-1:], gain, bias, eps)


def paper_cell(x, h, c, p, eps=EPS):
    """Eq. 20–22 with the gates in torch's order (i, f, g, o); ``p`` a cell's tensors by name."""
    gates = (_ln(x @ p["weight_ih"].T, p["norm_ih.weight"], p.get("norm_ih.bias"), eps)
             + _ln(h @ p["weight_hh"].T, p["norm_hh.weight"], p.get("norm_hh.bias"), eps))
    if "bias" in p:
        gates = gates + p["bias"]
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(_ln(c, p["norm_c.weight"], p.get("norm_c.bias"), eps))
    return h, c


def paper_lstm(x, h0, c0, layers, eps=EPS):
    """x (T, B, I), h0/c0 (L, B, H), ``layers`` one dict per layer -> (output, (h_n, c_n))."""
    h_n, c_n = [], []
    for k, p in enumerate(layers):
        h, c, out = h0[k], c0[k], []
        for t in range(x.shape[0]):
            h, c = paper_cell(x[t], h, c, p, eps)
            out.append(h)
        x = torch.stack(out)
        h_n.append(h)
        c_n.append(c)
    return x, (torch.stack(h_n), torch.stack(c_n))


def layer_params(model, dtype=torch.float64):
    """The parameters of each layer as a dict, cast (a detached copy) to ``dtype``."""
    cells = model.cells if isinstance(model, LayerNormLSTM) else [model]
    return [{n: t.detach().to(dtype).requires_grad_() for n, t in cell.named_parameters()}
            for cell in cells]


def randomized(model):
    """Every parameter random, the norms' gains around 1 and biases around 0 included, so that
    no term of the equations hides behind an initial value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_ih.weight") or name.endswith("norm_hh.weight") \
                    or name.endswith("norm_c.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return model


def lstm(*args, seed=0, **kw):
    torch.manual_seed(seed)
    return randomized(LayerNormLSTM(*args, **kw))


def cell(*args, seed=0, **kw):
    torch.manual_seed(seed)
    return randomized(LayerNormLSTMCell(*args, **kw))


def states(layers, batch, hidden, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (layers, *batch, hidden)
    return (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))


# ----------------------------------------------------------------------------------------------
# Against the paper, float64: forward and backward
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_cell_matches_the_paper_float64(bias):
    m = cell(5, 6, bias=bias, eps=1e-3, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    h, c = (torch.randn(3, 6, dtype=torch.float64) for _ in range(2))
    got = m(x, (h, c))
    want = paper_cell(x, h, c, layer_params(m)[0], eps=1e-3)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # hx=None is zeros
    zeros = torch.zeros(3, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], paper_cell(x, zeros, zeros, layer_params(m)[0],
                                                   eps=1e-3)[0], rtol=1e-12, atol=1e-12)


def test_lstm_forward_and_backward_match_the_paper_float64():
    m = lstm(4, 5, num_layers=3, dtype=torch.float64)
    x = torch.randn(6, 2, 4, dtype=torch.float64, requires_grad=True)
    h0, c0 = (t.requires_grad_() for t in states(3, (2,), 5, torch.float64))
    out, (h_n, c_n) = m(x, (h0, c0))
    p = layer_params(m)
    x_r, h0_r, c0_r = (t.detach().clone().requires_grad_() for t in (x, h0, c0))
    out_r, (h_r, c_r) = paper_lstm(x_r, h0_r, c0_r, p)
    for a, b in ((out, out_r), (h_n, h_r), (c_n, c_r)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    g = [torch.randn_like(t) for t in (out, h_n, c_n)]
    torch.autograd.backward((out, h_n, c_n), g)
    torch.autograd.backward((out_r, h_r, c_r), g)
    for a, b in ((x, x_r), (h0, h0_r), (c0, c0_r)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    for cell_, ref in zip(m.cells, p, strict=True):
        for name, t in cell_.named_parameters():
            torch.testing.assert_close(t.grad, ref[name].grad, rtol=1e-10, atol=1e-12,
                                       msg=name)


def test_gradcheck_float64():
    """Numerical against analytical gradients, for the inputs, the states and every parameter."""
    m = lstm(3, 2, num_layers=2, dtype=torch.float64)
    names = [n for n, _ in m.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in m.parameters()]
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    h0, c0 = (t.requires_grad_() for t in states(2, (2,), 2, torch.float64))

    def f(x, h0, c0, *ps):
        out, (h, c) = functional_call(m, dict(zip(names, ps, strict=True)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


# ----------------------------------------------------------------------------------------------
# float32 and bfloat16: the suite's rule (error <= 2x torch's own + ATOL, against float64)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_the_accuracy_rule(dtype):
    m = lstm(16, 24, num_layers=2, dtype=dtype)
    x = torch.randn(5, 3, 16).to(dtype).requires_grad_()
    h0, c0 = states(2, (3,), 24, dtype)
    out, (h_n, c_n) = m(x, (h0, c0))
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    out, h_n, c_n = out.detach(), h_n.detach(), c_n.detach()

    def paper(p_dtype):
        xs = x.detach().to(p_dtype).requires_grad_()
        o, (h, c) = paper_lstm(xs, h0.to(p_dtype), c0.to(p_dtype), layer_params(m, p_dtype))
        dxs = torch.autograd.grad(o, xs, g.to(p_dtype))[0]
        return (o.detach(), h.detach(), c.detach()), dxs

    (o64, h64, c64), dx64 = paper(torch.float64)  # the same (rounded) inputs and parameters
    (ot, ht, ct), dxt = paper(dtype)  # torch's own error in this dtype
    for ours, theirs, truth, what in ((out, ot, o64, "output"), (h_n, ht, h64, "h_n"),
                                      (c_n, ct, c64, "c_n"), (dx, dxt, dx64, "dx")):
        assert ours.dtype == dtype
        assert_close_to_ref(ours, theirs, truth, dtype, what=what)


# ----------------------------------------------------------------------------------------------
# The nn.LSTM-shaped API
# ----------------------------------------------------------------------------------------------


def test_batch_first_unbatched_and_the_final_state():
    m = lstm(4, 5, num_layers=2, dtype=torch.float64)
    x = torch.randn(7, 3, 4, dtype=torch.float64)
    h0, c0 = states(2, (3,), 5, torch.float64)
    out, (h_n, c_n) = m(x, (h0, c0))
    want, _ = paper_lstm(x, h0, c0, layer_params(m))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert out.shape == (7, 3, 5) and h_n.shape == c_n.shape == (2, 3, 5)
    assert torch.equal(h_n[-1], out[-1])  # the last layer's last h is the last output
    # batch_first: the same numbers, batch and time swapped (the states are never batch-first)
    m.batch_first = True
    out_bf, (h_bf, c_bf) = m(x.transpose(0, 1), (h0, c0))
    torch.testing.assert_close(out_bf, out.transpose(0, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_bf, h_n, rtol=1e-12, atol=1e-12)
    # unbatched (T, I) with (L, H) states, as torch accepts, with or without batch_first
    for batch_first in (False, True):
        m.batch_first = batch_first
        out_u, (h_u, c_u) = m(x[:, 1], (h0[:, 1], c0[:, 1]))
        assert out_u.shape == (7, 5) and h_u.shape == c_u.shape == (2, 5)
        want_u, (wh, wc) = paper_lstm(x[:, 1:2], h0[:, 1:2], c0[:, 1:2], layer_params(m))
        torch.testing.assert_close(out_u, want_u[:, 0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c_u, wc[:, 0], rtol=1e-12, atol=1e-12)
    # the cell unbatched: (I,) with (H,) states
    c1 = m.cells[0]
    h, c = c1(x[0, 1], (h0[0, 1], c0[0, 1]))
    wh, wc = paper_cell(x[0, 1:2], h0[0, 1:2], c0[0, 1:2], layer_params(c1)[0])
    assert h.shape == c.shape == (5,)
    torch.testing.assert_close(h, wh[0], rtol=1e-12, atol=1e-12)


def test_the_layer_is_the_cell_stepped_over_time():
    """LayerNormLSTM's one matmul for all steps gives what stepping the cell gives."""
    m = lstm(4, 5, num_layers=1, dtype=torch.float64)
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    out, (h_n, c_n) = m(x)
    state = None
    for t in range(6):
        state = m.cells[0](x[t], state)
        torch.testing.assert_close(state[0], out[t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[1], c_n[0], rtol=1e-12, atol=1e-12)


def test_dropout_acts_between_layers_in_training_only():
    x = torch.randn(5, 3, 4)
    m = lstm(4, 6, num_layers=2, dropout=0.5)
    plain = lstm(4, 6, num_layers=2)  # the same parameters (same seed), no dropout
    m.eval()
    assert torch.equal(m(x)[0], plain(x)[0])  # eval: dropout is off
    m.train()
    torch.manual_seed(3)
    a = m(x)[0]
    torch.manual_seed(3)
    assert torch.equal(m(x)[0], a)  # reproducible from the seed
    assert not torch.equal(a, plain(x)[0])
    # p = 1 drops everything: the second layer runs on zeros, the first layer is untouched
    m.dropout = 1.0
    out, (h_n, _) = m(x)
    second = first = None
    for t in range(5):
        second = m.cells[1](torch.zeros(3, 6), second)
        first = m.cells[0](x[t], first)
    assert torch.equal(out[-1], second[0])  # a zero input projects to zeros in any batching
    torch.testing.assert_close(h_n[0], first[0])


def test_dropout_without_a_second_layer_warns_as_torch_does():
    with pytest.warns(UserWarning, match="num_layers=1"):
        LayerNormLSTM(4, 6, dropout=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LayerNormLSTM(4, 6, num_layers=2, dropout=0.2)


def test_state_dict_keys_are_stable_and_load_back():
    m = LayerNormLSTM(3, 4, num_layers=2)
    per_cell = ["bias", "weight_ih", "weight_hh", "norm_ih.weight", "norm_ih.bias",
                "norm_hh.weight", "norm_hh.bias", "norm_c.weight", "norm_c.bias"]
    assert list(m.state_dict()) == [f"cells.{k}.{n}" for k in range(2) for n in per_cell]
    shapes = {"bias": (16,), "weight_ih": (16, 3), "weight_hh": (16, 4)}
    for n, t in m.cells[0].state_dict().items():
        assert tuple(t.shape) == shapes.get(n, (4,) if n.startswith("norm_c") else (16,)), n
    no_bias = LayerNormLSTMCell(3, 4, bias=False)
    assert list(no_bias.state_dict()) == ["weight_ih", "weight_hh", "norm_ih.weight",
                                          "norm_hh.weight", "norm_c.weight"]
    other = randomized(LayerNormLSTM(3, 4, num_layers=2))
    other.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 1, 3)
    assert torch.equal(other(x)[0], m(x)[0])


def test_initialization():
    torch.manual_seed(0)
    c = LayerNormLSTMCell(8, 16)
    bound = 1 / math.sqrt(16)
    for w in (c.weight_ih, c.weight_hh):
        assert w.abs().max() <= bound and w.std() > bound / 3
    assert torch.equal(c.bias, torch.tensor([0.0] * 16 + [1.0] * 16 + [0.0] * 32))
    for norm in (c.norm_ih, c.norm_hh, c.norm_c):
        assert isinstance(norm, LayerNorm) and norm.eps == 1e-5
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


def test_repr_names_normkit_and_non_defaults():
    m = LayerNormLSTM(3, 4, num_layers=2, batch_first=True, eps=1e-6)
    assert repr(m).startswith("normkit.nn.LayerNormLSTM(")
    assert m.extra_repr() == "3, 4, num_layers=2, batch_first=True, eps=1e-06"
    assert m.cells[0].extra_repr() == "3, 4, eps=1e-06"
    assert LayerNormLSTMCell(3, 4, bias=False).extra_repr() == "3, 4, bias=False"
    assert LayerNormLSTM(3, 4).extra_repr() == "3, 4"


def test_exported_from_normkit_nn():
    assert normkit.nn.LayerNormLSTM is LayerNormLSTM
    assert {"LayerNormLSTM", "LayerNormLSTMCell"} <= set(normkit.nn.__all__)


# ----------------------------------------------------------------------------------------------
# Batch invariance
# ----------------------------------------------------------------------------------------------


_linear = F.linear


def _row_at_a_time_linear(x, w, b=None):
    """A batch-invariant stand-in for torch's F.linear: every row its own 1-row product."""
    rows = x.reshape(-1, x.shape[-1]).unbind()
    y = torch.stack([_linear(r.unsqueeze(0), w, b)[0] for r in rows])
    return y.reshape(*x.shape[:-1], w.shape[0])


def test_the_lstm_adds_no_batch_dependence_of_its_own(monkeypatch):
    """Row i of a batch equals the single-sample result bit for bit, given batch-invariant
    projections.  torch's CPU matmul is not (MKL picks its kernels by the number of rows), so
    the projections are swapped for a row-at-a-time product here: what remains — the normkit
    norms and the element-wise gate arithmetic — must not look at the batch."""
    monkeypatch.setattr(F, "linear", _row_at_a_time_linear)
    m = lstm(6, 8, num_layers=2)
    x = torch.randn(4, 5, 6)
    h0, c0 = states(2, (5,), 8)
    out, (h_n, c_n) = m(x, (h0, c0))
    for i in range(5):
        o, (h, c) = m(x[:, i], (h0[:, i], c0[:, i]))  # unbatched: one sample
        assert torch.equal(bits(o), bits(out[:, i])), i
        assert torch.equal(bits(c), bits(c_n[:, i])), i
        o, _ = m(x[:, i:i + 1], (h0[:, i:i + 1], c0[:, i:i + 1]))  # a batch of one
        assert torch.equal(bits(o[:, 0]), bits(out[:, i])), i


# ----------------------------------------------------------------------------------------------
# Bad arguments and inputs: clear errors that name the argument
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"input_size": 0}, ValueError, "input_size must be an int >= 1, got 0"),
    ({"hidden_size": 2.5}, ValueError, "hidden_size must be an int >= 1, got 2.5"),
    ({"num_layers": 0}, ValueError, "num_layers must be an int >= 1"),
    ({"num_layers": True}, ValueError, "num_layers must be an int"),
    ({"bias": 1}, TypeError, "bias must be a bool, got int"),
    ({"batch_first": "yes"}, TypeError, "batch_first must be a bool"),
    ({"dropout": 1.5}, ValueError, r"dropout must be a number in \[0, 1\], got 1.5"),
    ({"dropout": "0.1"}, ValueError, "dropout must be a number"),
    ({"eps": -1.0}, ValueError, "eps must be finite and >= 0"),
    ({"bidirectional": True}, NotImplementedError, "bidirectional=True is not supported"),
    ({"proj_size": 3}, NotImplementedError, "proj_size > 0 is not supported"),
    ({"proj_size": -1}, ValueError, "proj_size must be an int >= 0"),
])
def test_bad_constructor_arguments_are_named(kwargs, exc, match):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises(exc, match=match):
        LayerNormLSTM(**args)


def test_bad_cell_arguments_are_named():
    with pytest.raises(ValueError, match="hidden_size must be an int >= 1, got -2"):
        LayerNormLSTMCell(3, -2)
    with pytest.raises(TypeError, match="eps must be a float"):
        LayerNormLSTMCell(3, 2, eps=True)


def test_bad_inputs_and_states_are_named():
    m = LayerNormLSTM(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    bad = [
        (lambda: m(x[..., :2]), ValueError,
         r"LayerNormLSTM: input must be 2-D \(unbatched\) or 3-D \(batched\) with last dim "
         r"input_size=3, got shape \(5, 2, 2\)"),
        (lambda: m(torch.randn(5)), ValueError, "input must be 2-D"),
        (lambda: m(x.double()), TypeError,
         "LayerNormLSTM: input must be torch.float32 on cpu like the parameters, got "
         "torch.float64"),
        (lambda: m([1.0, 2.0]), TypeError, "input must be a torch.Tensor, got list"),
        (lambda: m(torch.nn.utils.rnn.pack_sequence([torch.randn(2, 3)])), TypeError,
         "got PackedSequence: pad the batch"),
        (lambda: m(torch.randn(0, 2, 3)), ValueError, "input has no time steps"),
        (lambda: m(x, torch.zeros(2, 2, 4)), TypeError,
         r"hx must be a tuple \(h, c\) of two tensors or None, got Tensor"),
        (lambda: m(x, (torch.zeros(2, 2, 4),)), TypeError,
         r"hx must be a tuple \(h, c\) of two tensors or None, got a tuple of 1"),
        (lambda: m(x, (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4))), ValueError,
         r"hx\[0\] \(h\) must have shape \(2, 2, 4\), got \(1, 2, 4\)"),
        (lambda: m(x, (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4).double())), TypeError,
         r"hx\[1\] \(c\) must be torch.float32"),
        (lambda: m(x[:, 0], (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))), ValueError,
         r"hx\[0\] \(h\) must have shape \(2, 4\)"),
        (lambda: m.cells[0](x[0, :, :2]), ValueError,
         r"LayerNormLSTMCell: input must be 1-D \(unbatched\) or 2-D \(batched\)"),
        (lambda: m.cells[0](x), ValueError, "LayerNormLSTMCell: input must be 1-D"),
        (lambda: m.cells[0](x[0], (torch.zeros(2, 3), torch.zeros(2, 4))), ValueError,
         r"hx\[0\] \(h\) must have shape \(2, 4\), got \(2, 3\)"),
    ]
    for call, exc, match in bad:
        with pytest.raises(exc, match=match):
            call()


# ----------------------------------------------------------------------------------------------
# The norms inside are normkit's, and normkit.watch sees them
# ----------------------------------------------------------------------------------------------


class _Tagger(torch.nn.Module):
    """A byte-level tagger: embedding, a two-layer LN-LSTM, a head."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.rnn = LayerNormLSTM(8, 12, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, idx):
        return self.head(self.rnn(self.emb(idx))[0])


NORMS = [f"rnn.cells.{k}.{n}" for k in range(2) for n in ("norm_ih", "norm_hh", "norm_c")]


def test_the_inventory_finds_exactly_the_norms_inside(caplog):
    """The cells and the LSTM are named "...Norm..." and hold an eps, but they are containers
    of norms, not norms: no look-alike warning, not counted (also with the norms swapped for
    identities, as the study's plain LSTM does)."""
    model = _Tagger()
    with caplog.at_level(logging.WARNING, logger="normkit._inventory"):
        found = _inventory.find(model)
        assert [(n, info.kind, info.family) for n, _, info in found] == \
            [(n, "layer", "normkit") for n in NORMS]
        for c in model.rnn.cells:
            c.norm_ih = c.norm_hh = c.norm_c = torch.nn.Identity()
        assert _inventory.find(model) == []
    assert caplog.records == []


def test_watch_records_every_norm_of_the_lstm():
    torch.manual_seed(0)
    model = _Tagger()
    idx = torch.randint(0, 32, (3, 7))
    with watch(model, model_name="tagger", model_version="1",
               alerts=AlertRules(log_alerts=False)) as w:
        for _ in range(2):
            model(idx).square().mean().backward()
    s = w.summary()
    assert sorted(s) == sorted(NORMS)
    for name in NORMS:
        # every time step's rows: batch 3 x 7 steps, per forward, two forwards
        assert s[name]["kind"] == "ln" and s[name]["rows"] == 2 * 3 * 7, name
        assert s[name]["input_std"] > 0 and s[name]["grad_input_norm"] > 0, name


def test_convert_leaves_the_lstm_as_it_is():
    """Its norms are normkit's already: convert replaces nothing, the modules stay the same."""
    model = _Tagger()
    before = list(model.modules())
    assert normkit.convert(model) is model
    assert list(model.modules()) == before
