"""normkit.watch: NaN/Inf origin (forward and backward), layer statistics, sampling, exporters
failing, alerts deduplicated, what a record may contain; a watched model trains bit for bit as
an unwatched one (in-place ops on norm outputs included); a detector that is off says so."""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from _monitor_models import Branches, ConvNet, ConvNeXtish, TinyTransformer, lm_batch

import normkit
from normkit import _dispatch as F
from normkit.monitor import AlertRules, JsonlExporter, read_jsonl, watch

K = 4  # norm k: blocks.2.ln1, fed by blocks.1.mlp.fc2 through the residual add
ROWS = (3, 17)  # injected rows of the (4 x 16, d) activations: batch 0 pos 3, batch 1 pos 1


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _model(impl):
    torch.manual_seed(0)
    m = TinyTransformer()
    if impl == "normkit":
        normkit.convert(m)
    return m


def _fwd_bwd(m):
    idx, tgt = lm_batch()
    loss = torch.nn.functional.cross_entropy(m(idx).reshape(-1, 64), tgt.reshape(-1))
    m.zero_grad()
    loss.backward()


def _layer_row_counts(w, key):
    return {n: s[key] for n, s in w.summary().items()}


@pytest.mark.parametrize("impl", ["torch", "normkit"])
def test_forward_nan_origin_is_the_linear_feeding_norm_k(impl):
    m = _model(impl)
    norms = m.norm_names()
    feeder = m.feeder_of(K)
    clock = FakeClock()
    rules = AlertRules(dedupe_seconds=60, clock=clock)
    pages = []
    rules.callbacks.append(pages.append)
    with watch(m, model_name="lm", model_version="v1", alerts=rules) as w:
        _fwd_bwd(m)
        assert w.nonfinite_origin is None
        m.get_submodule(feeder).inject_forward = ROWS
        for _ in range(3):
            clock.t += 10
            _fwd_bwd(m)  # no optimizer step: NaN gradients would poison the weights
    assert w.nonfinite_origin == feeder
    fwd = [e for e in w.nonfinite_events if e["pass"] == "forward"]
    assert len(fwd) == 3
    for e in fwd:
        assert e["origin"] == feeder
        assert e["origins"] == []
        assert e["origin_values"] == len(ROWS) * 32  # two rows of d=32 values
        props = [p for p in e["propagators"] if p in norms]
        assert props == norms[K:]  # norm k and every later norm, in execution order
        # Containers of the origin (its MLP, its block) are neither origin nor propagator.
        assert "blocks.1.mlp" not in e["propagators"] and "blocks.1" not in e["propagators"]
    rows = _layer_row_counts(w, "nonfinite_rows")
    assert all(rows[n] == 0 for n in norms[:K])
    assert rows[norms[K]] == 3 * len(ROWS)  # exactly the injected rows, in 3 steps
    assert all(rows[n] > 0 for n in norms[K + 1:])
    out_bad = _layer_row_counts(w, "output_nonfinite")
    assert out_bad[norms[K]] == 3 * len(ROWS) * 32
    # One page per dedupe window: 3 steps x (forward + backward) events folded into one alert.
    assert len(pages) == 1 and len(w.alerts) == 1
    a = w.alerts[0]
    assert (a.severity, a.rule, a.layer, a.model, a.version) == ("page", "nonfinite", feeder,
                                                                 "lm", "v1")
    assert a.count == 6 and a.first_seen <= a.last_seen
    # The backward pass saw it arrive from the loss: not a backward origin inside the model.
    assert {e["origin"] for e in w.nonfinite_events if e["pass"] == "backward"} == {"<loss>"}


def test_forward_origin_in_a_frozen_model_with_autograd_on():
    """Outputs outside the autograd graph are checked as they come (not kept to the end of the
    forward): the origin is still the injecting module, in the same step."""
    m = _model("normkit")
    for p in m.parameters():
        p.requires_grad_(False)
    feeder = m.feeder_of(K)
    with watch(m, model_name="lm", model_version="v1", alerts=AlertRules(log_alerts=False)) as w:
        m(lm_batch()[0])
        m.get_submodule(feeder).inject_forward = ROWS
        m(lm_batch()[0])
    assert [(e["step"], e["pass"], e["origin"]) for e in w.nonfinite_events] == [
        (2, "forward", feeder)]
    assert w.nonfinite_events[0]["origin_values"] == len(ROWS) * 32


