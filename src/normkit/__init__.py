"""normkit: fast, exact and observable layer normalization for PyTorch.

``import normkit`` imports torch and nothing heavier: numba loads on the first CPU kernel call,
and no optional extra (triton, transformers, onnx, prometheus_client, matplotlib) is imported.
"""

from . import nn
from .convert import convert, revert
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
