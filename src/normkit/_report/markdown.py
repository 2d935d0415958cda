"""Render a :class:`~normkit._report.document.Document` as GitHub-flavoured markdown; figures
become links to PNG files in ``image_dir`` (relative to the markdown file).

Every character of the text is shown as written: ``<``, ``>`` and ``&`` become HTML entities
(a module named ``<script>`` is text, never markup) and the characters markdown would read as
emphasis, code, links or strike-through are backslash-escaped.  :func:`escape_text`,
:func:`code_span` and :func:`table_cell` are what other markdown writers (the audit report) use
for the same guarantee.
"""

from __future__ import annotations

import html
import re

from .document import Callout, Code, Document, Figure, Heading, KeyValues, Paragraph, Table, spans

__all__ = ["render_markdown", "escape_text", "code_span", "table_cell"]

_TAGS = {"ok": "✅ OK", "warn": "⚠️ NOTE", "bad": "❌ FAIL", "info": "ℹ️"}
# "_" emphasizes only at a word's edge, so "ln_f" stays readable and "_orig_mod" is escaped.
_MARKDOWN = re.compile(r"[\\`*\[\]~]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def escape_text(text: str) -> str:
    """``text`` as markdown that shows exactly these characters: no HTML, emphasis, code, link
    or strike-through (a pipe is escaped by :func:`table_cell`)."""
    return _MARKDOWN.sub(lambda m: "\\" + m.group(0), html.escape(str(text), quote=False))


def code_span(text: str) -> str:
    """``text`` as inline code.  A backtick span cannot hold entities (``&lt;`` would show as
    typed), so text with ``<``, ``>``, ``&`` or a backtick becomes a ``<code>`` element around
    escaped text instead (GitHub renders both the same)."""
    text = str(text)
    if not text.strip() or any(c in text for c in "<>&`"):
        return f"<code>{escape_text(text)}</code>"
    return f"`{text}`"


def table_cell(markdown: str) -> str:
    """Rendered markdown made safe for one table cell: a pipe would end the cell and a newline
    the row."""
    return markdown.replace("|", "\\|").replace("\n", " ")


def _inline(text: str) -> str:
    out = []
    for kind, chars in spans(text):
        if kind == "code":
            out.append(code_span(chars))
        elif kind == "bold":
            out.append(f"**{escape_text(chars)}**")
        else:
            out.append(escape_text(chars))
    return "".join(out)


def _block(b, image_dir: str) -> str:
    if isinstance(b, Heading):
        return "#" * b.level + " " + _inline(b.text)
    if isinstance(b, Paragraph):
        return _inline(b.text)
    if isinstance(b, Table):
        rule = ["---:" if a == "r" else ":---" for a in b.alignments()]
        lines = ["| " + " | ".join(table_cell(_inline(h)) for h in b.headers) + " |",
                 "| " + " | ".join(rule) + " |"]
        lines += ["| " + " | ".join(table_cell(_inline(c)) for c in r) + " |" for r in b.rows]
        if b.caption:
            lines += ["", f"*{_inline(b.caption)}*"]
        return "\n".join(lines)
    if isinstance(b, Figure):
        prefix = f"{image_dir.rstrip('/')}/" if image_dir else ""
        text = f"![{escape_text(b.alt)}]({prefix}{b.filename})"
        return text + (f"\n\n*{_inline(b.caption)}*" if b.caption else "")
    if isinstance(b, Callout):
        return f"> **{_TAGS[b.kind]}** {_inline(b.text)}"
    if isinstance(b, KeyValues):
        return "\n".join(f"- **{_inline(k)}**: {_inline(v)}" for k, v in b.items)
    if isinstance(b, Code):
        return "```\n" + b.text + "\n```"
    raise TypeError(f"unknown report block {type(b).__name__}")


def render_markdown(doc: Document, image_dir: str = "plots", footer: str = "") -> str:
    """The whole report as markdown text."""
    parts = [f"# {_inline(doc.title)}"]
    if doc.subtitle:
        parts.append(f"*{_inline(doc.subtitle)}*")
    parts += [_block(b, image_dir) for b in doc.blocks]
    if footer:
        parts.append(f"---\n\n<sub>{_inline(footer)}</sub>")
    return "\n\n".join(parts) + "\n"