def test_second_dedupe_window_pages_again():
    m = _model("torch")
    clock = FakeClock()
    rules = AlertRules(dedupe_seconds=60, clock=clock, log_alerts=False)
    m.get_submodule(m.feeder_of(K)).inject_forward = ROWS
    with watch(m, model_name="lm", model_version="v1", alerts=rules, backward=False) as w:
        with torch.no_grad():
            for t in (0, 30, 59, 61, 90, 125):
                clock.t = t
                m(lm_batch()[0])
                w.flush()  # complete the step now, at this clock time
    assert [a.count for a in w.alerts] == [3, 2, 1]
    assert all(a.severity == "page" for a in w.alerts)


@pytest.mark.parametrize("hunt", ["on_detect", "always"])
@pytest.mark.parametrize("impl", ["torch", "normkit"])
def test_backward_nan_origin_is_the_linear_feeding_norm_k(impl, hunt):
    m = _model(impl)
    norms = m.norm_names()
    feeder = m.feeder_of(K)
    clock = FakeClock()
    rules = AlertRules(dedupe_seconds=60, clock=clock, log_alerts=False)
    with watch(m, model_name="lm", model_version="v1", alerts=rules, backward_hunt=hunt) as w:
        # Backward hooks go on modules seen taking inputs that require grad: from the second
        # sampled step on (torch warns about full backward hooks on modules without).
        _fwd_bwd(m)
        m.get_submodule(feeder).inject_backward = ROWS
        for _ in range(3):
            clock.t += 1
            _fwd_bwd(m)
    assert w.nonfinite_origin == feeder
    events = w.nonfinite_events
    assert [e["pass"] for e in events] == ["backward"] * 3
    if hunt == "on_detect":
        # Only the norms were hooked: the gradient is placed, provisionally, in the block of the
        # first norm it reached (the feeder's block); the next step hunts and names the feeder.
        first = events.pop(0)
        assert first["resolved"] is False and first["origin"] == "blocks.1"
        assert feeder.startswith(first["origin"] + ".")
        assert first["propagators"] == list(reversed(norms[:K]))
    for e in events:
        assert e["resolved"] is True
        assert e["origin"] == feeder
        assert e["origin_values"] > 0
        # Backward runs in reverse: the gradient reaches the norms *before* k in forward order
        # after leaving the feeder; norm k and later ones saw finite gradients.
        props = [p for p in e["propagators"] if p in norms]
        assert props == list(reversed(norms[:K]))
    rows = _layer_row_counts(w, "grad_nonfinite_rows")
    assert all(rows[n] == 0 for n in norms[K:])
    assert rows[norms[K - 1]] == 3 * len(ROWS)  # blocks.1.ln2: row-local, exactly the rows
    assert all(rows[n] > 0 for n in norms[:K])
    assert all(v == 0 for v in _layer_row_counts(w, "nonfinite_rows").values())
    # One alert, for the module the hunt found; the provisional event counts towards it.
    assert len(w.alerts) == 1 and w.alerts[0].count == 3 and w.alerts[0].layer == feeder


def test_a_one_step_backward_fault_is_alerted_where_it_was_placed():
    m = _model("normkit")
    feeder = m.feeder_of(K)
    with watch(m, model_name="lm", model_version="v1",
               alerts=AlertRules(log_alerts=False)) as w:
        _fwd_bwd(m)
        m.get_submodule(feeder).inject_backward = ROWS
        _fwd_bwd(m)
        m.get_submodule(feeder).inject_backward = None
        _fwd_bwd(m)  # the hunting step finds nothing: the fault was transient
        _fwd_bwd(m)
    assert [(e["step"], e["resolved"], e["origin"]) for e in w.nonfinite_events] == [
        (2, False, "blocks.1")]
    assert w.nonfinite_origin == "blocks.1"
    assert len(w.alerts) == 1 and w.alerts[0].layer == "blocks.1"
    assert "provisionally" in w.alerts[0].message


