"""normkit.guard: each check trips on its fault and never on healthy traffic, each action does
what it says, every trip is counted (Guard.trips, JSONL, a Prometheus scrape), and bad
arguments get clear errors.

Faults are injected with ``normkit.faults``.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import normkit
from normkit import faults
from normkit.guard import Guard, GuardTripped, Trip, guard
from normkit.monitor import (
    Baseline,
    JsonlExporter,
    PrometheusExporter,
    read_jsonl,
    watch,
)
from normkit.study.data import fixed_batches, load_corpus
from normkit.study.models import TinyGPT

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- models ---------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Float features → Linear → norm → GELU → Linear (no bias) → norm → head, built from
    torch's norms and converted by ``normkit.convert`` like a user's model.  The second Linear
    has no bias, so zeroing the first norm's γ/β leaves the second norm a constant (dead)
    input."""

    def __init__(self, norm=nn.LayerNorm, d_in=16, d=32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d)
        self.norm1 = norm(d)
        self.fc2 = nn.Linear(d, d, bias=False)
        self.norm2 = norm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x, *, scale=1.0):
        h = self.norm1(self.fc1(x))
        return self.head(self.norm2(self.fc2(nn.functional.gelu(h)))) * scale


def _mlp(norm=nn.LayerNorm):
    torch.manual_seed(0)
    m = Mlp(norm).eval()
    normkit.convert(m)
    return m


def _batches(n, seed, rows=64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 16, generator=g) for _ in range(n)]


def _baseline(model, batches) -> Baseline:
    with torch.no_grad(), watch(model, model_name="m", model_version="1") as w:
        for x in batches:
            model(x)
    return w.baseline()


@pytest.fixture(scope="module")
def mlp():
    m = _mlp()
    return m, _baseline(m, _batches(20, seed=1))


@pytest.fixture(scope="module")
def demo():
    """The demo's model (``normkit demo``: a pre-LN byte-level TinyGPT of normkit norms, its
    quick size) with a baseline on held-out text, and healthy batches of other text."""
    torch.manual_seed(0)
    model = TinyGPT("pre", "layer", layers=2, dim=64, heads=4, context=64).eval()
    corpus = load_corpus(max_train_bytes=200_000, max_val_bytes=50_000)
    base = _baseline(model, [x for x, _ in fixed_batches(corpus.val, 10, 16, 64, seed=1)])
    healthy = [x for x, _ in fixed_batches(corpus.train, 60, 16, 64, seed=2)]
    return model, base, healthy


def _trips(g, x, **kwargs) -> list[Trip]:
    with pytest.raises(GuardTripped) as e, torch.no_grad():
        g(x, **kwargs)
    return e.value.trips


# -- healthy traffic never trips --------------------------------------------------------------


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm], ids=["layernorm", "rmsnorm"])
def test_no_false_trips_on_healthy_batches(norm):
    model = _mlp(norm)
    g = Guard(model, baseline=_baseline(model, _batches(20, seed=1)))  # action="raise"
    with torch.no_grad():
        for x in _batches(300, seed=2):
            y = g(x)
            assert torch.equal(y, model(x))  # the guard hands the model's output back as is
    assert g.calls == 300 and not g.trips and g.off == {}


def test_no_false_trips_on_the_demo_model(demo):
    model, base, healthy = demo
    g = Guard(model, baseline=base)
    with torch.no_grad():
        for x in healthy:
            g(x)
    assert g.calls == len(healthy) and not g.trips
    assert g.layers == ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2",
                        "norm_f"]


# -- each check trips on its fault ------------------------------------------------------------


@pytest.mark.parametrize("where,value", [("weight", float("inf")), ("output", float("nan"))])
def test_nonfinite_trips_at_the_faulty_layer(mlp, where, value):
    model, base = mlp
    g = Guard(model, baseline=base)
    x = _batches(1, seed=3)[0]
    with faults.nonfinite(model, "norm1", where=where, value=value, index=5):
        trips = _trips(g, x)
    assert (trips[0].layer, trips[0].check, trips[0].limit) == ("norm1", "nonfinite", None)
    assert not torch.isfinite(torch.tensor(trips[0].value))
    assert ("<output>", "nonfinite") in {(t.layer, t.check) for t in trips}
    with torch.no_grad():
        g(x)  # the fault undone: healthy again


