"""docs/runbooks/: every Prometheus alert, every in-process alert rule and every audit finding id
has a page with the required sections; every link resolves; every PromQL query parses (promtool)
and names only metrics normkit exports; every ``normkit`` command line parses; every rehearsal
runs (once ``normkit.faults`` is there)."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest

from normkit._cli.main import build_parser
from normkit.audit._findings import RULES as FINDINGS
from normkit.audit._findings import Finding
from normkit.monitor import METRICS, AlertRules
from normkit.monitor.alerts import RULES, RUNBOOK_BASE, RUNBOOKS
from normkit.monitor.exporters import exported_series_names

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS_DIR = ROOT / "docs" / "runbooks"
RULES_YML = ROOT / "deploy" / "prometheus" / "rules.yml"
PAGES = sorted(p for p in RUNBOOKS_DIR.glob("*.md") if p.name != "README.md")
SECTIONS = ["What it means", "Confirm", "Likely causes", "Mitigate", "Verify the fix",
            "Rehearse"]
FAULTS = {"nonfinite", "precision", "eps", "affine", "scale_inputs"}  # faults-api.md

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_METRIC = re.compile(r"\bnormkit_[a-z0-9_]*[a-z0-9]\b")
_RECORDED = re.compile(r"\bnormkit:[a-z0-9_:]+[a-z0-9]\b")


def _blocks(page: Path, lang: str) -> list[str]:
    return [code for lg, code in _FENCE.findall(page.read_text()) if lg == lang]


def _page_of(url: str) -> Path:
    assert url.startswith(RUNBOOK_BASE), url
    return RUNBOOKS_DIR / url.removeprefix(RUNBOOK_BASE)


def _prometheus_alerts() -> dict[str, dict[str, str]]:
    """{alert: {"severity", "runbook_url"}} of rules.yml (read with regular expressions: the
    tests need no YAML library)."""
    chunks = re.split(r"^\s+- alert: ", RULES_YML.read_text(), flags=re.MULTILINE)[1:]
    out = {}
    for chunk in chunks:
        chunk = re.split(r"^\s+- (?:alert|record): ", chunk, flags=re.MULTILINE)[0]
        out[chunk.split()[0]] = {k: re.search(rf"^\s+{k}: (\S+)$", chunk, re.M)[1]
                                 for k in ("severity", "runbook_url")}
    return out


def test_every_prometheus_alert_links_an_existing_page_that_names_it():
    alerts = _prometheus_alerts()
    assert len(alerts) == 11
    for name, rule in alerts.items():
        page = _page_of(rule["runbook_url"])
        assert page.is_file(), (name, page)
        assert f"`{name}`" in page.read_text().split("\n## ")[0], (name, page.name)


def test_every_in_process_rule_links_an_existing_page(monkeypatch):
    monkeypatch.delenv("NORMKIT_RUNBOOK_BASE", raising=False)
    assert set(RUNBOOKS) == set(RULES)
    rules = AlertRules(log_alerts=False)
    for rule in RULES:
        alert = rules.fire(rule, "lm", rule, None)
        page = _page_of(alert.runbook_url)
        assert page.is_file() and f"rule\n`{rule}`" in page.read_text().replace(
            "rule `", "rule\n`"), (rule, page.name)


def test_every_audit_finding_id_has_a_page_that_explains_it(monkeypatch):
    monkeypatch.delenv("NORMKIT_RUNBOOK_BASE", raising=False)
    for rule_id, rule in FINDINGS.items():
        page = _page_of(Finding(rule_id, rule.severity, None, "m", rule.fix).runbook_url)
        assert page.is_file(), (rule_id, page)
        assert f"`{rule_id}`" in page.read_text(), (rule_id, page.name)


def test_in_process_and_prometheus_twins_share_page_and_severity():
    by_page = {Path(r["runbook_url"]).name: r for r in _prometheus_alerts().values()}
    for rule, page in RUNBOOKS.items():
        assert by_page[page]["severity"] == RULES[rule], rule


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_has_the_required_sections_in_order(page):
    headings = re.findall(r"^## (.+)$", page.read_text(), re.MULTILINE)
    assert headings == SECTIONS, headings
    assert re.match(r"# \S", page.read_text())
    rehearsals = _blocks(page, "python")
    assert rehearsals and all(code.startswith("# rehearsal\n") for code in rehearsals), page


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = unicodedata.normalize("NFKC", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("page", [*PAGES, RUNBOOKS_DIR / "README.md"], ids=lambda p: p.name)
def test_links_resolve(page):
    text = _FENCE.sub("", page.read_text())
    for target in _LINK.findall(text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.is_file(), (page.name, target)
        if anchor:
            anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            assert anchor in anchors, (page.name, target, sorted(anchors))


def test_readme_lists_every_page():
    text = (RUNBOOKS_DIR / "README.md").read_text()
    assert {p.name for p in PAGES} == set(re.findall(r"\]\(([\w-]+\.md)\)", text))


def _queries() -> list[tuple[str, str]]:
    return [(p.name, q.strip()) for p in PAGES for q in _blocks(p, "promql")]


def test_promql_names_only_exported_metrics_and_recording_rules():
    assert len(_queries()) > 40
    declared = set(re.findall(r"record:\s*(\S+)", RULES_YML.read_text()))
    label_names = {label for _, _, labels, _ in METRICS for label in labels}
    for page, q in _queries():
        metrics = set(_METRIC.findall(q)) - label_names
        assert metrics <= exported_series_names(), (page, q, metrics - exported_series_names())
        assert set(_RECORDED.findall(q)) <= declared, (page, q)


def test_promql_parses(tmp_path):
    """Each query as a recording rule's expression: ``promtool check rules`` parses them all."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (.ci/run installs the Debian prometheus package)")
    queries = [q for _, q in _queries()]
    text = "groups:\n  - name: runbooks\n    rules:\n" + "".join(
        f"      - record: runbook:query_{i}\n        expr: |\n"
        + "".join(f"          {line}\n" for line in q.splitlines())
        for i, q in enumerate(queries))
    path = tmp_path / "queries.yml"
    path.write_text(text)
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(queries)} rules found" in out.stdout


def _commands() -> list[tuple[str, str]]:
    out = []
    for page in PAGES:
        for block in _blocks(page, "bash"):
            out += [(page.name, line) for line in block.splitlines() if line.startswith("normkit ")]
    return out


def test_normkit_command_lines_parse():
    parser = build_parser()
    assert len(_commands()) > 15
    for page, line in _commands():
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
            pytest.fail(f"{page}: {line!r} does not parse")


def _rehearsals() -> list[tuple[str, str]]:
    return [(p.name, code) for p in PAGES for code in _blocks(p, "python")]


def test_rehearsals_use_the_faults_api_only():
    for page, code in _rehearsals():
        tree = ast.parse(code, page)
        used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                and isinstance(n.value, ast.Name) and n.value.id == "faults"}
        assert used <= FAULTS, (page, used - FAULTS)


@pytest.mark.parametrize("page, code", _rehearsals(), ids=[p for p, _ in _rehearsals()])
def test_rehearsal_runs(page, code):
    """Each rehearsal, in a namespace of its own: the fault is injected, the alert or finding
    comes (the block's own asserts)."""
    if "from normkit import faults" in code and importlib.util.find_spec("normkit.faults") is None:
        pytest.skip("normkit.faults is not there yet")
    if "checks=[\"export\"]" in code:
        pytest.importorskip("onnxruntime")
    exec(compile(code, page, "exec"), {"__name__": f"rehearsal:{page}"})
