"""deploy/: promtool checks and unit-tests the rules; every metric a rule or dashboard uses is one
the exporter really produces."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _monitor_models import TinyTransformer, lm_batch, train_step

import normkit
from normkit.canary import divergence
from normkit.guard import Guard
from normkit.monitor import METRICS, AlertRules, DriftThresholds, PrometheusExporter, watch
from normkit.monitor.exporters import exported_series_names

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))

_METRIC = re.compile(r"\bnormkit_[a-z0-9_]*[a-z0-9]\b(?!\*)")
_RECORDED = re.compile(r"\bnormkit:[a-z0-9_:]+[a-z0-9]\b")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _promtool():
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (.ci/run installs the Debian prometheus package)")
    return binary


def test_promtool_check_rules():
    out = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_test_rules():
    out = subprocess.run([_promtool(), "test", "rules", "rules_test.yml"], capture_output=True,
                         text=True, timeout=120, cwd=RULES.parent)
    assert out.returncode == 0, out.stdout + out.stderr


def _dashboard_exprs() -> dict[str, list[str]]:
    out = {}
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        exprs = [t["expr"] for p in d["panels"] for t in p["targets"]]
        exprs += [v["definition"] for v in d["templating"]["list"] if v.get("definition")]
        out[path.name] = exprs
    return out


def test_three_dashboards_are_valid_provisioning_json():
    assert [p.name for p in DASHBOARDS] == ["normkit-debug.json", "normkit-executive.json",
                                            "normkit-oncall.json"]
    uids = set()
    for path in DASHBOARDS:
        d = json.loads(path.read_text())
        assert d["uid"] not in uids and d["schemaVersion"] >= 36 and d["panels"]
        uids.add(d["uid"])
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids))
        for p in d["panels"]:
            assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"])
            assert p["datasource"]["uid"] == "${datasource}"


def _referenced() -> tuple[set[str], set[str]]:
    text = RULES.read_text() + "\n".join(e for v in _dashboard_exprs().values() for e in v)
    label_names = {label for _, _, labels, _ in METRICS for label in labels}  # normkit_version
    return set(_METRIC.findall(text)) - label_names, set(_RECORDED.findall(text))


def test_rules_and_dashboards_only_use_declared_metrics():
    metrics, recorded = _referenced()
    assert metrics, "no metric found: the regular expression is broken"
    assert metrics <= exported_series_names(), metrics - exported_series_names()
    defined = set(re.findall(r"record:\s*(\S+)", RULES.read_text()))
    assert recorded <= defined, recorded - defined
    # Every declared family is used somewhere (no dead metric nobody looks at), except the
    # counters' _created twins.
    used_families = {re.sub(r"_(total|bucket|sum|count)$", "", m) for m in metrics}
    declared = {name for name, *_ in METRICS}
    assert declared - used_families == set(), declared - used_families


def test_every_referenced_metric_is_produced_by_the_exporter():
    """A run that touches every code path (training, a baseline with drift checks, an injected
    NaN with its alert and a guard's trip): the scrape must contain every series the rules and
    dashboards use."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    torch.manual_seed(0)
    m = TinyTransformer()
    normkit.convert(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with watch(m, model_name="lm", model_version="v0") as w0:
        for _ in range(2):
            train_step(m, opt, *lm_batch())
    exp = PrometheusExporter(port=None)
    with watch(m, model_name="lm", model_version="v1", exporters=[exp], baseline=w0.baseline(),
               drift_every=1, thresholds=DriftThresholds(min_rows=1),
               alerts=AlertRules(log_alerts=False)) as w:
        for _ in range(2):
            train_step(m, opt, *lm_batch())
        m.get_submodule(m.feeder_of(3)).inject_forward = (0,)
        with torch.no_grad():  # through a guard, whose trips are counted by the exporter too
            Guard(m, action="record", watch=w)(lm_batch()[0])
        w.flush()
        # shadow traffic: the canary's output divergence of two versions on the same inputs
        exp.export(divergence(m(lm_batch()[0]), m(lm_batch()[0])).record("lm", "v1", "v0"))
        text = generate_latest(exp.registry).decode()  # stop() removes the watch's series
    produced = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    metrics, _ = _referenced()
    assert metrics <= produced, metrics - produced
