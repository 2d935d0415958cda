"""ONNX export parity: export, find each norm in the graph, verify eps and γ/β, and compare
every norm's output in ONNX Runtime with torch's.

The dynamo exporter (``torch.onnx.export(dynamo=True)``) tags every node with the module
scopes it came from (``pkg.torch.onnx.name_scopes`` metadata); the TorchScript exporter, the
fallback, encodes the scope in the node name ("/encoder/layer.0/LayerNorm/...").  A norm's
nodes are the nodes in its scope; its output is the last value of that scope read outside it.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import logging
import math
import os
import re
import sys
import warnings
from typing import Any

import torch

from ._checks import Context, Skip
from ._findings import Finding, finding
from ._model import Inputs, Norm, call, capture, flat_outputs, rel_err

log = logging.getLogger(__name__)

_FUSED = {"LayerNormalization": "layer_norm", "RMSNormalization": "rms_norm",
          "SimplifiedLayerNormalization": "rms_norm"}
_PASS_THROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Expand", "Flatten"}
# ONNX Runtime vs torch, relative to the largest |output|: float32 kernels reorder reductions
# (a few hundred ulps through a model), float16 graphs compute in float16 (a few ulps of 2^-11).
ORT_TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 1e-2}


def _import():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise Skip(f'{e.name} is not installed: pip install "normkit[export]"') from None
    return onnx, onnxruntime


@contextlib.contextmanager
def _quiet():
    """The exporters log, warn and print a lot (torchvision ops, deprecations, and the
    TorchScript exporter dumps the whole graph on failure from C++): silence them, down to the
    file descriptors, so the CLI's table or JSON stays clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript",
                                               "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    saved = []
    try:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real fds (e.g. captured by a notebook)
        pass
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy_fd in saved:
            os.dup2(copy_fd, fd)
            os.close(copy_fd)
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


EXPORTERS = ("auto", "dynamo", "torchscript")


def export(model: torch.nn.Module, inputs, opset: int | None, exporter: str = "auto",
           input_names: list[str] | None = None):
    """(ModelProto, exporter name, opset): "auto" tries dynamo first and falls back to
    TorchScript; "dynamo" / "torchscript" use only that one.  ``input_names`` names the
    graph inputs (default: the exporter's).

    Raises:
        RuntimeError: both exporters failed; the message holds both reasons.
    """
    _import()
    kwargs = {k: v for k, v in inputs.kwargs.items() if v is not None}
    errors = []
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    with _quiet():
        if exporter in ("auto", "dynamo"):
            try:
                return _export_dynamo(model, inputs.args, kwargs, opset, input_names)
            except Exception as e:
                errors.append(f"dynamo: {_first_line(e)}")
        if exporter in ("auto", "torchscript"):
            try:
                return _export_torchscript(model, inputs.args, kwargs, opset, input_names)
            except Exception as e:
                errors.append(f"torchscript: {_first_line(e)}")
    raise RuntimeError("; ".join(errors))


def _export_dynamo(model, args, kwargs, opset, input_names):
    prog = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True,
                             opset_version=opset, input_names=input_names, verbose=False)
    proto = prog.model_proto
    return proto, "dynamo", _opset(proto)


def _export_torchscript(model, args, kwargs, opset, input_names):
    import onnx

    buf = io.BytesIO()
    # keyword inputs ride along as a trailing dict, the legacy exporter's convention
    torch.onnx.export(model, args + ((kwargs,) if kwargs else ()), buf, dynamo=False,
                      opset_version=opset or 17, input_names=input_names)
    proto = onnx.load_from_string(buf.getvalue())
    return proto, "torchscript", _opset(proto)


