"""normkit.audit: every check fires on its purpose-built broken model and stays silent on the
healthy ones (torch models here; Hugging Face models in test_audit_hf.py; the CLI in
test_audit_cli.py)."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import audit_models as A
import pytest
import torch

from normkit.audit import CHECKS, RULES, SCHEMA_VERSION, AuditReport, Finding, audit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LOUD = "warning"  # "silent" means: no finding at warning or above (info may describe facts)


def loud_ids(report: AuditReport) -> set[str]:
    return report.ids(LOUD)


def describe(report: AuditReport) -> str:
    return "\n".join(f"{f.severity} {f.id} {f.layer}: {f.message}" for f in report.findings)


# ----------------------------------------------------------------------------------------------
# Healthy models: every check runs (ONNX included), nothing fires
# ----------------------------------------------------------------------------------------------

HEALTHY = {
    # factory: (model placement, {layer: placement} spot checks)
    "pre_ln": ("pre-norm", {"blocks.0.ln1": "pre", "blocks.1.ln2": "pre", "final": "final"}),
    "post_ln": ("post-norm", {"blocks.0.ln1": "post", "blocks.1.ln2": "final"}),
    "peri_ln": ("peri-norm", {"blocks.0.ln1": "pre", "blocks.0.ln1_out": "peri"}),
    "lstm_ln": (None, {"ln": "standalone"}),
    "cnn_bn": (None, {}),
}


@pytest.fixture(scope="module", params=sorted(HEALTHY))
def healthy(request):
    name = request.param
    model = getattr(A, name)()
    return name, model, audit(model)


def test_healthy_models_pass_every_check(healthy):
    name, model, report = healthy
    assert report.checks == list(CHECKS)
    assert not report.skipped, report.skipped
    assert loud_ids(report) == set(), describe(report)
    assert report.ok("warning") and report.ok("error")
    assert report.metrics["export"]["exporter"] == "dynamo"
    assert report.metrics["checkpoint"] == {"torch": "identical", "safetensors": "identical"}
    assert 0 <= report.metrics["numerics"]["output_rel_err_vs_float64"] < 1e-4
    # the audit never touches the caller's model
    assert not model.training


def test_inventory_describes_every_norm(healthy):
    name, model, report = healthy
    want = [(n, m) for n, m in model.named_modules() if isinstance(
        m, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm))]
    assert [L["name"] for L in report.layers] == [n for n, _ in want]
    for L, (_, m) in zip(report.layers, want, strict=True):
        assert L["type"] == type(m).__name__
        assert L["eps"] == m.eps
        assert L["params"] == sum(p.numel() for p in m.parameters())
        assert L["affine"] is True and L["bias"] is True
        assert L["dtype"] == "float32"
    placement, spots = HEALTHY[name]
    assert report.metrics["model"]["placement"] == placement
    got = {L["name"]: L["placement"] for L in report.layers}
    for layer, where in spots.items():
        assert got[layer] == where, (layer, got)


def test_normkit_converted_model_passes_every_check():
    """normkit's own modules (after normkit.convert) export, round-trip and stay exact."""
    import normkit

    model = normkit.convert(A.pre_ln())
    report = audit(model)
    assert loud_ids(report) == set(), describe(report)
    assert {L["family"] for L in report.layers} == {"normkit:torch"}
    assert set(report.metrics["export"]["layers"]) == {L["name"] for L in report.layers}


