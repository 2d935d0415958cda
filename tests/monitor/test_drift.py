"""Baselines (capture, save/load, from JSONL) and drift: no false alarm on the same
distribution; shifted inputs drift exactly the layers they reach."""

from __future__ import annotations

import json
import logging
import math
from statistics import NormalDist

import pytest
import torch
from _monitor_models import Branches

import normkit
from normkit.monitor import (
    AlertRules,
    Baseline,
    DriftThresholds,
    JsonlExporter,
    compute_drift,
    read_jsonl,
    watch,
)
from normkit.monitor._sketch import Histogram, ks, psi
from normkit.monitor._stats import LayerStats
from normkit.monitor.drift import _chi2_quantile

pytestmark = pytest.mark.usefixtures("one_torch_thread")


_LAYERS = ("norm.0", "norm.1", "norm.2", "norm.3")


def _model(impl="torch"):
    torch.manual_seed(0)
    m = Branches(k=4, d=16).eval()
    return normkit.convert(m) if impl == "normkit" else m


def _run(m, steps, seed, shift=None, rows=64, **kw):
    """``steps`` batches of ``rows`` rows of N(0, 1) features; ``shift(x)`` edits a batch."""
    g = torch.Generator().manual_seed(seed)
    w = watch(m, model_name="branches", model_version="1", **kw)
    with torch.no_grad():
        for _ in range(steps):
            x = torch.randn(rows, 64, generator=g)
            if shift is not None:
                x = shift(x)
            m(x)
    w.stop()
    return w


def test_histogram_merge_quantiles_psi_ks():
    a = torch.randn(20000, dtype=torch.float64)
    h = Histogram.of(a[:10000]).merge(Histogram.of(a[10000:]))
    assert h.n == 20000 and h.lo == float(a.min()) and h.hi == float(a.max())
    for q in (0.1, 0.5, 0.9):
        # Buckets are 19% wide relative to the value; near 0 they are much finer.
        assert h.quantile(q) == pytest.approx(float(a.quantile(q)), rel=0.1, abs=1e-3)
    same = Histogram.of(torch.randn(20000, dtype=torch.float64))
    moved = Histogram.of(torch.randn(20000, dtype=torch.float64) + 0.5)
    assert psi(h, same) < 0.02 and ks(h, same) < 0.03
    assert psi(h, moved) > 0.2 and ks(h, moved) == pytest.approx(0.19, abs=0.03)
    assert Histogram.from_dict(json.loads(json.dumps(h.to_dict()))).quantile(0.5) == h.quantile(0.5)
    with pytest.raises(ValueError, match="layout"):
        Histogram.from_dict({**h.to_dict(), "edges": "other"})


def test_square_spread_of_a_histogram():
    """The std of x² read back from a histogram (the variance limit's row spread): within ~7%
    for values over many buckets, high (never beyond ~2.2x) for values packed into one or two,
    over six seeds."""
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        spread = torch.randn(5000, dtype=torch.float64, generator=g).exp()
        packed = torch.randn(5000, 1024, dtype=torch.float64, generator=g).std(1)
        means = torch.randn(5000, dtype=torch.float64, generator=g) * 0.25 + 3
        for v, center, lo, hi in ((spread, 0.0, 0.9, 1.1), (packed, 0.0, 1.5, 2.5),
                                  (means, 3.0, 1.0, 2.5)):
            true = float(((v - center) ** 2).std(correction=0))
            assert lo < Histogram.of(v).square_spread(center) / true < hi, (seed, center)
    assert math.isnan(Histogram().square_spread())


@pytest.mark.parametrize("impl", ["torch", "normkit"])
def test_same_distribution_raises_no_drift_alarm(impl):
    m = _model(impl)
    base = _run(m, 30, seed=1).baseline()
    assert set(base.layers) == {f"norm.{i}" for i in range(4)}
    rules = AlertRules(log_alerts=False)
    w = _run(m, 40, seed=2, baseline=base, alerts=rules, drift_every=10, window=40)
    assert w.drift_results, "drift was never evaluated"
    for name, r in w.drift_results.items():
        assert not r.drifted, (name, r)
        assert r.mean_shift < 0.02 and abs(r.variance_ratio - 1) < 0.05 and r.psi < 0.05
    assert rules.alerts == []


