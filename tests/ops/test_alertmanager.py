"""deploy/alertmanager/alertmanager.yml end to end, and the silence client.

A REAL Prometheus evaluates the SHIPPED deploy/prometheus/rules.yml against a normkit
PrometheusExporter serving two watched models, and sends its alerts to a REAL Alertmanager
running the SHIPPED alertmanager.yml; a small webhook receiver in this test stands in for the
pager and the ticket system.  Model "a" drifts: its ticket reaches the ticket receiver.  Model
"b" drifts and puts out NaN: its page reaches the on-call receiver, and its drift ticket is
inhibited.

What the test changes, all timing and nothing else (checked): the rules copy evaluates every
second instead of 30 s and waits "for: 0s" instead of minutes; the Alertmanager copy waits 1 s
(group_wait, group_interval) instead of 30 s / 5 m; its receiver URLs point at the test's
webhook receiver instead of the https://hooks.example.com placeholders.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import shlex
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from _prometheus import binary, free_port, get_json, start_process, stop_process

from normkit import canary as canary_mod
from normkit import faults
from normkit.monitor import DriftThresholds, JsonlExporter, PrometheusExporter, watch
from normkit.monitor.alertmanager import (
    AlertmanagerError,
    active_silences,
    expire_silence,
    open_silence,
    parse_duration,
    silence,
)

pytest.importorskip("prometheus_client")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
AM_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
README = ROOT / "deploy" / "README.md"
PLACEHOLDER = "https://hooks.example.com/normkit/"


def _until(what: str, check, timeout: float = 45.0, step=lambda: None):
    """Calls ``step`` and ``check`` every 0.3 s until ``check`` returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        step()
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


class _Hooks:
    """A webhook receiver: every POST's (path, JSON body), in arrival order."""

    def __init__(self):
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self, path: str) -> list[dict]:
        return [a for p, body in list(self.received) if p == path for a in body["alerts"]]


@pytest.fixture(scope="module")
def hooks():
    h = _Hooks()
    yield h
    h.server.shutdown()
    h.server.server_close()


def _test_am_config(hooks_url: str) -> str:
    """The shipped config with the receiver URLs and the waits changed (only those)."""
    text = AM_CONFIG.read_text()
    assert text.count(PLACEHOLDER) == 2, "the shipped receiver URLs moved"
    text = text.replace(PLACEHOLDER, hooks_url)
    text, n = re.subn(r"(?m)^(\s*group_(?:wait|interval)): .*$", r"\1: 1s", text)
    assert n == 2, "the shipped group_wait/group_interval moved"
    return text


@pytest.fixture(scope="module")
def alertmanager(hooks, tmp_path_factory):
    """A real Alertmanager on 127.0.0.1 (clustering off) running the shipped config; its URL."""
    path = binary("prometheus-alertmanager")
    tmp = tmp_path_factory.mktemp("alertmanager")
    cfg = tmp / "alertmanager.yml"
    cfg.write_text(_test_am_config(hooks.url))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_process([path, f"--config.file={cfg}", f"--storage.path={tmp / 'data'}",
                   f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
                   "--log.level=warn"], url + "/-/ready", "alertmanager")
    yield url
    stop_process(proc)


