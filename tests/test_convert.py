"""normkit.convert / normkit.revert on torch modules and small Hugging Face models."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from normkit.convert import convert, revert
from normkit.nn import LayerNorm, RMSNorm

# Tolerances for a converted model's last_hidden_state against the original's.
TOL = {
    # Each norm differs from the original by a few float32 ulps (different summation order);
    # 2 layers of attention/MLP carry that to ~2e-6 on outputs of magnitude ~7.
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}
# bfloat16 models are judged against the float32 model, as flash-attention's tests do: the
# converted model's error may be at most BF16_FACTOR times the original bf16 model's error, plus
# BF16_ATOL (about one bfloat16 ulp at 0.25) for a rounding flip in a near-zero output.  A norm
# with the wrong cast order or 1+γ breaks this by orders of magnitude.
BF16_FACTOR = 2.0
BF16_ATOL = 1e-3

LOG = "normkit.convert"


# ----------------------------------------------------------------------------------------------
# Small Hugging Face models
# ----------------------------------------------------------------------------------------------

_DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)


def _hf_model(name):
    """(model, norm classes it holds, casting, zero_centered_gamma) for a tiny random model."""
    T = pytest.importorskip("transformers")
    if name == "bert":
        cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=48,
                           max_position_embeddings=64)
        return T.BertModel(cfg, add_pooling_layer=False), (torch.nn.LayerNorm,), "torch", False
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                           bos_token_id=0, eos_token_id=0)
        return T.GPT2Model(cfg), (torch.nn.LayerNorm,), "torch", False
    if name in ("llama", "qwen2", "mistral"):
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
        from transformers.models.mistral.modeling_mistral import MistralRMSNorm
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

        cls = {"llama": (T.LlamaConfig, T.LlamaModel), "qwen2": (T.Qwen2Config, T.Qwen2Model),
               "mistral": (T.MistralConfig, T.MistralModel)}[name]
        norms = (LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm)
        return cls[1](cls[0](**_DECODER)), norms, "llama", False
    if name in ("gemma", "gemma2", "gemma3"):
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

        cls = {"gemma": ("GemmaConfig", "GemmaModel", "gemma"),
               "gemma2": ("Gemma2Config", "Gemma2Model", "gemma2"),
               "gemma3": ("Gemma3TextConfig", "Gemma3TextModel", "gemma3")}[name]
        if not hasattr(T, cls[1]):
            pytest.skip(f"transformers {T.__version__} has no {cls[1]}")
        modeling = __import__(f"transformers.models.{cls[2]}.modeling_{cls[2]}", fromlist=["_"])
        norms = tuple({GemmaRMSNorm, getattr(modeling, name.capitalize() + "RMSNorm")})
        model = getattr(T, cls[1])(getattr(T, cls[0])(**_DECODER, head_dim=16))
        return model, norms, "gemma", True
    if name == "t5":
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        cfg = T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2,
                         num_heads=2, decoder_start_token_id=0)
        return T.T5Model(cfg), (T5LayerNorm,), "t5", False
    raise ValueError(name)


HF_MODELS = ["bert", "gpt2", "llama", "qwen2", "mistral", "gemma", "gemma2", "gemma3", "t5"]


def _randomize_norms(model, norm_classes, zero_centered):
    """Random γ/β, so that a dropped 1+γ, bias or cast would show (HF initialises γ to 1 or 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norm_classes):
                for pname, p in m.named_parameters(recurse=False):
                    center = 0.0 if pname == "bias" or zero_centered else 1.0
                    p.copy_(torch.randn_like(p) * 0.5 + center)


def _run(model, ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).last_hidden_state
        return model(input_ids=ids).last_hidden_state


@pytest.fixture(params=HF_MODELS)
def hf(request):
    torch.manual_seed(0)
    model, norm_classes, casting, zc = _hf_model(request.param)
    model.eval()
    _randomize_norms(model, norm_classes, zc)
    ids = torch.randint(0, 64, (2, 9))
    return model, norm_classes, casting, zc, ids