class _TensorIO(torch.nn.Module):
    """A Hugging Face model as the exporters take it: tensors in, by position, and the tuple of
    its floating-point output tensors out.  A ``ModelOutput`` may hold a cache object
    (``EncoderDecoderCache``) that neither exporter can trace, and the TorchScript exporter
    passes keyword inputs by the forward's signature, which a wrapper would hide; so the
    keyword tensors become positional ones here, and the graph inputs keep their names
    (``input_names``).  The model is the child ``model``: its scopes gain that prefix."""

    PREFIX = "model"

    def __init__(self, model: torch.nn.Module, inputs):
        super().__init__()
        self.model = model
        self.n_args = len(inputs.args)
        self.names = [k for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)]
        self.constants = {k: v for k, v in inputs.kwargs.items()
                          if v is not None and not isinstance(v, torch.Tensor)}
        # the model's mode, not a new module's (train): the TorchScript exporter restores the
        # wrapper's mode after exporting, into every child, which would turn dropout on
        self.train(model.training)

    def inputs(self, inputs) -> tuple[Inputs, list[str]]:
        """The positional inputs of ``forward`` and the graph input names."""
        args = (*inputs.args, *(inputs.kwargs[k] for k in self.names))
        names = [f"input_{i}" for i in range(self.n_args)] + self.names
        return Inputs(args), names

    def forward(self, *tensors):
        named = dict(zip(self.names, tensors[self.n_args:], strict=True))
        out = self.model(*tensors[:self.n_args], **named, **self.constants)
        return tuple(flat_outputs(out))