def test_amtool_check_config():
    out = subprocess.run([binary("amtool"), "check-config", str(AM_CONFIG)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_amtool_routes_pages_and_tickets_apart():
    """amtool's own route test: which receiver each kind of alert lands on."""
    def route(*labels):
        out = subprocess.run([binary("amtool"), "config", "routes", "test",
                              f"--config.file={AM_CONFIG}", *labels],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip()

    assert route("severity=page", "area=ml", "model=lm") == "normkit-oncall"
    assert route("severity=page", "area=serving", "model=lm") == "normkit-oncall"
    assert route("severity=ticket", "area=ml", "model=lm") == "normkit-ticket"
    assert route("alertname=Other", "model=lm") == "normkit-ticket"


def test_alert_names_in_the_routing_are_alerts_of_the_rules():
    """A renamed alert would silently fall out of the inhibition."""
    named = set(re.findall(r"Normkit\w+", AM_CONFIG.read_text()))
    defined = set(re.findall(r"- alert: (\w+)", RULES.read_text()))
    assert named and named <= defined, named - defined
    # and every alert has the labels the routing reads
    for chunk in RULES.read_text().split("- alert: ")[1:]:
        assert re.search(r"severity: (page|ticket)\n\s+area: (ml|serving)\n", chunk), chunk


def _test_rules() -> str:
    """The shipped rules, evaluated every second and firing without "for" waits (timing only:
    the rest of the file is compared line by line)."""
    text = RULES.read_text()
    out, n_int = re.subn(r"(?m)^(\s*interval): 30s$", r"\1: 1s", text)
    out, n_for = re.subn(r"(?m)^(\s*for): \w+$", r"\1: 0s", out)
    assert n_int == 1 and n_for >= 5, "the shipped rules' timing fields moved"
    changed = [(a, b) for a, b in zip(text.splitlines(), out.splitlines(), strict=True) if a != b]
    assert all(re.fullmatch(r"\s*(interval|for): \w+", a) for a, _ in changed), changed
    return out


@pytest.fixture
def prometheus(alertmanager, prometheus_server):
    """A real Prometheus evaluating the shipped rules (timing aside), scraping ``target`` every
    second and alerting to the test's Alertmanager."""
    return lambda target: prometheus_server(target, rules=_test_rules(),
                                            alertmanager=alertmanager.removeprefix("http://"))


def _firing(prom: str, alertname: str, model: str) -> bool:
    alerts = get_json(prom + "/api/v1/alerts")["data"]["alerts"]
    return any(a["labels"]["alertname"] == alertname and a["labels"]["model"] == model
               and a["state"] == "firing" for a in alerts)


def _am_alert(am: str, alertname: str, model: str) -> dict | None:
    q = urllib.parse.urlencode({"filter": [f'alertname="{alertname}"', f'model="{model}"']},
                               doseq=True)
    found = get_json(f"{am}/api/v2/alerts?{q}")
    return found[0] if found else None


def _served() -> torch.nn.Module:
    """Linear -> LayerNorm -> Linear -> LayerNorm: the faults go into ``ln1``."""
    return torch.nn.Sequential(collections.OrderedDict(
        lin1=torch.nn.Linear(16, 16), ln1=torch.nn.LayerNorm(16),
        lin2=torch.nn.Linear(16, 16), ln2=torch.nn.LayerNorm(16)))


def test_page_and_ticket_reach_their_receivers_and_nan_inhibits_drift(hooks, alertmanager,
                                                                      prometheus):
    torch.manual_seed(0)
    models = {"a": _served(), "b": _served()}
    for m in models.values():
        m.eval()
    gen = torch.Generator().manual_seed(1)

    def serve(m):
        with torch.no_grad():
            m(torch.randn(64, 16, generator=gen))

    baselines = {}
    for name, m in models.items():
        with watch(m, model_name=name, model_version="v1", background_export=False) as w:
            for _ in range(20):
                serve(m)
        baselines[name] = w.baseline()

    exp = PrometheusExporter(port=0)
    prom = prometheus(exp.url.removeprefix("http://").removesuffix("/metrics"))
    watches = [watch(m, model_name=name, model_version="v1", exporters=[exp],
                     baseline=baselines[name], window=5, drift_every=1,
                     thresholds=DriftThresholds(), background_export=False)
               for name, m in models.items()]
    injected = contextlib.ExitStack()
    try:
        def step():
            for m in models.values():
                serve(m)
            for w in watches:
                w.flush()

        # Healthy first, until Prometheus holds b's (zero) NaN counter: increase() needs it.
        _until("the first scrape", lambda: get_json(
            prom + '/api/v1/query?query=normkit_nonfinite_steps_total{model="b"}')
            ["data"]["result"], step=step)
        # Both models' inputs scaled by 3 (drift, in ln1); b's ln1 also puts out a NaN.
        for m in models.values():
            injected.enter_context(faults.scale_inputs(m, 3.0))
        injected.enter_context(faults.nonfinite(models["b"], "ln1", where="output",
                                                value=float("nan")))
        _until("b's NaN page at the on-call receiver", lambda: [
            a for a in hooks.alerts("/oncall")
            if a["labels"]["alertname"] == "NormkitNonFinite" and a["labels"]["model"] == "b"],
            step=step)
        _until("a's drift ticket at the ticket receiver", lambda: [
            a for a in hooks.alerts("/ticket")
            if a["labels"]["alertname"] == "NormkitActivationDrift"
            and a["labels"]["model"] == "a"], step=step)
        # b drifts too: its drift alert fires in Prometheus and reaches Alertmanager, which
        # holds it back while b's NaN page is active.
        _until("b's drift alert firing", lambda: _firing(prom, "NormkitActivationDrift", "b"),
               step=step)
        held = _until("b's drift alert in Alertmanager", lambda: _am_alert(
            alertmanager, "NormkitActivationDrift", "b"), step=step)
        assert held["status"]["state"] == "suppressed" and held["status"]["inhibitedBy"], held
        for _ in range(10):  # 3 s: three group_intervals in which it could have gone out
            step()
            time.sleep(0.3)
    finally:
        for w in watches:
            w.stop()
        injected.close()
    tickets = hooks.alerts("/ticket")
    pages = hooks.alerts("/oncall")
    # b's drift ticket (and its slow-burn ticket) were held back by its NaN page.
    assert not [a for a in tickets if a["labels"]["model"] == "b"], tickets
    assert not [a for a in pages if a["labels"]["alertname"] == "NormkitActivationDrift"]
    page = next(a for a in pages if a["labels"]["alertname"] == "NormkitNonFinite")
    assert page["labels"]["severity"] == "page" and page["labels"]["area"] == "ml"
    assert page["annotations"]["runbook_url"].endswith("/docs/runbooks/nonfinite.md")
    # One notification per model, version and area: a's and b's alerts never share one.
    for _path, body in hooks.received:
        assert len({a["labels"]["model"] for a in body["alerts"]}) == 1, body


def test_silence_opens_holds_and_expires(alertmanager):
    """The context manager silences a rollout's alerts and expires the silence on exit."""
    labels = {"alertname": "NormkitNonFinite", "severity": "page", "area": "ml",
              "model": "canary-lm", "version": "v2"}
    with silence(alertmanager, {"model": "canary-lm", "version": "v2"}, duration="30m",
                 comment="rollout of canary-lm v2", created_by="normkit-test") as sid:
        s = get_json(f"{alertmanager}/api/v2/silence/{sid}")
        assert s["status"]["state"] == "active" and s["createdBy"] == "normkit-test"
        assert {(m["name"], m["value"]) for m in s["matchers"]} == {("model", "canary-lm"),
                                                                     ("version", "v2")}
        ends = s["endsAt"]
        req = urllib.request.Request(f"{alertmanager}/api/v2/alerts", method="POST",
                                     data=json.dumps([{"labels": labels}]).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).close()
        held = _until("the silenced alert", lambda: _am_alert(alertmanager, "NormkitNonFinite",
                                                              "canary-lm"))
        assert held["status"]["state"] == "suppressed" and held["status"]["silencedBy"] == [sid]
    assert get_json(f"{alertmanager}/api/v2/silence/{sid}")["status"]["state"] == "expired"
    # 30 minutes from opening, give or take the test's own duration
    assert 29 * 60 < (_parse_time(ends) - _parse_time(s["startsAt"])) < 31 * 60


def _parse_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_silence_expires_when_the_body_raises(alertmanager):
    with pytest.raises(KeyError, match="boom"):
        with silence(alertmanager, {"model": "raising"}, "5m", "test") as sid:
            raise KeyError("boom")
    assert get_json(f"{alertmanager}/api/v2/silence/{sid}")["status"]["state"] == "expired"


def test_open_and_expire_silence_functions(alertmanager):
    sid = open_silence(alertmanager, {"model": "lm", "version": "v9"}, 90, "manual")
    assert get_json(f"{alertmanager}/api/v2/silence/{sid}")["status"]["state"] == "active"
    expire_silence(alertmanager + "/", sid)
    assert get_json(f"{alertmanager}/api/v2/silence/{sid}")["status"]["state"] == "expired"


def test_documented_amtool_silence_command_works(alertmanager):
    """deploy/README.md's ``amtool silence add`` line, run as written against the real
    Alertmanager (its --alertmanager.url pointed there)."""
    (line,) = [ln for ln in README.read_text().splitlines()
               if ln.startswith("amtool ") and " silence add " in ln]
    args = shlex.split(line.split("#")[0])
    args = [a for a in args if not a.startswith("--alertmanager.url=")]
    out = subprocess.run([binary("amtool"), *args[1:], f"--alertmanager.url={alertmanager}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    sid = out.stdout.strip()
    s = get_json(f"{alertmanager}/api/v2/silence/{sid}")
    assert s["status"]["state"] == "active"
    expire_silence(alertmanager, sid)


def test_unreachable_alertmanager_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(AlertmanagerError, match=f"unreachable at {url}/api/v2/silences"):
        with silence(url, {"model": "lm"}, "30m", "rollout", timeout=2):
            pass


def test_unknown_silence_is_a_clear_error(alertmanager):
    with pytest.raises(AlertmanagerError, match="refused DELETE .*HTTP"):
        expire_silence(alertmanager, "00000000-0000-0000-0000-000000000000")


@pytest.mark.parametrize("kwargs, match", [
    ({"url": "127.0.0.1:9093"}, "url must be Alertmanager's base URL"),
    ({"matchers": {}}, "matchers must be a non-empty"),
    ({"matchers": {"model": 3}}, "matchers must be a non-empty"),
    ({"duration": "30 minutes"}, "duration must be a string like '30m'"),
    ({"duration": -5}, "duration must be positive"),
    ({"comment": " "}, "comment must be a non-empty string"),
])
def test_bad_arguments_are_named(kwargs, match):
    args = {"url": "http://127.0.0.1:9", "matchers": {"model": "lm"}, "duration": "30m",
            "comment": "rollout"} | kwargs
    with pytest.raises(ValueError, match=match):
        open_silence(**args)


def test_parse_duration():
    assert parse_duration("1h30m").total_seconds() == 5400
    assert parse_duration("90s").total_seconds() == 90
    assert parse_duration("250ms").total_seconds() == 0.25
    assert parse_duration(12.5).total_seconds() == 12.5


def _telemetry(path, steps: int, seed: int):
    """``steps`` batches of 64 rows through a small model under watch (model "cm", version
    "v2"), written to the JSONL ``path``; its baseline."""
    torch.manual_seed(0)
    model = _served().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad(), watch(model, model_name="cm", model_version="v2",
                                exporters=[JsonlExporter(path)]) as w:
        for _ in range(steps):
            model(torch.randn(64, 16, generator=gen))
    return w.baseline()


def test_canary_keeps_a_silence_while_it_holds_and_expires_it_after(alertmanager, tmp_path,
                                                                      capsys):
    from normkit._cli.main import main

    _telemetry(tmp_path / "base.jsonl", 30, seed=1).save(tmp_path / "baseline.json")
    _telemetry(tmp_path / "short.jsonl", 3, seed=2)  # too little traffic: hold
    _telemetry(tmp_path / "long.jsonl", 30, seed=3)  # healthy: promote
    matchers = {"model": "cm", "version": "v2"}

    def canary(jsonl):
        code = main(["canary", str(tmp_path / jsonl), "--baseline", str(tmp_path / "baseline.json"),
                     "--silence", alertmanager, "--silence-for", "10m", "--format", "json"])
        return code, json.loads(capsys.readouterr().out)["decision"]

    assert canary("short.jsonl") == (1, "hold")
    first = active_silences(alertmanager, matchers, created_by=canary_mod.SILENCE_AUTHOR)
    assert len(first) == 1
    assert canary("short.jsonl") == (1, "hold")  # renewed: a new silence, the old one expired
    second = active_silences(alertmanager, matchers, created_by=canary_mod.SILENCE_AUTHOR)
    assert len(second) == 1 and second != first
    assert canary("long.jsonl") == (0, "promote")
    assert active_silences(alertmanager, matchers) == []
    # An unreachable Alertmanager is said, and the verdict (and exit code) stands.
    code = main(["canary", str(tmp_path / "long.jsonl"), "--baseline",
                 str(tmp_path / "baseline.json"), "--silence",
                 f"http://127.0.0.1:{free_port()}", "--format", "json"])
    out = capsys.readouterr()
    assert code == 0 and json.loads(out.out)["decision"] == "promote"
    assert "silence not updated" in out.err and "unreachable" in out.err