def test_hf_models_convert_exactly(hf):
    model, norm_classes, casting, zc, ids = hf
    originals = [m for m in model.modules() if isinstance(m, norm_classes)]
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    n_modules = len(list(model.modules()))
    want32 = _run(model, ids)

    assert convert(model) is model
    converted = [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm))]
    assert len(converted) == len(originals) > 0
    assert not any(isinstance(m, norm_classes) and m not in converted for m in model.modules())
    for new, old in zip(converted, originals, strict=True):
        assert (new.casting, new.zero_centered_gamma) == (casting, zc)
        assert new.weight is old.weight
        assert getattr(new, "bias", None) is getattr(old, "bias", None)
        eps = getattr(old, "variance_epsilon", getattr(old, "eps", None))
        assert new.eps == eps  # kept exactly; HF's attribute stays readable too:
        if hasattr(old, "variance_epsilon"):
            assert new.variance_epsilon == old.variance_epsilon
        assert not new.training
    assert all(p is params[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert len(list(model.modules())) == n_modules  # the originals are not submodules

    got32 = _run(model, ids)
    torch.testing.assert_close(got32, want32, **TOL[torch.float32])

    # revert gives back the original objects: bit-identical outputs
    assert revert(model) is model
    assert [m for m in model.modules() if isinstance(m, norm_classes)] == originals
    assert all(p is params[name] for name, p in model.named_parameters())
    assert torch.equal(_run(model, ids), want32)

    # bfloat16 (.to changes the shared parameters in place, so the float32 model is gone)
    model.to(torch.bfloat16)
    want16 = _run(model, ids)
    convert(model)
    assert all(p is params[name] for name, p in model.named_parameters())
    got16 = _run(model, ids)
    assert got16.dtype == torch.bfloat16
    err_original = (want16.double() - want32.double()).abs().max().item()
    err_converted = (got16.double() - want32.double()).abs().max().item()
    assert err_converted <= BF16_FACTOR * err_original + BF16_ATOL, (err_converted, err_original)


def test_filter_selects_by_qualified_name():
    torch.manual_seed(0)
    model, norm_classes, _, _ = _hf_model("llama")
    seen = []

    def only_layer0(module, name):
        seen.append((type(module).__name__, name))
        return name.startswith("layers.0.")

    convert(model, filter=only_layer0)
    assert [n for _, n in seen] == [
        "layers.0.input_layernorm", "layers.0.post_attention_layernorm",
        "layers.1.input_layernorm", "layers.1.post_attention_layernorm", "norm",
    ]  # post-order, norms only
    assert {c for c, _ in seen} == {"LlamaRMSNorm"}
    assert isinstance(model.layers[0].input_layernorm, RMSNorm)
    assert isinstance(model.layers[0].post_attention_layernorm, RMSNorm)
    assert isinstance(model.layers[1].input_layernorm, norm_classes)
    assert isinstance(model.norm, norm_classes)


def test_not_inplace_leaves_the_model_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    x = torch.randn(3, 8)
    new = convert(model, inplace=False)
    assert new is not model
    assert type(model[1]) is torch.nn.LayerNorm and isinstance(new[1], LayerNorm)
    assert new[1].weight is not model[1].weight
    torch.testing.assert_close(new(x), model(x), **TOL[torch.float32])


# ----------------------------------------------------------------------------------------------
# torch modules, the root, sharing, state
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.LayerNorm((4, 6), eps=1e-3),
        lambda: torch.nn.LayerNorm(24, bias=False),
        lambda: torch.nn.LayerNorm(24, elementwise_affine=False),
        lambda: torch.nn.RMSNorm(24),
        lambda: torch.nn.RMSNorm(24, eps=1e-6, elementwise_affine=False),
    ],
    ids=["ln-2d", "ln-nobias", "ln-noaffine", "rms", "rms-noaffine"],
)
def test_root_torch_norm_round_trip(make):
    torch.manual_seed(0)
    old = make()
    x = torch.randn(5, 24).view(5, *old.normalized_shape)
    want = old(x)
    new = convert(old)
    assert isinstance(new, LayerNorm if isinstance(old, torch.nn.LayerNorm) else RMSNorm)
    assert (new.normalized_shape, new.eps, new.elementwise_affine) == (
        old.normalized_shape, old.eps, old.elementwise_affine,
    )
    assert [n for n, _ in new.named_parameters()] == [n for n, _ in old.named_parameters()]
    assert all(a is b for a, b in zip(new.parameters(), old.parameters(), strict=True))
    assert list(new.state_dict()) == list(old.state_dict())
    torch.testing.assert_close(new(x), want, **TOL[torch.float32])
    assert revert(new) is old
    assert torch.equal(old(x), want)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.nn.LayerNorm(8, eps=0.0),
        lambda: torch.nn.RMSNorm(8, eps=0.0),
        lambda: _hf_norm("llama", 0.0),
        lambda: _hf_norm("gemma", 0.0),
        lambda: _hf_norm("t5", 0.0),
    ],
    ids=["ln", "rms", "llama", "gemma", "t5"],
)
def test_eps_zero_is_kept(make):
    torch.manual_seed(0)
    old = make()
    new = convert(old)
    assert isinstance(new, (LayerNorm, RMSNorm))
    assert new.eps == 0.0 and new.eps is not None
    x = torch.randn(3, 8)
    torch.testing.assert_close(new(x), old(x), **TOL[torch.float32])


