"""normkit: fast, exact and observable layer normalization for PyTorch.

``import normkit`` imports torch and nothing heavier: the compiled CPU kernels load on the first
CPU call (a shared library: nothing compiles), and no optional extra (triton, transformers, onnx,
prometheus_client, matplotlib) is imported.
``normkit.watch`` / ``normkit.Baseline`` (telemetry, ``normkit.monitor``) and ``normkit.audit``
load on first use.
"""

from . import nn
from ._inventory import register_norm
from .convert import convert, revert
from .functional import (
    BACKENDS,
    CASTINGS,
    available_backends,
    empty_cache,
    get_backend,
    layer_norm,
    rms_norm,
    use_backend,
)

__version__ = "0.1.0"

# name -> (submodule, attribute or None for the submodule itself), imported on first access.
# ``normkit.audit`` is a callable package: ``normkit.audit(model)`` and ``normkit.audit.RULES``.
_LAZY = {
    "watch": ("monitor", "watch"),
    "Baseline": ("monitor", "Baseline"),
    "monitor": ("monitor", None),
    "audit": ("audit", None),
    "AuditReport": ("audit", "AuditReport"),
}


def __getattr__(name):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'normkit' has no attribute {name!r}") from None
    import importlib

    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


__all__ = [
    # functional ops
    "layer_norm",
    "rms_norm",
    # backends
    "use_backend",
    "get_backend",
    "available_backends",
    "empty_cache",
    "BACKENDS",
    "CASTINGS",
    # modules and conversion
    "nn",
    "convert",
    "revert",
    "register_norm",
    # telemetry and release audit (loaded on first use)
    "watch",
    "Baseline",
    "monitor",
    "audit",
    "AuditReport",
]
