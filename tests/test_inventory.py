"""One inventory of norms (normkit._inventory): convert, watch and audit see the same modules,
each norm with its kind, eps, affine parameters, rows and convention; users declare their own
classes with normkit.register_norm."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _monitor_models import ConvNet, TinyTransformer, lm_batch

import normkit
from normkit import _inventory
from normkit.audit._model import find_norms as audit_norms
from normkit.monitor import find_norms as watch_norms
from normkit.monitor import watch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOG = "normkit._inventory"


def _scaler_class():
    """A hand-written RMSNorm whose name says nothing: a new class object per call, so
    registrations and the once-per-class warning never leak between tests."""

    class Scaler(torch.nn.Module):
        def __init__(self, n, eps=1e-6):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(n))
            self.eps = eps

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    return Scaler


def _info(module):
    return _inventory.describe(module)


# ----------------------------------------------------------------------------------------------
# Each kind, with its eps, affine parameters, rows and convention
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, want", [
    (torch.nn.LayerNorm((4, 6), eps=1e-3), ("layer", 1e-3, "weight", "bias", "last", 2)),
    (torch.nn.LayerNorm(4, bias=False), ("layer", 1e-5, "weight", None, "last", 1)),
    (torch.nn.RMSNorm(4), ("rms", None, "weight", None, "last", 1)),
    (torch.nn.RMSNorm(4, eps=0.0), ("rms", 0.0, "weight", None, "last", 1)),
    (torch.nn.BatchNorm1d(3, eps=1e-4), ("batch", 1e-4, "weight", "bias", "channel", 0)),
    (torch.nn.BatchNorm2d(3), ("batch", 1e-5, "weight", "bias", "channel", 0)),
    (torch.nn.GroupNorm(2, 4, eps=1e-6), ("group", 1e-6, "weight", "bias", "group", 0)),
    (torch.nn.InstanceNorm1d(3), ("instance", 1e-5, None, None, "instance", 1)),
    (torch.nn.InstanceNorm2d(3, affine=True), ("instance", 1e-5, "weight", "bias", "instance", 2)),
    (torch.nn.InstanceNorm3d(3), ("instance", 1e-5, None, None, "instance", 3)),
], ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else "")
def test_torch_norms(module, want):
    info = _info(module)
    assert (info.kind, info.eps, info.weight, info.bias, info.rows, info.ndims) == want
    assert info.family == "torch" and not info.zero_centered_gamma


def test_normkit_modules():
    ln = normkit.nn.LayerNorm(8, eps=1e-6)
    rms = normkit.nn.RMSNorm(8, eps=1e-5)
    rms.casting, rms.zero_centered_gamma = "gemma", True
    dyt = normkit.nn.DyT(8)
    assert _info(ln) == _inventory.NormInfo("layer", 1e-6, "weight", "bias", "last", 1,
                                            "normkit", "torch", False)
    assert _info(rms) == _inventory.NormInfo("rms", 1e-5, "weight", None, "last", 1,
                                             "normkit", "gemma", True)
    assert (_info(dyt).kind, _info(dyt).weight, _info(dyt).bias) == ("dyt", "weight", "bias")


def test_non_norms_and_norm_named_containers_are_not_norms():
    class NormBlock(torch.nn.Module):  # a block named like a norm that holds one
        def __init__(self):
            super().__init__()
            self.ln = torch.nn.LayerNorm(4)

    for m in (torch.nn.Linear(4, 4), torch.nn.Conv2d(3, 3, 1), torch.nn.Embedding(4, 4),
              NormBlock()):
        assert _info(m) is None


def _hf(name):
    T = pytest.importorskip("transformers")
    dec = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    if name == "llama":
        return T.LlamaModel(T.LlamaConfig(**dec, rms_norm_eps=1e-5))
    if name == "gemma":
        return T.GemmaModel(T.GemmaConfig(**dec, head_dim=16, rms_norm_eps=1e-6))
    if name == "t5":
        return T.T5Model(T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2,
                                    num_heads=2, decoder_start_token_id=0))
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=48,
                                        max_position_embeddings=64), add_pooling_layer=False)
    raise ValueError(name)


# (kind, eps, bias, family, casting, zero-centred γ) of every norm in each model
_HF_WANT = {
    "llama": ("rms", 1e-5, None, "llama", "llama", False),
    "gemma": ("rms", 1e-6, None, "gemma", "gemma", True),
    "t5": ("rms", 1e-6, None, "t5", "t5", False),
    "bert": ("layer", 1e-12, "bias", "torch", "torch", False),
}


@pytest.mark.parametrize("name", list(_HF_WANT))
def test_hugging_face_models(name):
    norms = _inventory.find(_hf(name))
    assert len(norms) >= 5  # 2 layers × 2 norms + a final (embedding) norm
    for _, _, info in norms:
        assert (info.kind, info.eps, info.bias, info.family, info.casting,
                info.zero_centered_gamma) == _HF_WANT[name]
        assert info.weight == "weight" and info.rows == "last" and info.ndims == 1


# ----------------------------------------------------------------------------------------------
# Watch: InstanceNorm is watched; BatchNorm/GroupNorm/InstanceNorm carry their own kind
# ----------------------------------------------------------------------------------------------


class _Instance(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.inorm = torch.nn.InstanceNorm2d(4, affine=True)

    def forward(self, x):
        return self.inorm(self.conv(x))


def test_instance_norm_is_watched():
    m = _Instance()
    x = torch.randn(2, 3, 5, 5) * 3 + 1
    with watch(m, model_name="inst", model_version="1") as w:
        m(x)
    s = w.summary()["inorm"]
    assert s["norm"] == "instance" and s["kind"] == "ln"
    assert s["rows"] == 2 * 4  # a row per sample and channel, over the 5×5 pixels
    h = m.conv(x).detach().double()
    assert s["input_mean"] == pytest.approx(float(h.mean()), rel=1e-5)


def test_batch_and_group_norms_are_recorded_with_their_own_kind(tmp_path):
    m = ConvNet()
    path = tmp_path / "run.jsonl"
    with watch(m, model_name="cnn", model_version="1",
               exporters=[normkit.monitor.JsonlExporter(path)]) as w:
        m(torch.randn(2, 3, 8, 8))
    s = w.summary()
    assert {k: s[k]["norm"] for k in ("bn1", "gn", "bn2")} == {
        "bn1": "batch", "gn": "group", "bn2": "batch"}
    rec = [r for r in normkit.monitor.read_jsonl(path) if r.get("layers")][-1]
    assert rec["layers"]["gn"]["norm"] == "group" and rec["summary"]["bn1"]["norm"] == "batch"
    # the statistics a record holds keep their schema value: mean and variance per row
    assert rec["layers"]["gn"]["kind"] == "ln"


# ----------------------------------------------------------------------------------------------
# register_norm and look-alikes
# ----------------------------------------------------------------------------------------------


def test_registered_scaler_is_converted_watched_and_audited():
    Scaler = _scaler_class()
    assert normkit.register_norm(Scaler, kind="rms", eps="eps", casting="torch") is Scaler
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Scaler(8, eps=1e-5))
    with torch.no_grad():
        model[1].weight.normal_(1.0, 0.3)
    info = _info(model[1])
    assert (info.kind, info.eps, info.weight, info.family, info.casting) == (
        "rms", 1e-5, "weight", "registered", "torch")

    (n,) = audit_norms(model)
    assert (n.name, n.kind, n.eps, n.family) == ("1", "rms_norm", 1e-5, "registered")
    with watch(model, model_name="s", model_version="1") as w:
        model(torch.randn(5, 8))
    assert w.summary()["1"]["kind"] == "rms" and w.summary()["1"]["norm"] == "rms"

    x = torch.randn(4, 8)
    with torch.no_grad():
        want = model(x)
    weight = model[1].weight
    normkit.convert(model)
    assert isinstance(model[1], normkit.nn.RMSNorm) and model[1].weight is weight
    assert model[1].eps == 1e-5
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_registered_without_casting_is_not_converted():
    Scaler = _scaler_class()
    normkit.register_norm(Scaler, kind="rms")
    model = torch.nn.Sequential(Scaler(8))
    normkit.convert(model)
    assert type(model[0]) is Scaler
    assert [n for n, *_ in watch_norms(model)] == ["0"]
    # subclasses are covered; registering again replaces the declaration
    Sub = type("Sub", (Scaler,), {})
    assert _info(Sub(8)).kind == "rms"
    normkit.register_norm(Scaler, kind="layer", eps=None)
    assert (_info(Sub(8)).kind, _info(Sub(8)).eps) == ("layer", None)


def test_registered_affine_names_are_tracked_by_watch_and_audit():
    class Whiten(torch.nn.Module):  # a LayerNorm keeping γ/β as gain/shift
        def __init__(self, n):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.full((n,), 2.0))
            self.shift = torch.nn.Parameter(torch.full((n,), 0.5))

        def forward(self, x):
            return torch.nn.functional.layer_norm(x, x.shape[-1:], self.gain, self.shift, 1e-3)

    normkit.register_norm(Whiten, kind="layer", eps=1e-3, weight="gain", bias="shift")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), Whiten(4))
    (n,) = audit_norms(model)
    row = n.describe()
    assert (row["kind"], row["eps"], row["affine"], row["bias"], row["params"]) == (
        "layer_norm", 1e-3, True, True, 8)
    with watch(model, model_name="w", model_version="1") as w:
        model(torch.randn(3, 4)).sum().backward()
    s = w.summary()["1"]
    assert s["norm"] == "layer" and s["weight_norm"] == pytest.approx(4.0)
    assert s["bias_norm"] == pytest.approx(1.0) and s["weight_grad_norm"] is not None


def test_unregistered_lookalike_warns_once(caplog):
    Scaler = _scaler_class()
    model = torch.nn.Sequential(Scaler(8), torch.nn.Linear(8, 8), Scaler(8))
    with caplog.at_level(logging.WARNING, logger=LOG):
        watch_norms(model)
        audit_norms(model)
        normkit.convert(model)
    msgs = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert len(msgs) == 1
    assert "Scaler" in msgs[0] and "normkit.register_norm" in msgs[0]
    # it is not dropped: watch and audit take it generically, convert leaves it alone
    assert [n for n, *_ in watch_norms(model)] == ["0", "2"]
    assert [n.kind for n in audit_norms(model)] == ["custom", "custom"]
    assert type(model[0]) is Scaler


def test_known_norms_do_not_warn(caplog):
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.BatchNorm1d(8),
                                normkit.nn.DyT(8), torch.nn.Linear(8, 8))
    with caplog.at_level(logging.WARNING, logger=LOG):
        _inventory.find(model)
    assert not [r for r in caplog.records if r.name == LOG]


@pytest.mark.parametrize("kwargs, match", [
    (dict(cls=int, kind="rms"), "cls must be a torch.nn.Module subclass"),
    (dict(kind="batchnorm"), "kind must be one of"),
    (dict(kind="rms", eps=-1.0), "eps must be"),
    (dict(kind="rms", eps=float("nan")), "eps must be"),
    (dict(kind="rms", weight=3), "weight must be an attribute name"),
    (dict(kind="layer", bias="not a name"), "bias must be an attribute name"),
    (dict(kind="rms", ndims=0), "ndims must be an int >= 1"),
    (dict(kind="rms", casting="fp32"), "casting must be one of"),
    (dict(kind="batch", casting="torch"), "casting .* needs kind"),
    (dict(kind="rms", weight="gamma", casting="torch"), "casting .* needs kind"),
    (dict(kind="rms", zero_centered_gamma=1), "zero_centered_gamma must be a bool"),
])
def test_register_norm_validates_its_arguments(kwargs, match):
    Scaler = _scaler_class()
    cls = kwargs.pop("cls", Scaler)
    with pytest.raises((TypeError, ValueError), match=match):
        normkit.register_norm(cls, **kwargs)
    assert _inventory._registration(Scaler) is None


# ----------------------------------------------------------------------------------------------
# convert, watch and audit agree
# ----------------------------------------------------------------------------------------------


class _Mixed(torch.nn.Module):
    """Every kind in one model (a look-alike included)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.inorm = torch.nn.InstanceNorm2d(8)
        self.ln = torch.nn.LayerNorm(8)
        self.rms = torch.nn.RMSNorm(8)
        self.dyt = normkit.nn.DyT(8)
        self.nk = normkit.nn.RMSNorm(8)
        self.scaler = _scaler_class()(8)

    def forward(self, x):
        h = self.inorm(self.gn(self.bn(self.conv(x))))
        h = h.mean(dim=(2, 3))
        return self.scaler(self.nk(self.dyt(self.rms(self.ln(h)))))


