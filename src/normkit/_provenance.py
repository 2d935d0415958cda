"""Where a result came from: normkit's version, in one place.

``__version__`` is the version of this code (``pyproject.toml`` reads it from here, so the
installed distribution and the code agree); ``normkit_version()`` is what records, reports,
metrics and result files carry.  Imports nothing: every layer may ask.
"""

from __future__ import annotations

__all__ = ["__version__", "normkit_version"]

__version__ = "0.1.0"


def normkit_version() -> str:
    """The version of the normkit code that is running (not of whatever distribution pip
    installed under that name: a checkout on ``PYTHONPATH`` reports its own)."""
    return __version__