def _hf_norm(kind, eps):
    pytest.importorskip("transformers")
    if kind == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as cls
    elif kind == "gemma":
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as cls
    else:
        from transformers.models.t5.modeling_t5 import T5LayerNorm as cls
    return cls(8, eps=eps)


def test_shared_module_stays_shared():
    ln = torch.nn.LayerNorm(8)
    model = torch.nn.Sequential(ln, torch.nn.ReLU(), ln)
    convert(model)
    assert isinstance(model[0], LayerNorm) and model[0] is model[2]
    revert(model)
    assert model[0] is ln and model[2] is ln


def test_training_flag_and_idempotence():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8)).eval()
    convert(model)
    assert not model[0].training and not model[1].training
    first = list(model)
    convert(model)  # already converted: nothing changes
    assert list(model) == first
    model.train()
    revert(model)
    assert type(model[0]) is torch.nn.LayerNorm and model[0].training


def test_revert_keeps_parameters_replaced_after_conversion():
    model = convert(torch.nn.Sequential(torch.nn.LayerNorm(8)))
    new_state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(new_state, assign=True)  # new Parameter objects on the converted module
    weight = model[0].weight
    revert(model)
    assert type(model[0]) is torch.nn.LayerNorm and model[0].weight is weight


def test_deepcopy_of_converted_model_reverts():
    model = convert(torch.nn.Sequential(torch.nn.LayerNorm(8)))
    clone = copy.deepcopy(model)
    revert(clone)
    assert type(clone[0]) is torch.nn.LayerNorm
    assert isinstance(model[0], LayerNorm)
    assert clone[0].weight is not model[0].weight


def test_hooks_are_not_carried_over_and_say_where(caplog):
    torch.manual_seed(0)
    model, _, _, _ = _hf_model("llama")
    model.layers[1].input_layernorm.register_forward_hook(lambda *a: None)
    with caplog.at_level(logging.WARNING, logger=LOG):
        _, plan = convert(model, return_plan=True)
    assert isinstance(model.layers[1].input_layernorm, RMSNorm)
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "hooks" in msg and "layers.1.input_layernorm (LlamaRMSNorm)" in msg
    noted = [n.name for n in plan.replaced if n.note]
    assert noted == ["layers.1.input_layernorm"]


