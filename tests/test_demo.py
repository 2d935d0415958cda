"""``normkit demo --quick`` end to end: the README's main job, in the suite's budget."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _browser import check_page, find_chromium


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "normkit-demo"
    p = subprocess.run([sys.executable, "-m", "normkit._cli.main", "demo", "--quick", "-o",
                        str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, p.stdout


def test_demo_shows_each_failure_mode(demo_dir):
    out, stdout = demo_dir
    s = json.loads((out / "demo.json").read_text())
    assert s["schema"] == "normkit.demo"
    assert s["train"]["loss_last"] < s["train"]["loss_first"] - 1.0  # it learned something
    assert s["metrics_url"].startswith("http://127.0.0.1:") and s["metrics_url"] in stdout
    assert s["drift_alerts"] and all(a["severity"] == "ticket" for a in s["drift_alerts"])
    assert [a["severity"] for a in s["page_alerts"]] == ["page"]
    assert s["nan_origin"] == s["nan_injected_at"]  # the origin is the corrupted layer
    # the canary promotes the healthy candidate and rolls back the one whose eps changed
    assert [(c["version"], c["decision"]) for c in s["canary"]] == [("2", "promote"),
                                                                    ("3", "rollback")]
    assert s["canary"][1]["reasons"], s["canary"]
    for c in s["canary"]:
        verdict = json.loads((out / f"canary-{c['version']}.json").read_text())
        assert verdict["decision"] == c["decision"]
        assert f"canary {c['version']}" in stdout and c["decision"].upper() in stdout
    # the guard passes healthy traffic, trips on the Inf and answers with the previous version
    g = s["guard"]
    assert g["healthy_trips"] == 0 and g["fell_back"], g
    assert any(t["check"] == "nonfinite" and t["action"] == "fallback" for t in g["trips"]), g
    assert "TRIPPED" in stdout and "canary: version 2 promote, version 3 rollback" in stdout
    report = (out / "report.md").read_text()
    assert "**promote**" in report and "**rollback**" in report
    assert s["audit"]["ok"], s["audit"]
    for name in ("train.jsonl", "serve.jsonl", "live.jsonl", "baseline.json", "audit.json",
                 "bench.json", "report.html", "report.md", "telemetry.html",
                 "canary-2.jsonl", "canary-3.jsonl"):
        assert (out / name).is_file(), name
    bench = json.loads((out / "bench.json").read_text())
    assert bench["results"] and all("normkit" in r["impls"] for r in bench["results"])


@pytest.mark.parametrize("page", ["report.html", "telemetry.html"])
def test_demo_reports_render_in_chromium(demo_dir, page):
    if find_chromium() is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    out, _ = demo_dir
    check = check_page(out / page)
    assert check.errors == []
    assert check.images and all(i["decoded"] and i["width"] > 0 for i in check.images)
    assert check.screenshot_colours > 10
