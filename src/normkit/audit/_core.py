"""``audit()``: run the checks on a model and collect an ``AuditReport``."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import _checks
from ._checks import Context, Skip
from ._findings import CHECKS, AuditReport, Finding, finding
from ._model import (
    Inputs,
    as_inputs,
    call,
    capture,
    find_norms,
    model_dtype,
    model_placement,
    synthesize_inputs,
    trace_placement,
)

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


def _run_export(ctx: Context) -> list[Finding]:
    from ._onnx import check_export  # onnx is imported only when the check runs

    return check_export(ctx)


# The order of the report's timing table; every check reads the shared Context only.
_ORDER: tuple[tuple[str, Callable[[Context], list[Finding]]], ...] = (
    ("parameters", _checks.check_parameters),
    ("shape", _checks.check_shape),
    ("numerics", _checks.check_numerics),
    ("epsilon", _checks.check_epsilon),
    ("batch", _checks.check_batch),
    ("export", _run_export),
    ("checkpoint", _checks.check_checkpoint),
    ("quantization", _checks.check_quantization),
)


# Checks with nothing to look at in a model without norms (batch dependence still applies).
_NEEDS_NORMS = {"shape", "numerics", "epsilon", "quantization", "export", "checkpoint"}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")


def _resolve_checks(checks: Iterable[str] | None) -> list[str]:
    if checks is None:
        return list(CHECKS)
    if isinstance(checks, str):
        checks = [checks]
    checks = list(checks)
    bad = [c for c in checks if c not in CHECKS]
    if bad:
        raise ValueError(f"unknown check(s) {bad}; choose from {', '.join(CHECKS)}")
    return [c for c in CHECKS if c in checks]


def audit(
    model: torch.nn.Module,
    example_inputs: Any = None,
    *,
    dtype: torch.dtype | str | None = None,
    checks: Iterable[str] | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    training: bool = False,
    opset: int | None = None,
    exporter: str = "auto",
    progress: Callable[[str], None] | None = None,
    _target: str | None = None,
    _missing_keys: Iterable[str] = (),
    _unexpected_keys: Iterable[str] = (),
) -> AuditReport:
    """Audit the normalization layers of ``model`` and return the findings.

    The model is never modified: the audit works on a deep copy (eval mode, cast to ``dtype``).

    Args:
        model: the model to audit.
        example_inputs: a tensor, a tuple of positional args, or a dict of keyword args (e.g. a
            tokenizer's output), with a batch dim first.  None: synthesised from the model's
            first layer (token ids for Hugging Face models and embeddings, random floats for
            Linear/Conv/RNN/LayerNorm inputs).
        dtype: run dtype ("float32", "bfloat16", "float16", "float64" or a torch.dtype);
            None keeps the model's own dtype.
        checks: check groups to run (default all): "inventory", "parameters", "shape",
            "epsilon", "batch", "numerics", "export", "checkpoint", "quantization".
        state_dict: a checkpoint to audit with the model: norm keys missing from it are
            reported (NK-PARAM-001), stray ones too (NK-PARAM-004), and it is loaded
            (``strict=False``) into the audited copy.
        training: the model is about to be trained: frozen norm parameters are reported.
        opset: ONNX opset for the export check (None: the exporter's default).
        exporter: "auto" (torch.onnx's dynamo exporter, falling back to the TorchScript one),
            "dynamo" or "torchscript".
        progress: called with the name of each check as it starts.

    Returns:
        An ``AuditReport``: ``report.ok(fail_on="error")`` is the release gate.

    Raises:
        TypeError: ``model`` is not a torch.nn.Module.
        ValueError: unknown check or dtype, or inputs cannot be synthesised.
    """
    t0 = time.perf_counter()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    run = _resolve_checks(checks)
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    dt = _resolve_dtype(dtype)
    report = AuditReport(target=_target or type(model).__name__, checks=run)

    train_mode = [name or "(root)" for name, m in model.named_modules()
                  if m.training and (not name or isinstance(m, (
                      torch.nn.Dropout, torch.nn.modules.batchnorm._BatchNorm)))]
    if not model.training:
        train_mode = []
    work = copy.deepcopy(model).eval()
    missing, unexpected = list(_missing_keys), list(_unexpected_keys)
    if state_dict is not None:
        res = work.load_state_dict(dict(state_dict), strict=False)
        missing += list(res.missing_keys)
        unexpected += list(res.unexpected_keys)
    config = getattr(work, "config", None)
    # A KV cache in the outputs only gets in the way: exporters cannot trace cache objects.
    # Every config, not just the model's: a T5 decoder stack holds its own copy.
    for m in work.modules():
        if getattr(getattr(m, "config", None), "use_cache", None):
            m.config.use_cache = False
    if dt is not None:
        work = work.to(dt)
    run_dtype = dt or model_dtype(work)
    report.dtype = str(run_dtype).removeprefix("torch.")

    if example_inputs is None:
        inputs = synthesize_inputs(work)
    else:
        inputs = as_inputs(example_inputs)
    inputs = inputs.cast(run_dtype)
    norms = find_norms(work)
    ctx = Context(model=work, norms=norms, inputs=inputs, dtype=run_dtype, config=config,
                  state_dict=state_dict, missing_keys=missing, unexpected_keys=unexpected,
                  training=training, train_mode_modules=train_mode, opset=opset,
                  exporter=exporter)

    # One forward at the given inputs records every norm's input and output (epsilon reads
    # the variance of real inputs, quantization the per-layer errors), and proves the inputs
    # fit the model before any check runs.
    try:
        with torch.no_grad(), capture(norms) as rec:
            call(work, inputs)
    except Exception as e:
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"the model's forward fails on the example inputs: "
                         f"{type(e).__name__}: {text} (pass example_inputs; CLI: "
                         "--input-shape)") from e
    ctx.captured = dict(rec)

    findings: list[Finding] = []
    if not norms:
        findings.append(finding("NK-INV-001", None,
                                f"{type(model).__name__} has no normalization layer"))
    try:
        placements = trace_placement(work, norms, inputs) if norms else {}
    except Exception as e:  # placement is descriptive; never fail the audit over it
        log.debug("placement trace failed: %s", e)
        placements = {}
    for n in norms:
        n.placement = placements.get(n.name)
    report.layers = [n.describe() for n in norms]
    report.metrics["model"] = {"placement": model_placement(placements),
                               "norms": len(norms),
                               "parameters": sum(p.numel() for p in work.parameters())}

    for name, fn in _ORDER:
        if name not in run:
            continue
        if name in _NEEDS_NORMS and not norms:
            report.skipped[name] = "no normalization layers"
            continue
        if progress is not None:
            progress(name)
        t = time.perf_counter()
        try:
            findings += fn(ctx)
        except Skip as e:
            report.skipped[name] = str(e)
            findings.append(finding("NK-AUDIT-001", None, f"{name} check skipped: {e}",
                                    check=name))
        except Exception as e:
            log.debug("check %s crashed", name, exc_info=True)
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            findings.append(finding("NK-AUDIT-002", None,
                                    f"{name} check crashed: {type(e).__name__}: {text}",
                                    check=name))
        report.metrics.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 3)
    report.metrics.update({k: v for k, v in ctx.metrics.items()})
    report.findings = _one_per_cause(findings)
    report.sort()
    report.seconds = time.perf_counter() - t0
    return report


# A defect in a layer's own parameters or eps explains what the forward checks then see at that
# layer (a NaN γ gives NaN outputs, a checkpoint/ONNX mismatch of NaNs, ...): report the cause.
_ROOTS = {"NK-PARAM-002", "NK-PARAM-003", "NK-EPS-001", "NK-CKPT-002", "NK-SHAPE-001"}
_CONSEQUENCES = {"NK-NUM-001", "NK-NUM-003", "NK-ONNX-003", "NK-ONNX-004", "NK-CKPT-001",
                 "NK-BATCH-001", "NK-QUANT-001", "NK-EPS-004"}


def _one_per_cause(findings: list[Finding]) -> list[Finding]:
    rooted = {f.layer for f in findings if f.id in _ROOTS and f.layer is not None}
    return [f for f in findings if not (f.id in _CONSEQUENCES and f.layer in rooted)]


def audit_state_dict(state_dict: Mapping[str, torch.Tensor], *, target: str) -> AuditReport:
    """Audit a bare state_dict (no architecture): the parameter checks on keys that look like
    norm parameters.  Forward checks need a model and are skipped."""
    import re

    t0 = time.perf_counter()
    report = AuditReport(target=target, checks=["inventory", "parameters"])
    # The last component of the module path names a norm: ln_1, ln2, LayerNorm, input_layernorm,
    # post_attention_norm, final_layer_norm, ...
    pat = re.compile(r"^(ln\w*|\w*_ln\d*|\w*norm\w*)$", re.IGNORECASE)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state_dict.items():
        prefix, _, pname = key.rpartition(".")
        if (isinstance(t, torch.Tensor) and t.dim() == 1 and pat.match(prefix.split(".")[-1])
                and pname in ("weight", "bias", "gamma", "beta", "scale")):
            groups.setdefault(prefix, {})[pname] = t
    findings: list[Finding] = []
    if not groups:
        findings.append(finding("NK-INV-001", None, "no norm-like keys in the state_dict"))
    with_bias = sum(("bias" in g or "beta" in g) for g in groups.values())
    for prefix, g in groups.items():
        gamma = g.get("weight", g.get("gamma", g.get("scale")))
        beta = g.get("bias", g.get("beta"))
        report.layers.append({
            "name": prefix, "type": "?", "kind": "?", "family": None,
            "normalized_shape": list((gamma if gamma is not None else beta).shape),
            "eps": None, "affine": gamma is not None, "bias": beta is not None,
            "zero_centered_gamma": None,
            "dtype": str((gamma if gamma is not None else beta).dtype)[6:],
            "params": sum(t.numel() for t in g.values()), "placement": None})
        for pname, t in g.items():
            bad = int((~torch.isfinite(t.float())).sum())
            if bad:
                findings.append(finding("NK-PARAM-002", prefix,
                                        f"{pname} has {bad} non-finite value(s) of {t.numel()}"))
        if gamma is not None and gamma.numel() and bool((gamma == 0).all()) and \
                torch.isfinite(gamma).all():
            findings.append(finding(
                "NK-PARAM-003", prefix,
                "γ is zero everywhere (zero-centred γ, as in Gemma, is fine: pass --model to "
                "tell)", severity="warning"))
        # Within one checkpoint the norms share a convention: a lone one without β (or γ)
        # when the others have it is a lost key.
        if beta is None and with_bias >= max(2, len(groups) // 2):
            findings.append(finding("NK-PARAM-001", prefix,
                                    f"{prefix} has no bias while {with_bias} other norms do"))
        if gamma is None:
            findings.append(finding("NK-PARAM-001", prefix, f"{prefix} has β but no γ"))
    findings.append(finding(
        "NK-AUDIT-001", None,
        "only parameter checks ran on a bare state_dict; pass --model package.module:factory "
        "for the forward, epsilon, batch, export and checkpoint checks"))
    report.skipped.update({c: "no model (bare state_dict)" for c in CHECKS
                           if c not in ("inventory", "parameters")})
    report.findings = findings
    report.sort()
    report.seconds = time.perf_counter() - t0
    return report


def audit_onnx(path: str, shapes: list[tuple[int, ...]] | None = None) -> AuditReport:
    """Audit an ONNX file: its norm nodes (fused LayerNormalization / RMSNormalization /
    BatchNormalization), their eps and γ/β initializers, and an ONNX Runtime run for NaN/Inf.

    Raises:
        ValueError: the file cannot be audited: empty, not ONNX, no graph, external data
            missing or short, invalid for ``onnx.checker``, or ONNX Runtime cannot load it or
            run it on the inputs (``shapes``, else synthesised); onnx or onnxruntime missing.
    """
    import numpy as np

    from ._onnx import _FUSED, _Graph, _import
    from ._onnx_file import TargetError, error_line, load_onnx

    try:
        onnx, ort = _import()
    except Skip as e:
        raise TargetError(f"cannot audit {path}: {e}") from None
    t0 = time.perf_counter()
    report = AuditReport(target=str(path), checks=["inventory", "parameters", "epsilon",
                                                   "numerics"])
    proto = load_onnx(str(path))
    gr = _Graph(proto)
    findings: list[Finding] = []
    kinds = dict(_FUSED, BatchNormalization="batch_norm", GroupNormalization="group_norm",
                 InstanceNormalization="instance_norm")
    float16 = False
    for n in gr.nodes:
        if n.op_type not in kinds:
            continue
        eps = next((float(onnx.helper.get_attribute_value(a)) for a in n.attribute
                    if a.name == "epsilon"), 1e-5)
        name = n.name or n.output[0]
        gamma = gr.const(n.input[1]) if len(n.input) > 1 else None
        beta = gr.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if gamma is not None and gamma.dtype == np.float16:
            float16 = True
        report.layers.append({
            "name": name, "type": n.op_type, "kind": kinds[n.op_type], "family": None,
            "normalized_shape": None if gamma is None else list(gamma.shape), "eps": eps,
            "affine": gamma is not None, "bias": beta is not None,
            "zero_centered_gamma": None, "dtype": None if gamma is None else str(gamma.dtype),
            "params": sum(0 if a is None else int(a.size) for a in (gamma, beta)),
            "placement": None})
        if eps == 0.0:
            findings.append(finding("NK-EPS-001", name, "epsilon is 0 in the graph"))
        for pname, arr in (("scale", gamma), ("bias", beta)):
            if arr is not None and not np.isfinite(arr.astype(np.float64)).all():
                findings.append(finding("NK-PARAM-002", name,
                                        f"{pname} initializer has non-finite values"))
        if gamma is not None and gamma.size and not np.any(gamma) and \
                n.op_type != "BatchNormalization":
            findings.append(finding("NK-PARAM-003", name, "scale initializer is all zero"))
    if not report.layers:
        findings.append(finding("NK-INV-001", None,
                                "no fused normalization node (LayerNormalization, "
                                "RMSNormalization, BatchNormalization) in the graph; a norm "
                                "exported as a subgraph (below opset 17) is not recognised"))
    # Run once on synthesised inputs: NaN/Inf in any output.  A graph ONNX Runtime cannot load
    # or run is not audited (exit 2), never passed.
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise TargetError(f"ONNX Runtime cannot load {path}: {error_line(e)}") from None
    feeds = {}
    rng = np.random.default_rng(0)
    for k, i in enumerate(sess.get_inputs()):
        shape = list(shapes[k]) if shapes and k < len(shapes) else [
            d if isinstance(d, int) and d > 0 else (2 if j == 0 else 8)
            for j, d in enumerate(i.shape)]
        if "int" in i.type:
            feeds[i.name] = rng.integers(0, 2, size=shape).astype(
                np.int64 if "int64" in i.type else np.int32)
        else:
            dt = np.float16 if "float16" in i.type else np.float32
            feeds[i.name] = rng.standard_normal(shape).astype(dt)
    try:
        outs = sess.run(None, feeds)
    except Exception as e:
        given = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        raise TargetError(f"ONNX Runtime cannot run {path} on inputs {given} (set them with "
                          f"--input-shape): {error_line(e)}") from None
    if any(o.dtype.kind == "f" and not np.isfinite(o).all() for o in outs):
        findings.append(finding("NK-NUM-001", None,
                                "ONNX Runtime output has NaN/Inf on random inputs"))
    report.dtype = "float16" if float16 else "float32"
    report.skipped.update({c: "ONNX file: no torch model to compare with"
                           for c in ("batch", "export", "checkpoint", "quantization")})
    report.findings = findings
    report.sort()
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["audit", "audit_state_dict", "audit_onnx", "Inputs"]