def test_hooks_on_the_root_name_the_root(caplog):
    ln = torch.nn.LayerNorm(8)
    ln.register_forward_pre_hook(lambda *a: None)
    with caplog.at_level(logging.WARNING, logger=LOG):
        assert isinstance(convert(ln), LayerNorm)
    assert "hooks registered on the root module (LayerNorm)" in caplog.text


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        convert("model")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got NoneType"):
        revert(None)
    with pytest.raises(TypeError, match="filter must be callable"):
        convert(torch.nn.LayerNorm(4), filter=3)
    for flag in ("inplace", "dry_run", "return_plan"):
        with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'yes'"):
            convert(torch.nn.LayerNorm(4), **{flag: "yes"})


# ----------------------------------------------------------------------------------------------
# What convert did: the plan, the summary line, dry runs
# ----------------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    """One of everything convert meets: norms it replaces and norms it leaves alone, each for
    a different reason."""

    def __init__(self):
        super().__init__()
        self.ln1 = torch.nn.LayerNorm(8)
        self.ln2 = torch.nn.LayerNorm(8)
        self.rms = torch.nn.RMSNorm(8)
        self.inst = torch.nn.InstanceNorm1d(8)
        self.batch = torch.nn.BatchNorm1d(8)
        self.hand = ScaledRMSNorm(8)                   # hand-written: no known forward
        self.nan_eps = torch.nn.LayerNorm(8, eps=float("nan"))
        self.done = LayerNorm(8)                        # already normkit's
        self.fc = torch.nn.Linear(8, 8)                 # no norm: not in the plan


def test_plan_says_what_was_replaced_and_why_the_rest_was_not(caplog):
    model = _Block()
    with caplog.at_level(logging.INFO, logger=LOG):
        got, plan = convert(model, return_plan=True)
    assert got is model and not plan.dry_run
    assert [(n.name, n.type_name, n.becomes) for n in plan.replaced] == [
        ("ln1", "LayerNorm", "LayerNorm"), ("ln2", "LayerNorm", "LayerNorm"),
        ("rms", "RMSNorm", "RMSNorm")]
    assert all(n.casting == "torch" and not n.zero_centered_gamma for n in plan.replaced)
    skipped = {n.name: (n.type_name, n.kind, n.reason) for n in plan.skipped}
    assert list(skipped) == ["inst", "batch", "hand", "nan_eps", "done"]
    assert skipped["inst"] == ("InstanceNorm1d", "instance",
                               "no normkit module computes instance norms")
    assert skipped["batch"][1:] == ("batch", "no normkit module computes batch norms")
    assert "matches no known norm implementation" in skipped["hand"][2]
    assert skipped["nan_eps"][2] == "eps=nan"
    assert skipped["done"][2] == "already a normkit module"
    assert all(n.becomes is None for n in plan.skipped)
    assert plan.counts() == {"LayerNorm": 2, "RMSNorm": 1}
    assert isinstance(model.ln1, LayerNorm) and model.inst.__class__ is torch.nn.InstanceNorm1d

    # one INFO line per call, the plan's summary
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == [plan.summary()]
    line = infos[0]
    assert line.startswith("replaced 3 of 8 norms: 2 LayerNorm → normkit.nn.LayerNorm, "
                           "1 RMSNorm → normkit.nn.RMSNorm; left alone: 1 InstanceNorm1d (no "
                           "normkit module computes instance norms), ")
    assert "1 LayerNorm (eps=nan)" in line and "1 LayerNorm (already a normkit module)" in line
    assert "\n" not in line
    # str(plan): the summary, then a line per norm with its qualified name
    text = str(plan).splitlines()
    assert text[0] == line and len(text) == 1 + 8
    assert any(t.split()[0] == "hand" and "ScaledRMSNorm" in t for t in text[1:])


def test_plan_reasons_for_unknown_and_registered_classes():
    import normkit

    class WhiteNorm(torch.nn.Module):  # a look-alike ("Norm" in its name) of no known kind
        def __init__(self):
            super().__init__()
            self.eps = 1e-5

        def forward(self, x):
            return x / x.std(-1, keepdim=True).add(self.eps)

    class Scaler(torch.nn.Module):  # a new class object per test run: the registration is ours
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    normkit.register_norm(Scaler, kind="rms")
    model = torch.nn.Sequential(WhiteNorm(), Scaler(), normkit.nn.DyT(8))
    _, plan = convert(model, return_plan=True)
    assert [(n.kind, n.reason) for n in plan.norms] == [
        ("custom", "looks like a norm but normkit does not know it; declare it with "
                   "normkit.register_norm"),
        ("rms", "registered without casting=, which convert needs to reproduce it"),
        ("dyt", "already a normkit module"),
    ]


def test_plan_of_hf_model_names_casting_and_filter():
    torch.manual_seed(0)
    model, _, _, _ = _hf_model("gemma")
    _, plan = convert(model, filter=lambda m, name: name != "norm", return_plan=True)
    assert [n.name for n in plan.replaced] == [
        f"layers.{i}.{s}" for i in (0, 1) for s in ("input_layernorm", "post_attention_layernorm")]
    assert {(n.type_name, n.becomes, n.casting, n.zero_centered_gamma)
            for n in plan.replaced} == {("GemmaRMSNorm", "RMSNorm", "gemma", True)}
    (left,) = plan.skipped
    assert (left.name, left.reason) == ("norm", "the filter returned False")
    assert plan.counts() == {"GemmaRMSNorm": 4}


def test_plan_of_model_without_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    _, plan = convert(model, return_plan=True)
    assert plan.norms == () and plan.summary() == "found no norms"


def test_second_convert_reports_the_norms_as_done():
    model = convert(torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8)))
    _, plan = convert(model, return_plan=True)
    assert plan.replaced == ()
    assert plan.summary() == ("replaced 0 of 2 norms; left alone: 1 LayerNorm (already a "
                              "normkit module), 1 RMSNorm (already a normkit module)")


def _snapshot(model):
    return ([(n, m) for n, m in model.named_modules()],
            [(n, p) for n, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()})


def _assert_untouched(model, snap):
    modules, params, state = snap
    assert [(n, m) for n, m in model.named_modules()] == modules  # the same objects
    assert all(a[0] == b[0] and a[1] is b[1]
               for a, b in zip(model.named_parameters(), params, strict=True))
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize("inplace", [True, False])
def test_dry_run_changes_nothing_and_plans_what_convert_does(inplace, caplog):
    torch.manual_seed(0)
    model, norm_classes, _, _ = _hf_model("llama")
    model.layers[0].input_layernorm.register_forward_hook(lambda *a: None)
    snap = _snapshot(model)
    with caplog.at_level(logging.INFO, logger=LOG):
        got, plan = convert(model, dry_run=True, inplace=inplace, return_plan=True)
    assert got is model  # not even a copy
    _assert_untouched(model, snap)
    assert all(isinstance(m, norm_classes) for m in model.modules()
               if "norm" in type(m).__name__.lower())
    assert plan.dry_run and len(plan.replaced) == 5 and plan.skipped == ()
    assert [r.getMessage() for r in caplog.records] == [plan.summary()]  # no hook warning
    assert plan.summary().startswith("dry run: would replace 5 of 5 norms: 5 LlamaRMSNorm → ")
    assert [n.name for n in plan.replaced if n.note] == ["layers.0.input_layernorm"]
    # the real conversion does what the dry run said
    _, done = convert(model, return_plan=True)
    assert done.norms == plan.norms and not done.dry_run


def test_dry_run_of_a_root_norm_and_without_plan():
    ln = torch.nn.LayerNorm(8)
    snap = _snapshot(ln)
    assert convert(ln, dry_run=True) is ln
    _assert_untouched(ln, snap)
    _, plan = convert(ln, dry_run=True, return_plan=True)
    assert [(n.name, n.becomes) for n in plan.norms] == [("", "LayerNorm")]
    assert "<root>" in str(plan)


# ----------------------------------------------------------------------------------------------
# Look-alikes are left alone
# ----------------------------------------------------------------------------------------------


class ScaledRMSNorm(torch.nn.Module):
    """Has Llama's attributes, but multiplies before casting and adds a constant: not Llama."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon) + 1


