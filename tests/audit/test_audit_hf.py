"""normkit.audit on Hugging Face models built locally from tiny configs (nothing downloaded):
healthy models pass, each broken variant triggers exactly its finding."""

from __future__ import annotations

import pytest
import torch

from normkit.audit import audit

T = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_DECODER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)


def build(name: str, **overrides):
    torch.manual_seed(0)
    if name == "bert":
        cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=48,
                           max_position_embeddings=64, **overrides)
        return T.BertModel(cfg, add_pooling_layer=False).eval()
    if name == "gpt2":
        cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                           bos_token_id=0, eos_token_id=0, **overrides)
        # with the LM head: its weight is tied to the embedding, which the safetensors
        # round-trip must handle (save_file refuses shared tensors)
        return T.GPT2LMHeadModel(cfg).eval()
    if name == "llama":
        return T.LlamaModel(T.LlamaConfig(**_DECODER, **overrides)).eval()
    if name == "gemma":
        return T.GemmaModel(T.GemmaConfig(**_DECODER, head_dim=16, **overrides)).eval()
    if name == "qwen3":
        return T.Qwen3Model(T.Qwen3Config(**_DECODER, head_dim=16, **overrides)).eval()
    if name in ("t5", "t5-lm"):
        cfg = T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
                         decoder_start_token_id=0, **overrides)
        return (T.T5Model if name == "t5" else T.T5ForConditionalGeneration)(cfg).eval()
    raise ValueError(name)


# (model, norm class name, model placement, eps)
HF = {
    "bert": ("LayerNorm", "post-norm", 1e-12),
    "gpt2": ("LayerNorm", "pre-norm", 1e-5),
    "llama": ("LlamaRMSNorm", "pre-norm", 1e-6),
    "gemma": ("GemmaRMSNorm", "pre-norm", 1e-6),
    "t5": ("T5LayerNorm", "pre-norm", 1e-6),
}
# Checks per model: all of them where the model brings something new to a check (GPT-2's tied
# LM head to the checkpoint round-trip); Gemma and T5 skip the model-agnostic checkpoint and
# quantization checks to keep the suite fast.
CHECKS_FOR = {
    "gemma": ["inventory", "parameters", "shape", "epsilon", "batch", "numerics", "export"],
    "t5": ["inventory", "parameters", "shape", "epsilon", "batch", "numerics", "export"],
}


@pytest.mark.parametrize("name", sorted(HF))
def test_hf_healthy(name):
    model = build(name)
    checks = CHECKS_FOR.get(name)
    report = audit(model, checks=checks)
    assert report.ids("warning") == set(), [(f.id, f.layer, f.message) for f in report.findings]
    cls, placement, eps = HF[name]
    norms = [n for n, m in model.named_modules() if type(m).__name__ == cls]
    assert [L["name"] for L in report.layers] == norms
    assert all(L["eps"] == pytest.approx(eps, rel=1e-9) for L in report.layers)
    assert report.metrics["model"]["placement"] == placement
    if name in ("llama", "gemma", "t5"):
        assert all(L["kind"] == "rms_norm" and not L["bias"] for L in report.layers)
    if name == "gemma":
        assert all(L["zero_centered_gamma"] for L in report.layers)
    if "export" in report.checks:  # every norm found, eps and γ verified, outputs compared
        layers = report.metrics["export"]["layers"]
        assert set(layers) == set(norms)
        assert all("max_rel" in v for v in layers.values())
        assert report.metrics["export"]["outputs_compared"] >= 1
    if "quantization" in report.checks:
        assert set(report.metrics["quantization"]["layers"]) == set(norms)
    if "checkpoint" in report.checks:
        assert report.metrics["checkpoint"] == {"torch": "identical", "safetensors": "identical"}


@pytest.mark.parametrize("name", ["t5", "t5-lm"])
def test_t5_exports_with_the_cache_off_and_tensor_outputs(name):
    """T5 (a family normkit.convert supports) passes its own export check: its decoder would
    return an EncoderDecoderCache, which neither exporter can trace, unless the cache is off in
    every config (the decoder stack has its own); the export sees plain tensor outputs.
    Explicit encoder and decoder inputs, with masks, as a caller passes them."""
    model = build(name)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "decoder_input_ids": ids[:, :4], "decoder_attention_mask": torch.ones_like(
                  ids[:, :4])}
    report = audit(model, inputs, checks=["export"])
    assert report.ids("warning") == set(), [(f.id, f.message) for f in report.findings]
    exp = report.metrics["export"]
    norms = {n for n, m in model.named_modules() if type(m).__name__ == "T5LayerNorm"}
    assert set(exp["layers"]) == norms
    assert all(v["max_rel"] <= exp["tolerance_rel"] for v in exp["layers"].values())
    # every model output (decoder state or logits, encoder state) compared with ONNX Runtime
    assert exp["outputs_compared"] == 2 and exp["output_max_rel"] <= exp["tolerance_rel"]
    assert model.config.use_cache and model.decoder.config.use_cache  # the caller's model


