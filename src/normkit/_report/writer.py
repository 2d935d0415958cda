"""Write a report: the HTML page, the markdown file and the PNGs it links to."""

from __future__ import annotations

import os
from pathlib import Path

from .._io import write_bytes_atomic, write_text_atomic
from .document import Document
from .html import render_html
from .markdown import render_markdown

__all__ = ["write_report"]


def write_report(doc: Document, out_dir: str | os.PathLike, stem: str = "report",
                 image_dir: str = "plots", footer: str = "") -> dict[str, Path]:
    """Write ``<out_dir>/<stem>.html`` (self-contained), ``<out_dir>/<stem>.md`` and the
    figures as ``<out_dir>/<image_dir>/<filename>.png``, each atomically.  The PNGs go first,
    so a markdown file never points at an image that is not there yet.

    Returns:
        ``{"html": path, "markdown": path, "images": [paths]}``.
    """
    out = Path(out_dir)
    images = [write_bytes_atomic(out / image_dir / f.filename, f.png) for f in doc.figures()]
    md = write_text_atomic(out / f"{stem}.md", render_markdown(doc, image_dir, footer))
    page = write_text_atomic(out / f"{stem}.html", render_html(doc, footer))
    return {"html": page, "markdown": md, "images": images}