class BufferedRMSNorm(torch.nn.Module):
    """Llama's forward, word for word, but with an extra buffer."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.register_buffer("scale", torch.ones(n))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class MyRMSNorm(BufferedRMSNorm):
    """Llama's forward (inherited) and only a weight: this one *is* a Llama RMSNorm."""

    def __init__(self, n, eps=1e-6):
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.variance_epsilon = eps


class ChannelsFirstLayerNorm(torch.nn.LayerNorm):
    """Subclasses torch.nn.LayerNorm but normalizes dim 1 (as ConvNeXt's does)."""

    def forward(self, x):
        return super().forward(x.transpose(1, -1)).transpose(1, -1)


def _gemma3n_norm():
    T = pytest.importorskip("transformers")
    try:
        from transformers.models.gemma3n.modeling_gemma3n import Gemma3nRMSNorm
    except ImportError:
        pytest.skip(f"transformers {T.__version__} has no Gemma3n")
    return Gemma3nRMSNorm(8)  # γ not zero-centred, pow(ms, -0.5): no known pattern


def _patched_layer_norm():
    ln = torch.nn.LayerNorm(8)
    ln.forward = lambda x: x  # e.g. what accelerate's hooks do, per instance
    return ln


@pytest.mark.parametrize(
    "make",
    [lambda: ScaledRMSNorm(8), lambda: BufferedRMSNorm(8), lambda: ChannelsFirstLayerNorm(8),
     _gemma3n_norm, _patched_layer_norm],
    ids=["different-forward", "extra-buffer", "subclass-overrides-forward", "gemma3n",
         "patched-instance"],
)
def test_lookalikes_are_left_alone(make, caplog):
    module = make()
    model = torch.nn.Sequential(module)
    with caplog.at_level(logging.DEBUG, logger=LOG):
        assert convert(model) is model
    assert model[0] is module
    assert "leaves '0'" in caplog.text and type(module).__name__ in caplog.text


