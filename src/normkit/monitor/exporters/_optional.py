"""The optional dependencies of the exporters: imported when an exporter is built, never at
``import normkit.monitor``."""

from __future__ import annotations

import importlib


def require(module: str, extra: str = "monitor"):
    """``module`` imported, or an ImportError naming the ``pip install`` (of normkit's ``extra``)
    that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f'{module} is needed for this exporter: pip install "normkit[{extra}]"'
                          ) from e