def test_no_norms_is_an_error_not_a_pass():
    """A model with nothing to audit fails the gate (it is not the model the user meant)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    report = audit(model, torch.randn(2, 4), checks=["inventory", "parameters", "epsilon"])
    assert report.ids() == {"NK-INV-001"}
    assert report.by_id("NK-INV-001")[0].severity == "error"
    assert report.layers == []
    assert not report.ok()


# ----------------------------------------------------------------------------------------------
# Broken variants: each triggers exactly its finding (at warning or above), at its layer
# ----------------------------------------------------------------------------------------------

# (factory, audit kwargs, expected id, expected layer)
BROKEN = [
    ("nan_gamma", {}, "NK-PARAM-002", "blocks.1.ln2"),
    ("dead_gamma", {}, "NK-PARAM-003", "blocks.0.ln1"),
    ("frozen_gamma", {"training": True}, "NK-PARAM-005", "final"),
    ("keras_eps", {}, "NK-EPS-003", "blocks.0.ln2"),
    ("zero_eps", {}, "NK-EPS-001", "blocks.1.ln1"),
    ("big_eps", {}, "NK-EPS-004", "final"),
    ("train_mode", {}, "NK-BATCH-003", None),
    ("cnn_batch_stats", {}, "NK-BATCH-001", "bn"),
    ("seq_bn", {}, "NK-BATCH-004", "bn"),
    ("fp16_naive_rms", {"dtype": "float16"}, "NK-NUM-002", "blocks.0.ln1"),
    ("naive_variance", {}, "NK-NUM-003", "ln"),
    ("unsaved_gamma", {}, "NK-CKPT-002", "final"),
    ("bias_dropping_load", {}, "NK-CKPT-001", "blocks.1.ln2"),
    ("single_feature_ln", {}, "NK-SHAPE-001", "head.1"),
    ("single_feature_rms", {}, "NK-SHAPE-001", "head.1"),
    ("seq_axis_norm", {}, "NK-SHAPE-002", "norm"),
]
# Export-only defects: the other checks are covered above, the export is the slow part.
BROKEN_EXPORT = [
    ("unexportable", "NK-ONNX-001", None),
    ("export_divergent", "NK-ONNX-004", "blocks.1.ln1"),
    ("tiny_eps_rms", "NK-ONNX-002", "final"),
    ("stale_gamma", "NK-ONNX-003", "final"),
    ("export_divergent_head", "NK-ONNX-005", None),
    ("dead_norm_branch", "NK-ONNX-007", "aux_norm"),
]
_NON_EXPORT = [c for c in CHECKS if c != "export"]


@pytest.mark.parametrize("name,kwargs,rule,layer", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_model_triggers_exactly_its_finding(name, kwargs, rule, layer):
    report = audit(getattr(A, name)(), checks=_NON_EXPORT, **kwargs)
    assert loud_ids(report) == {rule}, describe(report)
    hits = report.by_id(rule)
    assert layer in {f.layer for f in hits}, describe(report)
    assert all(f.fix == RULES[rule].fix and f.fix for f in hits)
    assert not report.ok("warning")


@pytest.mark.parametrize("name,rule,layer", BROKEN_EXPORT, ids=[b[0] for b in BROKEN_EXPORT])
def test_broken_export_triggers_exactly_its_finding(name, rule, layer):
    report = audit(getattr(A, name)(), checks=["export"])
    assert loud_ids(report) == {rule}, describe(report)
    assert [f.layer for f in report.by_id(rule)] == [layer]
    assert not report.ok("warning")


def test_export_failure_message_names_both_exporters_in_one_line():
    report = audit(A.unexportable(), checks=["export"])
    (f,) = report.by_id("NK-ONNX-001")
    assert "dynamo:" in f.message and "torchscript:" in f.message
    assert "bessel_j0" in f.message and "\x1b" not in f.message
    assert report.metrics["export"]["error"] == f.message.removeprefix("ONNX export failed: ")


def test_torchscript_exporter_below_opset_17_decomposed_layernorm_is_verified():
    """The legacy exporter below opset 17 writes LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div: the
    subgraph is still located (by node-name scopes), its eps and γ/β checked, its output
    compared; the only finding is the hint to export at opset ≥ 17."""
    report = audit(A.pre_ln(), checks=["export"], exporter="torchscript", opset=16)
    exp = report.metrics["export"]
    assert (exp["exporter"], exp["opset"]) == ("torchscript", 16)
    assert report.ids() == {"NK-ONNX-006"}, describe(report)
    assert report.by_id("NK-ONNX-006")[0].data["layers"] == [L["name"] for L in report.layers]
    for name, layer in exp["layers"].items():
        assert layer["op"] == "subgraph"
        assert math.isclose(layer["eps"], 1e-5, rel_tol=1e-6), name
        assert layer["max_rel"] <= exp["tolerance_rel"], name


def test_rms_norm_fused_at_opset_23_and_legacy_exporter_has_no_rms_norm():
    model = A.rms_healthy()
    report = audit(model, checks=["export"], opset=23)
    assert report.ids() == set(), describe(report)
    assert {v["op"] for v in report.metrics["export"]["layers"].values()} == {"RMSNormalization"}
    default = audit(model, checks=["export"])  # the exporter's default opset, 20 in torch 2.13
    if default.metrics["export"]["opset"] < 23:
        assert default.ids() == {"NK-ONNX-006"}, describe(default)
    legacy = audit(model, checks=["export"], exporter="torchscript", opset=17)
    assert legacy.ids() == {"NK-ONNX-001"}
    assert "rms_norm" in legacy.findings[0].message


def test_export_divergence_is_reported_per_layer_with_numbers():
    report = audit(A.export_divergent(), checks=["export"])
    (f,) = report.by_id("NK-ONNX-004")
    layers = report.metrics["export"]["layers"]
    # the layer before the broken one agrees with ONNX Runtime, the broken one does not
    assert layers["blocks.1.ln1"]["max_rel"] > report.metrics["export"]["tolerance_rel"]
    assert layers["blocks.0.ln2"]["max_rel"] <= report.metrics["export"]["tolerance_rel"]
    assert f.data["max_rel"] == layers["blocks.1.ln1"]["max_rel"]
    assert layers["blocks.0.ln1"]["op"] == "LayerNormalization"
    assert math.isclose(layers["blocks.0.ln1"]["eps"], 1e-5, rel_tol=1e-6)


# ----------------------------------------------------------------------------------------------
# Norm shapes
# ----------------------------------------------------------------------------------------------


class UnitNorm(torch.nn.Module):
    """A custom norm (neither torch's nor a known Hugging Face one): x/√(mean(x²)+eps)·γ."""

    def __init__(self, n, eps=1e-5):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((n,), 1.5))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@pytest.mark.parametrize("norm,severity,says", [
    (lambda: torch.nn.LayerNorm(1), "error", "outputs β"),
    (lambda: torch.nn.RMSNorm(1, eps=1e-5), "warning", "only the sign"),
    # custom norms are judged by what they do on a probe column
    (lambda: A.NaiveVarianceLayerNorm(1), "error", "outputs β"),
    (lambda: UnitNorm(1), "warning", "single feature"),
])
def test_single_feature_norm_severity_follows_what_it_computes(norm, severity, says):
    """LayerNorm(1) subtracts the row's mean, which is the row: a constant output (error).
    RMSNorm(1) is x/√(x²+eps)·γ ≈ sign(x)·γ: the input's sign survives (warning)."""
    report = audit(A._value_head(norm()), checks=["shape"])
    (f,) = report.by_id("NK-SHAPE-001")
    assert (f.layer, f.severity) == ("head.1", severity), f.message
    assert says in f.message and "[1]" in f.message
    assert loud_ids(report) == {"NK-SHAPE-001"}, describe(report)


