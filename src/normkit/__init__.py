"""normkit: fast, exact and observable layer normalization for PyTorch.

``import normkit`` imports nothing heavy: every public name below loads on first use (PEP 562),
so ``normkit --help`` does not pay for torch.  ``normkit.layer_norm`` (or ``normkit.nn``,
``normkit.convert``, ...) imports torch and normkit's functional layer, which registers the
``torch.ops.normkit`` custom ops.  Where torch is already imported (``import torch, normkit``),
``import normkit`` registers them at once (about 25 ms), so a saved program that calls them
(``torch.export.load``) loads right after it.  The compiled CPU kernels load on the first CPU
call (a shared library: nothing compiles).  ``normkit.watch`` / ``normkit.Baseline`` (telemetry,
``normkit.monitor``) and ``normkit.audit`` load the telemetry or the audit.  No optional extra
(triton, transformers, onnx, prometheus_client, matplotlib) is imported by any of them.
"""

import importlib
import sys
import types

from ._provenance import __version__  # noqa: F401  (normkit.__version__)

# name -> (submodule, attribute or None for the submodule itself), imported on first access.
# ``normkit.audit`` is a callable package: ``normkit.audit(model)`` and ``normkit.audit.RULES``.
_LAZY = {
    # functional ops and backends
    "functional": ("functional", None),
    "layer_norm": ("functional", "layer_norm"),
    "rms_norm": ("functional", "rms_norm"),
    "group_norm": ("functional", "group_norm"),
    "use_backend": ("functional", "use_backend"),
    "get_backend": ("functional", "get_backend"),
    "available_backends": ("functional", "available_backends"),
    "empty_cache": ("functional", "empty_cache"),
    "BACKENDS": ("functional", "BACKENDS"),
    "CASTINGS": ("functional", "CASTINGS"),
    # modules and conversion
    "nn": ("nn", None),
    "convert": ("convert", "convert"),
    "revert": ("convert", "revert"),
    "register_norm": ("_inventory", "register_norm"),
    # telemetry and release audit
    "watch": ("monitor", "watch"),
    "Baseline": ("monitor", "Baseline"),
    "monitor": ("monitor", None),
    "audit": ("audit", None),
    "AuditReport": ("audit", "AuditReport"),
    "guard": ("guard", None),
    # a subpackage that ``import normkit`` used to bind as a side effect (not in __all__)
    "kernels": ("kernels", None),
}


def __getattr__(name):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'normkit' has no attribute {name!r}") from None
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``normkit.convert`` is the function, although ``normkit/convert.py`` is also a
    submodule: importing a submodule binds it on its package, so whichever code imports
    ``normkit.convert`` (the module) first would otherwise hide the function."""

    def __setattr__(self, name, value):
        if name == "convert" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

if "torch" in sys.modules:  # torch's import is paid already: register the custom ops now
    importlib.import_module(".functional", __name__)

__all__ = [
    # functional ops
    "layer_norm",
    "rms_norm",
    "group_norm",
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
    # telemetry and release audit
    "watch",
    "Baseline",
    "monitor",
    "audit",
    "AuditReport",
    "guard",
]
