"""Terminal output shared by the command line and the demo: Rich consoles, and user strings
printed literally.

A file, model, layer or module name, or an error message, is the user's text, not Rich
markup: ``sd[v2].pt`` must print as ``sd[v2].pt`` (Rich would drop ``[v2]`` as an unknown
style), and ``[/x]`` must not raise a ``MarkupError``.  Every such string goes through
:func:`lit` before it meets markup (a ``console.print`` f-string, a table cell, a progress
description), and :func:`console` turns off Rich's emoji codes (``:thumbs_up:`` in a name stays
text).  Rich is imported when something prints, not when ``normkit --help`` builds the parser.
"""

from __future__ import annotations

import re

__all__ = ["console", "lit"]


def console(*, stderr: bool = False, width: int | None = None, **kwargs):
    """A ``rich.console.Console`` for normkit's output (no emoji codes); ``width=None`` is the
    terminal's width, or ``width`` when the output is not a terminal (a file keeps its tables
    whole)."""
    from rich.console import Console

    con = Console(stderr=stderr, emoji=False, **kwargs)
    if width is not None and not con.is_terminal:
        con = Console(stderr=stderr, emoji=False, width=width, **kwargs)
    return con


# What Rich's markup parser reads in plain text: a run of backslashes before a tag-like "[x...]"
# (half of them print, an odd one escapes the tag), before any other "[" (one is dropped), or at
# the end of the string (it would escape the first tag of the markup that follows).
_RICH_SPECIAL = re.compile(r"(\\*)(\[(?:[a-z#/@][^[]*?\])?)|(\\+)$")


def _escape(m: re.Match) -> str:
    slashes, bracket, trailing = m.groups()
    if trailing is not None:  # doubled, and an empty span keeps the next tag a tag
        return trailing * 2 + "[dim][/dim]"
    if len(bracket) > 1:  # a tag: each backslash doubled, one more to escape it
        return slashes * 2 + "\\" + bracket
    return slashes + "\\" + bracket if slashes else bracket


def lit(value) -> str:
    """``str(value)`` as Rich markup that prints exactly those characters, wherever it is put
    in a markup string (``rich.markup.escape`` loses a backslash before a "[" that is not a
    tag, as in ``C:\\runs\\[1]``, and doubles a trailing one when nothing follows)."""
    return _RICH_SPECIAL.sub(_escape, str(value))