def _is_hf(model: torch.nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # an HF model has imported it already
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    """One line for an exporter error: torch.onnx's own summary line when it has one."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        rest = lines[lines.index("## Exception summary") + 1:]
        if rest:
            return rest[0][:300]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _scopes(node) -> list[str]:
    """Module scopes of a node: qualified names ("" is the root)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return [str(s) for s in ast.literal_eval(p.value)[:-1]]
            except (ValueError, SyntaxError):
                return []
    if node.name.startswith("/"):  # TorchScript: "/encoder/layer.0/LayerNorm/Add"
        parts = node.name.strip("/").split("/")[:-1]
        return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return []


class _Graph:
    def __init__(self, proto):
        import onnx.numpy_helper as nh

        self.g = proto.graph
        self.nodes = list(self.g.node)
        self.consts: dict[str, Any] = {i.name: nh.to_array(i) for i in self.g.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            for o in n.output:
                self.producer[o] = (i, n)
            for x in n.input:
                self.consumers.setdefault(x, []).append(i)
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = nh.to_array(a.t)
        self.scope = [set(_scopes(n)) for n in self.nodes]
        self.outputs = {o.name for o in self.g.output}

    def const(self, name: str):
        """The constant behind ``name``, looking through Cast/Identity/Reshape-like nodes."""
        seen = 0
        while name not in self.consts and name in self.producer and seen < 8:
            _, n = self.producer[name]
            if n.op_type not in _PASS_THROUGH or not n.input:
                return None
            name = n.input[0]
            seen += 1
        return self.consts.get(name)

    def in_scope(self, qname: str) -> list[int]:
        return [i for i, s in enumerate(self.scope) if qname in s]


def _norm_eps_in_graph(gr: _Graph, idx: list[int]) -> tuple[str, float | None]:
    """(op, eps) for a norm's nodes: the fused node's epsilon, or the scalar added to a
    ReduceMean result in a decomposed subgraph (None: no such Add — eps was dropped)."""
    import onnx.helper as oh

    for i in idx:
        n = gr.nodes[i]
        if n.op_type in _FUSED:
            eps = next((oh.get_attribute_value(a) for a in n.attribute if a.name == "epsilon"),
                       1e-5)  # the ONNX default
            return n.op_type, float(eps)
    for i in idx:
        n = gr.nodes[i]
        if n.op_type != "Add" or len(n.input) != 2:
            continue
        for a, b in ((0, 1), (1, 0)):
            c = gr.const(n.input[b])
            src = gr.producer.get(n.input[a])
            if c is not None and c.size == 1 and src is not None and \
                    src[1].op_type == "ReduceMean":
                return "subgraph", float(c.reshape(-1)[0])
    return "subgraph", None


def _norm_output(gr: _Graph, idx: list[int]) -> str | None:
    """The last value the norm's nodes produce that is read outside them (or is a graph
    output): the norm's output.  Not the first: a value computed on the way can be read
    outside too — T5's norm casts its input to float32, a no-op the TorchScript exporter
    records as a Cast whose output the residual add then reads."""
    inside = set(idx)
    for i in reversed(idx):
        for o in gr.nodes[i].output:
            if o in gr.outputs or any(j not in inside for j in gr.consumers.get(o, [])):
                return o
    return None


def _scope_consts(gr: _Graph, idx: list[int]) -> list[Any]:
    out = []
    for i in idx:
        for x in gr.nodes[i].input:
            c = gr.const(x)
            if c is not None and c.size > 1:
                out.append(c)
    return out


def _has_values(consts: list[Any], t: torch.Tensor, zero_centered: bool) -> bool:
    import numpy as np

    want = t.detach().float().cpu().numpy().reshape(-1)
    cands = [want] + ([want + 1] if zero_centered else [])
    for c in consts:
        flat = c.reshape(-1)
        if flat.size != want.size:
            continue
        for w in cands:
            if np.array_equal(flat.astype(np.float32), w.astype(c.dtype).astype(np.float32),
                              equal_nan=True):
                return True
    return False


def check_export(ctx: Context) -> list[Finding]:
    onnx, ort = _import()
    out: list[Finding] = []
    # ONNX Runtime's CPU kernels have no bfloat16: a bf16 model is exported in float32.
    edtype = ctx.dtype if ctx.dtype in (torch.float32, torch.float16, torch.float64) \
        else torch.float32
    model = copy.deepcopy(ctx.model).to(edtype).eval()
    inputs = ctx.inputs.cast(edtype)
    norms = [Norm(n.name, model.get_submodule(n.name), n.kind, n.eps, n.family,
                  n.zero_centered) for n in ctx.norms]
    # Hugging Face models (their cache is off, see audit()) are exported with plain tensors in
    # and out; the norms and the compared outputs are the wrapped model's own.
    target, prefix, export_inputs, names = model, "", inputs, None
    if _is_hf(model):
        target, prefix = _TensorIO(model, inputs), _TensorIO.PREFIX
        export_inputs, names = target.inputs(inputs)
    try:
        proto, exporter, opset = export(target, export_inputs, ctx.opset, ctx.exporter, names)
    except RuntimeError as e:
        out.append(finding("NK-ONNX-001", None, f"ONNX export failed: {e}"))
        ctx.metrics["export"] = {"error": str(e)}
        return out
    gr = _Graph(proto)
    per_layer: dict[str, dict[str, Any]] = {}
    watch: dict[str, str] = {}
    decomposed: dict[tuple[str, int], list[str]] = {}
    for n in norms:
        idx = gr.in_scope(".".join(p for p in (prefix, n.name) if p))
        # Batch/group/instance norms are compared for parity only: exporters legitimately fold
        # BatchNorm into the preceding Conv, so its eps and γ/β need not survive as such.
        verify = n.kind in ("layer_norm", "rms_norm", "custom")
        if not idx:
            out.append(finding("NK-ONNX-007", n.name,
                               f"no node of the {exporter} export belongs to {n.name}"))
            continue
        op, eps = _norm_eps_in_graph(gr, idx)
        info: dict[str, Any] = {"op": op, "eps": eps}
        per_layer[n.name] = info
        if n.eps is not None and verify:
            want = [float(torch.tensor(n.eps, dtype=torch.float32))]
            half = float(torch.tensor(n.eps, dtype=torch.float16))
            if edtype == torch.float16 and half != 0.0:
                want.append(half)  # a float16 graph holds eps rounded to float16: not a change
            if eps is None or not any(math.isclose(eps, w, rel_tol=1e-6) for w in want):
                got = "removed (0.0)" if eps is None else f"{eps:g}"
                out.append(finding(
                    "NK-ONNX-002", n.name,
                    f"eps {n.eps:g} became {got} in the {exporter} export (opset {opset})",
                    eps=n.eps, exported=eps))
        missing = [s[0] for s in (n.gamma(), n.beta()) if s is not None and verify
                   and not _has_values(_scope_consts(gr, idx), s[1], n.zero_centered)]
        if missing:
            out.append(finding(
                "NK-ONNX-003", n.name,
                f"{', '.join(missing)} not found among the export's initializers for this "
                "layer with the module's values", missing=missing))
        if op == "subgraph" and n.kind in ("layer_norm", "rms_norm") and \
                type(n.module) in (torch.nn.LayerNorm, torch.nn.RMSNorm):
            need = 17 if n.kind == "layer_norm" else 23
            if opset < need:
                decomposed.setdefault((n.type, need), []).append(n.name)
        o = _norm_output(gr, idx)
        if o is not None:
            watch[n.name] = o

    for (tname, need), names in decomposed.items():
        fused = "LayerNormalization" if need == 17 else "RMSNormalization"
        out.append(finding(
            "NK-ONNX-006", names[0] if len(names) == 1 else None,
            f"{len(names)} {tname} layer(s) exported as subgraphs at opset {opset}; opset ≥ "
            f"{need} gives one {fused} node each", opset=opset, layers=names))

    # Run in ONNX Runtime with every norm output exposed as a graph output.
    existing = [o.name for o in proto.graph.output]
    n_model_outputs = len(existing)
    vi = {v.name: v for v in proto.graph.value_info}
    for name in watch.values():
        if name not in existing:
            proto.graph.output.append(vi[name] if name in vi
                                      else onnx.helper.make_empty_tensor_value_info(name))
            existing.append(name)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # the same thread budget as torch (the CLI uses 1 for small models: see _cli/audit.py)
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    # Basic optimizations only: fusions would change the very nodes whose outputs we compare.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        out.append(finding("NK-ONNX-001", None,
                           f"ONNX Runtime cannot load the {exporter} export: {_first_line(e)}"))
        ctx.metrics["export"] = {"exporter": exporter, "opset": opset, "layers": per_layer}
        return out
    feeds = _feeds(sess, inputs)
    results = sess.run(None, feeds)
    got = dict(zip([o.name for o in sess.get_outputs()], results, strict=True))

    with torch.no_grad(), capture(norms, keep_inputs=False) as rec:
        want_out = flat_outputs(call(target, export_inputs))
    tol = ORT_TOL.get(edtype, 1e-4)
    first_bad = None
    diverged = []
    for name in rec:  # execution order
        if name not in watch:
            continue
        y = rec[name]["out"]
        arr = got.get(watch[name])
        if arr is None:
            continue
        g = torch.from_numpy(arr.copy())
        if g.shape != y.shape:
            g = g.reshape(y.shape) if g.numel() == y.numel() else g
        ma, mr = rel_err(g, y)
        per_layer[name].update(max_abs=ma, max_rel=mr)
        if mr > tol:
            diverged.append(name)
            first_bad = first_bad or (name, ma, mr)
    # The model's own outputs come first, in torch's flattening order; when the exporter
    # flattened them differently (count differs) only the norms are compared.
    worst, compared = 0.0, 0
    if n_model_outputs == len(want_out):
        for r, b in zip(results[:n_model_outputs], want_out, strict=True):
            a = torch.from_numpy(r.copy())
            if a.shape == b.shape:
                worst = max(worst, rel_err(a, b)[1])
                compared += 1
    if first_bad is not None:
        name, ma, mr = first_bad
        more = len(diverged) - 1
        out.append(finding(
            "NK-ONNX-004", name,
            f"ONNX Runtime output differs from torch: max abs {ma:.3g}, max rel {mr:.3g} > "
            f"{tol:g}" + (f" ({more} later norm(s) differ too)" if more > 0 else ""),
            max_abs=ma, max_rel=mr, diverged=diverged[:20]))
    elif worst > tol:
        out.append(finding(
            "NK-ONNX-005", None,
            f"model output differs in ONNX Runtime (max rel {worst:.3g} > {tol:g}) although "
            "every norm agrees", max_rel=worst))
    ctx.metrics["export"] = {"exporter": exporter, "opset": opset, "dtype": str(edtype)[6:],
                             "tolerance_rel": tol, "output_max_rel": worst,
                             "outputs_compared": compared, "layers": per_layer}
    return out


def _feeds(sess, inputs) -> dict[str, Any]:
    """Graph inputs by name (dynamo keeps the forward's argument names) or by position."""
    names = [i.name for i in sess.get_inputs()]
    tensors = [v for v in (*inputs.args, *inputs.kwargs.values()) if isinstance(v, torch.Tensor)]
    by_name = {k: v for k, v in inputs.kwargs.items() if isinstance(v, torch.Tensor)}
    feeds, pos = {}, iter(tensors)
    for n in names:
        t = by_name.get(n)
        if t is None:
            t = next(pos)
        feeds[n] = t.detach().cpu().numpy()
    return feeds
