"""The optional dependencies of the exporters: imported when an exporter is built, never at
``import normkit.monitor``."""

from __future__ import annotations

import importlib

EXTRA = 'pip install "normkit[monitor]"'


def require(module: str):
    """``module`` imported, or an ImportError naming the ``pip install`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for this exporter: {EXTRA}") from e
