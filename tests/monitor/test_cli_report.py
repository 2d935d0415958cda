"""``normkit report``'s per-layer view of runs the default test run does not have: an
RMSNorm-only model (no mean statistic), a NaN that reaches every later layer, and drift that
cannot be judged."""

from __future__ import annotations

import pytest
import torch
from _monitor_models import TinyTransformer, lm_batch
from torch import nn

from normkit import convert
from normkit.monitor import AlertRules, JsonlExporter, watch
from normkit.monitor import report as telemetry
from normkit.monitor.report import build_telemetry_report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rms = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 8), nn.RMSNorm(8))
    with torch.no_grad(), watch(rms, model_name="rms", model_version="1",
                                exporters=[JsonlExporter(d / "rms.jsonl")]):
        for _ in range(3):
            rms(torch.randn(16, 8, generator=g))

    # Every row of blocks.2.attn.proj's output is NaN from step 3 on: every later norm layer
    # sees only non-finite rows, and its statistics stop.
    model = convert(TinyTransformer()).eval()
    with torch.no_grad(), watch(model, model_name="tiny", model_version="v1",
                                exporters=[JsonlExporter(d / "nan.jsonl")],
                                alerts=AlertRules(dedupe_seconds=3600)) as w:
        for step in range(5):
            model.blocks[2].attn.proj.inject_forward = tuple(range(256)) if step >= 2 else ()
            model(lm_batch(16, generator=g)[0])
        w.baseline().save(d / "tiny-baseline.json")
    return d


def _table(doc, first_header: str):
    return next(b for b in doc.blocks if type(b).__name__ == "Table"
                and b.headers[0] == first_header)


def test_rmsnorm_only_run_draws_no_empty_mean_chart(runs, monkeypatch):
    figures = []
    real = telemetry.to_png

    def keep(fig):
        figures.append([(ax.get_title(), len(ax.lines)) for ax in fig.axes])
        return real(fig)

    monkeypatch.setattr(telemetry, "to_png", keep)
    doc = build_telemetry_report(runs / "rms.jsonl")
    (panels,) = figures
    assert panels and all(lines == 2 for _title, lines in panels), panels  # 2 layers each
    assert "mean" not in " ".join(t for t, _ in panels)
    (fig,) = doc.figures()
    assert "RMS" in fig.alt and "RMS" in fig.caption and "mean" not in fig.alt
    layers = _table(doc, "layer")
    assert "input mean" not in layers.headers  # a column of "–" says nothing
    assert all(row[layers.headers.index("input std/RMS")] != "–" for row in layers.rows)


def test_nan_run_shows_last_finite_values_and_where_the_nan_started(runs):
    doc = build_telemetry_report(runs / "nan.jsonl")
    layers = _table(doc, "layer")
    rows = {r[0]: dict(zip(layers.headers, r, strict=True)) for r in layers.rows}
    clean, hit = rows["blocks.2.ln1"], rows["blocks.2.ln2"]  # before and after the NaN
    for col in ("input mean", "input std/RMS"):
        assert "(step" not in clean[col] and clean[col] != "–"
        assert hit[col].endswith(" (step 2)") and float(hit[col].split()[0]) > 0
    assert clean["non-finite input"] == "–" and hit["non-finite input"] == "steps 3–5"
    assert rows["ln_f"]["non-finite input"] == "steps 3–5"
    assert "(step 2)" in rows["ln_f"]["input mean"]
    text = " ".join(b.text for b in doc.blocks if type(b).__name__ == "Paragraph")
    assert "from step 3 (forward), started in `blocks.2.attn.proj`" in text


def test_drift_that_cannot_be_judged_renders_no_table(runs):
    # The tiny model's baseline has none of the RMSNorm model's layers: nothing is compared.
    doc = build_telemetry_report(runs / "rms.jsonl", runs / "tiny-baseline.json")
    assert not any(type(b).__name__ == "Table" and b.headers[:2] == ("layer", "rows")
                   for b in doc.blocks)
    assert any(type(b).__name__ == "Callout" and "could not be judged" in b.text
               for b in doc.blocks)