def test_per_head_q_k_norms_match_their_projections():
    """Qwen3 normalises q and k per head over head_dim (16 of hidden 32): the norm's input is
    (batch, seq, heads, head_dim) from a projection of width heads·head_dim, not a mismatch."""
    model = build("qwen3")
    report = audit(model, checks=["shape"])
    assert report.ids() == set(), [(f.id, f.layer, f.message) for f in report.findings]
    widths = {L["name"]: L["normalized_shape"] for L in report.layers}
    assert widths["layers.0.self_attn.q_norm"] == [16]
    assert widths["layers.0.input_layernorm"] == [32]


def test_bert_keras_eps_port():
    """The classic: one LayerNorm of a PyTorch BERT built with Keras' 1e-3."""
    model = build("bert")
    model.encoder.layer[1].output.LayerNorm.eps = 1e-3
    report = audit(model, checks=["epsilon", "numerics"])
    assert report.ids("warning") == {"NK-EPS-003"}
    (f,) = report.by_id("NK-EPS-003")
    assert f.layer == "encoder.layer.1.output.LayerNorm" and f.severity == "error"
    assert f.data["expected"] == 1e-12


def test_llama_eps_differs_from_config():
    model = build("llama")
    model.layers[0].post_attention_layernorm.variance_epsilon = 3e-6
    report = audit(model, checks=["epsilon"])
    assert report.ids("warning") == {"NK-EPS-002"}
    assert report.by_id("NK-EPS-002")[0].layer == "layers.0.post_attention_layernorm"


def test_bert_float16_eps_underflow():
    report = audit(build("bert"), checks=["epsilon"], dtype="float16")
    assert report.ids("warning") == {"NK-EPS-001"}
    assert len(report.by_id("NK-EPS-001")) == len(report.layers) == 5
    assert audit(build("gpt2"), checks=["epsilon"], dtype="float16").ids("warning") == set()


def test_llama_layernorm_with_bias_in_rms_family():
    model = build("llama")
    model.norm = torch.nn.LayerNorm(32, eps=1e-6)
    report = audit(model, checks=["parameters"])
    assert report.ids("warning") == {"NK-PARAM-004"}
    assert report.by_id("NK-PARAM-004")[0].layer == "norm"


def test_gemma_zero_centred_gamma_is_not_dead():
    """Gemma stores γ-1: zeros are a healthy identity scale; -1 is the dead layer."""
    model = build("gemma")
    assert audit(model, checks=["parameters"]).ids() == set()
    with torch.no_grad():
        model.norm.weight.fill_(-1.0)
    report = audit(model, checks=["parameters"])
    assert report.ids() == {"NK-PARAM-003"} and report.findings[0].layer == "norm"


def test_gpt2_checkpoint_missing_norm_keys():
    model = build("gpt2")
    sd = model.state_dict()
    del sd["transformer.h.1.ln_2.weight"]
    report = audit(model, state_dict=sd, checks=["parameters"])
    assert report.ids() == {"NK-PARAM-001"}
    assert report.by_id("NK-PARAM-001")[0].layer == "transformer.h.1.ln_2"


def test_hf_directory_with_a_norm_key_missing(tmp_path):
    """A Hugging Face checkpoint that lost one LayerNorm γ: transformers initialises it (to 1)
    and reports it missing; the audit turns that into NK-PARAM-001 at the layer."""
    from safetensors.torch import load_file, save_file

    from normkit._cli._target import load_target

    build("bert").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    sd = load_file(weights)
    key = next(k for k in sd if k.endswith("layer.1.output.LayerNorm.weight"))
    del sd[key]
    save_file(sd, weights, metadata={"format": "pt"})
    target = load_target(str(tmp_path))
    assert target.kind == "hf" and any(k.endswith(key) for k in target.missing_keys)
    report = audit(target.model, checks=["parameters"], _missing_keys=target.missing_keys)
    assert report.ids() == {"NK-PARAM-001"}
    assert report.by_id("NK-PARAM-001")[0].layer == "encoder.layer.1.output.LayerNorm"
