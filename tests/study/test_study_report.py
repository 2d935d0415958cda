"""``normkit._report``: the shared HTML/markdown rendering of the study (and, later, of
``normkit report`` and ``normkit demo``)."""

from __future__ import annotations

import io
import json
import os

import pytest
from _browser import visible

from normkit._report import Document, render_html, render_markdown, write_json_atomic, write_report


def _png() -> bytes:
    from normkit._report.plotting import new_figure, to_png

    fig, (ax,) = new_figure(1, 1, width=2, height=1.5)
    ax.plot([0, 1, 2], [1, 0, 1])
    return to_png(fig)


def _doc() -> Document:
    d = Document("t <&> title", "sub `code` **bold**")
    d.heading("Section <one>")
    d.paragraph("a <script>alert(1)</script> b `x<y` **strong**")
    d.table(["name", "value"], [["a|b", "1.0"], ["c", "2"]], caption="cap")
    d.callout("ok", "fine")
    d.callout("bad", "broken")
    d.key_values([("k", "v & w")])
    d.code("x < 1\ny")
    d.figure(_png(), "fig.png", 'alt "quoted"', "caption")
    return d


def test_html_escapes_text_and_embeds_images():
    page = render_html(_doc(), footer="foot")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<code>x&lt;y</code>" in page and "<strong>strong</strong>" in page
    assert "t &lt;&amp;&gt; title" in page
    assert 'src="data:image/png;base64,iVBORw0KGgo' in page
    assert 'alt="alt &quot;quoted&quot;"' in page
    assert page.count('class="callout ok"') == 1 and page.count('class="callout bad"') == 1
    assert '<td class="r">1.0</td>' in page  # numbers right-aligned by default
    assert "http://" not in page and "https://" not in page


def test_markdown_tables_figures_and_callouts():
    md = render_markdown(_doc(), image_dir="plots", footer="foot")
    assert md.startswith("# t &lt;&amp;&gt; title\n")
    assert "| name | value |\n| :--- | ---: |\n| a\\|b | 1.0 |" in md
    assert "![alt \"quoted\"](plots/fig.png)" in md
    assert "> **✅ OK** fine" in md and "> **❌ FAIL** broken" in md
    assert "```\nx < 1\ny\n```" in md


def _markdown_page(md: str) -> str:
    """``md`` rendered as GitHub would (CommonMark with tables and strike-through)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)


def test_markdown_shows_html_as_text():
    md = render_markdown(_doc())
    assert "<script>" not in md
    text, tags = visible(_markdown_page(md))
    assert "a <script>alert(1)</script> b" in text and "script" not in tags
    assert "Section <one>" in text and "t <&> title" in text
    assert "x<y" in text and "code" in tags and "strong" in tags  # the marks still work


# Names a user can give a module or file: HTML, markdown emphasis, code, links, strike-through,
# a table pipe, entities, backslashes, and the report's own marks.
USER = ("<script>alert(1)</script>", "*m* _u_ __b__", "`c` ``d``", "[a](javascript:x)",
        "~~s~~", "p|q", "&amp; &lt;", "C:\\dir\\", "**not bold**", "_orig_mod.ln_f", "a\\`b")


def _named_doc(name: str) -> Document:
    from normkit._report import literal, literal_code

    d = Document(f"t {literal(name)}", literal(name))
    d.heading(f"h {literal(name)}")
    d.paragraph(f"p {literal(name)} and {literal_code(name)} **bold**")
    d.table(["layer", "v"], [[literal(name), "1"]], caption=literal(name))
    d.callout("bad", f"origin {literal_code(name)}")
    d.key_values([("file", literal(name))])
    return d


@pytest.mark.parametrize("name", USER)
def test_literal_strings_show_as_written_in_html_and_markdown(name):
    for render in (lambda d: _markdown_page(render_markdown(d)), render_html):
        text, tags = visible(render(_named_doc(name)))
        # title (and <title>), subtitle, heading, paragraph twice, cell, caption, call-out, file
        assert text.count(name) >= 9, (name, text)
        assert tags == visible(render(_named_doc("x")))[1]  # no element came from the name


def test_document_validates_blocks():
    d = Document("t")
    with pytest.raises(ValueError, match="cells"):
        d.table(["a", "b"], [["1"]])
    with pytest.raises(ValueError, match="not PNG"):
        d.figure(b"GIF89a", "x.png", "x")
    with pytest.raises(ValueError, match="filename"):
        d.figure(_png(), "../x.png", "x")
    d.figure(_png(), "x.png", "x")
    with pytest.raises(ValueError, match="two figures"):
        d.figure(_png(), "x.png", "y")
    with pytest.raises(ValueError, match="callout kind"):
        d.callout("loud", "x")


def test_write_report_writes_everything(tmp_path):
    paths = write_report(_doc(), tmp_path, stem="r")
    assert paths["html"] == tmp_path / "r.html" and paths["markdown"] == tmp_path / "r.md"
    assert (tmp_path / "plots" / "fig.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(os.listdir(tmp_path)) == ["plots", "r.html", "r.md"]  # no temp files left


def test_png_bytes_are_reproducible():
    assert _png() == _png()  # no timestamps or software versions in the PNG


def test_json_write_is_atomic_and_strict(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"schema_version": 1, "x": [1.5]})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"x": float("nan")})  # NaN is not JSON
    assert json.loads(path.read_text()) == {"schema_version": 1, "x": [1.5]}  # old file intact
    assert os.listdir(tmp_path) == ["a.json"]
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_missing_matplotlib_names_the_extra(monkeypatch):
    import builtins

    from normkit._report import plotting

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib")
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"normkit\[report\]"):
        plotting.require_matplotlib()


def test_study_terminal_findings_say_what_the_html_report_says():
    """`normkit study` prints the findings in the report's words: the same verdict for each
    claim, and the same note on the quick preset."""
    import copy
    from pathlib import Path

    from rich.console import Console

    from normkit._cli.study import findings_table
    from normkit.study import build_document

    root = Path(__file__).resolve().parents[2]
    recorded = sorted((root / "benchmarks" / "results").glob("study-*.json"))[-1]
    doc = copy.deepcopy(json.loads(recorded.read_text(encoding="utf-8")))
    doc["config"]["preset"] = "quick"
    # one finding of each verdict: reproduced, not reproduced, two inconclusive, not measured
    states = [(True, True), (False, True), (True, False), (False, False), (None, False)]
    for f, (holds, conclusive) in zip(doc["findings"][:5], states, strict=True):
        f["holds"], f["conclusive"] = holds, conclusive
    report = build_document(doc)
    table = next(b for b in report.blocks if type(b).__name__ == "Table")
    assert table.headers == ("claim", "source", "verdict", "evidence")
    buf = io.StringIO()
    Console(file=buf, width=400).print(findings_table(doc))
    terminal = buf.getvalue()
    lines = {" ".join(line.split()) for line in terminal.splitlines()}
    for row in table.rows:  # claim, source, verdict, evidence: each on the terminal's row
        assert any(all(cell in line for cell in row) for line in lines), row
    note = next(b.text for b in report.blocks if type(b).__name__ == "Callout")
    assert note.replace("`", "") in " ".join(terminal.split())