class ConstNorm(torch.nn.Module):
    """Linear with zero weight and constant bias (a constant row) → LayerNorm(eps=0)."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8, eps=0.0)
        self.out = torch.nn.Linear(8, 4)
        with torch.no_grad():
            self.inp.weight.zero_()
            self.inp.bias.fill_(0.25)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


@pytest.mark.parametrize("impl", [
    "torch",
    "reference",
    "cpu",
])
def test_norm_that_itself_produces_nan_is_the_origin(impl):
    m = ConstNorm()
    if impl != "torch":
        normkit.convert(m)
        assert isinstance(m.norm, normkit.nn.LayerNorm)
    with watch(m, model_name="c", model_version="1", alerts=AlertRules(log_alerts=False)) as w:
        with torch.no_grad(), normkit.use_backend("cpu" if impl == "cpu" else "auto"):
            if impl == "reference":
                with normkit.use_backend("reference"):
                    y = m(torch.randn(5, 8))
            else:
                y = m(torch.randn(5, 8))
    assert not torch.isfinite(y).any()
    assert w.nonfinite_origin == "norm"
    ev = w.nonfinite_events[0]
    assert ev["origin"] == "norm" and ev["origin_values"] == 40 and ev["propagators"] == ["out"]
    s = w.summary()["norm"]
    assert s["nonfinite_rows"] == 0  # its input was finite: var 0 exactly
    assert s["input_std"] == 0.0 and s["output_nonfinite"] == 40


def test_nan_in_the_input_is_reported_as_input():
    m = Branches()
    x = torch.randn(8, 64)
    x[2, 5] = math.nan
    with watch(m, model_name="b", model_version="1", alerts=AlertRules(log_alerts=False)) as w:
        with torch.no_grad():
            m(x)
    assert w.nonfinite_origin == "<input>"
    assert w.nonfinite_events[0]["propagators"][0] == "lin.0"


@pytest.mark.parametrize("impl", ["torch", "normkit"])
def test_layer_statistics_match_a_direct_computation(impl):
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.LayerNorm(24),
                            torch.nn.Linear(24, 24), torch.nn.RMSNorm(24, eps=1e-6))
    if impl == "normkit":
        normkit.convert(m)
    seen = {}
    for name in ("1", "3"):
        m.get_submodule(name).register_forward_hook(
            lambda mod, a, out, name=name: seen.setdefault(name, []).append((a[0], out)))
    with watch(m, model_name="s", model_version="1") as w:
        for _ in range(3):
            m(torch.randn(6, 10, 24) * 3 + 1).sum().backward()
    s = w.summary()
    x = torch.cat([a.detach().reshape(-1, 24) for a, _ in seen["1"]]).double()
    y = torch.cat([o.detach().reshape(-1, 24) for _, o in seen["1"]]).double()
    assert s["1"]["kind"] == "ln" and s["1"]["rows"] == 180 and s["1"]["steps"] == 3
    assert s["1"]["input_mean"] == pytest.approx(float(x.mean()), abs=1e-5)
    assert s["1"]["input_std"] == pytest.approx(float(x.std(correction=0)), rel=1e-5)
    assert s["1"]["output_std"] == pytest.approx(float(y.std(correction=0)), rel=1e-5)
    rstd = x.std(dim=1, correction=0)
    assert s["1"]["row_scale"]["min"] == pytest.approx(float(rstd.min()), rel=1e-5)
    assert s["1"]["row_scale"]["max"] == pytest.approx(float(rstd.max()), rel=1e-5)
    # Sketch quantiles: buckets are 19% wide, so the median is within ~10%.
    assert s["1"]["row_scale"]["p50"] == pytest.approx(float(rstd.median()), rel=0.1)
    x3 = torch.cat([a.detach().reshape(-1, 24) for a, _ in seen["3"]]).double()
    assert s["3"]["kind"] == "rms" and s["3"]["input_mean"] is None
    assert s["3"]["input_rms"] == pytest.approx(float(x3.pow(2).mean().sqrt()), rel=1e-5)
    for name in ("1", "3"):
        assert s[name]["batch_size"] == 6 and s[name]["seq_len"] == 10
        assert s[name]["weight_norm"] == pytest.approx(math.sqrt(24))
        assert s[name]["grad_input_norm"] > 0 and s[name]["weight_grad_norm"] > 0
        assert s[name]["latency_p50_seconds"] > 0
    assert F._observers == 0  # the statistics sink is gone after the watch


def test_gamma_updates_visible_and_frozen_gamma_shows_zero():
    torch.manual_seed(0)
    m = Branches(k=2)
    m.norm[1].weight.requires_grad_(False)
    m.norm[1].bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    with watch(m, model_name="b", model_version="1") as w:
        for _ in range(4):
            loss = m(torch.randn(16, 32)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    s = w.summary()
    assert s["norm.0"]["weight_update_norm"] > 0 and s["norm.0"]["bias_update_norm"] > 0
    assert s["norm.1"]["weight_update_norm"] == 0.0 and s["norm.1"]["bias_update_norm"] == 0.0
    assert s["norm.1"]["weight_grad_norm"] is None


def test_group_and_batch_norms_are_watched():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8),
                            torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8))
    with watch(m, model_name="c", model_version="1") as w:
        m(torch.randn(4, 3, 10, 10))
    s = w.summary()
    assert s["1"]["rows"] == 4 * 2 and s["3"]["rows"] == 8
    assert s["1"]["input_std"] > 0 and s["3"]["kind"] == "ln"


def test_sampling_every_k_and_fraction(tmp_path):
    m = Branches(k=2)
    with watch(m, model_name="b", model_version="1", every=3,
               exporters=[JsonlExporter(tmp_path / "k.jsonl")]) as w:
        with torch.no_grad():
            for _ in range(7):
                m(torch.randn(4, 32))
    steps = [r["step"] for r in read_jsonl(tmp_path / "k.jsonl") if r["type"] == "step"]
    assert steps == [1, 4, 7] and w.records == 3
    with watch(m, model_name="b", model_version="1", every=0.25, seed=3) as w:
        with torch.no_grad():
            for _ in range(200):
                m(torch.randn(1, 32))
    assert 25 <= w.records <= 75


def test_unsampled_nan_forces_the_next_step_to_be_sampled():
    m = _model("torch")
    rules = AlertRules(log_alerts=False)
    with watch(m, model_name="lm", model_version="v1", every=100, alerts=rules,
               backward=False) as w:
        with torch.no_grad():
            m(lm_batch()[0])  # step 1: sampled
            m.get_submodule(m.feeder_of(K)).inject_forward = ROWS
            m(lm_batch()[0])  # step 2: not sampled, output non-finite
            assert w.nonfinite_origin is None
            m(lm_batch()[0])  # step 3: forced
            m(lm_batch()[0])
    assert w.records == 2
    assert w.nonfinite_origin == m.feeder_of(K)
    assert [e["step"] for e in w.nonfinite_events] == [3]


class Boom:
    def __init__(self):
        self.calls = 0
        self.closed = False

    def export(self, record):
        self.calls += 1
        raise ConnectionError("collector down")

    def close(self):
        self.closed = True


def test_failing_exporter_logs_once_and_never_breaks_the_step(tmp_path, caplog):
    m = Branches(k=2)
    boom = Boom()
    with caplog.at_level(logging.DEBUG, logger="normkit.monitor.watch"):
        with watch(m, model_name="b", model_version="1",
                   exporters=[boom, JsonlExporter(tmp_path / "ok.jsonl")]) as w:
            for _ in range(5):
                m(torch.randn(4, 32)).sum().backward()
    assert boom.calls == 5 and boom.closed
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "Boom failed" in errors[0].getMessage()
    assert sum(r["type"] == "step" for r in read_jsonl(tmp_path / "ok.jsonl")) == 5 == w.records


def test_records_are_aggregates_whose_size_does_not_grow_with_the_batch(tmp_path):
    m = Branches(k=2)
    sizes = {}
    for batch in (4, 512):
        path = tmp_path / f"{batch}.jsonl"
        with watch(m, model_name="b", model_version="1", exporters=[JsonlExporter(path)]):
            with torch.no_grad():
                m(torch.randn(batch, 32))
        rec = [r for r in read_jsonl(path) if r["type"] == "step"][0]
        assert rec["schema"] == "normkit.monitor" and rec["schema_version"] == 1
        assert rec["layers"]["norm.0"]["rows"] == batch
        sizes[batch] = len(json.dumps(rec["layers"]))
        # No list in a record is as long as the rows it describes.
        def lists(o):
            if isinstance(o, dict):
                for v in o.values():
                    yield from lists(v)
            elif isinstance(o, list):
                yield o
                for v in o:
                    yield from lists(v)
        assert max(len(v) for v in lists(rec)) < 330  # histogram buckets at most
    # 128x the rows; the record only gains histogram buckets (bounded by the layout).
    assert sizes[512] < 3 * sizes[4]


def test_stop_is_idempotent_and_removes_every_hook():
    m = _model("normkit")
    w = watch(m, model_name="lm", model_version="v1")
    m(lm_batch()[0]).sum().backward()
    w.stop()
    w.stop()
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks
               and not mod._backward_hooks for mod in m.modules())
    assert F._observers == 0
    assert set(w.summary()) == set(m.norm_names())


def test_bad_arguments_are_rejected():
    m = Branches()
    for every in (0, -3):
        with pytest.raises(ValueError, match="every must be >= 1"):
            watch(m, model_name="b", model_version="1", every=every)
    for every in (0.0, -0.5, math.nan):
        with pytest.raises(ValueError, match="fraction"):
            watch(m, model_name="b", model_version="1", every=every)
    with pytest.raises(ValueError, match="fraction"):
        watch(m, model_name="b", model_version="1", every=1.5)
    with pytest.raises(ValueError, match="reduce"):
        watch(m, model_name="b", model_version="1", reduce="mean")
    with pytest.raises(ValueError, match="model_name"):
        watch(m, model_name="", model_version="1")
    with pytest.raises(ValueError, match="backward_hunt"):
        watch(m, model_name="b", model_version="1", backward_hunt="never")


def test_import_is_lean_and_missing_extras_name_the_install():
    code = (
        "import sys, normkit.monitor as m\n"
        "assert not any(k.startswith(('prometheus_client', 'tensorboard')) for k in sys.modules)\n"
        "sys.modules['prometheus_client'] = None\n"
        "sys.modules['tensorboard'] = None\n"
        "for f in (lambda: m.PrometheusExporter(), lambda: m.TensorBoardExporter('/tmp/x')):\n"
        "    try:\n"
        "        f()\n"
        "    except ImportError as e:\n"
        "        assert 'pip install \"normkit[monitor]\"' in str(e), e\n"
        "    else:\n"
        "        raise AssertionError('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_failing_hook_never_breaks_the_step(monkeypatch, caplog):
    from normkit.monitor import _stats

    def boom(self, y):
        raise RuntimeError("telemetry bug")

    monkeypatch.setattr(_stats.LayerStats, "add_output", boom)
    m = Branches(k=2)
    x = torch.randn(4, 32)
    want = m(x)
    with watch(m, model_name="b", model_version="1") as w:
        for _ in range(3):
            got = m(x)
    torch.testing.assert_close(got, want)
    assert w.records == 3
    assert sum("_norm_post failed" in r.getMessage() for r in caplog.records) == 1


class LlamaRMSNorm(torch.nn.Module):
    """Hugging Face's Llama RMSNorm, verbatim (normkit.convert recognises it by its source)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def test_hugging_face_norms_are_watched_converted_or_not():
    from normkit.monitor import find_norms

    m = torch.nn.Sequential(torch.nn.Linear(16, 16), LlamaRMSNorm(16))
    assert [(n, k) for n, _, k, *_ in find_norms(m)] == [("1", "rms")]
    x = torch.randn(5, 16)
    with watch(m, model_name="hf", model_version="1") as w:
        m(x)
    normkit.convert(m)
    assert isinstance(m[1], normkit.nn.RMSNorm)
    with watch(m, model_name="hf", model_version="1") as w2:
        m(x)
    a, b = w.summary()["1"], w2.summary()["1"]
    assert a["kind"] == b["kind"] == "rms" and a["rows"] == b["rows"] == 5
    assert a["input_rms"] == pytest.approx(b["input_rms"], rel=1e-5)


