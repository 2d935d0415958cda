"""The report model: a :class:`Document` of blocks, independent of the output format.

Text in headings, paragraphs, cells, captions and call-outs may use two inline marks, rendered
by both formats: ```code``` and ``**bold**``; a backslash before a backslash, a backtick or a
star makes that character plain.  Everything else is plain text, shown as written: escaped in
HTML and in markdown.  A user's string (a file, model or layer name, an error message) goes in
through :func:`literal` (or :func:`literal_code`), so its own backticks and stars stay
characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Heading", "Paragraph", "Table", "Figure", "Callout", "KeyValues", "Code",
           "Document", "CALLOUT_KINDS", "literal", "literal_code", "spans", "plain"]

CALLOUT_KINDS = ("info", "ok", "warn", "bad")
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.png$")

_ESCAPE = re.compile(r"\\([\\`*])")
_SPECIAL = re.compile(r"([\\`*])")
# One pass, left to right: an escaped character, a `code` span or a **bold** span (either may
# hold escaped characters; a lone backslash is a character).
_MARKS = re.compile(r"\\([\\`*])"
                    r"|`((?:\\[\\`*]|[^`])+?)`"
                    r"|\*\*((?:\\[\\`*]|[^*])+?)\*\*")


def literal(text) -> str:
    """``str(text)`` as report text that shows exactly those characters (no marks)."""
    return _SPECIAL.sub(r"\\\1", str(text))


def literal_code(text) -> str:
    """``str(text)`` as a ```code``` span that shows exactly those characters."""
    return f"`{literal(text)}`" if str(text) else ""


def spans(text: str) -> list[tuple[str, str]]:
    """``text`` as runs of ``("text" | "code" | "bold", characters)``, escapes resolved: what
    both renderers draw."""
    runs: list[tuple[str, str]] = []
    plain_chars: list[str] = []
    pos = 0
    for m in _MARKS.finditer(text):
        plain_chars.append(text[pos:m.start()])
        pos = m.end()
        if m.group(1) is not None:
            plain_chars.append(m.group(1))
            continue
        if "".join(plain_chars):
            runs.append(("text", "".join(plain_chars)))
        plain_chars = []
        kind, body = ("code", m.group(2)) if m.group(2) is not None else ("bold", m.group(3))
        runs.append((kind, _ESCAPE.sub(r"\1", body)))
    plain_chars.append(text[pos:])
    if "".join(plain_chars):
        runs.append(("text", "".join(plain_chars)))
    return runs


def plain(text: str) -> str:
    """``text`` without its marks: the characters a reader sees (a terminal, a page title)."""
    return "".join(chars for _kind, chars in spans(text))


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2  # 2 or 3; the document title is the only level 1

    def __post_init__(self):
        if self.level not in (2, 3):
            raise ValueError(f"heading level must be 2 or 3, got {self.level}")


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    """A table; ``align`` per column is "l" or "r" (default: "l" for the first, "r" after —
    the usual label-then-numbers layout)."""

    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""
    align: tuple[str, ...] = ()

    def __post_init__(self):
        n = len(self.headers)
        for i, row in enumerate(self.rows):
            if len(row) != n:
                raise ValueError(f"table row {i} has {len(row)} cells, expected {n}")
        if self.align and (len(self.align) != n or set(self.align) - {"l", "r"}):
            raise ValueError(f"align must give 'l' or 'r' for each of {n} columns")

    def alignments(self) -> tuple[str, ...]:
        return self.align or tuple("l" if i == 0 else "r" for i in range(len(self.headers)))


@dataclass(frozen=True)
class Figure:
    """A PNG image; ``filename`` is where the markdown report expects it (beside the other
    figures), the HTML report embeds the bytes."""

    png: bytes
    filename: str
    alt: str
    caption: str = ""

    def __post_init__(self):
        if not self.png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"figure {self.filename!r}: not PNG data")
        if not _FILENAME.match(self.filename):
            raise ValueError(f"figure filename must be a plain name ending in .png, "
                             f"got {self.filename!r}")


@dataclass(frozen=True)
class Callout:
    """A highlighted verdict: ``kind`` "ok" (green), "warn" (amber), "bad" (red), "info"."""

    kind: str
    text: str

    def __post_init__(self):
        if self.kind not in CALLOUT_KINDS:
            raise ValueError(f"callout kind must be one of {CALLOUT_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class KeyValues:
    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Code:
    text: str


Block = Heading | Paragraph | Table | Figure | Callout | KeyValues | Code


@dataclass
class Document:
    """A report: ``title``, an optional ``subtitle`` line, and blocks in order.

    The builder methods append a block and return it, e.g.::

        doc = Document("normkit study", "quick preset, 2 seeds")
        doc.heading("Placement")
        doc.table(["config", "val loss"], [["pre-LN", "1.92"]])
        doc.figure(png, "placement.png", "loss vs step")
    """

    title: str
    subtitle: str = ""
    blocks: list = field(default_factory=list)

    def add(self, block):
        self.blocks.append(block)
        return block

    def heading(self, text: str, level: int = 2) -> Heading:
        return self.add(Heading(text, level))

    def paragraph(self, text: str) -> Paragraph:
        return self.add(Paragraph(text))

    def table(self, headers, rows, caption: str = "", align=()) -> Table:
        return self.add(Table(tuple(headers), tuple(tuple(str(c) for c in r) for r in rows),
                              caption, tuple(align)))

    def figure(self, png: bytes, filename: str, alt: str, caption: str = "") -> Figure:
        if any(isinstance(b, Figure) and b.filename == filename for b in self.blocks):
            raise ValueError(f"two figures named {filename!r}")
        return self.add(Figure(png, filename, alt, caption))

    def callout(self, kind: str, text: str) -> Callout:
        return self.add(Callout(kind, text))

    def key_values(self, items) -> KeyValues:
        return self.add(KeyValues(tuple((str(k), str(v)) for k, v in items)))

    def code(self, text: str) -> Code:
        return self.add(Code(text))

    def figures(self) -> list[Figure]:
        return [b for b in self.blocks if isinstance(b, Figure)]