def test_norm_width_its_neighbours_do_not_use_names_both_sizes():
    report = audit(A.seq_axis_norm(), checks=["shape"])
    (f,) = report.by_id("NK-SHAPE-002")
    assert f.layer == "norm" and f.severity == "warning"
    assert f.data["norm_width"] == A.SEQ
    assert f.data["neighbours"] == {"proj": A.D, "head": A.D}
    assert f"{A.SEQ} features" in f.message and "proj" in f.message and "head" in f.message
    assert str(A.D) in f.message


def test_norm_width_falls_back_on_the_config_hidden_size():
    """No Linear, Conv, Embedding, RNN or attention layer around the norm: the width it should
    have comes from the model config (hidden_size / d_model / n_embd)."""

    class Bare(torch.nn.Module):
        def __init__(self, over_seq: bool):
            super().__init__()
            self.config = types.SimpleNamespace(hidden_size=A.D)
            self.over_seq = over_seq
            self.norm = torch.nn.LayerNorm(A.SEQ if over_seq else A.D)

        def forward(self, x):  # (batch, seq, hidden); normalised over seq by mistake
            if self.over_seq:
                return self.norm(x.transpose(1, 2)).transpose(1, 2)
            return self.norm(x)

    x = torch.randn(3, A.SEQ, A.D)
    (f,) = audit(Bare(over_seq=True), x, checks=["shape"]).by_id("NK-SHAPE-002")
    assert f.layer == "norm" and f.data["neighbours"] == {"config.hidden_size": A.D}
    assert "hidden_size=32" in f.message
    assert audit(Bare(over_seq=False), x, checks=["shape"]).ids() == set()