def test_latency_regression_pages():
    m = Branches(k=2)
    with watch(m, model_name="b", model_version="1") as w:
        with torch.no_grad():
            for _ in range(6):
                m(torch.randn(8, 32))
    base = w.baseline()
    from normkit.monitor._sketch import Histogram

    for s in base.layers.values():  # a baseline 1000x faster than anything real
        s.hist_latency = Histogram.of(torch.full((10,), 1e-9, dtype=torch.float64))
    rules = AlertRules(log_alerts=False)
    with watch(m, model_name="b", model_version="1", baseline=base, alerts=rules,
               drift_every=5) as w:
        with torch.no_grad():
            for _ in range(6):
                m(torch.randn(8, 32))
    assert [(a.severity, a.rule) for a in rules.alerts] == [("page", "latency_regression")]
    assert set(rules.alerts[0].layers) == {"norm.0", "norm.1"}


class _BadGradFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * math.inf  # the backward of functional code (no module of its own) goes bad


class FunctionalInside(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(_BadGradFn.apply(self.a(x)))


def test_backward_nan_from_a_containers_own_code_names_the_container():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), FunctionalInside(), torch.nn.LayerNorm(8))
    x = torch.randn(4, 8, requires_grad=True)
    with watch(m, model_name="f", model_version="1", alerts=AlertRules(log_alerts=False)) as w:
        for _ in range(3):  # step 1 learns which modules take gradients
            m(x).sum().backward()
    ev = [e for e in w.nonfinite_events if e["pass"] == "backward"]
    # Below the only norm, no norm sees it: the parameter-gradient check at the end of backward
    # does, and places it at the last module whose parameters got a bad gradient ...
    assert ev[0]["resolved"] is False and ev[0]["origin"] == "1.a"
    # ... and the hunting step names FunctionalInside, between its leaves a and b.
    assert ev[1]["resolved"] is True and ev[1]["origin"] == "1"
    assert ev[1]["propagators"][:2] == ["1.a", "0"]


