"""normkit: fast, exact and observable layer normalization for PyTorch.

``import normkit`` imports torch and nothing heavier: numba loads on the first CPU kernel call,
and no optional extra (triton, transformers, onnx, prometheus_client, matplotlib) is imported.
"""

from .functional import (
    BACKENDS,
    CASTINGS,
    available_backends,
    get_backend,
    layer_norm,
    rms_norm,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    # functional ops
    "layer_norm",
    "rms_norm",
    # backends
    "use_backend",
    "get_backend",
    "available_backends",
    "BACKENDS",
    "CASTINGS",
    # modules and conversion
    "nn",
    "convert",
    "revert",
]


def __getattr__(name):
    # nn and convert are imported on first access so that a helper-free `import normkit` stays
    # cheap and so that these layers (which sit above functional) never load during it.
    if name == "nn":
        from . import nn

        return nn
    if name in ("convert", "revert"):
        from . import convert as _convert

        return getattr(_convert, name)
    raise AttributeError(f"module 'normkit' has no attribute {name!r}")
