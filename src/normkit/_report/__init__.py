"""Shared report rendering for ``normkit study``, ``normkit report`` and ``normkit demo``.

A report is a :class:`Document` — a title and a list of blocks (headings, paragraphs, tables,
figures, call-outs, key/value lists) — rendered two ways from the same blocks:

* :func:`render_html`: one self-contained HTML file (inline CSS, PNGs as data URIs, no
  scripts, no network), the same look for every normkit report;
* :func:`render_markdown`: markdown whose figures point at PNG files written beside it.

Block text may carry two inline marks (```code```, ``**bold**``); user strings (file, model and
layer names, messages) go in through :func:`literal` / :func:`literal_code` and come out as
written in both formats — escaped, never read as HTML or markdown.

:func:`write_report` writes both (and the PNGs) atomically.  Plots come from
:mod:`normkit._report.plotting`, which imports matplotlib (the ``report`` extra) lazily.
"""

from .._io import write_bytes_atomic, write_json_atomic, write_text_atomic
from .document import (
    Callout,
    Code,
    Document,
    Figure,
    Heading,
    KeyValues,
    Paragraph,
    Table,
    literal,
    literal_code,
)
from .html import render_html
from .markdown import render_markdown
from .writer import write_report

__all__ = [
    # building a report
    "Document",
    "Heading",
    "Paragraph",
    "Table",
    "Figure",
    "Callout",
    "KeyValues",
    "Code",
    "literal",
    "literal_code",
    # rendering and writing
    "render_html",
    "render_markdown",
    "write_report",
    "write_text_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
]
