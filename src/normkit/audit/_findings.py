"""Findings, the rule table that gives each finding id its meaning, and the findings table
(``AuditReport``: the audit's result, as JSON or markdown).

Finding ids are a public, stable contract (CI configurations filter on them): an id is never
renamed or reused for another meaning.  New checks get new ids.  See docs/audit.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._io import write_text_atomic
from .._provenance import normkit_version
from .._report.markdown import code_span, escape_text, table_cell
from ..monitor.alerts import runbook_url

SCHEMA_VERSION = 1

SEVERITIES = ("info", "warning", "error")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}

# The check groups, in the order they run; ``audit(checks=...)`` selects from these names.
CHECKS = (
    "inventory",
    "parameters",
    "shape",
    "epsilon",
    "batch",
    "numerics",
    "export",
    "checkpoint",
    "quantization",
)


@dataclass(frozen=True)
class Rule:
    """What a finding id means: its check group, default severity, title and fix text."""

    id: str
    check: str
    severity: str
    title: str
    fix: str


_RULES = (
    Rule("NK-INV-001", "inventory", "error", "no normalization layers found",
         "Check that TARGET is the model you meant: a model without norms has nothing to "
         "audit, so it cannot pass the gate."),
    Rule("NK-PARAM-001", "parameters", "error", "γ/β missing from the checkpoint",
         "Re-export the checkpoint from the trained model (model.state_dict()) and check key "
         "renames (gamma/beta → weight/bias, LayerNorm → layer_norm)."),
    Rule("NK-PARAM-002", "parameters", "error", "non-finite γ/β",
         "The weights are corrupt (diverged training or a bad conversion): restore an earlier "
         "checkpoint."),
    Rule("NK-PARAM-003", "parameters", "error", "γ all zero: the layer outputs a constant",
         "γ was lost or zero-initialised; load the trained γ (for zero-centred γ, as in Gemma, "
         "the stored value is γ-1)."),
    Rule("NK-PARAM-004", "parameters", "warning", "β where the model family has none",
         "RMSNorm families (Llama, Gemma, T5, ...) have no bias: use the family's norm class and "
         "drop the stray bias key."),
    Rule("NK-PARAM-005", "parameters", "warning", "norm parameters frozen in a training config",
         "Set requires_grad=True on the norm's γ/β, or audit without --training if the "
         "model is not meant to be trained."),
    Rule("NK-SHAPE-001", "shape", "error", "norm over a single feature",
         "Normalize over the feature dim (normalized_shape = the hidden size): over one value "
         "a LayerNorm outputs β and an RMSNorm sign(x)·γ; a scalar output needs no norm."),
    Rule("NK-SHAPE-002", "shape", "warning", "norm width differs from its neighbours'",
         "Check which dim the norm normalizes (a transpose too many, or normalized_shape "
         "built from the wrong size): it should be the width of the layers around it."),
    Rule("NK-EPS-001", "epsilon", "error", "eps is zero or underflows in the run dtype",
         "Use an eps representable in the run dtype (float16: ≥ 6e-8, e.g. 1e-5), or compute "
         "the statistics in float32."),
    Rule("NK-EPS-002", "epsilon", "error", "eps differs from the model config",
         "Build the norm with the config's eps (layer_norm_eps / rms_norm_eps / "
         "layer_norm_epsilon)."),
    Rule("NK-EPS-003", "epsilon", "warning", "eps is another framework's default",
         "The model was ported with the source framework's default eps; set the eps the "
         "original model used (e.g. Keras 1e-3 vs PyTorch 1e-5 vs BERT 1e-12)."),
    Rule("NK-EPS-004", "epsilon", "warning", "eps swamps the variance of real inputs",
         "eps is ≥ 10% of the typical per-row variance, so it changes the outputs; use a "
         "smaller eps or check the input scale."),
    Rule("NK-BATCH-001", "batch", "error", "output depends on the batch in eval mode",
         "Replace batch-statistics norms (BatchNorm without running stats, ...) with "
         "LayerNorm/RMSNorm or use running statistics in eval."),
    Rule("NK-BATCH-002", "batch", "info", "single-sample output not bitwise equal to batched",
         "Within tolerance; for bitwise batch invariance use batch-invariant kernels (normkit's "
         "norms are; matmuls may not be)."),
    Rule("NK-BATCH-003", "batch", "error", "model left in train mode",
         "Call model.eval() before saving/serving: dropout and BatchNorm behave differently "
         "in train mode."),
    Rule("NK-BATCH-004", "batch", "warning", "BatchNorm in a sequence model",
         "A model serving single requests should normalise per token (LayerNorm/RMSNorm); "
         "BatchNorm statistics are from training batches."),
    Rule("NK-NUM-001", "numerics", "error", "non-finite output",
         "Find the first layer named here: compute its statistics in float32 and keep "
         "activations in range."),
    Rule("NK-NUM-002", "numerics", "error", "sum of squares overflows in float16",
         "Upcast the norm input to float32 before squaring (as torch's and HF Llama's norms "
         "do), or use normkit.nn modules."),
    Rule("NK-NUM-003", "numerics", "warning", "norm output error vs float64 above tolerance",
         "Accumulate statistics in float32 and cast once at the end (normkit.convert does)."),
    Rule("NK-ONNX-001", "export", "error", "ONNX export failed",
         "Make the model exportable by torch.onnx: the message gives each exporter's reason "
         "(an op without an ONNX translation, data-dependent Python control flow, outputs "
         "that are not tensors)."),
    Rule("NK-ONNX-002", "export", "error", "exported eps differs from the model's",
         "Export at opset ≥ 17 (fused LayerNormalization keeps eps as a float32 attribute), "
         "compute statistics in float32, and avoid eps below float16's range in fp16 graphs."),
    Rule("NK-ONNX-003", "export", "error", "γ/β not in the export with the model's values",
         "The graph uses other weights than the module's parameters (a stale cache or an "
         "export-only code path); use the registered parameters in forward."),
    Rule("NK-ONNX-004", "export", "error", "norm output differs in ONNX Runtime",
         "Remove export-only code paths (torch.onnx.is_in_onnx_export()) and check the op's "
         "ONNX decomposition; the first diverging norm is named."),
    Rule("NK-ONNX-005", "export", "error", "model output differs in ONNX Runtime",
         "The norms agree but the model output does not: the divergence is outside the norms."),
    Rule("NK-ONNX-006", "export", "info", "norm exported as a decomposed subgraph",
         "Export at a higher opset (LayerNormalization ≥ 17, RMSNormalization ≥ 23) for one "
         "fused node."),
    Rule("NK-ONNX-007", "export", "warning", "norm not found in the export",
         "The exporter merged or removed the norm's nodes; its eps and γ/β could not be "
         "verified."),
    Rule("NK-CKPT-001", "checkpoint", "error", "outputs change after a checkpoint round-trip",
         "state_dict save/load does not restore the model: check custom state_dict / "
         "_load_from_state_dict hooks and key renames."),
    Rule("NK-CKPT-002", "checkpoint", "error", "γ/β not saved in the state_dict",
         "Register γ/β with nn.Parameter or register_buffer; a plain tensor attribute is "
         "never saved."),
    Rule("NK-QUANT-001", "quantization", "info", "norm sensitive to int8 per-tensor quantization",
         "Keep this norm's input in higher precision, or quantize it per channel."),
    Rule("NK-AUDIT-001", "inventory", "info", "check skipped",
         "Install the named extra or provide what the check needs (a model, example inputs)."),
    Rule("NK-AUDIT-002", "inventory", "error", "check crashed",
         "An internal error stopped this check; please report it with the message."),
)

RULES: dict[str, Rule] = {r.id: r for r in _RULES}

# Each check group's runbook page under docs/runbooks/ (``Finding.runbook_url``): what a
# finding means, how to confirm and fix it, and how to rehearse it with normkit.faults.
RUNBOOKS = {
    "inventory": "audit-inventory.md",
    "parameters": "audit-parameters.md",
    "checkpoint": "audit-parameters.md",
    "shape": "audit-shape.md",
    "epsilon": "audit-eps-dtype.md",
    "batch": "audit-batch-dependence.md",
    "numerics": "audit-nonfinite.md",
    "export": "audit-export-parity.md",
    "quantization": "audit-quantization.md",
}


@dataclass(frozen=True)
class Finding:
    """One problem (or notable fact) the audit found.

    Attributes:
        id: stable rule id, e.g. "NK-EPS-001" (see ``RULES`` and docs/audit.md).
        severity: "info", "warning" or "error".
        layer: qualified module name, or None for a model-wide finding.
        message: one line saying what is wrong, with the numbers.
        fix: what to do about it.
        data: the measurements behind the message (JSON-serialisable).
    """

    id: str
    severity: str
    layer: str | None
    message: str
    fix: str
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.id not in RULES:
            raise ValueError(f"unknown finding id {self.id!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        if "\n" in self.message:
            raise ValueError("a finding message is one line")

    @property
    def runbook_url(self) -> str:
        """The runbook page of this finding's check group (``normkit.monitor.alerts.runbook_url``:
        ``$NORMKIT_RUNBOOK_BASE`` or the published docs)."""
        return runbook_url(RUNBOOKS[RULES[self.id].check])


def finding(rule_id: str, layer: str | None, message: str, *, severity: str | None = None,
            **data: Any) -> Finding:
    """A Finding with the rule's default severity and fix text."""
    rule = RULES[rule_id]
    return Finding(rule_id, severity or rule.severity, layer, message, rule.fix, _jsonable(data))


