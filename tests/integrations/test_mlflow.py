"""MlflowExporter against a real MLflow tracking server (``mlflow server``, SQLite backend, on
127.0.0.1, started once for this module): the metrics read back through ``MlflowClient`` equal
the JSONL of the same run, per layer and step; params, tags and artifacts are there; a server
that is down costs the step next to nothing and is logged once."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _prometheus import free_port, start_process, stop_process

from normkit.monitor import JsonlExporter, MlflowExporter, read_jsonl, watch
from normkit.monitor._schema import SUMMARY_SCALARS

# No usage telemetry from the client or the server (nothing outside can be reached anyway), and
# no race on it: mlflow 3.17 sets and unsets _MLFLOW_TELEMETRY_SESSION_ID in os.environ while
# another thread's first request reads the environment (seen once as a KeyError in create_run).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")

SERVER = Path(sys.executable).with_name("mlflow")
STARTUP_TIMEOUT = 240  # seconds: ~50 s measured on a loaded 2-core machine, most of it imports


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tracking server's URI."""
    if not SERVER.exists():
        pytest.skip(f"no mlflow server executable at {SERVER}")
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = start_process(
        [str(SERVER), "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--default-artifact-root", str(d / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        f"{uri}/health", "mlflow server", timeout=STARTUP_TIMEOUT, log=d / "server.log")
    print(f"mlflow server answered after {time.monotonic() - t0:.1f} s")
    try:
        yield uri
    finally:
        stop_process(proc)


class Net(torch.nn.Module):
    """Two norm layers whose names meet once made MLflow-valid ("ln:1" and "ln_1")."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(8, 16)
        self.norms = torch.nn.ModuleDict({"ln:1": torch.nn.LayerNorm(16),
                                          "ln_1": torch.nn.RMSNorm(16)})
        self.out = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.norms["ln_1"](self.norms["ln:1"](self.inp(x))))


def _train(model, opt, steps, micro=2):
    for _ in range(steps):
        for _ in range(micro):
            model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_metrics_equal_the_jsonl_params_tags_and_artifacts(server, tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    audit = tmp_path / "audit.json"
    audit.write_text(json.dumps({"verdict": "pass"}))
    exp = MlflowExporter(server, experiment="normkit-test", run_name="t")
    with watch(model, model_name="net", model_version="v7", step="optimizer", optimizer=opt,
               exporters=[exp, JsonlExporter(tmp_path / "run.jsonl")]) as w:
        _train(model, opt, steps=4)
        exp.log_artifact(audit)
    assert w.off == {} and exp.failed_batches == 0 and exp.dropped_steps == 0
    recs = [r for r in read_jsonl(tmp_path / "run.jsonl") if r["type"] == "step"]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]

    client = mlflow.MlflowClient(server)
    layers = w.layer_names
    keys = {exp.metric_key(n, "input_std") for n in layers}
    assert len(keys) == 2 and all(":" not in k for k in keys)  # sanitised, still distinct
    compared = 0
    for name in layers:
        for stat in SUMMARY_SCALARS:
            want = {r["step"]: r["summary"][name][stat] for r in recs
                    if r["summary"][name].get(stat) is not None}
            got = {m.step: m.value
                   for m in client.get_metric_history(exp.run_id, exp.metric_key(name, stat))}
            assert got == want, (name, stat)
            compared += len(want)
    assert compared >= 2 * 4 * 8  # every layer, every step, most statistics
    nonfinite = client.get_metric_history(exp.run_id, "normkit/nonfinite_forward")
    assert [(m.step, m.value) for m in nonfinite] == [(s, 0.0) for s in (1, 2, 3, 4)]

    run = client.get_run(exp.run_id)
    assert run.info.status == "FINISHED"  # a run the exporter made is ended by it
    assert run.data.params["normkit.model"] == "net"
    assert run.data.params["normkit.model_version"] == "v7"
    assert run.data.tags["normkit.version"] == run.data.params["normkit.version"]
    arts = {a.path for a in client.list_artifacts(exp.run_id, "normkit")}
    assert arts == {"normkit/telemetry.jsonl", "normkit/baseline.json", "normkit/report.html",
                    "normkit/audit.json"}
    got = Path(client.download_artifacts(exp.run_id, "normkit/baseline.json", str(tmp_path)))
    baseline = json.loads(got.read_text())
    assert {n: s["rows"] for n, s in baseline["layers"].items()} == \
        {n: w.summary()[n]["rows"] for n in layers}
    page = Path(client.download_artifacts(exp.run_id, "normkit/report.html", str(tmp_path)))
    assert "normkit telemetry report" in page.read_text()


def test_the_active_run_is_used_and_left_open(server):
    mlflow.set_tracking_uri(server)
    try:
        with mlflow.start_run() as active:
            exp = MlflowExporter()
            model = Net()
            with watch(model, model_name="net", model_version="v1", exporters=[exp]):
                model(torch.randn(4, 8))
            assert exp.run_id == active.info.run_id
            assert mlflow.MlflowClient(server).get_run(exp.run_id).info.status == "RUNNING"
    finally:
        mlflow.set_tracking_uri(None)


def test_a_server_that_is_down_costs_the_step_nothing_and_is_logged_once(
        tmp_path, monkeypatch, caplog):
    # mlflow's client retries a refused connection 7 times with backoff by default (minutes);
    # the step never waits for that either way, but the test wants the failure seen quickly.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    torch.manual_seed(0)
    models = {k: Net() for k in ("with", "without")}
    exp = MlflowExporter(down, close_timeout=5)
    spent = []  # the exporter's own time per record (on the step's thread with
    real = exp.export  # background_export=False)

    def timed(record):
        t0 = time.perf_counter()
        try:
            real(record)
        finally:
            spent.append(time.perf_counter() - t0)

    exp.export = timed

    def make(k):
        exps = [JsonlExporter(tmp_path / f"{k}.jsonl")] + ([exp] if k == "with" else [])
        return watch(models[k], model_name="net", model_version=k, exporters=exps)

    with caplog.at_level(logging.WARNING, "normkit"):
        watches = {k: make(k) for k in models}
        times = {k: [] for k in models}
        for i in range(60):
            for k in (("with", "without") if i % 2 else ("without", "with")):
                x = torch.randn(4, 8)
                t0 = time.perf_counter()
                models[k](x).square().mean().backward()
                watches[k].flush()  # every exporter done with the step: charged to it
                times[k].append(time.perf_counter() - t0)
        off = dict(watches["with"].off)
        for w in watches.values():
            w.stop()
    base = statistics.median(times["without"][10:])
    cost = statistics.median(times["with"][10:]) - base
    own = statistics.median(spent)
    print(f"step {base * 1e3:.2f} ms without, {cost * 1e3:+.3f} ms with a down MLflow "
          f"(medians of 50 interleaved steps); its export() {own * 1e3:.3f} ms (median); "
          f"{exp.failed_batches} batches failed")
    # The bar is 1 ms; a loaded 2-core machine gets a generous margin.
    assert cost < 0.020 and own < 0.005
    assert exp.failed_batches >= 50
    assert any("MlflowExporter" in what for what in off)
    said = [r for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("normkit")]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert "MlflowExporter" in said[0].getMessage()


def test_bad_arguments_are_named(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # the client connects only when it logs
    with pytest.raises(ValueError, match="queue_size must be an int >= 1"):
        MlflowExporter(uri, queue_size=0)
    with pytest.raises(ValueError, match="experiment must be a non-empty string"):
        MlflowExporter(uri, experiment="")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        MlflowExporter(uri, artifacts=[tmp_path / "nope.json"])
    exp = MlflowExporter(uri)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        exp.log_artifact(tmp_path / "missing.json")
    exp.close()  # nothing was watched: no run is made
    (tmp_path / "audit.json").write_text("{}")
    with pytest.raises(RuntimeError, match="no run to log"):
        exp.log_artifact(tmp_path / "audit.json")


def test_keys_are_valid_bounded_and_distinct(tmp_path):
    from mlflow.utils.validation import _validate_metric_name

    exp = MlflowExporter(f"http://127.0.0.1:{free_port()}")
    names = ["blocks.0.ln", "a:b", "a_b", "..", "", "x" * 400, "x" * 400 + "y", "ü/ñ"]
    keys = [exp.metric_key(n, "drift_variance_ratio", rank="12") for n in names]
    for k in keys:
        _validate_metric_name(k)  # raises on an invalid name
        assert len(k) <= 250
    assert len(set(keys)) == len(names)
    assert keys[0] == "normkit/rank12/blocks.0.ln/drift_variance_ratio"
    assert exp.metric_key("blocks.0.ln", "input_std") == "normkit/blocks.0.ln/input_std"
    exp.close()


def test_import_normkit_monitor_does_not_import_mlflow():
    code = ("import sys, normkit, normkit.monitor; "
            "sys.exit('mlflow' in sys.modules)")
    env = dict(os.environ)
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0
