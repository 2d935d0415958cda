"""Exporters end to end: a real Prometheus scrapes a training run; TensorBoard event files read
back with tensorboard's own reader; the endpoint binds loopback."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest
import torch
from _monitor_models import TinyTransformer, lm_batch, train_step
from _prometheus import DEPLOY_CONFIG
from _prometheus import get as _get
from _prometheus import query as _query
from _prometheus import wait_for as _wait_for

import normkit
from normkit.monitor import PrometheusExporter, TensorBoardExporter, watch

pytest.importorskip("prometheus_client")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_exporter_serves_loopback_with_bounded_labels():
    exp = PrometheusExporter(port=0)
    try:
        assert exp.url.startswith("http://127.0.0.1:") and exp.url.endswith("/metrics")
        m = TinyTransformer()
        normkit.convert(m)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        with watch(m, model_name="lm", model_version="v1", exporters=[exp], every=2) as w:
            for _ in range(4):
                train_step(m, opt, *lm_batch())
            w.flush()
            # Before stop(): stop closes the exporter, which drops the watch's series.
            text = _get(exp.url)
            samples = list(exp.registry.collect())
        labels = {"model": "lm", "version": "v1", "rank": "0"}
        reg = _Frozen(samples)
        assert reg.get_sample_value("normkit_steps_total", labels) == 3  # steps 1..3 seen
        assert reg.get_sample_value("normkit_sampled_steps_total", labels) == 2
        assert reg.get_sample_value("normkit_nonfinite_steps_total", labels) == 0
        std = reg.get_sample_value("normkit_norm_input_std", {**labels, "layer": "ln_f"})
        assert std is not None and std > 0
        assert reg.get_sample_value("normkit_norm_forward_latency_seconds_count",
                                    {**labels, "layer": "blocks.0.ln1"}) == 2
        from prometheus_client.parser import text_string_to_metric_families

        samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
        assert any(s.name == "normkit_norm_weight_grad_norm" and s.labels.get("layer")
                   == "blocks.3.ln2" and s.value > 0 for s in samples)
        # Label values are model structure only: layer/module names, never data.
        for s in samples:
            assert set(s.labels) <= {"model", "version", "rank", "layer", "pass", "module",
                                     "quantile", "severity", "rule", "normkit_version", "le"}
    finally:
        exp.close()


class _Frozen:
    """``get_sample_value`` over metric families collected earlier."""

    def __init__(self, families):
        self._samples = [s for fam in families for s in fam.samples]

    def get_sample_value(self, name, labels):
        for s in self._samples:
            if s.name == name and s.labels == labels:
                return s.value
        return None


def _versions(registry) -> set[str]:
    return {s.labels["version"] for fam in registry.collect() for s in fam.samples
            if "version" in s.labels}


def test_user_registry_without_a_server():
    pc = pytest.importorskip("prometheus_client")
    reg = pc.CollectorRegistry()
    exp = PrometheusExporter(port=None, registry=reg)
    assert exp.url is None
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    with watch(m, model_name="s", model_version="1", exporters=[exp]) as w:
        m(torch.randn(3, 8))
        w.flush()
        labels = {"model": "s", "version": "1", "rank": "0", "layer": "1"}
        assert reg.get_sample_value("normkit_norm_input_mean", labels) is not None
    assert callable(exp.asgi_app())


def test_series_of_an_ended_or_retired_version_are_removed():
    """A registry that outlives a watch (the user's own, served by their app) keeps no series of
    a model version whose watch ended (the exporter's close), nor of one retired on request
    (``remove_series``); a later record brings its series back."""
    pc = pytest.importorskip("prometheus_client")
    reg = pc.CollectorRegistry()
    exp = PrometheusExporter(port=None, registry=reg)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    steps = {"model": "s", "version": "1", "rank": "0"}
    with torch.no_grad(), watch(m, model_name="s", model_version="1", exporters=[exp]) as w:
        for _ in range(3):
            m(torch.randn(3, 8))
        w.flush()
        assert _versions(reg) == {"1"}
        assert reg.get_sample_value("normkit_steps_total", steps) == 3
    assert _versions(reg) == set()  # the watch ended: its exporter's close removed them
    # The same exporter (and registry) serves the next version.
    with torch.no_grad(), watch(m, model_name="s", model_version="2", exporters=[exp]) as w:
        m(torch.randn(3, 8))
        w.flush()
        assert _versions(reg) == {"2"}
        assert exp.remove_series(model="other") == 0 and _versions(reg) == {"2"}
        assert exp.remove_series(model="s", version="2") > 0
        assert _versions(reg) == set()
        m(torch.randn(3, 8))
        w.flush()
        assert _versions(reg) == {"2"}  # exported again, counters from zero
        assert reg.get_sample_value("normkit_sampled_steps_total", {**steps, "version": "2"}) == 1
    assert _versions(reg) == set()


def _shipped_target() -> str:
    """The one target deploy/prometheus/prometheus.yml scrapes."""
    targets = re.findall(r"targets:\s*\[([^\]]*)\]", DEPLOY_CONFIG.read_text())
    assert len(targets) == 1, targets
    return targets[0].strip().strip("'\"")


def _skip_if_in_use(target: str) -> None:
    host, port = target.rsplit(":", 1)
    with socket.socket() as s:
        if s.connect_ex((host, int(port))) == 0:
            pytest.skip(f"{target} is in use on this machine (another exporter?)")


def test_default_exporter_serves_where_the_deploy_config_scrapes():
    target = _shipped_target()
    _skip_if_in_use(target)
    exp = PrometheusExporter()
    try:
        assert exp.url == f"http://{target}/metrics"
        assert "# TYPE normkit_steps_total counter" in _get(exp.url)
    finally:
        exp.close()


def test_port_in_use_is_a_clear_error():
    pc = pytest.importorskip("prometheus_client")
    reg = pc.CollectorRegistry()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=rf"port {port} on 127.0.0.1 is in use.*port=0"):
            PrometheusExporter(port=port, registry=reg)
    # Nothing was left registered: the same registry takes an exporter on a free port.
    exp = PrometheusExporter(port=0, registry=reg)
    try:
        assert exp.url.startswith("http://127.0.0.1:")
    finally:
        exp.close()


def test_real_prometheus_scrapes_a_training_run(prometheus_server):
    exp = PrometheusExporter(port=0)
    try:
        target = exp.url.removeprefix("http://").removesuffix("/metrics")
        base = prometheus_server(target)
        m = TinyTransformer()
        normkit.convert(m)
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        q = ('normkit_norm_input_std{model="lm",version="v7",rank="0",layer="blocks.2.ln1",'
             'job="normkit"}')

        def train():
            for _ in range(3):
                train_step(m, opt, *lm_batch())

        with watch(m, model_name="lm", model_version="v7", exporters=[exp]) as w:
            found = _wait_for(base, q, True, train)
            assert found, "Prometheus never scraped the series"
            steps = _query(base, 'normkit_sampled_steps_total{model="lm",version="v7"}')
            assert float(found[0]["value"][1]) > 0
            assert found[0]["metric"]["instance"] == target
            assert float(steps[0]["value"][1]) >= 1
            # Retired on request while the endpoint still serves: Prometheus marks the
            # series stale at its next scrape, and an instant query no longer returns them.
            w.flush()
            assert exp.remove_series(model="lm", version="v7") > 0
            assert _wait_for(base, q, False) == [], "the removed series are still there"
    finally:
        exp.close()


def test_shipped_prometheus_config_scrapes_the_default_exporter(prometheus_server):
    """The README's quick start as written: ``PrometheusExporter()`` and Prometheus run with
    deploy/prometheus/prometheus.yml (and its rules) — the series arrive."""
    _skip_if_in_use(_shipped_target())
    exp = PrometheusExporter()
    try:
        base = prometheus_server()
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        with torch.no_grad(), watch(m, model_name="s", model_version="1", exporters=[exp]):
            found = _wait_for(base, 'normkit_steps_total{job="normkit",model="s"}', True,
                              lambda: m(torch.randn(3, 8)))
        assert found and found[0]["metric"]["instance"] == _shipped_target()
        rules = json.loads(_get(f"{base}/api/v1/rules"))["data"]["groups"]
        assert {g["name"] for g in rules} == {"normkit-recording", "normkit-alerts"}
    finally:
        exp.close()


def test_tensorboard_event_files_are_readable(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = TinyTransformer()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    with watch(m, model_name="lm", model_version="v1",
               exporters=[TensorBoardExporter(tmp_path / "tb")]):
        for _ in range(3):
            train_step(m, opt, *lm_batch())
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "normkit/blocks.0.ln1/input_std" in tags["scalars"]
    assert "normkit/ln_f/weight_grad_norm" in tags["scalars"]
    assert "normkit/nonfinite/forward" in tags["scalars"]
    assert "normkit/blocks.5.ln2/row_scale" in tags["histograms"]
    ev = acc.Scalars("normkit/blocks.0.ln1/input_std")
    assert [e.step for e in ev] == [1, 2, 3] and all(e.value > 0 for e in ev)
    h = acc.Histograms("normkit/ln_f/row_mean")[-1].histogram_value
    assert h.num == 4 * 16 and h.min <= h.max


def test_event_file_framing_matches_tensorboards_own_crc(tmp_path):
    """Our compiled CRC-32C gives tensorboard's masked CRC bit for bit, and tensorboard's own
    record reader (which verifies both CRCs of every record) reads our file back."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    from normkit.monitor.exporters.tensorboard import _EventFile, _masked_crc32c

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 255, 4096, 10007):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert _masked_crc32c(data) == masked_crc32c(data), n
    f = _EventFile(str(tmp_path), event_pb2)
    for step in range(3):
        f.write(event_pb2.Event(wall_time=1.0 + step, step=step))
    f.close()
    events = [event_pb2.Event.FromString(r) for r in RawEventFileLoader(f.path).Load()]
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [0, 1, 2]