@pytest.mark.parametrize("impl", ["torch", "normkit"])
def test_shifted_inputs_drift_only_the_layers_they_reach(impl):
    m = _model(impl)
    base = _run(m, 30, seed=1).baseline()

    def shift(x):
        x = x.clone()
        x[:, 16:32] += 1.0  # branch 1: a mean shift of its inputs
        x[:, 48:64] *= 1.5  # branch 3: a variance change
        return x

    tickets = []
    rules = AlertRules(log_alerts=False, callbacks=[tickets.append])
    w = _run(m, 40, seed=2, shift=shift, baseline=base, alerts=rules, window=40)
    drifted = {n for n, r in w.drift_results.items() if r.drifted}
    assert drifted == {"norm.1", "norm.3"}
    assert "variance_ratio" in w.drift_results["norm.3"].crossed
    assert w.drift_results["norm.3"].variance_ratio == pytest.approx(2.25, rel=0.1)
    assert set(w.drift_results["norm.1"].crossed) & {"mean_shift", "variance_ratio", "psi"}
    # One ticket per (model, version) dedupe window, naming both layers.
    assert len(tickets) == 1 and tickets[0].severity == "ticket" and tickets[0].rule == "drift"
    assert set(w.alerts[0].layers) == {"norm.1", "norm.3"}
    assert w.alerts[0].count >= 2


def test_thresholds_are_configurable_and_validated():
    m = _model()
    base = _run(m, 20, seed=1).baseline()
    live = _run(m, 20, seed=2).window_stats()
    # A threshold above what noise reaches at these row counts is the limit itself ...
    lenient = DriftThresholds(mean_shift=1.0, variance_change=1.0, psi=5.0, ks=0.9)
    r = compute_drift("norm.0", base.layers["norm.0"], live["norm.0"], lenient)
    assert r.limits == {"mean_shift": 1.0, "variance_change": 1.0, "psi": 5.0, "ks": 0.9}
    # ... one below it is raised to it: a tiny threshold does not turn noise into drift, a
    # larger alpha lowers the limits (1280 rows a side).
    strict = DriftThresholds(mean_shift=1e-9, variance_change=1e-9, psi=1e-9, ks=1e-9)
    r = compute_drift("norm.0", base.layers["norm.0"], live["norm.0"], strict)
    assert r.evaluable and r.crossed == () and all(v > 1e-3 for v in r.limits.values())
    loose = compute_drift("norm.0", base.layers["norm.0"], live["norm.0"],
                          DriftThresholds(mean_shift=1e-9, variance_change=1e-9, psi=1e-9,
                                          ks=1e-9, alpha=0.5))
    assert all(loose.limits[k] < v for k, v in r.limits.items())
    r = compute_drift("norm.0", base.layers["norm.0"], live["norm.0"],
                      DriftThresholds(min_rows=10**9))
    assert not r.evaluable and not r.drifted and "min_rows" in r.reason
    with pytest.raises(ValueError, match="mean_shift"):
        DriftThresholds(mean_shift=0)
    with pytest.raises(ValueError, match="min_rows"):
        DriftThresholds(min_rows=0)
    with pytest.raises(ValueError, match="alpha"):
        DriftThresholds(alpha=1.5)


def test_rms_layers_drift_on_the_mean_square():
    torch.manual_seed(0)
    base_s, live_s = LayerStats(kind="rms"), LayerStats(kind="rms")
    base_s.add_rows(None, torch.rand(5000) + 1)
    live_s.add_rows(None, (torch.rand(5000) + 1) * 1.3)
    r = compute_drift("rms", base_s, live_s)
    assert r.mean_shift is None and r.variance_ratio == pytest.approx(1.3, rel=0.03)
    assert "variance_ratio" in r.crossed