def test_submodule_calls_between_steps_are_not_counted():
    """A step is one root forward: a submodule run on its own afterwards (validation through
    model.blocks, say) adds nothing to the still-open sampled step."""
    torch.manual_seed(0)
    m = TinyTransformer()
    with torch.no_grad(), watch(m, model_name="t", model_version="1",
                                alerts=AlertRules(log_alerts=False)) as w:
        m(lm_batch(4)[0])
        m.ln_f(torch.randn(50, 32))  # outside any root call
        m.ln_f(torch.full((3, 32), float("nan")))
    s = w.summary()["ln_f"]
    assert s["rows"] == 4 * 16 and s["nonfinite_rows"] == 0
    assert w.nonfinite_origin is None


def test_dyt_layers_are_watched():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), normkit.nn.DyT(8))
    with torch.no_grad(), watch(m, model_name="d", model_version="1") as w:
        m(torch.randn(5, 8))
    assert w.summary()["1"]["rows"] == 5


# ----------------------------------------------------------------------------------------------
# A watched model trains exactly as an unwatched one
# ----------------------------------------------------------------------------------------------


def _hf(name: str):
    """Tiny Hugging Face models built from configs (nothing downloaded)."""
    T = pytest.importorskip("transformers")
    dec = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    if name == "resnet":  # BatchNorm outputs get `hidden_state += residual`
        return T.ResNetModel(T.ResNetConfig(num_channels=3, embedding_size=8,
                                            hidden_sizes=[8, 16], depths=[1, 1],
                                            layer_type="basic"))
    if name == "bert":
        return T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=48,
                                        max_position_embeddings=64), add_pooling_layer=False)
    if name == "gpt2":
        return T.GPT2Model(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                                        n_positions=64))
    if name == "llama":
        return T.LlamaModel(T.LlamaConfig(**dec))
    if name == "t5":
        return T.T5EncoderModel(T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48,
                                           num_layers=2, num_heads=2))
    raise ValueError(name)


