"""User strings — file, model, layer and module names, error messages — as the ``normkit``
commands show them: printed as written in the terminal, escaped in markdown and HTML (never
read as Rich markup, HTML or markdown)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _browser import visible
from markdown_it import MarkdownIt
from torch import nn

TESTS = Path(__file__).parent
# The package these tests import: the subprocess must run the same code.
SRC = Path(importlib.util.find_spec("normkit").origin).resolve().parents[1]

# Module names a user can give (any string without a dot): HTML, Rich markup (a closing tag
# nobody opened raises MarkupError; a style tag vanishes), a Rich emoji code, markdown marks and
# a table pipe, and matplotlib mathtext (parsed in a legend, and "\frac" alone fails).
NAMES = ("<script>alert(1)</script>", "[/x]", "[bold]b", "e:thumbs_up:", "*m*`c`_u_|p",
         r"$\frac$")


class Named(nn.Module):
    """LayerNorms under the names above, one after another, with a Linear before the last."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        for name in NAMES:
            self.add_module(name, nn.LayerNorm(8, eps=eps))
        self.add_module("[/x]lin", nn.Linear(8, 8))
        self.add_module("[bold]last", nn.LayerNorm(8))

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x


def named():
    """``normkit audit test_cli:named``: eps 1e-3 (Keras' default) gives each layer a warning
    that names it, and the gate still passes."""
    torch.manual_seed(0)
    return Named().eval(), (torch.randn(3, 8),)