def test_nonfinite_on_the_demo_model(demo):
    model, base, healthy = demo
    g = Guard(model, baseline=base)
    with faults.nonfinite(model, "blocks.1.norm1", where="weight", value=float("inf"), index=0):
        trips = _trips(g, healthy[0])
    assert (trips[0].layer, trips[0].check) == ("blocks.1.norm1", "nonfinite")
    assert all(t.layer not in ("blocks.0.norm1", "blocks.0.norm2") for t in trips)


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_nonfinite_input_row_trips_from_the_statistics(norm, value):
    """fc2's weight corrupted: norm2's input rows hold NaN/Inf.  norm2's output is not read
    (float32, no other hook on it): its rows' rstd tells (NaN; 0 for an RMSNorm row holding
    Inf), with the lower rstd bound off so that only the nonfinite check can trip."""
    model = _mlp(norm)
    g = Guard(model, rstd_bounds=(0, None))
    with torch.no_grad():
        model.fc2.weight[0, 0] = value
    trips = _trips(g, _batches(1, seed=3)[0])
    assert (trips[0].layer, trips[0].check) == ("norm2", "nonfinite")
    assert not torch.isfinite(torch.tensor(trips[0].value))


def test_precision_fault_overflows_to_nonfinite(mlp):
    """The first norm run in float16 on activations past 65504: its input overflows to Inf."""
    model, base = mlp
    g = Guard(model, rstd_bounds=(0, None))  # the rstd check off: the nonfinite check alone
    x = _batches(1, seed=3)[0] * 1e5
    with torch.no_grad():
        g(x)  # in float32 the same input is finite all through
    with faults.precision(model, "norm1", dtype=torch.float16):
        trips = _trips(g, x)
    assert (trips[0].layer, trips[0].check) == ("norm1", "nonfinite")


def test_rstd_trips_when_activations_explode(mlp):
    model, _ = mlp
    g = Guard(model)
    x = _batches(1, seed=3)[0]
    with faults.scale_inputs(model, 1e6):
        trips = _trips(g, x)
    assert (trips[0].layer, trips[0].check, trips[0].limit) == ("norm1", "rstd", 1e-4)
    assert trips[0].value < 1e-4
    assert "activations exploded" in str(GuardTripped(trips))


def test_rstd_trips_on_a_dead_input(mlp):
    """norm1's γ/β zeroed (a bad export): norm2's input rows are all zero, their rstd is
    1/sqrt(eps), above the ceiling 1/sqrt(2·eps)."""
    model, _ = mlp
    g = Guard(model)
    with faults.affine(model, "norm1", mode="zero"):
        trips = _trips(g, _batches(1, seed=3)[0])
    eps = model.norm2.eps
    assert (trips[0].layer, trips[0].check) == ("norm2", "rstd")
    assert trips[0].limit == pytest.approx((2 * eps) ** -0.5)
    assert trips[0].value == pytest.approx(eps ** -0.5, rel=1e-3)


@pytest.mark.parametrize("factor,side", [(5.0, "above"), (0.1, "below")])
def test_scale_trips_outside_the_baseline(mlp, factor, side):
    model, base = mlp
    g = Guard(model, baseline=base)
    x = _batches(1, seed=3)[0]
    with faults.scale_inputs(model, factor):
        trips = _trips(g, x)
    assert {(t.layer, t.check) for t in trips} == {("norm1", "scale")}
    lo, hi = base.layers["norm1"].hist_scale.lo, base.layers["norm1"].hist_scale.hi
    assert trips[0].limit == pytest.approx(hi * 2 if side == "above" else lo / 2)
    assert side in trips[0].describe()
    # no baseline, no scale check; a wider tolerance lets the same call through
    with faults.scale_inputs(model, factor), torch.no_grad():
        Guard(model)(x)
        Guard(model, baseline=base, scale_tolerance=10)(x)


# -- actions ------------------------------------------------------------------------------------


def test_raise_names_layer_check_and_value(mlp):
    model, _ = mlp
    g = Guard(model, action="raise")
    with faults.scale_inputs(model, 1e6), pytest.raises(GuardTripped) as e, torch.no_grad():
        g(_batches(1, seed=3)[0])
    err = e.value
    assert (err.layer, err.check, err.limit) == ("norm1", "rstd", 1e-4)
    assert "'norm1'" in str(err) and "'rstd'" in str(err) and f"{err.value:.3g}" in str(err)
    assert g.trips == {("norm1", "rstd", "raise"): 1}


