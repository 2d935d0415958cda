"""A real Prometheus for the tests: the ``prometheus_server`` fixture (conftest.py offers it to
every test), small HTTP API helpers, and the start and stop of a server process (Alertmanager's
too)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

DEPLOY_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "prometheus.yml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def get_json(url: str, timeout: float = 5.0):
    return json.loads(get(url, timeout))


def binary(name: str) -> str:
    """The path of a system binary the test needs; skips the test where it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (.ci/run installs the Debian package)")
    return path


def start_process(cmd: list[str], ready, what: str, timeout: float = 30.0,
                  log: Path | None = None) -> subprocess.Popen:
    """Starts a server and waits (``timeout`` seconds at most) until it is ready: ``ready`` is
    a URL that answers, or a callable that returns true.  Its output goes to ``log`` (stderr
    only, kept for the error message, when None)."""
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    # its own process group: stop_process ends the children it starts too (mlflow's workers)
    proc = subprocess.Popen(cmd, stdout=out, start_new_session=True,
                            stderr=subprocess.STDOUT if log is not None else subprocess.PIPE)
    if log is not None:
        out.close()  # the child has its own descriptor

    def said() -> str:
        return (log.read_text(errors="replace") if log is not None
                else proc.stderr.read().decode(errors="replace"))[-3000:]

    check = ready if callable(ready) else lambda: get(ready, 1) is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {said()}")
        try:
            if check():
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    stop_process(proc)
    raise RuntimeError(f"{what} did not become ready in {timeout:.0f} s: {said()}")


def stop_process(proc: subprocess.Popen) -> None:
    """Ends a server started by ``start_process`` and what is left of its process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:  # already gone, with its group
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children still there (mlflow's job workers)
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture
def prometheus_server(tmp_path):
    """Starts a real Prometheus (Debian package) scraping a target every second; yields
    ``start(target=None, *, rules=None, alertmanager=None) -> base URL``."""
    path = binary("prometheus")
    procs = []

    def start(target: str | None = None, *, rules: str | None = None,
              alertmanager: str | None = None) -> str:
        """Scrapes ``target`` (host:port), evaluating the rules file text ``rules`` every second
        and alerting to the Alertmanager at ``alertmanager`` (host:port), where given.  None:
        runs the shipped deploy/prometheus config (its rules included) as it is, but scraping
        and evaluating every second."""
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        if target is None:
            shutil.copy(DEPLOY_CONFIG.parent / "rules.yml", tmp_path / "rules.yml")
            text, n = re.subn(r"(?m)^(\s*)(scrape|evaluation)_interval: .*$", r"\1\2_interval: 1s",
                              DEPLOY_CONFIG.read_text())
            assert n == 2, "the shipped config's intervals moved"
            cfg.write_text(text)
        else:
            text = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            if rules is not None:
                (tmp_path / "rules.yml").write_text(rules)
                text += "rule_files: [rules.yml]\n"
            if alertmanager is not None:
                text += ("alerting:\n  alertmanagers:\n    - static_configs:\n"
                         f"        - targets: ['{alertmanager}']\n")
            cfg.write_text(text + "scrape_configs:\n  - job_name: normkit\n    static_configs:\n"
                                  f"      - targets: ['{target}']\n")
        base = f"http://127.0.0.1:{port}"
        procs.append(start_process(
            [path, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            base + "/-/ready", "prometheus"))
        return base

    try:
        yield start
    finally:
        for p in procs:
            stop_process(p)


def query(base: str, q: str) -> list:
    out = json.loads(get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": q})))
    assert out["status"] == "success", out
    return out["data"]["result"]


def wait_for(base: str, q: str, present: bool, step=lambda: None, timeout: float = 60) -> list:
    """Queries ``q`` (calling ``step`` before each try) until it has a result (``present``) or
    none; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        step()
        found = query(base, q)
        if bool(found) == present or time.monotonic() > deadline:
            return found
        time.sleep(0.5)
