"""The commands' usage-error line; their consoles and literal strings are
:mod:`normkit._console`'s (shared with the demo)."""

from __future__ import annotations

from .._console import lit

__all__ = ["error"]


def error(con, command: str, message) -> int:
    """Print ``normkit COMMAND: error: MESSAGE`` (the message literally) on ``con``; returns the
    usage-error exit code, 2."""
    con.print(f"[red]normkit {command}: error:[/red] {lit(message)}", soft_wrap=True,
              highlight=False)
    return 2