@pytest.mark.parametrize("name", ["funnel", "convnext_like", "head_norm_attention",
                                  "scale_norm", "cnn_bn", "lstm_ln", "seq_bn", "peri_ln"])
def test_shape_check_is_silent_on_healthy_widths(name):
    """Several widths (each norm has its own neighbours), norms over a conv net's channels
    (channels-first BatchNorm/GroupNorm, channels-last LayerNorm), per-head norms over
    head_dim, a scalar γ over many features: nothing to report."""
    report = audit(getattr(A, name)(), checks=["shape"])
    assert report.ids() == set(), describe(report)
    assert report.checks == ["shape"] and not report.skipped


def test_fp16_naive_rms_is_fine_in_float32():
    """The naive RMSNorm's defect is float16-specific: in float32 the numerics are silent."""
    report = audit(A.fp16_naive_rms(), checks=["numerics"], dtype="float32")
    assert loud_ids(report) == set(), describe(report)
    assert report.metrics["numerics"]["layers"]["final"]["x1000"] < 1e-5


def test_large_mean_rows_are_fine_with_a_robust_variance():
    """The same activations as naive_variance through torch's LayerNorm: numerics silent."""
    report = audit(A.offset_healthy(), checks=["numerics"])
    assert loud_ids(report) == set(), describe(report)


def test_healthy_rms_model_float16_numerics_silent():
    """torch.nn.RMSNorm upcasts, so the x1000 scale that breaks the naive norm is fine."""
    report = audit(A.rms_healthy(), checks=["numerics", "epsilon"], dtype="float16")
    assert loud_ids(report) == set(), describe(report)


def test_non_finite_output_names_where_it_starts():
    model = A.pre_ln()
    with torch.no_grad():
        model.blocks[1].mlp[0].bias.fill_(float("inf"))
    report = audit(model, checks=["numerics"])
    assert loud_ids(report) == {"NK-NUM-001"}, describe(report)
    assert report.by_id("NK-NUM-001")[0].layer == "blocks.1.mlp.0"


def test_bitwise_batch_dependence_is_info_with_numbers():
    class Jitter(torch.nn.Module):
        """Adds a tiny batch-dependent term, below any tolerance but not bitwise invariant."""

        def forward(self, x):
            return x + 1e-7 * x.mean(0, keepdim=True)

    model = A.pre_ln()
    model.blocks[0].mlp.append(Jitter())
    report = audit(model, checks=["batch"])
    assert report.ids() == {"NK-BATCH-002"}, describe(report)
    batch = report.metrics["batch"]
    assert batch["bitwise"] is False and 0 < batch["max_abs"] < 1e-4
    # norms and elementwise ops only: row-wise by construction, so bitwise batch invariant
    # (a matmul's blocking may depend on the batch size on some CPUs)
    rowwise = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.GELU(),
                                  torch.nn.LayerNorm(16)).eval()
    clean = audit(rowwise, torch.randn(4, 5, 16), checks=["batch"])
    assert clean.ids() == set() and clean.metrics["batch"]["bitwise"] is True


