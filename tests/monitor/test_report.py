"""``normkit report``: a telemetry JSONL run rendered as HTML — from a real watched run with a
NaN and a drifted input, opened in headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _browser import check_page, find_chromium
from _monitor_models import TinyTransformer, lm_batch

from normkit import convert
from normkit.monitor import AlertRules, JsonlExporter, watch
from normkit.monitor.report import build_telemetry_report, load_run


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A baseline run, then a run with shifted inputs and one NaN injected by a Linear."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = convert(TinyTransformer()).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad(), watch(model, model_name="tiny", model_version="v1",
                                exporters=[JsonlExporter(d / "base.jsonl")]) as w:
        for _ in range(8):
            model(lm_batch(16, generator=g)[0])
    w.baseline().save(d / "baseline.json")

    # Shift the embedding: every layer's input distribution moves.
    model.emb.weight.data.mul_(3.0).add_(0.5)
    model.blocks[2].attn.proj.inject_forward = (5,)
    with torch.no_grad(), watch(model, model_name="tiny", model_version="v1",
                                exporters=[JsonlExporter(d / "live.jsonl")],
                                alerts=AlertRules(dedupe_seconds=3600)) as w2:
        for _ in range(4):
            model(lm_batch(16, generator=g)[0])
    assert w2.nonfinite_origin == "blocks.2.attn.proj"
    return d


def test_report_shows_origin_alerts_layers_and_drift(run_files):
    doc = build_telemetry_report(run_files / "live.jsonl", run_files / "baseline.json")
    text = json.dumps([getattr(b, "__dict__", str(b)) for b in doc.blocks], default=str)
    assert "blocks.2.attn.proj" in text  # the origin, named
    tables = {b.headers[0] + "/" + b.headers[1]: b for b in doc.blocks
              if type(b).__name__ == "Table"}
    layers = tables["layer/kind"]
    assert [r[0] for r in layers.rows] == TinyTransformer().norm_names()
    assert {r[1] for r in layers.rows} == {"layer"}  # the norm's own kind, not "ln"
    drift = tables["layer/rows"]
    assert any(r[-1] != "–" for r in drift.rows), "a shifted embedding must drift some layer"
    assert any(type(b).__name__ == "Callout" and b.kind == "bad" for b in doc.blocks)
    assert {f.filename for f in doc.figures()} >= {"activations.png"}


def test_clean_run_says_so_and_no_drift_against_itself(run_files):
    doc = build_telemetry_report(run_files / "base.jsonl", run_files / "baseline.json")
    callouts = [b for b in doc.blocks if type(b).__name__ == "Callout"]
    assert callouts[0].kind == "ok"
    assert any(c.kind == "ok" and "No drift" in c.text for c in callouts)


def test_load_run_rejects_other_files(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"schema": "other", "type": "step"}\n')
    with pytest.raises(ValueError, match="not a normkit telemetry file"):
        load_run(p)
    p.write_text("")
    with pytest.raises(ValueError, match="no step records"):
        load_run(p)


def test_cli_writes_html_that_renders(run_files, tmp_path):
    out = tmp_path / "r" / "report.html"
    cmd = [sys.executable, "-m", "normkit._cli.main", "report", str(run_files / "live.jsonl"),
           "--baseline", str(run_files / "baseline.json"), "-o", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert out.is_file() and (tmp_path / "r" / "report.md").is_file()
    if find_chromium() is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    page = check_page(out)
    assert page.errors == []
    assert page.images and all(i["decoded"] and i["width"] > 0 for i in page.images)
    assert page.screenshot_colours > 10


@pytest.mark.parametrize("args, msg", [
    (["missing.jsonl"], "cannot read"),
    (["{run}", "-o", "report.txt"], "must end in .html"),
    (["{run}", "--baseline", "{run}"], "cannot read"),
])
def test_cli_bad_input_exits_2_with_one_line(run_files, tmp_path, args, msg):
    args = [a.format(run=run_files / "live.jsonl") for a in args]
    p = subprocess.run([sys.executable, "-m", "normkit._cli.main", "report", *args],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2
    assert msg in p.stderr and "Traceback" not in p.stderr
