"""``normkit._report``: the shared HTML/markdown rendering of the study (and, later, of
``normkit report`` and ``normkit demo``)."""

from __future__ import annotations

import json
import os

import pytest

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
    assert md.startswith("# t <&> title\n")
    assert "| name | value |\n| :--- | ---: |\n| a\\|b | 1.0 |" in md
    assert "![alt \"quoted\"](plots/fig.png)" in md
    assert "> **✅ OK** fine" in md and "> **❌ FAIL** broken" in md
    assert "```\nx < 1\ny\n```" in md


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
