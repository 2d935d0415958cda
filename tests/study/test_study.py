"""``normkit study``: the quick study end to end (results, telemetry, report, real browser), and
the pieces it is built from (data split, DyT, statistics, reproducibility, the recorded full
study)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from normkit._cli.main import main
from normkit.monitor import read_jsonl
from normkit.nn import DyT
from normkit.study import SCHEMA, SCHEMA_VERSION, StudyConfig, findings, plan_runs
from normkit.study.data import _is_validation, load_corpus
from normkit.study.plots import telemetry_series
from normkit.study.runner import _DYNAMICS
from normkit.study.stats import compare, summarize
from normkit.study.train import RunSpec, lr_at, train_run

ROOT = Path(__file__).resolve().parents[2]
FINDING_IDS = {"xiong_postln_needs_warmup", "xiong_preln_without_warmup", "rmsnorm_matches_ln",
               "rmsnorm_faster", "dyt_matches_ln", "ln_batch_invariant", "bn_batch_dependent",
               "ba_ln_lstm_faster"}


# ----------------------------------------------------------------------------------------------
# The quick study, run once through the CLI for the whole module
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    threads = torch.get_num_threads()
    code = main(["study", "--quick", "--out", str(out)])
    assert code == 0
    # the study sets its own thread count and must give the caller's back
    assert torch.get_num_threads() == threads
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return out, doc


def test_results_document_structure(quick):
    out, doc = quick
    assert doc["schema"] == SCHEMA and doc["schema_version"] == SCHEMA_VERSION
    cfg = StudyConfig.quick()
    assert doc["config"] == cfg.to_dict()
    assert set(doc["experiments"]) == {"placement", "norms", "batch", "recurrent"}
    # every planned run is there once, with full-length curves and finite losses
    planned = {s.run_id for s in plan_runs(cfg)}
    assert set(doc["runs"]) == planned
    for rid, run in doc["runs"].items():
        steps = cfg.lstm_steps if rid.startswith("lstm") else cfg.steps
        assert run["steps"] == len(run["loss"]) == len(run["grad_norm"]) == steps, rid
        assert not run["diverged"] and all(math.isfinite(v) for v in run["loss"]), rid
        assert run["final_val_loss"] is not None and run["step_time_s"] > 0
    # each placement x warm-up configuration has one run per seed
    confs = doc["experiments"]["placement"]["configs"]
    assert len(confs) == 8
    assert all(len(c["runs"]) == len(cfg.seeds) for c in confs.values())
    assert {f["id"] for f in doc["findings"]} == FINDING_IDS
    # the data provenance lets two runs prove they trained on the same bytes
    assert re.fullmatch(r"[0-9a-f]{64}", doc["data"]["sha256"]["train"])
    assert doc["data"]["bytes"]["train"] == cfg.train_bytes
    # written atomically: no temp files left behind anywhere
    assert not list(out.rglob("*.tmp"))


def test_quick_run_marks_training_dynamics_inconclusive(quick):
    _, doc = quick
    for f in doc["findings"]:
        if f["id"] in _DYNAMICS:
            assert f["conclusive"] is False, f["id"]
            assert isinstance(f["holds"], bool), f["id"]


def test_layernorm_is_batch_invariant_and_batchnorm_is_not(quick):
    """The finding the quick run is long enough to show: LN layers give bitwise the same output
    for a sample alone or in a batch of 8 or 64; BatchNorm in training mode does not."""
    _, doc = quick
    models = doc["experiments"]["batch"]["models"]
    for mode in ("train", "eval"):
        for b, v in models["layer"][mode]["norm_layers"].items():
            assert v["all_bitwise_equal"] and v["max_abs_diff"] == 0.0, (mode, b)
            assert v["layers_checked"] == 2 * StudyConfig.quick().layers + 1
    for b, v in models["batch"]["train"]["norm_layers"].items():
        assert not v["all_bitwise_equal"] and v["max_abs_diff"] > 1e-3, b
    assert models["batch"]["train_eval_gap"] > 1e-3
    assert models["layer"]["train_eval_gap"] == 0.0
    by_id = {f["id"]: f for f in doc["findings"]}
    assert by_id["ln_batch_invariant"]["holds"] is True
    assert by_id["ln_batch_invariant"]["conclusive"] is True
    assert by_id["bn_batch_dependent"]["holds"] is True


def test_findings_recompute_from_the_document(quick):
    _, doc = quick
    assert findings(doc) == doc["findings"]


def _spec_of(run: dict) -> RunSpec:
    """The RunSpec of a results-document run (from its config name)."""
    name, seed = run["config"], run["seed"]
    if name.startswith("lstm"):
        return RunSpec("lstm", "-", "layer" if name == "lstm-ln" else "none", False, seed)
    *parts, wu = name.split("-")
    warm = wu == "warmup"
    if parts == ["nonorm"]:
        return RunSpec("gpt", "none", "none", warm, seed)
    return RunSpec("gpt", parts[0], parts[1], warm, seed)


def test_run_telemetry_jsonl(quick):
    """Each run is recorded by normkit.watch + JsonlExporter: one header, then a step record
    every log_every steps from step 1, with statistics for exactly the model's LayerNorm /
    RMSNorm / DyT layers, taken on the training batch only (the validation passes add nothing)."""
    out, doc = quick
    cfg = StudyConfig.quick()
    assert sorted(doc["outputs"]["runs"]) == sorted(f"runs/{p.name}"
                                                    for p in (out / "runs").glob("*.jsonl"))
    from normkit.nn import DyT, LayerNorm, RMSNorm
    from normkit.study.train import build_model

    watched_any = False
    for rid, run in doc["runs"].items():
        recs = list(read_jsonl(out / "runs" / run["telemetry"]))
        assert recs[0]["type"] == "header" and recs[0]["schema"] == "normkit.monitor"
        steps = [r for r in recs if r["type"] == "step"]
        assert len(steps) == len(recs) - 1, rid
        assert [r["step"] for r in steps] == list(range(1, run["steps"] + 1, cfg.log_every))
        spec = _spec_of(run)
        assert spec.run_id == rid
        assert all(r["model"] == spec.config_name and r["version"] == f"s{spec.seed}"
                   for r in steps), rid
        model = build_model(spec, cfg)
        norms = {n: math.prod(m.normalized_shape) for n, m in model.named_modules()
                 if isinstance(m, (LayerNorm, RMSNorm, DyT))}
        lstm = spec.model == "lstm"
        rows = cfg.batch * (cfg.lstm_context if lstm else cfg.context)
        for r in steps:
            assert set(r["layers"]) == set(r["summary"]) == set(norms), (rid, r["step"])
            assert r["nonfinite"]["forward"]["origin"] is None, (rid, r["step"])
            assert r["nonfinite"]["backward"]["origin"] is None, (rid, r["step"])
            for layer, s in r["summary"].items():
                watched_any = True
                # one training batch's rows and outputs: a validation pass leaking into the
                # sampled step (the watch's hooks stay armed until the next step) would add
                # outputs
                raw = r["layers"][layer]
                assert raw["rows"] == rows, (rid, r["step"], layer)
                assert raw["out_n"] == rows * norms[layer], (rid, r["step"], layer)
                assert s["nonfinite_rows"] == 0 and s["weight_norm"] > 0, (rid, layer)
                if s["kind"] == "rms":  # RMSNorm's kernel keeps the mean square only
                    assert s["input_rms"] > 0, (rid, layer)
                else:
                    assert s["input_std"] > 0 and math.isfinite(s["input_mean"]), (rid, layer)
        # the training-level numbers live in results.json, one per step
        assert len(run["lr"]) == len(run["step_times_s"]) == run["steps"], rid
        peak = cfg.lstm_lr if lstm else cfg.lr
        warm = cfg.warmup_steps if spec.warmup else 0
        assert run["lr"] == [lr_at(i, peak, warm) for i in range(1, run["steps"] + 1)], rid
        assert all(t > 0 for t in run["step_times_s"]), rid
    assert watched_any


def test_activation_plot_reads_the_telemetry(quick):
    out, doc = quick
    cfg = StudyConfig.quick()
    run = doc["runs"][f"pre-layer-nowarmup-s{cfg.seeds[0]}"]
    series = telemetry_series(out / "runs" / run["telemetry"], ".norm1")
    assert sorted(series) == [f"blocks.{i}.norm1" for i in range(cfg.layers)]
    for steps, means, stds in series.values():
        assert steps == list(range(1, cfg.steps + 1, cfg.log_every))
        assert len(means) == len(stds) == len(steps)
        assert all(math.isfinite(m) for m in means) and all(v > 0 for v in stds)
        assert len(set(stds)) > 1  # the statistics move as the model trains
    assert "placement_activations.png" in " ".join(doc["outputs"]["plots"])


def test_markdown_report(quick):
    out, doc = quick
    md = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Findings", "## Setup", "## Placement", "## Norm type",
                    "## Batch dependence", "## Recurrent"):
        assert heading in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == len(doc["outputs"]["plots"]) == 6
    for link in links:
        png = (out / link).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, link
    # every finding's claim is in the summary table
    for f in doc["findings"]:
        assert f["claim"] in md


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.imgs, self.scripts = [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])


def test_html_report_is_self_contained(quick):
    out, doc = quick
    page = (out / "report.html").read_text(encoding="utf-8")
    p = _Collect()
    p.feed(page)
    assert p.scripts == 0
    assert len(p.imgs) == len(doc["outputs"]["plots"])
    assert all(u.startswith("data:") for u in p.urls), [u[:40] for u in p.urls]


def test_html_report_in_headless_chromium(quick):
    """Real browser: no console errors, every image decodes, the page is not blank."""
    import _browser

    if _browser.find_chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs the Debian package)")
    out, doc = quick
    seen = _browser.check_page(out / "report.html")
    assert seen.title == "normkit study"
    assert seen.errors == []
    assert len(seen.images) == len(doc["outputs"]["plots"])
    assert all(i["decoded"] and i["width"] > 100 and i["height"] > 100 for i in seen.images)
    assert seen.screenshot_colours > 16  # a blank page is one colour; text anti-aliasing is many


def test_browser_check_catches_broken_pages(tmp_path):
    """The browser helper must be able to fail: a console error, a missing and a corrupt image,
    and a blank page are all reported."""
    import _browser

    if _browser.find_chromium() is None:
        pytest.skip("chromium is not installed (.ci/run installs the Debian package)")
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>x</title><link rel="icon" href="data:,">'
                    '</head><body style="margin:0;background:#fff">'
                    '<img src="data:image/png;base64,AAAA" alt="corrupt">'
                    '<img src="missing.png" alt="missing">'
                    '<script>console.error("boom")</script></body></html>', encoding="utf-8")
    seen = _browser.check_page(page, width=400, height=300)
    assert any("boom" in e for e in seen.errors)
    assert any("missing.png" in e for e in seen.errors)
    assert [i["decoded"] for i in seen.images] == [False, False]
    blank = tmp_path / "blank.html"
    blank.write_text('<!DOCTYPE html><html><head><title>b</title><link rel="icon" '
                     'href="data:,"></head><body style="background:#fff"></body></html>',
                     encoding="utf-8")
    seen = _browser.check_page(blank, width=400, height=300)
    assert seen.errors == [] and seen.images == []
    assert seen.screenshot_colours == 1


def test_cli_rejects_bad_flags(capsys):
    from normkit._cli.main import build_parser

    assert "study" in build_parser().format_help()
    with pytest.raises(SystemExit) as e:
        main(["study", "--experiments", "placement,bogus"])
    assert e.value.code == 2
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["study", "--seeds", "-1"])


def test_import_does_not_load_matplotlib():
    code = ("import sys, normkit.study, normkit._cli.study, normkit._report; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


def _tiny(**kw) -> StudyConfig:
    base = dict(preset="custom", seeds=(0,), layers=1, dim=16, heads=2, context=16, batch=4,
                steps=6, warmup_steps=2, eval_every=3, eval_batches=1, log_every=2,
                lstm_hidden=16, lstm_emb=8, lstm_context=8, lstm_steps=4,
                train_bytes=50_000, val_bytes=8_000)
    base.update(kw)
    return StudyConfig(**base)


@pytest.fixture(scope="module")
def corpus():
    cfg = _tiny()
    return load_corpus(cfg.train_bytes, cfg.val_bytes)


@pytest.mark.parametrize("spec", [RunSpec("gpt", "post", "layer", False, 3),
                                  RunSpec("gpt", "pre", "rms", True, 3),
                                  RunSpec("gpt", "peri", "dyt", True, 3),
                                  RunSpec("lstm", "-", "layer", False, 3)])
def test_runs_are_bitwise_reproducible(spec, corpus, tmp_path):
    """Same seed, same bits — with or without the telemetry watching (it only reads)."""
    cfg = _tiny()
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)  # the study's thread count (matmul sums depend on it)
    try:
        a, _ = train_run(spec, cfg, corpus, tmp_path / "a.jsonl")
        b, _ = train_run(spec, cfg, corpus, None)
        c, _ = train_run(RunSpec(spec.model, spec.placement, spec.norm, spec.warmup, 4), cfg,
                         corpus, None)
    finally:
        torch.set_num_threads(previous)
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"] and a["val"] == b["val"]
    assert c["loss"] != a["loss"]  # the seed matters
    assert a["telemetry"] == "a.jsonl" and (tmp_path / "a.jsonl").is_file()


def test_telemetry_file_is_replaced_on_rerun_and_dropped_on_failure(corpus, tmp_path):
    cfg = _tiny()
    spec = RunSpec("gpt", "pre", "layer", True, 0)
    path = tmp_path / "runs" / "r.jsonl"
    for _ in range(2):  # the exporter appends; the study must not: one run, one file
        train_run(spec, cfg, corpus, path)
    recs = list(read_jsonl(path))
    assert [r["type"] for r in recs].count("header") == 1
    steps = [r for r in recs if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 3, 5]
    # step 3 is sampled and followed by a validation pass (eval_every=3) while the watch's
    # hooks are still armed: the step's statistics must hold the training batch only
    rows = cfg.batch * cfg.context
    for r in steps:
        for layer, raw in r["layers"].items():
            assert raw["rows"] == rows and raw["out_n"] == rows * cfg.dim, (r["step"], layer)

    def boom(step, total):
        if step == 4:
            raise KeyboardInterrupt

    path2 = tmp_path / "runs" / "interrupted.jsonl"
    with pytest.raises(KeyboardInterrupt):
        train_run(spec, cfg, corpus, path2, on_step=boom)
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.jsonl"]  # no file, no temp


def test_corpus_is_deterministic_and_split_by_path_hash(tmp_path):
    lib = tmp_path / "Lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "os.py").write_text("x = 1\n" * 2000)
    names = [f"m{i:02d}.py" for i in range(40)]
    for n in names:
        (lib / "pkg" / n).write_text(f"# {n}\n" + "y = 2\n" * 800)
    a = load_corpus(1 << 20, 1 << 20, val_buckets=4, root=lib)
    b = load_corpus(1 << 20, 1 << 20, val_buckets=4, root=lib)
    assert torch.equal(a.train, b.train) and a.meta == b.meta
    assert 0 < a.meta["files"]["val"] < a.meta["files"]["train"]
    before = {n: _is_validation(f"pkg/{n}", 4) for n in names}
    (lib / "pkg" / "aaa_new.py").write_text("z = 3\n" * 900)  # sorts first
    c = load_corpus(1 << 20, 1 << 20, val_buckets=4, root=lib)
    assert c.meta["files_total"] == a.meta["files_total"] + 1
    assert {n: _is_validation(f"pkg/{n}", 4) for n in names} == before
    # budgets are honoured exactly
    d = load_corpus(10_000, 5_000, val_buckets=4, root=lib)
    assert d.meta["bytes"] == {"train": 10_000, "val": 5_000}


def test_study_reads_the_running_interpreters_stdlib(corpus):
    import sysconfig

    assert corpus.meta["source"] == sysconfig.get_paths()["stdlib"]
    assert b"def " in corpus.train.numpy().tobytes()


def test_dyt_formula_gradients_and_errors():
    torch.manual_seed(0)
    m = DyT(24)
    assert m.alpha.item() == 0.5
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.1, 0.1)
    x = torch.randn(5, 7, 24, dtype=torch.float64, requires_grad=True)
    y = m.double()(x)
    ref = m.weight * torch.tanh(m.alpha * x) + m.bias  # Zhu et al. 2025, eq. 1
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: m(t), (x[:1, :2],))
    y.sum().backward()
    assert m.alpha.grad is not None and m.weight.grad.shape == (24,)
    # a row's output depends only on that row: bitwise the same alone as in a batch
    z = torch.randn(9, 24)
    mf = DyT(24)
    assert torch.equal(mf(z)[3:4], mf(z[3:4]))
    assert DyT(24, elementwise_affine=False)(z).abs().max() < 1
    with pytest.raises(ValueError, match="trailing shape"):
        DyT(24)(torch.randn(3, 25))
    with pytest.raises(ValueError, match="alpha_init"):
        DyT(8, alpha_init=0.0)


def test_noise_verdicts():
    a = summarize([1.0, 1.1, 0.9])
    assert a["mean"] == pytest.approx(1.0) and a["std"] == pytest.approx(0.1)
    far = compare(a, summarize([2.0, 2.1, 1.9]))
    assert far["diff"] == pytest.approx(1.0) and far["within_noise"] is False
    near = compare(a, summarize([1.05, 1.15, 0.95]))
    assert near["within_noise"] is True
    # s.e. = sqrt(0.01/3 + 0.01/3); twice that is the noise band
    assert near["noise"] == pytest.approx(2 * math.sqrt(0.02 / 3))
    one = compare(summarize([1.0]), summarize([2.0]))
    assert one["diff"] == 1.0 and one["within_noise"] is None
    missing = summarize([1.0, None, float("nan")])
    assert missing["n"] == 1 and missing["n_missing"] == 2 and missing["std"] is None


def test_config_validation():
    with pytest.raises(ValueError, match="experiments"):
        StudyConfig(experiments=("placement", "nope"))
    with pytest.raises(ValueError, match="warmup_steps"):
        StudyConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="divisible"):
        StudyConfig(dim=30, heads=4)
    # a pre-LN model without a norm is the no-norm model: planned (and run) once
    specs = plan_runs(StudyConfig(seeds=(0,)))
    assert len(specs) == len(set(specs))
    assert RunSpec("gpt", "pre", "none", True, 0).canonical() in specs


# ----------------------------------------------------------------------------------------------
# The recorded default study (the findings the quick run is too short to show)
# ----------------------------------------------------------------------------------------------


def _recorded() -> list[Path]:
    return sorted((ROOT / "benchmarks" / "results").glob("study-*.json"))


def test_recorded_full_study_structure():
    paths = _recorded()
    assert paths, "no benchmarks/results/study-*.json: run `normkit study --record`"
    doc = json.loads(paths[-1].read_text(encoding="utf-8"))
    assert doc["schema"] == SCHEMA and doc["schema_version"] == SCHEMA_VERSION
    assert doc["config"]["preset"] == "default" and len(doc["config"]["seeds"]) >= 3
    assert set(doc["experiments"]) == {"placement", "norms", "batch", "recurrent"}
    assert {f["id"] for f in doc["findings"]} == FINDING_IDS
    # every finding was measured and is conclusive at the default scale
    assert all(isinstance(f["holds"], bool) and f["conclusive"] for f in doc["findings"])
    # the stored verdicts are what the analysis code derives from the stored numbers
    assert findings(doc) == doc["findings"]
    # and the report renders from the record alone (no run files needed)
    from normkit.study import build_document

    report = build_document(doc)
    assert len(report.figures()) == 5  # all but the activation plot, which reads runs/