def _images(g):
    return torch.randn(2, 3, 32, 32, generator=g)


def _tokens(g):
    return torch.randint(0, 64, (2, 16), generator=g)


def _lm_loss(m, g):
    idx, tgt = lm_batch(generator=g)
    return torch.nn.functional.cross_entropy(m(idx).reshape(-1, 64), tgt.reshape(-1))


# family: (build, loss of one batch drawn from a generator)
FAMILIES = {
    "tiny-transformer": (lambda: TinyTransformer(), _lm_loss),
    "tiny-transformer-normkit": (lambda: normkit.convert(TinyTransformer()), _lm_loss),
    "convnet": (ConvNet, lambda m, g: m(_images(g)).square().mean()),
    "convnext": (ConvNeXtish, lambda m, g: m(_images(g)).square().mean()),
    "hf-resnet": (lambda: _hf("resnet"),
                  lambda m, g: m(pixel_values=_images(g)).pooler_output.square().mean()),
    **{f"hf-{n}": (lambda n=n: _hf(n),
                   lambda m, g: m(input_ids=_tokens(g)).last_hidden_state.square().mean())
       for n in ("bert", "gpt2", "llama", "t5")},
}


@pytest.mark.parametrize("hunt", ["on_detect", "always"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_watched_model_trains_bit_for_bit_as_unwatched(family, hunt, one_torch_thread):
    """Backward telemetry on: the loss and every parameter's gradient are the same bits with and
    without the watch, on every model family here — including the ones that modify a norm's
    output in place (``+=``, ``relu_``/``ReLU(inplace=True)``, through views)."""
    build, loss_of = FAMILIES[family]
    torch.manual_seed(0)
    ref = build().train()
    watched = copy.deepcopy(ref)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, watched)]
    with watch(watched, model_name=family, model_version="1", backward_hunt=hunt,
               alerts=AlertRules(log_alerts=False)) as w:
        for step in range(3):
            losses = []
            for m, opt in zip((ref, watched), opts, strict=True):
                torch.manual_seed(100 + step)  # the same dropout masks in both
                loss = loss_of(m, torch.Generator().manual_seed(step))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                losses.append(loss.detach())
            assert torch.equal(losses[0], losses[1]), (family, step)
            for (n, p), (_, q) in zip(ref.named_parameters(), watched.named_parameters(),
                                      strict=True):
                assert (p.grad is None) == (q.grad is None), n
                assert p.grad is None or torch.equal(p.grad, q.grad), (family, step, n)
            for opt in opts:
                opt.step()
    assert w.records == 3 and w.nonfinite_origin is None
    s = w.summary()
    assert s and all(v["rows"] > 0 for v in s.values())
    # The backward telemetry was on, not skipped: every norm layer got its input gradient.
    assert all(v["grad_input_norm"] is not None for v in s.values()), family


