"""Baselines (capture, save/load, from JSONL) and drift: no false alarm on the same
distribution; shifted inputs drift exactly the layers they reach."""

from __future__ import annotations

import json
import math

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
    watch,
)
from normkit.monitor._sketch import Histogram, ks, psi
from normkit.monitor._stats import LayerStats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(impl="torch"):
    torch.manual_seed(0)
    m = Branches(k=4, d=16).eval()
    return normkit.convert(m) if impl == "normkit" else m


def _run(m, steps, seed, shift=None, **kw):
    """``steps`` batches of 64 rows of N(0, 1) features; ``shift(x)`` edits a batch."""
    g = torch.Generator().manual_seed(seed)
    w = watch(m, model_name="branches", model_version="1", **kw)
    with torch.no_grad():
        for _ in range(steps):
            x = torch.randn(64, 64, generator=g)
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
    strict = DriftThresholds(mean_shift=1e-9, variance_change=1e-9, psi=1e-9, ks=1e-9)
    r = compute_drift("norm.0", base.layers["norm.0"], live["norm.0"], strict)
    assert set(r.crossed) == {"mean_shift", "variance_ratio", "psi", "ks"}
    assert compute_drift("norm.0", base.layers["norm.0"], live["norm.0"],
                         DriftThresholds(min_rows=10**9)) is None
    with pytest.raises(ValueError, match="mean_shift"):
        DriftThresholds(mean_shift=0)
    with pytest.raises(ValueError, match="min_rows"):
        DriftThresholds(min_rows=0)


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