def _models():
    yield "mixed", _Mixed()
    yield "convnet", ConvNet()
    yield "transformer", TinyTransformer()
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    for name in _HF_WANT:
        yield name, _hf(name)


@pytest.mark.parametrize("name, model", list(_models()), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_convert_watch_and_audit_see_the_same_norms(name, model):
    watched = {n for n, *_ in watch_norms(model)}
    assert watched == {n.name for n in audit_norms(model)}
    norms = {n for n, *_ in _inventory.find(model)}
    assert norms and norms == watched
    converted = copy.deepcopy(model)
    normkit.convert(converted)
    before, after = dict(model.named_modules()), dict(converted.named_modules())
    swapped = {n for n in before if type(before[n]) is not type(after[n])}
    # convert replaces norms only — exactly those of kind layer/rms/group it has a casting for
    assert swapped == {n for n, _, i in _inventory.find(model)
                       if i.kind in ("layer", "rms", "group") and i.casting is not None
                       and i.family != "normkit"}
    # ... and after converting, watch and audit still see the same modules
    assert {n for n, *_ in watch_norms(converted)} == norms
    assert {n.name for n in audit_norms(converted)} == norms


def test_a_watched_transformer_records_every_norm():
    m = TinyTransformer()
    idx, _ = lm_batch()
    with watch(m, model_name="t", model_version="1") as w:
        m(idx)
    s = w.summary()
    assert set(s) == set(m.norm_names()) and {d["norm"] for d in s.values()} == {"layer"}
