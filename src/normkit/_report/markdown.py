"""Render a :class:`~normkit._report.document.Document` as GitHub-flavoured markdown; figures
become links to PNG files in ``image_dir`` (relative to the markdown file)."""

from __future__ import annotations

from .document import Callout, Code, Document, Figure, Heading, KeyValues, Paragraph, Table

__all__ = ["render_markdown"]

_TAGS = {"ok": "✅ OK", "warn": "⚠️ NOTE", "bad": "❌ FAIL", "info": "ℹ️"}


def _cell(text: str) -> str:
    # A pipe would end the cell and a newline the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _block(b, image_dir: str) -> str:
    if isinstance(b, Heading):
        return "#" * b.level + " " + b.text
    if isinstance(b, Paragraph):
        return b.text
    if isinstance(b, Table):
        rule = ["---:" if a == "r" else ":---" for a in b.alignments()]
        lines = ["| " + " | ".join(_cell(h) for h in b.headers) + " |",
                 "| " + " | ".join(rule) + " |"]
        lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in b.rows]
        if b.caption:
            lines += ["", f"*{b.caption}*"]
        return "\n".join(lines)
    if isinstance(b, Figure):
        prefix = f"{image_dir.rstrip('/')}/" if image_dir else ""
        text = f"![{b.alt}]({prefix}{b.filename})"
        return text + (f"\n\n*{b.caption}*" if b.caption else "")
    if isinstance(b, Callout):
        return f"> **{_TAGS[b.kind]}** {b.text}"
    if isinstance(b, KeyValues):
        return "\n".join(f"- **{k}**: {v}" for k, v in b.items)
    if isinstance(b, Code):
        return "```\n" + b.text + "\n```"
    raise TypeError(f"unknown report block {type(b).__name__}")


def render_markdown(doc: Document, image_dir: str = "plots", footer: str = "") -> str:
    """The whole report as markdown text."""
    parts = [f"# {doc.title}"]
    if doc.subtitle:
        parts.append(f"*{doc.subtitle}*")
    parts += [_block(b, image_dir) for b in doc.blocks]
    if footer:
        parts.append(f"---\n\n<sub>{footer}</sub>")
    return "\n\n".join(parts) + "\n"