def test_fallback_returns_the_fallback_output_for_the_same_inputs(mlp):
    model, _ = mlp
    safe = _mlp()  # "the previous version"
    seen = []

    def fallback(*args, **kwargs):
        seen.append((args, kwargs))
        return safe(*args, **kwargs)

    g = Guard(model, action="fallback", fallback=fallback)
    x = _batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(g(x, scale=2.0), model(x, scale=2.0)) and not seen  # healthy
        with faults.nonfinite(model, "norm2", where="output", value=float("nan")):
            y = g(x, scale=2.0)
        assert torch.equal(y, safe(x, scale=2.0)) and torch.isfinite(y).all()
    assert len(seen) == 1 and seen[0][0][0] is x and seen[0][1] == {"scale": 2.0}
    assert g.trips == {("norm2", "nonfinite", "fallback"): 1,
                       ("<output>", "nonfinite", "fallback"): 1}


def test_record_counts_and_passes_through(mlp, caplog):
    model, base = mlp
    g = Guard(model, baseline=base, action="record")
    x = _batches(1, seed=3)[0]
    with faults.scale_inputs(model, 5.0), torch.no_grad(), caplog.at_level(logging.WARNING):
        for _ in range(3):
            y = g(x)
        assert torch.equal(y, model(x))
    assert g.trips == {("norm1", "scale", "record"): 3} and g.calls == 3
    said = [r for r in caplog.records if r.name == "normkit.guard"]
    assert len(said) == 1 and "norm1" in said[0].getMessage()  # logged once, counted always


def test_nonfinite_after_the_last_norm_is_the_output(mlp):
    model, _ = mlp
    g = Guard(model)
    with torch.no_grad():
        saved = model.head.weight[0, 0].item()
        model.head.weight[0, 0] = float("inf")
        try:
            trips = _trips(g, _batches(1, seed=3)[0])
        finally:
            model.head.weight[0, 0] = saved
    assert [(t.layer, t.check) for t in trips] == [("<output>", "nonfinite")]


# -- telemetry ----------------------------------------------------------------------------------


