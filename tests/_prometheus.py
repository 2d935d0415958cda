"""A real Prometheus for the tests: the ``prometheus_server`` fixture (conftest.py offers it to
every test) and small HTTP API helpers."""

from __future__ import annotations

import json
import re
import shutil
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


@pytest.fixture
def prometheus_server(tmp_path):
    """Starts a real Prometheus (Debian package) scraping ``targets`` every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (.ci/run installs the Debian package)")
    procs = []

    def start(target: str | None = None) -> str:
        """Scrapes ``target``; None: runs the shipped deploy/prometheus config (its rules
        included) as it is, but scraping every second."""
        port = free_port()
        cfg = tmp_path / "prometheus.yml"
        if target is None:
            shutil.copy(DEPLOY_CONFIG.parent / "rules.yml", tmp_path / "rules.yml")
            text, n = re.subn(r"(?m)^(\s*)(scrape|evaluation)_interval: .*$", r"\1\2_interval: 1s",
                              DEPLOY_CONFIG.read_text())
            assert n == 2, "the shipped config's intervals moved"
            cfg.write_text(text)
        else:
            cfg.write_text(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                "scrape_configs:\n  - job_name: normkit\n    static_configs:\n"
                f"      - targets: ['{target}']\n"
            )
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if "Ready" in get(base + "/-/ready", 1):
                    return base
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready in 30 s")

    try:
        yield start
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


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