def test_baseline_save_load_roundtrip_is_atomic_and_versioned(tmp_path):
    m = _model()
    base = _run(m, 5, seed=1).baseline()
    path = tmp_path / "sub" / "baseline.json"
    base.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["baseline.json"]  # no temp file left
    d = json.loads(path.read_text())
    assert d["schema"] == "normkit.baseline" and d["schema_version"] == 1
    assert d["model_name"] == "branches" and d["model_version"] == "1"
    assert d["normkit_version"]
    back = Baseline.load(path)
    assert back.layers.keys() == base.layers.keys()
    for n in base.layers:
        assert back.layers[n].summary() == base.layers[n].summary()
    d["schema_version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="schema_version 99"):
        Baseline.load(path)


def test_baseline_from_jsonl_equals_the_captured_one(tmp_path):
    m = _model()
    path = tmp_path / "run.jsonl"
    w = _run(m, 6, seed=1, exporters=[JsonlExporter(path)])
    from_file = Baseline.from_jsonl(path)
    live = w.baseline()
    assert (from_file.model_name, from_file.model_version) == ("branches", "1")
    for n, s in live.layers.items():
        a, b = from_file.layers[n].summary(), s.summary()
        assert a["rows"] == b["rows"] == 6 * 64
        for k in ("input_mean", "input_std", "output_std"):
            assert a[k] == pytest.approx(b[k], rel=1e-12)
    # A torn last line (a crash mid-write) is skipped, not fatal.
    with open(path, "a") as f:
        f.write('{"type": "step", "sch')
    assert Baseline.from_jsonl(path).layers["norm.0"].rows == 6 * 64
    with pytest.raises(ValueError, match="no step records"):
        Baseline.from_jsonl(path, model_version="nope")


def test_merging_is_exact():
    a, b = LayerStats(), LayerStats()
    x = torch.randn(300, 8, dtype=torch.float64) * 2 + 3
    for s, part in ((a, x[:100]), (b, x[100:])):
        s.add_rows(part.mean(1), part.var(1, correction=0))
    a.merge(b)
    assert a.rows == 300
    assert a.input_mean == pytest.approx(float(x.mean()), rel=1e-12)
    assert math.sqrt(a.input_var) == pytest.approx(float(x.std(correction=0)), rel=1e-12)


def _direct_row_stats(kind, mean, second) -> LayerStats:
    """What one layer's rows must add up to, computed directly with torch in float64."""
    from normkit.monitor._sketch import Histogram

    sec = second.double()
    mu = torch.zeros_like(sec) if mean is None else mean.double()
    ok = torch.isfinite(sec) & torch.isfinite(mu)
    sec, mu = sec[ok].clamp(min=0), mu[ok]
    s = LayerStats(kind=kind)
    s.rows, s.nonfinite_rows = int(ok.sum()), int((~ok).sum())
    if s.rows == 0:
        return s
    s.sum_ms = float(sec.sum() + (mu * mu).sum())
    if mean is not None:
        s.sum_mean, s.sum_mean_sq, s.sum_var = float(mu.sum()), float((mu * mu).sum()), \
            float(sec.sum())
        s.hist_mean = Histogram.of(mu)
    s.hist_scale = Histogram.of(sec.sqrt())
    return s


def test_batched_row_statistics_match_a_direct_computation():
    """add_rows_many (the watch's per-step path; add_rows is one layer of it) against sums and
    histograms computed directly, over several layers at once."""
    from normkit.monitor._stats import add_rows_many

    g = torch.Generator().manual_seed(3)
    items = []
    for kind, m in (("ln", 40), ("ln", 0), ("rms", 7), ("ln", 1), ("ln", 3)):
        mean = None if kind == "rms" else torch.randn(m, generator=g)
        second = torch.rand(m, generator=g) * 3
        if m == 40:
            second[5] = math.inf  # a non-finite row is counted, not summed
            mean[9] = math.nan
        if m == 3:
            second[:] = math.nan  # a layer with no finite row at all
        items.append((kind, mean, second))
    one = [_direct_row_stats(*item) for item in items]
    many = [LayerStats(kind=k) for k, _, _ in items]
    add_rows_many([(s, mean, second) for s, (_, mean, second) in zip(many, items, strict=True)])
    for a, b in zip(one, many, strict=True):
        da, db = a.to_dict(), b.to_dict()
        for key in ("sum_mean", "sum_mean_sq", "sum_var", "sum_ms"):
            assert da.pop(key) == pytest.approx(db.pop(key), rel=1e-12, abs=1e-12)
        for h in ("hist_mean", "hist_scale"):
            for key in ("min", "max"):
                va, vb = da[h].pop(key), db[h].pop(key)
                assert (va is None and vb is None) or va == pytest.approx(vb, rel=1e-12)
        assert da == db


# -- small windows: drift is judged with the rows there are -----------------------------------


def test_gross_shift_in_a_short_serving_watch_raises_a_ticket():
    """Mean moved by 2σ and spread tripled, 20 steps of 16 rows (320 rows, judged by the watch's
    defaults at 160 and 320 rows): a drift ticket, naming every layer."""
    m = _model()
    base = _run(m, 30, seed=1, rows=16).baseline()
    tickets = []
    rules = AlertRules(log_alerts=False, callbacks=[tickets.append])
    w = _run(m, 20, seed=2, rows=16, shift=lambda x: 2 + 3 * x, baseline=base, alerts=rules)
    assert [(a.severity, a.rule) for a in tickets] == [("ticket", "drift")]
    assert set(tickets[0].layers) == set(_LAYERS)
    assert all(r.evaluable and r.drifted and r.rows == 320 for r in w.drift_results.values())


def test_same_distribution_in_short_watches_raises_no_ticket():
    """50 independent 20-step watches of 16 rows a step, same distribution as the baseline.

    Rule: ``alpha`` (default 0.001) bounds the chance that one check of one layer raises a false
    alarm.  50 watches x 2 checks x 4 layers = 400 checks: at most 0.4 false alarms expected,
    and more than 2 has probability < 0.01 (Poisson(0.4)); so at most 2 tickets may open.
    """
    m = _model()
    base = _run(m, 30, seed=1, rows=16).baseline()
    assert DriftThresholds().alpha == 0.001
    rules = AlertRules(log_alerts=False, dedupe_seconds=0)  # every drifted check opens one
    judged = 0
    for seed in range(100, 150):
        w = _run(m, 20, seed=seed, rows=16, baseline=base, alerts=rules)
        assert all(r.evaluable and r.rows == 320 for r in w.drift_results.values())
        judged += len(w.drift_results)
    assert judged == 50 * 4
    assert len(rules.alerts) <= 2, [a.message for a in rules.alerts]


def _row_stats(rows: torch.Tensor) -> LayerStats:
    s = LayerStats()
    s.add_rows(rows.mean(1), rows.var(1, correction=0))
    return s


@pytest.mark.parametrize("dist", ["normal", "lognormal"])
@pytest.mark.parametrize("n", [20, 64, 300])
def test_one_checks_false_alarm_rate_is_at_most_alpha(n, dist):
    """compute_drift on live windows drawn from the baseline's own distribution: the share of
    windows called drifted stays within alpha (0.02 here, so that it can be measured).

    Rule: 500 windows, each called drifted with probability at most alpha; Binomial(500, 0.02)
    exceeds 20 with probability < 0.002, so at most 20 may be.  Row scales of lognormal
    features are skewed, which is where normal approximations err first."""
    g = torch.Generator().manual_seed(n)

    def draw(rows):
        x = torch.randn(rows, 16, generator=g, dtype=torch.float64)
        return _row_stats(x.exp() if dist == "lognormal" else x)

    base = draw(3000)
    th = DriftThresholds(alpha=0.02)
    results = [compute_drift("l", base, draw(n), th) for _ in range(500)]
    assert all(r.evaluable for r in results)
    drifted = [r.crossed for r in results if r.drifted]
    assert len(drifted) <= 20, drifted[:5]


def test_limits_grow_at_small_windows_and_meet_the_thresholds_at_large_ones():
    g = torch.Generator().manual_seed(0)
    base = _row_stats(torch.randn(20000, 16, generator=g, dtype=torch.float64))
    th = DriftThresholds()
    small = compute_drift("l", base, _row_stats(torch.randn(30, 16, generator=g)), th)
    large = compute_drift("l", base, _row_stats(torch.randn(20000, 16, generator=g)), th)
    configured = {"mean_shift": th.mean_shift, "variance_change": th.variance_change,
                  "psi": th.psi, "ks": th.ks}
    assert small.limits.keys() == large.limits.keys() == configured.keys()
    for k, v in configured.items():
        assert small.limits[k] > v, k  # noise at 30 rows can exceed the configured threshold
        assert large.limits[k] == v, k  # at 20000 rows the configured threshold decides
    # Two-sample KS at alpha/6 (split over up to six tests): c(a) * sqrt((n + m) / (n m)).
    a = th.alpha / 6
    c = math.sqrt(-math.log(a / 2) / 2)
    assert small.limits["ks"] == pytest.approx(c * math.sqrt((30 + 20000) / (30 * 20000)))
    # PSI: 30 rows make 6 bins; its limit is the chi-square quantile with 5 df times
    # (1/n + 1/m).  The approximate quantile stays just above the exact ones at df 1 and 2.
    assert small.limits["psi"] == pytest.approx(_chi2_quantile(5, 1 - a) * (1 / 30 + 1 / 20000))
    z = NormalDist().inv_cdf(1 - a / 2)
    for df, exact in ((1, z * z), (2, -2 * math.log(a))):
        assert exact < _chi2_quantile(df, 1 - a) < 1.1 * exact


def test_drift_that_cannot_be_judged_is_said_once(tmp_path, caplog):
    """A live window of a handful of rows, and a layer the baseline lacks: one warning in the
    log, ``evaluable: false`` with a reason in the records, ``normkit_drift_evaluable`` 0, and a
    sentence in ``normkit report``; no ticket.  Once the window holds enough rows, the layers
    the baseline has are judged (the gauge goes to 1) and nothing more is logged."""
    pytest.importorskip("prometheus_client")
    from normkit.monitor import PrometheusExporter
    from normkit.monitor.report import build_telemetry_report

    m = _model()
    base = _run(m, 10, seed=1).baseline()
    del base.layers["norm.3"]
    exp = PrometheusExporter(port=None)
    path = tmp_path / "run.jsonl"
    rules = AlertRules(log_alerts=False)
    g = torch.Generator().manual_seed(2)
    labels = {"model": "branches", "version": "1", "rank": "0"}
    with caplog.at_level(logging.WARNING, logger="normkit"), torch.no_grad(), \
            watch(m, model_name="branches", model_version="1", baseline=base, alerts=rules,
                  exporters=[JsonlExporter(path), exp], window=3, drift_every=2) as w:
        for _ in range(6):  # 2 rows a step: windows of 6 rows, checked 3 times
            m(torch.randn(2, 64, generator=g))
        w.flush()
        gauge = {n: exp.registry.get_sample_value("normkit_drift_evaluable",
                                                  {**labels, "layer": n}) for n in _LAYERS}
        assert gauge == {n: 0.0 for n in _LAYERS}
        for _ in range(6):  # 64 rows a step: the three layers with a baseline are judged
            m(torch.randn(64, 64, generator=g))
        w.flush()
        gauge = {n: exp.registry.get_sample_value("normkit_drift_evaluable",
                                                  {**labels, "layer": n}) for n in _LAYERS}
        assert gauge == {"norm.0": 1.0, "norm.1": 1.0, "norm.2": 1.0, "norm.3": 0.0}
    warnings = [r for r in caplog.records if "drift" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    msg = warnings[0].getMessage()
    assert all(n in msg for n in _LAYERS) and "min_rows" in msg and "baseline" in msg
    assert rules.alerts == []
    records = [r for r in read_jsonl(path) if r.get("type") == "step" and r["drift"]]
    first = records[0]["drift"]
    assert set(first) == set(_LAYERS)
    assert all(d["evaluable"] is False and d["crossed"] == [] and d["psi"] is None
               for d in first.values())
    assert "rows" in first["norm.0"]["reason"] and "baseline" in first["norm.3"]["reason"]
    assert records[-1]["drift"]["norm.0"]["evaluable"] is True

    doc = build_telemetry_report(path)
    text = " ".join(getattr(b, "text", "") for b in doc.blocks)
    assert "could not be judged at the watch's last check for 1 layer(s): norm.3" in text
    base.save(tmp_path / "baseline.json")
    doc = build_telemetry_report(path, tmp_path / "baseline.json")
    text = " ".join(getattr(b, "text", "") for b in doc.blocks)
    assert "could not be judged over the whole run for 1 layer(s): norm.3" in text