def _jsonable(v: Any) -> Any:
    """Plain JSON values; non-finite floats become strings ("nan", "inf") so the JSON is strict."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    try:
        f = float(v)  # numpy / torch scalars
    except (TypeError, ValueError):
        return str(v)
    return f if math.isfinite(f) else str(f)


@dataclass
class AuditReport:
    """The result of ``normkit.audit``.

    Attributes:
        target: what was audited (a model class name, a path or a factory).
        findings: every finding, errors first.
        layers: the norm inventory, one dict per layer (name, type, kind, normalized_shape,
            eps, affine, bias, dtype, params, placement, ...).
        metrics: measurements by check (batch diffs, export parity, quantization errors, ...).
        checks: the check groups that ran.
        skipped: check group → why it did not run.
        dtype: the run dtype, e.g. "float32".
        seconds: wall time of the audit.
    """

    target: str
    findings: list[Finding] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    dtype: str | None = None
    seconds: float = 0.0

    def ok(self, fail_on: str = "error") -> bool:
        """True when no finding is at or above ``fail_on`` ("warning" or "error")."""
        if fail_on not in ("warning", "error", "info"):
            raise ValueError(f"fail_on must be 'warning' or 'error', got {fail_on!r}")
        return not any(_RANK[f.severity] >= _RANK[fail_on] for f in self.findings)

    def by_id(self, rule_id: str) -> list[Finding]:
        """The findings with id ``rule_id``."""
        return [f for f in self.findings if f.id == rule_id]

    def ids(self, min_severity: str = "info") -> set[str]:
        """The distinct finding ids at or above ``min_severity``."""
        return {f.id for f in self.findings if _RANK[f.severity] >= _RANK[min_severity]}

    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}

    def sort(self) -> None:
        """Errors first, then warnings, then info; by id and layer within a severity."""
        self.findings.sort(key=lambda f: (-_RANK[f.severity], f.id, f.layer or ""))

    # -- rendering ------------------------------------------------------------------------------

    def to_dict(self, fail_on: str = "error") -> dict[str, Any]:
        """The JSON document: ``schema_version``, target, the verdict (``ok`` under the gate
        ``fail_on``, the same as ``ok(fail_on)``), summary, findings, layers, metrics."""
        import torch

        return _jsonable({
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "normkit audit", "normkit": normkit_version(),
                     "torch": torch.__version__},
            "target": self.target,
            "dtype": self.dtype,
            "ok": self.ok(fail_on),
            "fail_on": fail_on,
            "counts": self.counts(),
            "checks": list(self.checks),
            "skipped": dict(self.skipped),
            "seconds": round(self.seconds, 3),
            "findings": [asdict(f) | {"runbook_url": f.runbook_url} for f in self.findings],
            "layers": self.layers,
            "metrics": self.metrics,
        })

    def to_json(self, indent: int | None = 2, fail_on: str = "error") -> str:
        """Strict JSON (no NaN literals) of ``to_dict(fail_on)``."""
        return json.dumps(self.to_dict(fail_on), indent=indent, allow_nan=False)

    def to_markdown(self, fail_on: str = "error") -> str:
        """A markdown summary: the verdict under the gate ``fail_on``, findings table, norm
        inventory."""
        c = self.counts()
        verdict = "✅ passed" if self.ok(fail_on) else "❌ failed"
        lines = [
            f"## normkit audit: {code_span(self.target)} — {verdict} (`--fail-on {fail_on}`)",
            "",
            f"{c['error']} error(s), {c['warning']} warning(s), {c['info']} info; dtype "
            f"{self.dtype}; checks: {', '.join(self.checks) or 'none'}; {self.seconds:.1f} s.",
            "",
        ]
        if self.skipped:
            lines += ["Skipped: " + "; ".join(f"{_md(k)} ({_md(v)})"
                                              for k, v in self.skipped.items()), ""]
        if self.findings:
            lines += ["| severity | id | layer | message | fix |", "|---|---|---|---|---|"]
            for f in self.findings:
                lines.append(f"| {f.severity} | {f.id} | {_md(f.layer or '—')} | "
                             f"{_md(f.message)} | {_md(f.fix)} |")
        else:
            lines.append("No findings.")
        if self.layers:
            lines += ["", "### Norm layers", "",
                      "| layer | type | shape | eps | affine | dtype | params | placement |",
                      "|---|---|---|---|---|---|---|---|"]
            for L in self.layers:
                lines.append(
                    f"| {_md(L['name'] or '(root)')} | {_md(L['type'])} | "
                    f"{L.get('normalized_shape')} | {L.get('eps')} | {L.get('affine')} | "
                    f"{L.get('dtype')} | {L.get('params')} | {_md(L.get('placement') or '—')} |")
        return "\n".join(lines) + "\n"

    def write(self, path: str | os.PathLike, fmt: str = "json", fail_on: str = "error") -> Path:
        """Write the report as ``fmt`` ("json" or "markdown"), its verdict under the gate
        ``fail_on``, atomically (temp file + rename)."""
        text = (self.to_json(fail_on=fail_on) + "\n" if fmt == "json"
                else self.to_markdown(fail_on))
        return write_text_atomic(path, text)


def _md(text) -> str:
    """A user's string (a target, layer, message) as one markdown table cell, shown as written:
    a module named ``<script>`` is text, not HTML."""
    return table_cell(escape_text(str(text)))
