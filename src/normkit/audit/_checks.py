"""The checks that need only torch: parameters, epsilon, batch dependence, numerics,
checkpoint round-trip and quantization sensitivity.  ONNX export parity is in ``_onnx``."""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._findings import Finding, finding
from ._model import (
    Inputs,
    Norm,
    call,
    capture,
    first_tensor,
    flat_outputs,
    rel_err,
    tol_for,
    widen_batch,
)

log = logging.getLogger(__name__)


class Skip(Exception):
    """A check that cannot run here; the message says why (e.g. the extra to install)."""


@dataclass
class Context:
    """Everything a check reads.  ``model`` is the audit's own copy: eval mode, run dtype."""

    model: torch.nn.Module
    norms: list[Norm]
    inputs: Inputs
    dtype: torch.dtype
    config: Any = None
    state_dict: Mapping[str, torch.Tensor] | None = None
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    training: bool = False
    train_mode_modules: list[str] = field(default_factory=list)
    opset: int | None = None
    exporter: str = "auto"
    captured: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def _equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN where the other has NaN (a NaN γ is not a round-trip bug)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(a, b)) or bool(
        ((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def _fmt(v: float) -> str:
    return f"{v:.3g}"


# ----------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------

# Model families whose norms are RMS norms without β (HF config model_type prefixes).
_NO_BIAS_FAMILIES = ("llama", "mistral", "mixtral", "qwen", "gemma", "t5", "mt5", "olmo2",
                     "phi3", "granite", "cohere2")


def _owner(key: str, norms: list[Norm]) -> tuple[Norm, str] | None:
    """The norm a state_dict key belongs to, and the parameter name."""
    prefix, _, pname = key.rpartition(".")
    for n in norms:
        if n.name == prefix:
            return n, pname
    return None


def check_parameters(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    for key in ctx.missing_keys:
        own = _owner(key, ctx.norms)
        if own is not None:
            out.append(finding(
                "NK-PARAM-001", own[0].name,
                f"{key} is missing from the checkpoint; the layer runs with its initial "
                f"{own[1]} instead of the trained one", key=key))
    family = str(getattr(ctx.config, "model_type", "") or "")
    no_bias_family = family.startswith(_NO_BIAS_FAMILIES)
    for key in ctx.unexpected_keys:
        own = _owner(key, ctx.norms)
        if own is not None and own[1] in ("bias", "beta") and own[0].beta() is None:
            out.append(finding(
                "NK-PARAM-004", own[0].name,
                f"checkpoint has {key} but {own[0].type} has no bias: it is silently dropped",
                key=key))
    for n in ctx.norms:
        g, b = n.gamma(), n.beta()
        for slot in (g, b):
            if slot is None:
                continue
            pname, t = slot
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                out.append(finding(
                    "NK-PARAM-002", n.name,
                    f"{pname} has {bad} non-finite value(s) of {t.numel()}",
                    param=pname, count=bad))
        if g is not None and torch.isfinite(g[1]).all():
            eff = g[1].detach().double() + (1.0 if n.zero_centered else 0.0)
            if eff.numel() and bool((eff == 0).all()):
                what = "1+γ" if n.zero_centered else "γ"
                out.append(finding(
                    "NK-PARAM-003", n.name,
                    f"{what} is zero everywhere ({g[1].numel()} values): the layer outputs "
                    "β (or 0) whatever its input"))
        if b is not None and no_bias_family and n.kind in ("layer_norm", "custom"):
            out.append(finding(
                "NK-PARAM-004", n.name,
                f"{n.type} has a bias but {family} models use RMSNorm without β",
                family=family))
        if ctx.training:
            frozen = [s[0] for s in (g, b) if s is not None and isinstance(s[1],
                      torch.nn.Parameter) and not s[1].requires_grad]
            if frozen:
                out.append(finding(
                    "NK-PARAM-005", n.name,
                    f"{', '.join(frozen)} frozen (requires_grad=False) in a training config",
                    frozen=frozen))
    return out


# ----------------------------------------------------------------------------------------------
# Shape
# ----------------------------------------------------------------------------------------------

# Norms that normalise each row over its trailing dims; batch, group and instance norms
# normalise over the batch or the spatial dims, never over one value.
_ROW_KINDS = ("layer_norm", "rms_norm", "custom")
# A column of distinct values of both signs: what a custom norm does to rows of one value.
_PROBE = (-2.0, -0.5, 0.5, 2.0)
# Config keys for the hidden size (BERT/Llama/..., T5, GPT-2).
_CONFIG_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd")


def _row_width(n: Norm, x: torch.Tensor | None) -> int | None:
    """How many values each row of ``n`` holds: its ``normalized_shape`` when it declares one,
    else the last dim of its input (not γ's size: ScaleNorm's γ is one scalar for D values)."""
    shape = getattr(n.module, "normalized_shape", None)
    if shape is not None:
        return math.prod(int(s) for s in (shape if isinstance(shape, (tuple, list))
                                          else (shape,)))
    return int(x.shape[-1]) if x is not None and x.dim() else None


def _constant_on_probe(module: torch.nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``module`` maps distinct one-value rows to one output (False if it cannot run on
    them)."""
    x = torch.tensor(_PROBE, dtype=dtype).unsqueeze(-1)
    try:
        with torch.no_grad():
            y = first_tensor(module(x))
    except Exception as e:
        log.debug("single-feature probe of %s failed: %s", type(module).__name__, e)
        return False
    return y is not None and y.shape == x.shape and bool(torch.allclose(y, y[:1].expand_as(y)))


def _single_feature(n: Norm, x: torch.Tensor | None, dtype: torch.dtype) -> Finding | None:
    """NK-SHAPE-001 for a norm whose rows hold one value.  Mean-subtracting norms (LayerNorm,
    and custom norms whose output does not change on ``_PROBE``) compute x − mean(x) = 0: they
    output β whatever the input, an error.  RMS norms compute x/√(x²+eps)·γ ≈ sign(x)·γ: the
    sign survives, so the output still depends on the input; almost surely a misconfigured
    norm, but not a dead one: a warning."""
    if n.kind not in _ROW_KINDS or _row_width(n, x) != 1:
        return None
    shape = n.normalized_shape() or [1]
    head = f"{n.type} normalizes a single feature (normalized shape {shape})"
    if n.kind == "layer_norm" or (n.kind == "custom" and _constant_on_probe(n.module, dtype)):
        return finding("NK-SHAPE-001", n.name,
                       f"{head}: x − mean(x) is 0 in every row, so it outputs β (or 0) whatever "
                       "its input", normalized_shape=shape)
    if n.kind == "rms_norm":
        return finding("NK-SHAPE-001", n.name,
                       f"{head}: x/√(x²+eps)·γ is sign(x)·γ once |x| ≫ √eps, so only the sign of "
                       "its input survives (a warning: the output still follows the input)",
                       severity="warning", normalized_shape=shape)
    return finding("NK-SHAPE-001", n.name,
                   f"{head}: each row's statistics are its one value's own",
                   severity="warning", normalized_shape=shape)


def _io_widths(m: torch.nn.Module) -> tuple[int | None, int | None] | None:
    """(input width, output width) of a layer that fixes the hidden size around it, else
    None: Linear, Conv, Embedding, RNN, MultiheadAttention, Hugging Face's Conv1D (GPT-2)."""
    if isinstance(m, torch.nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, torch.nn.modules.conv._ConvNd):
        return m.in_channels, m.out_channels
    if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)):
        return None, m.embedding_dim
    if isinstance(m, torch.nn.RNNBase):
        return m.input_size, (m.proj_size or m.hidden_size) * (2 if m.bidirectional else 1)
    if isinstance(m, torch.nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    nx, nf = getattr(m, "nx", None), getattr(m, "nf", None)
    if isinstance(nx, int) and isinstance(nf, int):
        return nx, nf
    return None


def _feature_dims(n: Norm, rank: int) -> list[int]:
    """The dims of a rank-``rank`` input that hold ``n``'s features: the channels (dim 1) for
    batch, group and instance norms, else the ``len(normalized_shape)`` trailing dims (one
    when the norm does not say)."""
    if n.kind not in _ROW_KINDS:
        return [1 if rank > 1 else 0]
    shape = getattr(n.module, "normalized_shape", None)
    k = len(shape) if isinstance(shape, (tuple, list)) else 1
    return list(range(max(0, rank - k), rank))


def _widths_of(shape: torch.Size, first: int) -> set[int]:
    """Products of runs of consecutive dims of ``shape`` that include dim ``first``, never the
    leading (batch) dim of a batched input: (…, heads, head_dim) holds a Linear's
    heads·head_dim, (C, H, W) a conv's C."""
    lo = 1 if len(shape) > 1 else 0
    return {math.prod(shape[i:j]) for i in range(lo, first + 1)
            for j in range(first + 1, len(shape) + 1)}


def _neighbours(ctx: Context) -> dict[str, tuple[torch.Size, dict[str, int], list[str]]]:
    """For each norm's first call, one forward: its input shape, and the widths of the layers
    next to it (``_io_widths``) — the output width of the last one that finished before it
    started, the input width of the first one that starts after it ends — by layer name,
    with a phrase for each."""
    events: list[tuple[str, str, int]] = []  # ("out" | "in", layer, width) in call order
    calls: dict[str, list] = {}  # norm → [events before its start, events before its end, shape]
    handles = []
    norm_ids = {id(n.module) for n in ctx.norms}
    for name, m in ctx.model.named_modules():
        w = _io_widths(m)
        if w is None or id(m) in norm_ids:
            continue
        if w[0] is not None:
            handles.append(m.register_forward_pre_hook(
                lambda mod, a, _n=name, _w=w[0]: events.append(("in", _n, _w))))
        if w[1] is not None:
            handles.append(m.register_forward_hook(
                lambda mod, a, o, _n=name, _w=w[1]: events.append(("out", _n, _w))))

    def start(mod, args, _name):
        x = first_tensor(args)
        if _name not in calls and x is not None:
            calls[_name] = [len(events), None, x.shape]

    def end(mod, args, out, _name):
        if _name in calls and calls[_name][1] is None:
            calls[_name][1] = len(events)

    for n in ctx.norms:
        handles.append(n.module.register_forward_pre_hook(
            lambda mod, a, _n=n.name: start(mod, a, _n)))
        handles.append(n.module.register_forward_hook(
            lambda mod, a, o, _n=n.name: end(mod, a, o, _n)))
    try:
        with torch.no_grad():
            call(ctx.model, ctx.inputs)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, (i, j, shape) in calls.items():
        before = next((e for e in reversed(events[:i]) if e[0] == "out"), None)
        after = next((e for e in events[j or i:] if e[0] == "in"), None)
        near, said = {}, []
        if before is not None:
            near[before[1]] = before[2]
            said.append(f"{before[1]} outputs {before[2]} before it")
        if after is not None:
            near[after[1]] = after[2]
            said.append(f"{after[1]} takes {after[2]} after it")
        result[name] = (shape, near, said)
    return result


def check_shape(ctx: Context) -> list[Finding]:
    """Norm shapes that cannot be what the model meant.

    NK-SHAPE-001, a norm over a single feature (rows of one value): see ``_single_feature``.

    NK-SHAPE-002, a norm whose width its neighbours do not use.  The rule: in one traced
    forward, the layers next to the norm's first call are the last Linear / Conv / Embedding /
    RNN / attention layer to finish before it (its output width) and the first to start after
    it (its input width); when there is none, the model config's hidden_size (d_model,
    n_embd).  The norm matches when one of those widths is the product of a run of
    consecutive dims of its input that includes its first feature dim (its first normalized
    dim; the channels for batch, group and instance norms) and not the batch dim: a norm
    over (…, heads, head_dim) after a Linear of heads·head_dim (Qwen3's q/k norms), a
    LayerNorm([C, H, W]) or a GroupNorm after a conv of C channels, a channels-last LayerNorm(C)
    all match.  Each norm is judged by its own neighbours, so a model with several widths (a
    funnel) is fine; one matching neighbour is enough, so a norm at a width change is too.
    It is a warning: a heuristic, which a norm fed from a distant layer can fool.
    """
    out: list[Finding] = []
    single = set()
    for n in ctx.norms:
        rec = ctx.captured.get(n.name)
        f = _single_feature(n, rec["in"] if rec is not None else None, ctx.dtype)
        if f is not None:
            out.append(f)
            single.add(n.name)
    conf = next(((k, int(v)) for k in _CONFIG_WIDTH_KEYS
                 if isinstance(v := getattr(ctx.config, k, None), int)
                 and not isinstance(v, bool)), None)
    norms = {n.name: n for n in ctx.norms}
    for name, (shape, near, said) in _neighbours(ctx).items():
        if name in single:
            continue  # one finding per layer: the single feature explains the width too
        dims = _feature_dims(norms[name], len(shape))
        if not near and conf is not None:
            near = {f"config.{conf[0]}": conf[1]}
            said = [f"the model config has {conf[0]}={conf[1]} (no Linear, Conv, Embedding, "
                    "RNN or attention layer next to it)"]
        if not near or _widths_of(shape, dims[0]) & set(near.values()):
            continue
        width = math.prod(shape[d] for d in dims)
        out.append(finding(
            "NK-SHAPE-002", name,
            f"{norms[name].type} normalizes over {width} features (dims {dims} of its input "
            f"{list(shape)}), but {' and '.join(sorted({str(w) for w in near.values()}))} "
            f"is the width around it: {', '.join(said)}",
            norm_width=width, neighbours=near))
    return out


# ----------------------------------------------------------------------------------------------
# Epsilon
# ----------------------------------------------------------------------------------------------

_CONFIG_EPS_KEYS = ("layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon", "norm_epsilon",
                    "norm_eps", "rms_norm_epsilon")
# Other frameworks' defaults: a port that kept the source framework's default shows one.
FOREIGN_DEFAULTS = {
    1e-3: "Keras LayerNormalization",
    1e-6: "Flax LayerNorm",
    1e-5: "PyTorch nn.LayerNorm / ONNX LayerNormalization",
    1e-12: "TensorFlow BERT",
}
# eps / median per-row variance above which eps visibly changes the output: y shrinks by
# 1/sqrt(1 + eps/var), i.e. ≥ 4.7% at 10%.
SWAMP_RATIO = 0.1


def config_eps(config) -> tuple[str, float] | None:
    """(key, value) of the model config's eps, if it has one."""
    if config is None:
        return None
    for key in _CONFIG_EPS_KEYS:
        v = getattr(config, key, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return key, float(v)
    return None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=0.0)


def check_epsilon(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    conv = config_eps(ctx.config)
    tiny = {torch.float16: 2.0 ** -25}  # half the smallest float16 subnormal: rounds to 0
    for n in ctx.norms:
        eps = n.eps
        if eps is None:
            continue
        # One finding per layer, for the most basic cause: an eps that is zero in the run dtype
        # explains everything else about it.
        if eps == 0.0:
            out.append(finding("NK-EPS-001", n.name,
                               "eps is 0: a constant row divides by zero (NaN/Inf)", eps=eps))
            continue
        limit = tiny.get(ctx.dtype)
        if limit is not None and eps <= limit:
            out.append(finding(
                "NK-EPS-001", n.name,
                f"eps={eps:g} rounds to 0 in {str(ctx.dtype)[6:]} (smallest subnormal 6e-8): "
                "it is lost wherever the statistics are computed in that dtype",
                eps=eps, dtype=str(ctx.dtype)[6:]))
            continue
        if n.kind in ("batch_norm", "group_norm", "instance_norm"):
            continue  # their eps conventions are the framework's, not the config's
        foreign = next((src for v, src in FOREIGN_DEFAULTS.items() if _close(eps, v)), None)
        if conv is not None and not _close(eps, conv[1]):
            if foreign is not None:
                out.append(finding(
                    "NK-EPS-003", n.name,
                    f"eps={eps:g} is the {foreign} default, but config {conv[0]}={conv[1]:g}",
                    severity="error", eps=eps, expected=conv[1], source=foreign))
            else:
                out.append(finding(
                    "NK-EPS-002", n.name,
                    f"eps={eps:g} differs from config {conv[0]}={conv[1]:g}",
                    eps=eps, expected=conv[1]))
            continue
        if conv is None and _close(eps, 1e-3):
            out.append(finding(
                "NK-EPS-003", n.name,
                f"eps={eps:g} is the Keras LayerNormalization default (PyTorch's is 1e-5): "
                "was this ported from Keras?", eps=eps, source=FOREIGN_DEFAULTS[1e-3]))
            continue
        rec = ctx.captured.get(n.name)
        if rec is not None and rec["in"] is not None and n.kind in ("layer_norm", "rms_norm",
                                                                     "custom"):
            x = rec["in"].double()
            width = max(1, len(n.normalized_shape() or [x.shape[-1]]))
            rows = x.reshape(-1, math.prod(x.shape[-width:])) if x.dim() >= width else x
            var = rows.pow(2).mean(-1) if n.kind == "rms_norm" else rows.var(-1, unbiased=False)
            var = var[torch.isfinite(var)]
            if var.numel():
                med = float(var.median())
                if med > 0 and eps >= SWAMP_RATIO * med:
                    out.append(finding(
                        "NK-EPS-004", n.name,
                        f"eps={eps:g} is {eps / med:.0%} of the median per-row variance "
                        f"{med:.3g} on the example inputs: outputs shrink by "
                        f"{1 - 1 / math.sqrt(1 + eps / med):.1%}",
                        eps=eps, median_variance=med))
    return out


# ----------------------------------------------------------------------------------------------
# Batch dependence
# ----------------------------------------------------------------------------------------------

_SEQUENCE_LAYERS = (torch.nn.Embedding, torch.nn.RNNBase, torch.nn.MultiheadAttention,
                    torch.nn.TransformerEncoderLayer, torch.nn.TransformerDecoderLayer)


def _batch_dim(batched: torch.Tensor, single: torch.Tensor, b: int) -> int | None:
    """The dim of ``batched`` that holds the samples: size b there, 1 in ``single``."""
    if batched.dim() != single.dim():
        return None
    for d in range(batched.dim()):
        if (batched.shape[d] == b and single.shape[d] == 1
                and all(batched.shape[k] == single.shape[k] for k in range(batched.dim())
                        if k != d)):
            return d
    return None


def check_batch(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    if ctx.train_mode_modules:
        shown = ", ".join(ctx.train_mode_modules[:3])
        more = len(ctx.train_mode_modules) - 3
        out.append(finding(
            "NK-BATCH-003", None,
            f"the model was in train mode ({shown}{f' and {more} more' if more > 0 else ''} "
            "with training=True); audited in eval mode",
            modules=ctx.train_mode_modules[:20]))
    if any(n.kind == "batch_norm" for n in ctx.norms) and any(
            isinstance(m, _SEQUENCE_LAYERS) for m in ctx.model.modules()):
        for n in ctx.norms:
            if n.kind == "batch_norm":
                out.append(finding(
                    "NK-BATCH-004", n.name,
                    f"{n.type} in a sequence model: single requests are normalised with "
                    "training-batch statistics"))
    inputs = widen_batch(ctx.inputs)
    B = inputs.batch_size()
    if B is None or B < 2:
        raise Skip("inputs have no common batch dim of size ≥ 2")
    tol = tol_for(ctx.dtype)
    worst = {"bitwise": True, "max_abs": 0.0, "max_rel": 0.0}
    first_bad: tuple[str | None, float, float] | None = None
    per_layer: dict[str, dict[str, Any]] = {}
    with torch.no_grad(), capture(ctx.norms, keep_inputs=False) as rec_b:
        full = flat_outputs(call(ctx.model, inputs))
    for i in sorted({0, B - 1}):
        with torch.no_grad(), capture(ctx.norms, keep_inputs=False) as rec_1:
            one = flat_outputs(call(ctx.model, inputs.sample(i)))
        pairs = [(name, rec_b[name]["out"], rec_1[name]["out"]) for name in rec_b
                 if name in rec_1]
        # same model, same outputs; strict=False only so a batch-dependent output count cannot crash
        pairs += [(None, fo, so) for fo, so in zip(full, one, strict=False)]
        for name, fb, s in pairs:
            d = _batch_dim(fb, s, B)
            if d is None:
                continue
            a = fb.narrow(d, i, 1)
            ma, mr = rel_err(s, a)
            bitwise = bool(torch.equal(a, s)) or _equal_nan(a, s)
            key = name if name is not None else "<output>"
            cur = per_layer.setdefault(key, {"bitwise": True, "max_abs": 0.0, "max_rel": 0.0})
            cur["bitwise"] &= bitwise
            cur["max_abs"] = max(cur["max_abs"], ma)
            cur["max_rel"] = max(cur["max_rel"], mr)
            worst["bitwise"] &= bitwise
            worst["max_abs"] = max(worst["max_abs"], ma)
            worst["max_rel"] = max(worst["max_rel"], mr)
            if mr > tol and first_bad is None:
                first_bad = (name, ma, mr)
    ctx.metrics["batch"] = {"batch": B, "tolerance_rel": tol, **worst, "layers": per_layer}
    if first_bad is not None:
        name, ma, mr = first_bad
        where = f"first at {name}" if name else "at the model output (no norm differs)"
        out.append(finding(
            "NK-BATCH-001", name,
            f"single-sample vs batch-of-{B} outputs differ in eval mode, {where}: max abs "
            f"{_fmt(ma)}, max rel {_fmt(mr)} > {tol:g}", max_abs=ma, max_rel=mr))
    elif not worst["bitwise"]:
        out.append(finding(
            "NK-BATCH-002", None,
            f"single-sample vs batch-of-{B} outputs not bitwise equal: max abs "
            f"{_fmt(worst['max_abs'])}, max rel {_fmt(worst['max_rel'])} (tolerance {tol:g})",
            max_abs=worst["max_abs"], max_rel=worst["max_rel"]))
    return out


# ----------------------------------------------------------------------------------------------
# Numerics
# ----------------------------------------------------------------------------------------------

SCALES = (1.0, 1e3, 1e-3)
_FP16_MAX = 65504.0


@torch.no_grad()
def _scaled_run(ctx: Context, scale: float) -> tuple[dict, list, str | None]:
    """Forward at ``scale``: (captured norm inputs/outputs, outputs, first non-finite module).

    Float inputs are scaled directly; token ids by scaling the embeddings' outputs."""
    inputs, handles = ctx.inputs, []
    if scale != 1.0:
        if ctx.inputs.floating():
            inputs = ctx.inputs.map(lambda t: t * scale if t.is_floating_point() else t)
        else:
            embeds = [m for m in ctx.model.modules() if isinstance(m, torch.nn.Embedding)]
            if not embeds:
                raise Skip("integer inputs and no nn.Embedding to scale")
            for m in embeds:
                handles.append(m.register_forward_hook(lambda mod, a, o: o * scale))
    first_bad: list[str] = []

    def watch(mod, args, out, _name=""):
        if first_bad:
            return
        y = first_tensor(out)
        if y is None or not y.is_floating_point() or bool(torch.isfinite(y).all()):
            return
        x = first_tensor(args)
        if x is None or not x.is_floating_point() or bool(torch.isfinite(x).all()):
            first_bad.append(_name)

    for name, m in ctx.model.named_modules():
        if name:
            handles.append(m.register_forward_hook(lambda mod, a, o, _n=name: watch(mod, a, o,
                                                                                   _n)))
    try:
        with capture(ctx.norms) as rec:
            outs = flat_outputs(call(ctx.model, inputs))
    finally:
        for h in handles:
            h.remove()
    return rec, outs, (first_bad[0] if first_bad else None)


def _f64_twin(module: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(module)
    return twin.double()


def _row_tol(n: Norm, x: torch.Tensor, dtype: torch.dtype, tol: float) -> float:
    """``tol`` plus the error any implementation makes on ill-conditioned rows: subtracting a
    mean that is large against the spread costs ~ulp(mean)/σ, so the bound grows with
    max |mean|/σ (8 ulps of it).  A naive E[x²]-E[x]² loses ulp·(mean/σ)², far above this."""
    if n.kind in ("rms_norm", "batch_norm") or not x.is_floating_point():
        return tol
    x = x.double().reshape(-1, x.shape[-1])
    cond = float((x.mean(-1).abs() / (x.std(-1, unbiased=False) + 1e-30)).max())
    return tol + 8 * torch.finfo(dtype).eps * min(cond, 1e12)


def check_numerics(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    tol = tol_for(ctx.dtype)
    layer_err: dict[str, dict[str, float]] = {}
    reported: set[tuple[str, str | None]] = set()
    twins: dict[str, torch.nn.Module] = {}
    for scale in SCALES:
        try:
            rec, outs, first_bad = _scaled_run(ctx, scale)
        except Skip:
            if scale == 1.0:
                raise
            continue
        nonfinite_out = any(not bool(torch.isfinite(t).all()) for t in outs)
        for n in ctx.norms:
            r = rec.get(n.name)
            if r is None or r["in"] is None or not r["in"].is_floating_point():
                continue
            x, y = r["in"], r["out"]
            if n.name not in twins:
                twins[n.name] = _f64_twin(n.module)
            with torch.no_grad():
                try:
                    y64 = first_tensor(twins[n.name](x.double()))
                except Exception as e:  # a norm that cannot run in float64 is not judged
                    log.debug("float64 twin of %s failed: %s", n.name, e)
                    continue
            if not torch.isfinite(x).all():
                continue
            _, err = rel_err(y, y64)
            layer_err.setdefault(n.name, {})[f"x{scale:g}"] = err
            if err <= _row_tol(n, x, ctx.dtype, tol) or not torch.isfinite(y64).all():
                continue
            sumsq = float(x.float().pow(2).sum(-1).max())
            if ctx.dtype == torch.float16 and sumsq > _FP16_MAX and (n.name, "sq") not in reported:
                reported.add((n.name, "sq"))
                out.append(finding(
                    "NK-NUM-002", n.name,
                    f"at input scale {scale:g} the row sum of x² reaches {sumsq:.3g} > 65504 "
                    f"(float16 max): output error {_fmt(err)} vs float64",
                    scale=scale, sum_of_squares=sumsq, rel_err=err))
            elif (n.name, "err") not in reported and (n.name, "sq") not in reported:
                reported.add((n.name, "err"))
                out.append(finding(
                    "NK-NUM-003", n.name,
                    f"at input scale {scale:g} the output error vs float64 is {_fmt(err)} "
                    f"(max rel) > {tol:g} for {str(ctx.dtype)[6:]}", scale=scale, rel_err=err))
        flagged = {f.layer for f in out if f.id == "NK-NUM-002"}
        if (first_bad is not None or nonfinite_out) and first_bad not in flagged and \
                (None, f"nf{scale}") not in reported and not any(
                    f.id == "NK-NUM-001" for f in out):
            reported.add((None, f"nf{scale}"))
            out.append(finding(
                "NK-NUM-001", first_bad,
                f"non-finite values at input scale {scale:g} in {str(ctx.dtype)[6:]}, "
                f"starting at {first_bad or 'the model output'}", scale=scale))
    ctx.metrics["numerics"] = {"scales": list(SCALES), "tolerance_rel": tol,
                               "output_rel_err_vs_float64": _model_error_vs_f64(ctx),
                               "layers": layer_err}
    return out


def _model_error_vs_f64(ctx: Context) -> float | None:
    """Max rel error of the model's outputs in the run dtype against the same model in float64
    (a measurement: how much error depth adds on top of the per-norm errors judged above)."""
    if ctx.dtype == torch.float64:
        return 0.0
    try:
        twin = copy.deepcopy(ctx.model).double()
        with torch.no_grad():
            want = flat_outputs(call(twin, ctx.inputs.cast(torch.float64)))
            got = flat_outputs(call(ctx.model, ctx.inputs))
    except Exception as e:  # e.g. a model with dtype-specific code paths
        log.debug("float64 twin of the model failed: %s", e)
        return None
    errs = [rel_err(g, w)[1] for g, w in zip(got, want, strict=False) if g.shape == w.shape]
    return max(errs) if errs else None


# ----------------------------------------------------------------------------------------------
# Checkpoint round-trip
# ----------------------------------------------------------------------------------------------


def _scrambled_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose state_dict tensors are overwritten with other values, so that a
    load that fails to restore something shows in the outputs."""
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for t in twin.state_dict(keep_vars=True).values():
            if t.is_floating_point() and t.numel():
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
                        + 0.5)
    return twin


def check_checkpoint(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    sd_ids = {id(t) for t in ctx.model.state_dict(keep_vars=True).values()}
    for n in ctx.norms:
        for slot in (n.gamma(), n.beta()):
            if slot is not None and id(slot[1]) not in sd_ids:
                out.append(finding(
                    "NK-CKPT-002", n.name,
                    f"{n.name}.{slot[0]} is a plain tensor attribute: state_dict() does not "
                    "contain it, so no checkpoint carries the trained value", param=slot[0]))
    with torch.no_grad():
        want = flat_outputs(call(ctx.model, ctx.inputs))
    results: dict[str, Any] = {}
    differs: list[tuple[str, str | None, float]] = []
    for fmt in ("torch", "safetensors"):
        twin = _scrambled_copy(ctx.model)
        try:
            if fmt == "torch":
                buf = io.BytesIO()
                torch.save(ctx.model.state_dict(), buf)
                buf.seek(0)
                sd = torch.load(buf, weights_only=True, map_location="cpu")
                twin.load_state_dict(sd, strict=True)
            else:
                try:
                    import safetensors.torch as st
                except ImportError:
                    results[fmt] = 'skipped: pip install "normkit[hf]"'
                    continue
                with tempfile.TemporaryDirectory() as d:
                    path = os.path.join(d, "model.safetensors")
                    # save_model/load_model handle tied (shared) tensors, save_file does not.
                    st.save_model(ctx.model, path)
                    missing, unexpected = st.load_model(twin, path, strict=False)
                    if unexpected or [k for k in missing
                                      if not _is_tied(ctx.model, k)]:
                        raise RuntimeError(f"missing {sorted(missing)[:3]}, unexpected "
                                           f"{sorted(unexpected)[:3]}")
        except Exception as e:
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            out.append(finding("NK-CKPT-001", None,
                               f"{fmt} round-trip failed to load: {msg}", format=fmt))
            results[fmt] = "load failed"
            continue
        twin.eval()
        with torch.no_grad(), capture(ctx.norms, keep_inputs=False) as rec_a:
            call(ctx.model, ctx.inputs)
        twin_norms = [Norm(n.name, twin.get_submodule(n.name), n.kind, n.eps)
                      for n in ctx.norms]
        with torch.no_grad(), capture(twin_norms, keep_inputs=False) as rec_b:
            got = flat_outputs(call(twin, ctx.inputs))
        equal = len(got) == len(want) and all(
            _equal_nan(a, b) for a, b in zip(got, want, strict=True))
        results[fmt] = "identical" if equal else "differs"
        if not equal:
            bad = next((name for name in rec_a if name in rec_b
                        and not _equal_nan(rec_a[name]["out"], rec_b[name]["out"])), None)
            diff = max((rel_err(b, a)[0] for a, b in zip(want, got, strict=False)),
                       default=math.inf)
            differs.append((fmt, bad, diff))
    if differs:
        fmts = " and ".join(d[0] for d in differs)
        bad = differs[0][1]
        diff = max(d[2] for d in differs)
        out.append(finding(
            "NK-CKPT-001", bad,
            f"outputs differ after a {fmts} save/load (max abs {_fmt(diff)})"
            + (f", first at {bad}" if bad else ""), formats=[d[0] for d in differs],
            max_abs=diff))
    ctx.metrics["checkpoint"] = results
    # One finding per layer and cause: a γ that is not saved also changes the round-trip.
    lost = {f.layer for f in out if f.id == "NK-CKPT-002"}
    return [f for f in out if not (f.id == "NK-CKPT-001" and f.layer in lost)]


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    """True when ``key`` names a tensor that shares storage with another state_dict entry
    (save_model stores it once; load_model reports the alias as missing)."""
    sd = model.state_dict()
    t = sd.get(key)
    if t is None:
        return False
    return any(k != key and v.data_ptr() == t.data_ptr() for k, v in sd.items())


# ----------------------------------------------------------------------------------------------
# Quantization sensitivity
# ----------------------------------------------------------------------------------------------

# Relative L1 error (mean |Δy| / mean |y|) above which a norm is reported as sensitive.  Int8
# per-tensor quantization of a Gaussian row costs ~1-2%; an outlier channel 100× the others
# pushes the rest of the row into a few quantization steps (tens of %).
QUANT_THRESHOLD = 0.05


def _fq(t: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Symmetric int8 fake quantization, per tensor (dim None) or per channel along ``dim``."""
    if dim is None:
        s = t.abs().max() / 127
    else:
        dims = [d for d in range(t.dim()) if d != dim % t.dim()]
        s = t.abs().amax(dim=dims, keepdim=True) / 127 if dims else t.abs() / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (t / s).round().clamp(-127, 127) * s


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.abs().mean())
    return float((a - b).abs().mean()) / den if den > 0 else 0.0


def check_quantization(ctx: Context) -> list[Finding]:
    out: list[Finding] = []
    table: dict[str, dict[str, float]] = {}
    for n in ctx.norms:
        rec = ctx.captured.get(n.name)
        if rec is None or rec["in"] is None or not rec["in"].is_floating_point():
            continue
        if n.kind not in ("layer_norm", "rms_norm", "custom"):
            continue
        m = copy.deepcopy(n.module).float()
        x = rec["in"].float()
        if not torch.isfinite(x).all():
            continue
        with torch.no_grad():
            y = first_tensor(m(x))
            row = {
                "input_per_tensor": _rel_l1(first_tensor(m(_fq(x, None))), y),
                "input_per_channel": _rel_l1(first_tensor(m(_fq(x, -1))), y),
            }
            for slot, key in ((n.gamma(), "gamma"), (n.beta(), "beta")):
                if slot is None or not isinstance(getattr(m, slot[0], None), torch.Tensor):
                    continue
                orig = getattr(m, slot[0]).detach().clone()
                for mode, dim in (("per_tensor", None), ("per_channel", 0)):
                    getattr(m, slot[0]).copy_(_fq(orig, dim))
                    row[f"{key}_{mode}"] = _rel_l1(first_tensor(m(x)), y)
                getattr(m, slot[0]).copy_(orig)
        table[n.name] = row
        if row["input_per_tensor"] > QUANT_THRESHOLD:
            out.append(finding(
                "NK-QUANT-001", n.name,
                f"int8 per-tensor input: {row['input_per_tensor']:.1%} output error "
                f"(per-channel {row['input_per_channel']:.1%}); keep in higher precision",
                **row))
    ctx.metrics["quantization"] = {"threshold_rel_l1": QUANT_THRESHOLD, "layers": table}
    return out