def normkit(*args, cwd=TESTS, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(SRC)]))
    return subprocess.run([sys.executable, "-m", "normkit._cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def rendered_text(markdown: str) -> tuple[str, list[str]]:
    """(the text a reader sees, the elements) of ``markdown`` rendered as GitHub would."""
    return visible(MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(markdown))


# ------------------------------------------------------------------------------------------
# normkit audit: names printed literally, escaped in markdown
# ------------------------------------------------------------------------------------------

FAST = "--checks=inventory,parameters,epsilon"


def test_audit_table_prints_module_names_literally():
    r = normkit("audit", "test_cli:named", FAST)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    inventory = r.stdout.split("norm layers", 1)[1].split("findings", 1)[0]
    for name in (*NAMES, "[bold]last"):
        assert name in inventory, name


def test_audit_json_keeps_module_names():
    r = normkit("audit", "test_cli:named", FAST, "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [L["name"] for L in doc["layers"]] == [*NAMES, "[bold]last"]
    assert {f["layer"] for f in doc["findings"]} >= set(NAMES)


@pytest.mark.parametrize("how", ["stdout", "file"])
def test_audit_markdown_escapes_module_names(tmp_path, how):
    out = tmp_path / "audit.md"
    r = normkit("audit", "test_cli:named", FAST, "--format", "markdown", "--output", out)
    assert r.returncode == 0, r.stderr
    md = r.stdout if how == "stdout" else out.read_text()
    assert "<script>" not in md
    text, tags = rendered_text(md)
    assert "script" not in tags and "em" not in tags and "a" not in tags
    for name in (*NAMES, "[bold]last"):
        assert name in text, name


def _state_dict_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ln.weight": torch.ones(4), "ln.bias": torch.zeros(4)}, path)
    return path


# "run[/x].pt" is the file "x].pt" in the directory "run[".
@pytest.mark.parametrize("fname", ["sd[v2].pt", "run[/x].pt", "[bold]m.pt", "a:thumbs_up:.pt"])
def test_audit_prints_file_names_literally(tmp_path, fname):
    path = _state_dict_file(tmp_path / fname)
    r = normkit("audit", path, cwd=tmp_path)
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr
    assert f"normkit audit {path}:" in r.stdout.replace("\n", "")
    missing = normkit("audit", tmp_path / ("gone" + fname), cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert str(tmp_path / ("gone" + fname)) in missing.stderr.replace("\n", "")


# ------------------------------------------------------------------------------------------
# normkit report: a run of the named model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def named_run(tmp_path_factory):
    """A baseline run of ``Named`` and a live one where the Linear named "[/x]lin" puts Inf in
    its output from the third step (a NaN origin, an alert and drift, all naming modules)."""
    from normkit.monitor import AlertRules, JsonlExporter, watch

    d = tmp_path_factory.mktemp("named")
    model, _ = named()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), watch(model, model_name="m<i>[/x]", model_version="v[bold]1",
                                exporters=[JsonlExporter(d / "base.jsonl")]) as w:
        for _ in range(4):
            model(torch.randn(64, 8, generator=g))
    w.baseline().save(d / "base[v2].json")
    lin = model.get_submodule("[/x]lin")
    with torch.no_grad(), watch(model, model_name="m<i>[/x]", model_version="v[bold]1",
                                exporters=[JsonlExporter(d / "live.jsonl")],
                                alerts=AlertRules(dedupe_seconds=3600)) as w:
        for step in range(4):
            lin.bias.fill_(float("inf") if step >= 2 else 0.0)
            model(3 * torch.randn(64, 8, generator=g) + 1)
    assert w.nonfinite_origin == "[/x]lin"
    return d


def test_report_prints_paths_and_escapes_names(named_run, tmp_path):
    out = tmp_path / "out[/x]" / "r[bold].html"
    r = normkit("report", named_run / "live.jsonl", "--baseline", named_run / "base[v2].json",
                "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"report: {out}" in r.stderr.replace("\n", "")
    md = out.with_suffix(".md").read_text()
    page = out.read_text()
    assert "<script>" not in md and "<script>" not in page and "<i>" not in md
    for text, tags in (rendered_text(md), visible(page)):
        assert "script" not in tags and "i" not in tags
        for name in NAMES:
            assert name in text, name
        assert "[/x]lin" in text  # the NaN origin
        assert "m<i>[/x] v[bold]1" in text  # model name and version


# ------------------------------------------------------------------------------------------
# bench, study and demo print messages and names literally
# ------------------------------------------------------------------------------------------


def _text(renderable, width=200) -> str:
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, emoji=False).print(renderable)
    return buf.getvalue()


# Strings Rich would change: tags (known or not), a Windows path with a backslash before "[" and
# one ending in a backslash (which would escape the markup's next tag), an emoji code.
RICH_TEXT = ("[/x]", "[bold]b", r"C:\runs\[1]\m.pt", "C:\\dir\\", r"a\[bold]b", "e:thumbs_up:")


@pytest.mark.parametrize("text", RICH_TEXT)
def test_normkit_consoles_print_user_strings_literally(capsys, text):
    from normkit._cli._out import error
    from normkit._console import console, lit

    con = console(color_system=None)
    for template in ("{}", "[bold]{}[/bold] after", "[red]{}[/red][bold]x[/bold]"):
        con.print(template.format(lit(text)))
    assert error(console(stderr=True), "x", text) == 2
    out, err = capsys.readouterr()
    assert out == f"{text}\n{text} after\n{text}x\n"
    assert err == f"normkit x: error: {text}\n"


def test_bench_prints_errors_literally():
    from normkit.bench import _terminal as bench_cli

    msg = "x must be [float32] [/x] :thumbs_up:"
    doc = {"config": {"peers": ["torch"]},
           "results": [{"op": "ln", "pass": "fwd", "dtype": "float32", "M": 1, "N": 8,
                        "impls": {"normkit": {"error": msg}, "torch": {"median_s": 1e-6}}}]}
    assert msg in " ".join(_text(bench_cli.results_table(doc)).split())  # the caption wraps
    from rich.console import Console

    buf = io.StringIO()
    bar = {"points": [{"op": "ln", "pass": "fwd", "dtype": "float32", "error": msg}],
           "worst_speedup": None, "dtypes": ["float32"], "speedup_needed": 0.9, "ok": None}
    bench_cli._print_bar(Console(file=buf, width=200, emoji=False), bar)
    assert msg in buf.getvalue()


def test_study_prints_paths_and_errors_literally(tmp_path, monkeypatch, capsys):
    import normkit.study
    from normkit._cli import study as study_cli
    from normkit._cli.main import build_parser

    out = tmp_path / "st[/x]" / "[bold]d"

    def fake_run_study(config, out_dir, progress=None):
        return {"findings": [], "config": {"preset": "quick"}}

    def fake_write_outputs(doc, out_dir):
        return {"results": out_dir / "results.json", "html": out_dir / "report.html",
                "markdown": out_dir / "report.md"}

    monkeypatch.setattr(normkit.study, "run_study", fake_run_study)
    monkeypatch.setattr(normkit.study, "write_outputs", fake_write_outputs)
    args = build_parser().parse_args(["study", "--quick", "--out", str(out)])
    assert study_cli.run(args) == 0
    printed = capsys.readouterr().out.replace("\n", "")
    assert str(out) in printed and str(out / "report.html") in printed

    def bad_config(args):
        raise ValueError("warmup [/x] longer than [bold]steps")

    monkeypatch.setattr(study_cli, "config_from_args", bad_config)
    assert study_cli.run(args) == 2
    assert "warmup [/x] longer than [bold]steps" in capsys.readouterr().err


def test_demo_prints_alerts_and_summary_literally(monkeypatch, capsys):
    import normkit._demo
    from normkit._cli.main import build_parser
    from normkit.monitor.alerts import Alert

    alert = Alert("page", "nonfinite", "[/x]", "m", "1", 1, 0.0, 0.0,
                  message="non-finite values, origin [/x] [bold]y")

    def fake_run_demo(out_dir, config, console):
        normkit._demo.announcer(console)(alert)  # how the demo prints an alert as it opens
        return {"wall_s": 1.0, "train": {"loss_first": 2.0, "loss_last": 1.0, "steps": 3},
                "drift_alerts": [], "nan_origin": "[bold]o[/x]", "nan_injected_at": "[bold]o[/x]",
                "canary": [{"version": "[bold]2", "decision": "promote"}],
                "guard": {"fault": "[/x].weight", "fell_back": True},
                "audit": {"ok": True, "counts": {"error": 0}}, "report": f"{out_dir}/report.html"}

    monkeypatch.setattr(normkit._demo, "run_demo", fake_run_demo)
    args = build_parser().parse_args(["demo", "-o", "/tmp/[/x]:thumbs_up:"])
    assert args._run(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "PAGE nonfinite: non-finite values, origin [/x] [bold]y" in text
    assert "origin [bold]o[/x] (Inf injected into [bold]o[/x])" in text
    assert "report: /tmp/[/x]:thumbs_up:/report.html" in text
    assert "canary: version [bold]2 promote" in text
    assert "guard: tripped on [/x].weight, fell back to the previous version: True" in text