def test_input_gradient_norm_is_the_gradient_through_the_norm():
    """The norm's input gradient is what flows back through the norm alone (not the residual
    stream's total), also for a norm of several ops whose input has two consumers inside it
    (Llama's RMSNorm: ``x.pow(2)`` and ``x * rsqrt(...)``) and with in-place ops after it."""

    class Residual(torch.nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)
            self.norm = norm
            self.out = torch.nn.Linear(16, 16)

        def forward(self, x):
            h = self.lin(x)
            y = self.norm(h)
            y += h  # in place on the norm's output; h also feeds the residual
            return self.out(y.relu_())

    for norm in (torch.nn.LayerNorm(16), LlamaRMSNorm(16)):
        torch.manual_seed(0)
        m = Residual(norm)
        x = torch.randn(3, 5, 16)
        with watch(m, model_name="r", model_version="1") as w:
            m(x).square().sum().backward()
        # The same gradient by hand: the loss's gradient at the norm's output ...
        h = m.lin(x)
        y = m.norm(h)
        (g_y,) = torch.autograd.grad(m.out((y + h).relu()).square().sum(), [y])
        # ... taken back through the norm alone.
        h = h.detach().requires_grad_()
        (g_h,) = torch.autograd.grad(m.norm(h), [h], g_y)
        got = w.summary()["norm"]["grad_input_norm"]
        assert got == pytest.approx(float(torch.linalg.vector_norm(g_h)), rel=1e-6)


