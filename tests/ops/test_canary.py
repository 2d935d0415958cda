"""normkit.canary: on the demo's model a healthy candidate is promoted and candidates with an
Inf in a weight, eps 1e-5 → 1e-2 or inputs scaled by 3 (each injected with normkit.faults)
are rolled back; no false rollback over 20 seeds; too little traffic holds; the policy is
checked key by key; divergence; a real Prometheus as the source."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import _prometheus
import pytest
import torch
import torch.nn.functional as F
from _canary_demo import BATCH, CONTEXT, FAULTS, MODEL, VERSION, demo, serve

from normkit import canary
from normkit.canary import DEFAULTS, NOT_ENOUGH_TRAFFIC, Policy, PrometheusSource, evaluate
from normkit.canary._evidence import Evidence, LayerEvidence
from normkit.monitor._stats import LayerStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


DOCS = Path(__file__).resolve().parents[2] / "docs" / "canary.md"


@pytest.mark.parametrize("fault,decision,rules", [
    ("healthy", "promote", set()),
    ("inf-weight", "rollback", {"nonfinite.steps", "nonfinite.rows", "nonfinite.output_values"}),
    ("eps-1e-2", "rollback", {"output.std_change"}),
    ("inputs-x3", "rollback", {"drift.variance_change", "drift.psi", "drift.ks"}),
])
def test_the_bar_on_the_demo_model(fault, decision, rules):
    v = evaluate(serve(seed=100, fault=fault), demo()[2])
    rolled = {r.rule for r in v.reasons if r.decision == "rollback"}
    assert v.decision == decision, [r.message for r in v.reasons]
    assert rules <= rolled, rolled
    assert v.exit_code == (0 if decision == "promote" else 1)
    for r in v.reasons:  # every reason names its rule, layer, value and threshold
        assert r.rule and r.message and r.observed is not None and r.threshold is not None


def test_the_fault_is_named_where_it_is():
    v = evaluate(serve(seed=100, fault="inf-weight"), demo()[2])
    out = next(r for r in v.reasons if r.rule == "nonfinite.output_values")
    assert out.layer == "blocks.1.norm1"  # the norm whose γ holds the Inf
    assert not [r for r in v.reasons if r.rule.startswith("evidence.")], \
        "layers whose rows are all NaN/Inf are not 'not enough traffic'"
    v = evaluate(serve(seed=100, fault="inputs-x3"), demo()[2])
    first = next(r for r in v.reasons if r.rule == "drift.variance_change")
    assert first.layer == "blocks.0.norm1" and 8 < first.observed + 1 < 10  # 3² = 9


@pytest.mark.slow
def test_no_false_rollback_across_20_healthy_seeds():
    base = demo()[2]
    worst: dict[str, float] = {}
    for seed in range(200, 220):
        v = evaluate(serve(seed=seed), base)
        assert v.decision == "promote", (seed, [r.message for r in v.reasons])
        for row in v.layers.values():
            for k in ("psi", "ks", "mean_shift"):
                worst[k] = max(worst.get(k, 0.0), row[k])
            worst["variance_change"] = max(worst.get("variance_change", 0.0),
                                           abs(row["variance_ratio"] - 1))
    # the margin: the worst healthy value is well under every hold threshold
    for k, v in worst.items():
        assert v < DEFAULTS["drift"]["hold"][k] / 2, (k, v)


def test_too_little_traffic_holds_and_says_so():
    v = evaluate(serve(seed=100, steps=3), demo()[2])
    assert v.decision == "hold"
    assert [r.rule for r in v.reasons] == ["evidence.steps"]
    assert NOT_ENOUGH_TRAFFIC in v.reasons[0].message
    assert v.layers == {}  # nothing judged on a window too small
    # per layer: too few rows (3 steps hold 3072 rows a layer, the baseline 12288)
    pol = Policy.from_dict({"version": 1, "evidence": {"min_steps": 1, "min_rows": 5000}})
    v = evaluate(serve(seed=100, steps=3), demo()[2], policy=pol)
    assert v.decision == "hold" and {r.rule for r in v.reasons} == {"evidence.rows"}
    assert all(NOT_ENOUGH_TRAFFIC in r.message and r.observed == 3072 for r in v.reasons)
    # a baseline with too few rows is said as such
    pol = Policy.from_dict({"version": 1, "evidence": {"min_rows": 10 ** 6}})
    v = evaluate(serve(seed=100), demo()[2], policy=pol)
    assert v.decision == "hold" and {r.rule for r in v.reasons} == {"evidence.baseline"}
    assert all(r.observed == 12288 and "the baseline has" in r.message for r in v.reasons)
    # and in time
    pol = Policy.from_dict({"version": 1, "evidence": {"min_seconds": 3600}})
    v = evaluate(serve(seed=100), demo()[2], policy=pol)
    assert v.decision == "hold" and [r.rule for r in v.reasons] == ["evidence.seconds"]


def test_a_nonfinite_value_rolls_back_even_on_little_traffic():
    v = evaluate(serve(seed=100, steps=2, fault="inf-weight"), demo()[2])
    assert v.decision == "rollback"
    assert {r.rule for r in v.reasons} >= {"nonfinite.steps", "evidence.steps"}


def _evidence(p50: float, p99: float, calls: int) -> Evidence:
    s = LayerStats(kind="ln", rows=5000, steps=50)
    return Evidence(MODEL, VERSION, 50, 0, 0.0, 60.0,
                    {"ln": LayerEvidence(s, p50, p99, calls)}, "synthetic")


@pytest.mark.parametrize("p50,p99,calls,decision,rule", [
    (1.0, 1.0, 500, "promote", None),
    (1.3, 1.3, 500, "hold", "latency.p50_ratio"),
    (1.0, 2.5, 500, "rollback", "latency.p99_ratio"),
    (3.0, 3.0, 50, "promote", None),  # below min_latency_calls: not judged
])
def test_latency_against_serving(p50, p99, calls, decision, rule):
    from normkit.monitor import Baseline

    base = Baseline(MODEL, VERSION, {"ln": LayerStats(kind="ln")})
    serving = _evidence(100e-6, 200e-6, 500)
    v = evaluate(_evidence(100e-6 * p50, 200e-6 * p99, calls), base, serving)
    assert v.decision in (decision, "hold")  # the empty baseline layer holds for itself
    lat = [r for r in v.reasons if r.rule.startswith("latency.")]
    assert [r.rule for r in lat][:1] == ([rule] if rule else [])
    if rule:
        assert lat[0].against == "serving" and lat[0].decision == decision


def test_latency_against_a_baseline_that_has_timings():
    from normkit.monitor import Baseline
    from normkit.monitor._sketch import Histogram

    timed = LayerStats(kind="ln", hist_latency=Histogram.of(torch.full((500,), 100e-6)))
    base = Baseline(MODEL, VERSION, {"ln": timed})
    for factor, decision in ((1.0, None), (3.0, "rollback")):
        v = evaluate(_evidence(100e-6 * factor, 100e-6 * factor, 500), base)
        lat = [r for r in v.reasons if r.rule.startswith("latency.")]
        assert [r.decision for r in lat][:1] == ([decision] if decision else [])
        assert all(r.against == "baseline" for r in lat)


def test_divergence_is_kl_from_serving_and_top1_agreement():
    torch.manual_seed(0)
    s = torch.randn(4, 7, 11)
    c = s + 0.3 * torch.randn_like(s)
    d = canary.divergence(c, s)
    # independent formula: F.kl_div(input=log q, target=p) = Σ p (log p − log q)
    ref = F.kl_div(F.log_softmax(c.double(), -1).reshape(-1, 11),
                   F.softmax(s.double(), -1).reshape(-1, 11), reduction="batchmean")
    assert math.isclose(d.kl, float(ref), rel_tol=1e-9)
    assert d.top1_agreement == float((c.argmax(-1) == s.argmax(-1)).double().mean())
    assert d.rows == 28
    same = canary.divergence(s, s)
    assert same.kl == pytest.approx(0.0, abs=1e-12) and same.top1_agreement == 1.0
    bad = c.clone()
    bad[0, 0, 0] = float("nan")
    assert math.isnan(canary.divergence(bad, s).kl)
    rec = canary.divergence(bad, s).record(MODEL, "2", "1")
    assert rec["type"] == "divergence" and rec["kl"] is None and json.dumps(rec)


def test_divergence_rule_and_bad_inputs():
    base = demo()[2]
    recs = serve(seed=100)
    s = torch.randn(64, 10)
    for logits, decision in ((s, "promote"), (-s, "rollback")):
        v = evaluate(recs, base, divergence=canary.divergence(logits, s))
        assert v.decision == decision
        assert v.evidence["divergence"]["rows"] == 64
    with pytest.raises(ValueError, match="must have one shape"):
        canary.divergence(s, s[:3])
    with pytest.raises(TypeError, match="candidate_logits must be a floating"):
        canary.divergence(s.long(), s)


def test_divergence_metrics_are_served_by_the_prometheus_exporter():
    pytest.importorskip("prometheus_client")
    from normkit.monitor import PrometheusExporter

    exp = PrometheusExporter(port=None)
    s = torch.randn(32, 5)
    exp.export(canary.divergence(s, s).record(MODEL, "2", "1"))
    labels = {"model": MODEL, "version": "2", "serving_version": "1"}
    assert exp.registry.get_sample_value("normkit_canary_top1_agreement", labels) == 1.0
    assert exp.registry.get_sample_value("normkit_canary_output_kl", labels) == pytest.approx(0)
    bad = s.clone()
    bad[0, 0] = float("inf")
    exp.export(canary.divergence(bad, s).record(MODEL, "2", "1"))
    assert exp.registry.get_sample_value("normkit_canary_output_kl", labels) == math.inf


@pytest.mark.parametrize("doc,match", [
    ({}, r"version: missing"),
    ({"version": 2}, r"version: expected 1, got 2"),
    ({"version": 1, "drift": {"rollback": {"pis": 0.3}}},
     r"drift\.rollback\.pis: unknown key \(known: mean_shift, variance_change, psi, ks\)"),
    ({"version": 1, "latency": {"hold": {"p50_ratio": "fast"}}},
     r"latency\.hold\.p50_ratio: expected a finite number, got 'fast'"),
    ({"version": 1, "latency": {"hold": {"p50_ratio": 0.5}}}, r"expected a ratio >= 1"),
    ({"version": 1, "evidence": {"min_steps": 2.5}}, r"evidence\.min_steps: expected an int"),
    ({"version": 1, "drift": {"hold": {"psi": 0.5}}},
     r"drift\.hold\.psi: 0\.5 is beyond drift\.rollback\.psi \(0\.25\)"),
    ({"version": 1, "divergence": {"rollback": {"top1_agreement": 1.5}}}, r"fraction"),
    ({"version": 1, "drift": 3}, r"drift: expected a mapping"),
    ([1], r"expected a mapping with a version"),
])
def test_policy_rejects_bad_documents_naming_the_key(doc, match):
    with pytest.raises(ValueError, match=r"^p\.json: .*" + match):
        Policy.from_dict(doc, source="p.json")


def test_policy_files_yaml_and_json(tmp_path):
    pytest.importorskip("yaml")
    y = tmp_path / "p.yml"
    y.write_text("version: 1\ndrift:\n  rollback:\n    psi: 0.3\n")
    p = Policy.load(y)
    assert p["drift"]["rollback"]["psi"] == 0.3 and p["drift"]["hold"]["psi"] == 0.1
    j = tmp_path / "p.json"
    j.write_text(json.dumps(p.to_dict()))
    assert Policy.load(j) == Policy(p.values, 1, str(j))
    (tmp_path / "bad.yml").write_text("version: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yml: not YAML"):
        Policy.load(tmp_path / "bad.yml")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def test_every_default_is_in_the_docs_table():
    rows = dict(re.findall(r"^\| `([a-z0-9_.]+)` \| ([^|]+?) \|", DOCS.read_text(), re.M))
    flat = _flat(DEFAULTS)
    assert set(rows) == set(flat)
    for k, v in flat.items():
        assert float(rows[k]) == v, k


def _serve_until(base: str, exp, version: str, fault: str, query: str) -> float:
    """Serves the demo's validation batches under one watch (version ``version``, ``fault``)
    until Prometheus answers ``query``, then one scrape more; returns when serving started."""
    from normkit.monitor import watch
    from normkit.study.data import fixed_batches

    model, corpus, _ = demo()
    batches = iter(fixed_batches(corpus.val, 10 ** 4, BATCH, CONTEXT, seed=300))
    t0 = time.time()
    with torch.no_grad(), FAULTS[fault](model), watch(model, model_name=MODEL,
                                                      model_version=version, exporters=[exp]):
        found = _prometheus.wait_for(base, query, True, lambda: model(next(batches)[0]))
        assert found, f"Prometheus never answered {query}"
        for _ in range(3):
            model(next(batches)[0])
            time.sleep(0.5)
    return t0


def test_prometheus_as_the_source(prometheus_server):
    pc = pytest.importorskip("prometheus_client")
    from normkit.monitor import PrometheusExporter

    demo()
    exp = PrometheusExporter(port=None)  # served here: a watch's stop closes its own server
    server, _ = pc.start_http_server(0, addr="127.0.0.1", registry=exp.registry)
    try:
        base = prometheus_server(f"127.0.0.1:{server.server_port}")
        sel = f'{{model="{MODEL}",version="{VERSION}"}}'
        t0 = _serve_until(base, exp, VERSION, "healthy", f"normkit_sampled_steps_total{sel} > 15")
        src = PrometheusSource(base, t0 - 1, time.time(), model=MODEL, version=VERSION)
        v = evaluate(src, demo()[2])
        assert v.decision == "promote", [r.message for r in v.reasons]
        assert v.evidence["steps"] >= 10 and v.evidence["source"] == base
        assert set(v.layers) == set(demo()[2].layers)
        # an Inf in a weight under another version label, in the same server
        sel = f'{{model="{MODEL}",version="3"}}'
        t1 = _serve_until(base, exp, "3", "inf-weight", f"normkit_nonfinite_steps_total{sel} > 0")
        v = evaluate(PrometheusSource(base, t1 - 1, time.time(), model=MODEL, version="3"),
                     demo()[2])
        assert v.decision == "rollback"
        assert "nonfinite.steps" in {r.rule for r in v.reasons}
        with pytest.raises(ValueError, match="no sampled steps"):
            PrometheusSource(base, t0 - 1, time.time(), model=MODEL,
                             version="nope").evidence()
    finally:
        server.shutdown()
        server.server_close()


def test_bad_inputs_are_clear_errors(tmp_path):
    base = demo()[2]
    with pytest.raises(TypeError, match="candidate: expected a JSONL path"):
        evaluate(42, base)
    with pytest.raises(ValueError, match="no step records"):
        evaluate([], base)
    recs = serve(seed=100, steps=2) + serve(seed=101, steps=2, version="9")
    with pytest.raises(ValueError, match="several model versions"):
        evaluate(recs, base)
    assert evaluate(recs, base, version="9").version == "9"
    with pytest.raises(ValueError, match="url must start with http"):
        PrometheusSource("localhost:9090", 0, 1, model="m", version="v")
    with pytest.raises(ValueError, match="since .* must be before until"):
        PrometheusSource("http://x", 5, 1, model="m", version="v")
    with pytest.raises(OSError, match="cannot reach Prometheus"):
        PrometheusSource(f"http://127.0.0.1:{_prometheus.free_port()}", 0, 1, model="m",
                         version="v").evidence()