def test_trips_reach_jsonl_and_prometheus(mlp, tmp_path):
    """With a running watch, each tripped call is a "guard" record: in the JSONL file (readers
    that build baselines skip it) and in normkit_guard_trips_total on a scrape.  The watch and
    the guard share the statistics sink: both get the kernel's statistics on the same call."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    model, base = mlp
    prom = PrometheusExporter(port=None)
    path = tmp_path / "run.jsonl"
    x = _batches(1, seed=3)[0]
    with torch.no_grad(), watch(model, model_name="m", model_version="2",
                                exporters=[JsonlExporter(path), prom]) as w:
        g = Guard(model, baseline=base, action="record", watch=w)
        g(x)
        with faults.scale_inputs(model, 5.0):
            g(x)
            g(x)
        with faults.nonfinite(model, "norm2", where="weight", value=float("nan")):
            g(x)
        w.flush()
        text = generate_latest(prom.registry).decode()
        assert w.summary()["norm1"]["rows"] == 4 * 64  # the watch got its statistics too
    samples = {tuple(sorted(s.labels.items())): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "normkit_guard_trips_total"}

    def key(layer, check):
        return tuple(sorted({"model": "m", "version": "2", "layer": layer, "check": check,
                             "action": "record"}.items()))

    assert samples == {key("norm1", "scale"): 2.0, key("norm2", "nonfinite"): 1.0,
                       key("<output>", "nonfinite"): 1.0}
    recs = [r for r in read_jsonl(path) if r["type"] == "guard"]
    assert [r["call"] for r in recs] == [2, 3, 4]
    (t,) = recs[0]["trips"]
    assert (t["layer"], t["check"]) == ("norm1", "scale")
    assert t["limit"] == pytest.approx(base.layers["norm1"].hist_scale.hi * 2)
    assert t["value"] > t["limit"]
    assert recs[2]["trips"][0] == {"layer": "norm2", "check": "nonfinite", "value": None,
                                   "limit": None}  # NaN is null in JSON
    assert {(r["model"], r["version"], r["action"]) for r in recs} == {("m", "2", "record")}
    assert Baseline.from_jsonl(path).layers["norm1"].rows == 4 * 64  # steps only
    assert sum(g.trips.values()) == 4


def test_guard_record_is_checked_on_read(tmp_path):
    import json

    path = tmp_path / "bad.jsonl"
    rec = {"type": "guard", "schema": "normkit.monitor", "schema_version": 1, "time_unix": 1.0,
           "model": "m", "version": "1", "rank": "0", "call": 1, "action": "record",
           "trips": [{"layer": "n", "check": "bogus", "value": 1.0, "limit": 2.0}]}
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: trips\[0\].check: expected"):
        list(read_jsonl(path))


def test_a_stopped_watch_is_said_once_and_trips_still_count(mlp):
    model, _ = mlp
    with watch(model, model_name="m", model_version="1") as w:
        pass
    g = Guard(model, action="record", watch=w)
    with faults.scale_inputs(model, 1e6), torch.no_grad():
        g(_batches(1, seed=3)[0])
        g(_batches(1, seed=3)[0])
    assert g.trips == {("norm1", "rstd", "record"): 2}
    assert "not running" in g.off["telemetry"]


# -- models and arguments -----------------------------------------------------------------------


def test_norms_normkit_cannot_read_are_listed_and_the_rest_guarded():
    torch.manual_seed(0)
    model = Mlp().eval()
    with pytest.raises(ValueError, match=r"no normkit norm layer.*normkit\.convert"):
        Guard(model)
    normkit.convert(model, filter=lambda m, name: name == "norm2")
    g = Guard(model)
    assert g.layers == ["norm2"] and "normkit.convert" in g.off["norm1"]


def test_a_layer_without_statistics_keeps_its_nonfinite_check(mlp, caplog):
    """A norm whose call hands no statistics over (as under torch.compile): said once, listed
    in ``off``, still checked for non-finite output."""
    model, base = mlp
    g = Guard(model, baseline=base)
    norm1 = model.norm1
    norm1.forward = lambda x: nn.functional.layer_norm(x, norm1.normalized_shape, norm1.weight,
                                                       norm1.bias, norm1.eps)
    try:
        with torch.no_grad(), caplog.at_level(logging.WARNING):
            g(_batches(1, seed=3)[0])
            g(_batches(1, seed=4)[0])
            with faults.nonfinite(model, "norm1", where="weight", value=float("nan")):
                trips = _trips(g, _batches(1, seed=3)[0])
    finally:
        del norm1.forward
    assert list(g.off) == ["statistics of norm1"] and "only its nonfinite" in g.off[
        "statistics of norm1"]
    assert len([r for r in caplog.records if "statistics of norm1" in r.getMessage()]) == 1
    assert (trips[0].layer, trips[0].check) == ("norm1", "nonfinite")


def test_baseline_without_a_layer_turns_its_scale_check_off(mlp, tmp_path):
    model, base = mlp
    part = Baseline("m", "1", {"norm1": base.layers["norm1"]})
    part.save(tmp_path / "b.json")
    g = Guard(model, baseline=str(tmp_path / "b.json"))
    assert set(g.off) == {"scale of norm2"} and "no rows" in g.off["scale of norm2"]


def test_remove_detaches_the_hooks(mlp):
    model, _ = mlp
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    g = guard(model)
    assert isinstance(g, Guard)
    g.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
               for m in model.modules()) == hooks
    with faults.nonfinite(model, "norm1", where="weight", value=float("nan")), torch.no_grad():
        assert not torch.isfinite(g(_batches(1, seed=3)[0])).all()  # passed through, unchecked
    assert g.calls == 0 and not g.trips


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(model="m"), TypeError, "model must be a torch.nn.Module"),
    (dict(action="block"), ValueError, "action must be one of"),
    (dict(action="fallback"), TypeError, "action='fallback' needs fallback="),
    (dict(action="fallback", fallback=3), TypeError, "needs fallback="),
    (dict(fallback=lambda x: x), ValueError, "fallback is only used with action='fallback'"),
    (dict(rstd_bounds=1e-4), TypeError, r"rstd_bounds must be a pair \(low, high\)"),
    (dict(rstd_bounds=(-1, None)), ValueError, "rstd_bounds low must be a number >= 0"),
    (dict(rstd_bounds=(None, None)), ValueError, "rstd_bounds low must be a number >= 0"),
    (dict(rstd_bounds=(1e-4, "eps")), ValueError, "rstd_bounds high must be a number >= 0 or "
                                                  "None"),
    (dict(rstd_bounds=(1.0, 0.5)), ValueError, "low < high"),
    (dict(scale_tolerance=0.5), ValueError, "scale_tolerance must be a finite number >= 1"),
    (dict(scale_tolerance=float("inf")), ValueError, "scale_tolerance"),
    (dict(scale_tolerance=True), ValueError, "scale_tolerance"),
    (dict(baseline={"layers": {}}), TypeError, "baseline must be a normkit.monitor.Baseline"),
    (dict(watch="w"), TypeError, "watch must be what normkit.watch returns"),
])
def test_bad_arguments(mlp, kwargs, exc, match):
    model = kwargs.pop("model", mlp[0])
    with pytest.raises(exc, match=match):
        Guard(model, **kwargs)


def test_a_missing_baseline_file_names_it(mlp, tmp_path):
    with pytest.raises(OSError, match="nope.json"):
        Guard(mlp[0], baseline=tmp_path / "nope.json")