def test_quantization_sensitivity_is_reported_not_failed():
    report = audit(A.outlier_channel(), checks=["quantization", "numerics"])
    assert report.ids() == {"NK-QUANT-001"}, describe(report)
    assert report.ok("warning")  # a report, never a gate
    row = report.metrics["quantization"]["layers"]["ln"]
    assert row["input_per_tensor"] > 5 * row["input_per_channel"]
    assert row["gamma_per_channel"] == 0.0  # one scale per γ entry is lossless
    healthy = audit(A.lstm_ln(), checks=["quantization", "numerics"])
    assert healthy.ids() == set(), describe(healthy)


def test_checkpoint_missing_and_stray_keys():
    model = A.pre_ln()
    sd = model.state_dict()
    del sd["blocks.0.ln2.bias"]
    report = audit(model, state_dict=sd, checks=["parameters"])
    assert report.ids() == {"NK-PARAM-001"}
    assert report.by_id("NK-PARAM-001")[0].layer == "blocks.0.ln2"
    assert audit(model, state_dict=model.state_dict(), checks=["parameters"]).ids() == set()

    rms = A.rms_healthy()
    sd = rms.state_dict()
    sd["final.bias"] = torch.zeros(A.D)
    report = audit(rms, state_dict=sd, checks=["parameters"])
    assert report.ids() == {"NK-PARAM-004"}
    assert report.by_id("NK-PARAM-004")[0].layer == "final"


def test_frozen_parameters_only_matter_for_training():
    assert audit(A.frozen_gamma(), checks=["parameters"]).ids() == set()
    assert audit(A.pre_ln(), checks=["parameters"], training=True).ids() == set()


def test_eps_underflow_in_float16_and_zero_centred_gamma():
    model = A.pre_ln()
    model.blocks[0].ln1.eps = 1e-12  # BERT's eps: 0 in float16
    report = audit(model, checks=["epsilon"], dtype="float16")
    assert report.ids() == {"NK-EPS-001"} and report.findings[0].layer == "blocks.0.ln1"
    assert audit(model, checks=["epsilon"], dtype="float32").ids() == set()


# ----------------------------------------------------------------------------------------------
# The caller's model, inputs and the report format
# ----------------------------------------------------------------------------------------------


def test_audit_does_not_modify_the_model():
    model = A.train_mode()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    audit(model, dtype="bfloat16", checks=["numerics", "batch"])
    assert model.training
    assert next(model.parameters()).dtype == dtype
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_example_inputs_tensor_tuple_and_dict():
    model = A.pre_ln()
    ids = torch.randint(0, A.VOCAB, (2, 5))
    for example in (ids, (ids,), [ids]):
        r = audit(model, example, checks=["batch"])
        assert r.metrics["batch"]["batch"] == 3  # widened from 2 to 3 samples
    wrapped = DictModel(model).eval()
    r = audit(wrapped, {"ids": ids}, checks=["batch", "numerics"])
    assert loud_ids(r) == set(), describe(r)


class DictModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        return {"logits": self.inner(ids)}


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        audit("model")
    with pytest.raises(ValueError, match="unknown check"):
        audit(A.pre_ln(), checks=["eps"])
    with pytest.raises(ValueError, match="dtype"):
        audit(A.pre_ln(), dtype="int8")
    with pytest.raises(ValueError, match="exporter"):
        audit(A.pre_ln(), exporter="tf2onnx")
    with pytest.raises(ValueError, match="example_inputs|--input-shape"):
        audit(torch.nn.Sequential(torch.nn.ReLU(), torch.nn.LayerNorm(4)))
    with pytest.raises(ValueError, match="forward fails on the example inputs: RuntimeError"):
        audit(A.lstm_ln(), torch.randn(2, 5, 7))  # the LSTM wants 16 features


