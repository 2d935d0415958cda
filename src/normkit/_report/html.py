"""Render a :class:`~normkit._report.document.Document` as one self-contained HTML page.

Self-contained means: inline CSS, every image a ``data:image/png;base64`` URI, no scripts, no
web fonts, no external links loaded — the file can be mailed, attached to a CI run or opened
offline, and it loads with zero network requests (even the favicon is an empty data URI, so a
browser does not go looking for ``/favicon.ico``).
"""

from __future__ import annotations

import base64
import html
import re

from .document import (
    Callout,
    Code,
    Document,
    Figure,
    Heading,
    KeyValues,
    Paragraph,
    Table,
    plain,
    spans,
)

__all__ = ["render_html", "inline_html", "STYLE"]

# One stylesheet for every normkit report (study, report, demo): system fonts, a readable
# measure, tables with tabular numbers, call-out colours that also read in greyscale print.
STYLE = """
:root { --fg:#1b1f24; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --panel:#f6f8fa;
        --ok:#1a7f37; --warn:#9a6700; --bad:#cf222e; --info:#0969da; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
       font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width: 1040px; margin: 0 auto; padding: 28px 24px 64px; }
header { border-bottom: 3px solid var(--fg); margin-bottom: 20px; padding-bottom: 10px; }
h1 { font-size: 28px; margin: 0; letter-spacing: -0.01em; }
.subtitle { color: var(--muted); margin-top: 4px; }
h2 { font-size: 21px; margin: 34px 0 10px; padding-bottom: 4px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 17px; margin: 22px 0 8px; }
p { margin: 8px 0; }
code, pre { font-family: ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size: 13px; }
code { background: var(--panel); padding: 1px 4px; border-radius: 4px; }
pre { background: var(--panel); padding: 10px 12px; border-radius: 6px; overflow-x: auto; }
table { border-collapse: collapse; margin: 10px 0 4px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 10px; }
th { background: var(--panel); font-weight: 600; }
td.r, th.r { text-align: right; } td.l, th.l { text-align: left; }
.caption { color: var(--muted); font-size: 13px; margin: 2px 0 12px; }
figure { margin: 14px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.callout { border-left: 5px solid var(--info); background: var(--panel); padding: 8px 12px;
           margin: 10px 0; border-radius: 0 6px 6px 0; }
.callout.ok { border-color: var(--ok); } .callout.warn { border-color: var(--warn); }
.callout.bad { border-color: var(--bad); }
.callout .tag { font-weight: 700; margin-right: 6px; }
.callout.ok .tag { color: var(--ok); } .callout.warn .tag { color: var(--warn); }
.callout.bad .tag { color: var(--bad); } .callout.info .tag { color: var(--info); }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; border-top: 1px solid var(--line);
         padding-top: 8px; }
"""

_TAGS = {"ok": "OK", "warn": "NOTE", "bad": "FAIL", "info": "INFO"}
_ELEMENT = {"code": "code", "bold": "strong"}


def inline_html(text: str) -> str:
    """``text`` as HTML: its inline marks (```code```, ``**bold**``) as elements, every
    character escaped."""
    out = []
    for kind, chars in spans(text):
        chars = html.escape(chars, quote=True)
        out.append(chars if kind == "text" else f"<{_ELEMENT[kind]}>{chars}</{_ELEMENT[kind]}>")
    return "".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _block(b) -> str:
    if isinstance(b, Heading):
        return f'<h{b.level} id="{_slug(b.text)}">{inline_html(b.text)}</h{b.level}>'
    if isinstance(b, Paragraph):
        return f"<p>{inline_html(b.text)}</p>"
    if isinstance(b, Table):
        al = b.alignments()
        head = "".join(f'<th class="{a}">{inline_html(h)}</th>'
                       for h, a in zip(b.headers, al, strict=True))
        body = "".join(
            "<tr>" + "".join(f'<td class="{a}">{inline_html(c)}</td>'
                             for c, a in zip(r, al, strict=True)) + "</tr>"
            for r in b.rows)
        cap = f'<div class="caption">{inline_html(b.caption)}</div>' if b.caption else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{cap}"
    if isinstance(b, Figure):
        data = base64.b64encode(b.png).decode("ascii")
        cap = f"<figcaption>{inline_html(b.caption)}</figcaption>" if b.caption else ""
        return (f'<figure><img src="data:image/png;base64,{data}" '
                f'alt="{html.escape(b.alt, quote=True)}">{cap}</figure>')
    if isinstance(b, Callout):
        return (f'<div class="callout {b.kind}"><span class="tag">{_TAGS[b.kind]}</span>'
                f"{inline_html(b.text)}</div>")
    if isinstance(b, KeyValues):
        items = "".join(f"<dt>{inline_html(k)}</dt><dd>{inline_html(v)}</dd>" for k, v in b.items)
        return f'<dl class="kv">{items}</dl>'
    if isinstance(b, Code):
        return f"<pre>{html.escape(b.text)}</pre>"
    raise TypeError(f"unknown report block {type(b).__name__}")


def render_html(doc: Document, footer: str = "") -> str:
    """The whole page as a string (UTF-8, self-contained)."""
    sub = f'<div class="subtitle">{inline_html(doc.subtitle)}</div>' if doc.subtitle else ""
    body = "\n".join(_block(b) for b in doc.blocks)
    foot = f"<footer>{inline_html(footer)}</footer>" if footer else ""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{html.escape(plain(doc.title))}</title>\n<style>{STYLE}</style></head>\n"
        f"<body><main><header><h1>{inline_html(doc.title)}</h1>{sub}</header>\n"
        f"{body}\n{foot}</main></body></html>\n"
    )
