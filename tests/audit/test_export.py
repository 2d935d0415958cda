"""Tracing and ONNX export of normkit modules: the graph must hold the op, not a constant.

A compiled kernel is opaque to tracers: without the traceable path, ``torch.jit.trace`` and the
TorchScript ONNX exporter record the kernel's *output* as a constant, and the exported model
returns the example's result for every input.  These tests feed other inputs than the example.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import normkit

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class _Block(torch.nn.Module):
    def __init__(self, n=48, rms=False):
        super().__init__()
        cls = normkit.nn.FusedAddRMSNorm if rms else normkit.nn.FusedAddLayerNorm
        self.add_norm = cls(n, eps=1e-6)
        self.norm = normkit.nn.RMSNorm(n, eps=1e-6) if rms else normkit.nn.LayerNorm(n)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(0.5, 1.5)

    def forward(self, x, r):
        y, h = self.add_norm(x, r)
        return self.norm(y) + h


def _inputs(seed, batch=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 5, 48, generator=g) * 2 + 1,
            torch.randn(batch, 5, 48, generator=g))


@pytest.mark.parametrize("rms", [False, True])
def test_jit_trace_records_the_op_not_a_constant(rms):
    m = _Block(rms=rms).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(m, _inputs(0))
    x, r = _inputs(1)
    torch.testing.assert_close(traced(x, r), m(x, r), rtol=1e-5, atol=1e-5)


def _ort_run(model_bytes, x, r):
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, (x.numpy(), r.numpy()), strict=True)))[0]


@pytest.mark.parametrize("rms", [False, True])
def test_torchscript_onnx_export_matches(rms):
    m = _Block(rms=rms).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, _inputs(0), buf, dynamo=False, opset_version=17,
                          input_names=["x", "r"], dynamic_axes={"x": {0: "b"}, "r": {0: "b"}})
    proto = onnx.load_from_string(buf.getvalue())
    ops = [n.op_type for n in proto.graph.node]
    if not rms:
        lns = [n for n in proto.graph.node if n.op_type == "LayerNormalization"]
        assert len(lns) == 2, ops
        eps = {a.name: a.f for n in lns for a in n.attribute}["epsilon"]
        assert eps == pytest.approx(1e-6, rel=1e-6) or eps == pytest.approx(1e-5, rel=1e-6)
    x, r = _inputs(2, batch=7)  # another batch size: the batch dim stayed dynamic
    torch.testing.assert_close(torch.from_numpy(_ort_run(buf.getvalue(), x, r)), m(x, r),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_dynamo_onnx_export_matches():
    m = _Block(rms=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(m, _inputs(0), dynamo=True, verbose=False)
    x, r = _inputs(3)
    out = _ort_run(prog.model_proto.SerializeToString(), x, r)
    assert "LayerNormalization" in [n.op_type for n in prog.model_proto.graph.node]
    torch.testing.assert_close(torch.from_numpy(out), m(x, r), rtol=1e-4, atol=1e-4)
