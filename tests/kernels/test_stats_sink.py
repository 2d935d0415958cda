"""The statistics hook telemetry reads: per-row mean/rstd from the kernels, no extra pass."""

from __future__ import annotations

import threading

import pytest
import torch

import normkit
from normkit import _dispatch as F


class _Sink:
    def __init__(self):
        self.calls = []

    def __call__(self, mean, rstd, eps, rms):
        self.calls.append((mean, rstd, eps, rms))


@pytest.fixture
def sink():
    s = _Sink()
    prev = F._set_stats_sink(s)
    try:
        yield s
    finally:
        F._set_stats_sink(prev)
    assert F._observers == 0


def _expected(x, eps, rms):
    v = x.double().reshape(-1, x.shape[-1])
    if rms:
        return None, torch.rsqrt((v * v).mean(-1) + eps)
    return v.mean(-1), torch.rsqrt(v.var(-1, unbiased=False) + eps)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_sink_gets_row_statistics(sink, backend, rms, grad):
    x = (torch.randn(3, 5, 37) * 2 + 1.5).requires_grad_(grad)
    w = torch.randn(37)
    with normkit.use_backend(backend):
        if rms:
            y = normkit.rms_norm(x, 37, w, 1e-5)
        else:
            y = normkit.layer_norm(x, 37, w, None, 1e-5)
    if grad:
        y.sum().backward()
    assert len(sink.calls) == 1
    mean, rstd, eps, was_rms = sink.calls[0]
    assert (eps, was_rms) == (1e-5, rms)
    em, er = _expected(x.detach(), 1e-5, rms)
    assert rstd.shape == (15,) and not rstd.requires_grad
    torch.testing.assert_close(rstd.double(), er, rtol=1e-5, atol=0)
    if rms:
        assert mean is None
    else:
        assert mean.shape == (15,)
        torch.testing.assert_close(mean.double(), em, rtol=1e-5, atol=1e-6)


def test_module_call_with_nonfinite_row_reports_it(sink):
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    normkit.nn.LayerNorm(16)(x)
    mean, rstd, _, _ = sink.calls[0]
    assert torch.isfinite(rstd).tolist() == [True, True, False, True]


def test_no_sink_no_calls_and_fast_path_back():
    s = _Sink()
    prev = F._set_stats_sink(s)
    F._set_stats_sink(prev)
    assert F._observers == 0
    normkit.layer_norm(torch.randn(2, 8), 8)
    assert s.calls == []


def test_sink_is_per_thread(sink):
    other = []
    t = threading.Thread(target=lambda: other.append(normkit.layer_norm(torch.randn(2, 8), 8)))
    t.start()
    t.join()
    assert len(other) == 1 and sink.calls == []


def test_failing_sink_never_breaks_the_op(caplog):
    def bad(*args):
        raise RuntimeError("exporter down")

    prev = F._set_stats_sink(bad)
    try:
        x = torch.randn(2, 8)
        y = normkit.layer_norm(x, 8)
    finally:
        F._set_stats_sink(prev)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))
    assert "sink failed" in caplog.text