def test_report_json_markdown_and_gate(tmp_path):
    report = audit(A.nan_gamma(), checks=["parameters", "epsilon"])
    doc = json.loads(report.to_json())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["ok"] is False and doc["counts"]["error"] == 1
    (f,) = doc["findings"]
    assert set(f) == {"id", "severity", "layer", "message", "fix", "data", "runbook_url"}
    assert f["runbook_url"].endswith("/docs/runbooks/audit-parameters.md")
    assert (f["id"], f["layer"]) == ("NK-PARAM-002", "blocks.1.ln2")
    md = report.to_markdown()
    assert "NK-PARAM-002" in md and "failed" in md and "| blocks.1.ln2 |" in md
    assert not report.ok("error") and not report.ok("warning")
    out = report.write(tmp_path / "sub" / "r.json")
    assert json.loads(out.read_text())["findings"][0]["id"] == "NK-PARAM-002"
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temp file left behind


def test_every_format_states_the_verdict_of_its_gate(tmp_path):
    """One warning, no error: passed under fail_on="error", failed under "warning" — and
    JSON, markdown and the written file say the same as ok(fail_on)."""
    report = audit(A.keras_eps(), checks=["epsilon"])
    assert loud_ids(report) == {"NK-EPS-003"} and report.counts()["error"] == 0
    for gate, ok in (("error", True), ("warning", False)):
        assert report.ok(gate) is ok
        assert (report.to_dict(gate)["ok"], report.to_dict(gate)["fail_on"]) == (ok, gate)
        assert json.loads(report.to_json(fail_on=gate))["ok"] is ok
        head = report.to_markdown(gate).splitlines()[0]
        assert ("✅ passed" in head, "❌ failed" in head) == (ok, not ok), head
        assert f"--fail-on {gate}" in head
        written = report.write(tmp_path / f"{gate}.json", fail_on=gate)
        assert json.loads(written.read_text())["ok"] is ok
        md = report.write(tmp_path / f"{gate}.md", "markdown", fail_on=gate).read_text()
        assert md == report.to_markdown(gate)
    with pytest.raises(ValueError, match="fail_on"):
        report.to_dict("fatal")


def test_finding_validation_and_rule_table():
    with pytest.raises(ValueError, match="unknown finding id"):
        Finding("NK-NOPE-001", "error", None, "m", "f")
    with pytest.raises(ValueError, match="severity"):
        Finding("NK-EPS-001", "fatal", None, "m", "f")
    with pytest.raises(ValueError, match="one line"):
        Finding("NK-EPS-001", "error", None, "a\nb", "f")
    for rule in RULES.values():
        assert rule.check in CHECKS and rule.fix and rule.title
    # every rule id is documented
    doc = (Path(__file__).parents[2] / "docs" / "audit.md").read_text()
    assert all(rid in doc for rid in RULES)


def test_package_is_callable_like_the_function():
    import normkit.audit as nka

    model = A.dead_gamma()
    assert nka(model, checks=["parameters"]).ids() == audit(model, checks=["parameters"]).ids()
    assert nka.RULES is RULES and nka.audit is audit


def test_missing_extra_skips_the_check_and_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime → ImportError
    report = audit(A.pre_ln(), checks=["export", "parameters"])
    assert report.ids() == {"NK-AUDIT-001"}
    assert 'pip install "normkit[export]"' in report.skipped["export"]
    assert report.ok("warning")


def test_a_crashing_check_is_reported_and_the_others_still_run(monkeypatch):
    from normkit.audit import _core

    def boom(ctx):
        raise RuntimeError("kaboom\nsecond line")

    order = tuple((n, boom if n == "epsilon" else f) for n, f in _core._ORDER)
    monkeypatch.setattr(_core, "_ORDER", order)
    report = audit(A.nan_gamma(), checks=["epsilon", "parameters"])
    assert report.ids() == {"NK-AUDIT-002", "NK-PARAM-002"}
    (f,) = report.by_id("NK-AUDIT-002")
    assert f.message == "epsilon check crashed: RuntimeError: kaboom" and not report.ok()


def test_import_is_lean():
    import subprocess

    code = ("import sys, normkit.audit; "
            "bad = [m for m in ('onnx', 'onnxruntime', 'transformers', 'safetensors', "
            "'onnxscript') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