def test_non_norm_modules_are_not_logged(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with caplog.at_level(logging.DEBUG, logger=LOG):
        convert(model)
    assert [r.getMessage() for r in caplog.records if r.name == LOG] == ["found no norms"]


def test_behaviour_not_name_decides():
    torch.manual_seed(0)
    module = MyRMSNorm(8, eps=1e-5)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.5)
    new = convert(module)
    assert isinstance(new, RMSNorm) and new.casting == "llama"
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = new(x), module(x)
    assert got.dtype == want.dtype == torch.float32  # promote(bf16 x, fp32 γ), as Llama does
    torch.testing.assert_close(got, want, atol=1e-5, rtol=2**-7)


def test_gpt_oss_style_norm_uses_torch_casting():
    pytest.importorskip("transformers")
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    except ImportError:
        pytest.skip("transformers has no GPT-OSS")
    torch.manual_seed(0)
    module = GptOssRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.5)
    new = convert(module)
    assert isinstance(new, RMSNorm) and new.casting == "torch"
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = new(x), module(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=1e-5, rtol=2**-7)


@pytest.mark.parametrize("kind", ["llama", "gemma", "t5"])
def test_hf_norm_gradients_match(kind):
    torch.manual_seed(0)
    old = _hf_norm(kind, 1e-6)
    with torch.no_grad():
        old.weight.normal_(0.0 if kind == "gemma" else 1.0, 0.5)
    new = convert(copy.deepcopy(old))
    x, dy = torch.randn(6, 8), torch.randn(6, 8)
    grads = []
    for module in (old, new):
        xi = x.clone().requires_grad_()
        (module(xi) * dy).sum().backward()
        grads.append((xi.grad, module.weight.grad))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, **TOL[torch.float32])