class InplaceLayerNorm(torch.nn.Module):
    """A memory-saving LayerNorm that normalizes its input in place and returns it: its
    backward has no node of its own consuming the input, so it cannot be observed."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        with torch.no_grad():
            mean = x.mean(-1, keepdim=True)
            rstd = torch.rsqrt(x.var(-1, keepdim=True, correction=0) + self.eps)
        return x.sub_(mean).mul_(rstd)


def _warnings(caplog, text):
    return [r for r in caplog.records
            if r.levelno == logging.WARNING and text in r.getMessage()]


def test_a_norm_whose_backward_cannot_be_observed_says_so_and_keeps_its_forward(caplog):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), InplaceLayerNorm(8), torch.nn.Linear(8, 4),
                            torch.nn.LayerNorm(4))
    ref = copy.deepcopy(m)
    x = torch.randn(5, 8)
    with caplog.at_level(logging.WARNING, logger="normkit.monitor.watch"):
        with watch(m, model_name="n", model_version="1") as w:
            for _ in range(3):
                m(x).square().sum().backward()
    for _ in range(3):
        ref(x).square().sum().backward()
    for p, q in zip(ref.parameters(), m.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)  # the model trained as unwatched
    assert len(_warnings(caplog, "backward of 1")) == 1  # one warning, not one per step
    assert list(w.off) == ["backward of 1"] and "in place" in w.off["backward of 1"]
    s = w.summary()
    assert s["1"]["rows"] == 15 and s["1"]["grad_input_norm"] is None  # forward only
    assert list(s["1"]["off"]) == ["backward of 1"]
    assert s["3"]["off"] == {} and s["3"]["grad_input_norm"] is not None


class Exporter:
    def __init__(self):
        self.records = 0
        self.closed = False

    def export(self, record):
        self.records += 1

    def close(self):
        self.closed = True


class StartFails(Exporter):
    def start(self):
        raise OSError("port 9464 is in use")


class Disabled(Exporter):
    enabled = False


def test_exporters_that_are_off_say_so(tmp_path, caplog):
    m = Branches(k=2)
    exps = [StartFails(), Disabled(), Exporter(), Boom()]
    with caplog.at_level(logging.WARNING, logger="normkit.monitor.watch"):
        with watch(m, model_name="b", model_version="1", exporters=exps) as w:
            for _ in range(3):
                m(torch.randn(4, 32)).sum().backward()
    assert [e.records for e in exps[:3]] == [0, 0, 3] and exps[3].calls == 3
    assert all(e.closed for e in exps)  # off or not, every exporter is closed
    assert len(_warnings(caplog, "exporter 0 (StartFails)")) == 1
    assert len(_warnings(caplog, "exporter 1 (Disabled)")) == 1
    assert w.off == {
        "exporter 0 (StartFails)": "its start() raised OSError: port 9464 is in use; it gets "
                                   "no records",
        "exporter 1 (Disabled)": "disabled (enabled is False); it gets no records",
        "exporter 3 (Boom)": "its export raised ConnectionError: collector down",
    }
    for layer in ("norm.0", "norm.1"):
        assert w.summary()[layer]["off"] == w.off


def test_an_exporter_that_recovers_is_no_longer_off():
    class Flaky(Exporter):
        def export(self, record):
            super().export(record)
            if self.records == 1:
                raise ConnectionError("blip")

    m = Branches(k=2)
    with watch(m, model_name="b", model_version="1", exporters=[Flaky()]) as w:
        m(torch.randn(4, 32))
        w.flush()
        assert list(w.off) == ["exporter 0 (Flaky)"]
        m(torch.randn(4, 32))
        w.flush()
        assert w.off == {}


@pytest.mark.parametrize("every,steps,sampled", [(10, 5, 1), (0.01, 20, 0)])
def test_sampling_that_never_samples_says_so(every, steps, sampled, caplog):
    m = Branches(k=2)
    with caplog.at_level(logging.WARNING, logger="normkit.monitor.watch"):
        with watch(m, model_name="b", model_version="1", every=every) as w:
            with torch.no_grad():
                for _ in range(steps):
                    m(torch.randn(4, 32))
            assert "sampling" in w.off  # already visible while running
            assert not _warnings(caplog, "sampling")  # warned once, at the end
    assert w.records == sampled
    assert len(_warnings(caplog, "sampling")) == 1
    why = w.off["sampling"]
    assert f"every={every!r} sampled {sampled} of the {steps} steps run" in why
    s = w.summary()
    assert set(s) == {"norm.0", "norm.1"}  # never-sampled layers are listed too
    assert all(v["off"] == {"sampling": why} and v["steps"] == sampled for v in s.values())


def test_sampling_that_samples_is_not_off(caplog):
    m = Branches(k=2)
    with caplog.at_level(logging.WARNING, logger="normkit.monitor.watch"):
        with torch.no_grad(), watch(m, model_name="b", model_version="1", every=3) as w:
            for _ in range(4):
                m(torch.randn(4, 32))
    assert w.records == 2 and w.off == {} and not caplog.records
