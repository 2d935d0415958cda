"""The options of one norm call — eps, LayerNorm or RMSNorm, zero-centred γ, casting, output
dtype — as one frozen object, and the checks of each option (``_validate`` runs them on every
call; the modules in ``nn`` run theirs when they are built)."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

CASTINGS = ("torch", "gemma", "llama", "t5")


class NormOptions(NamedTuple):
    """What a norm computes, apart from its tensors.  Frozen, and a NamedTuple rather than a
    frozen dataclass: the general path builds one per call, which costs ~0.15 µs with
    ``tuple.__new__`` against ~0.9 µs for a frozen dataclass, and unpacking it gives the fields
    in the kernels' argument order.

    Attributes:
        eps: added to the variance (LayerNorm) or the mean square (RMSNorm): as given (None
            for RMSNorm's default), and once checked (``_validate``) a float, finite and >= 0.
        rms: RMSNorm when True, LayerNorm otherwise.
        zero_centered: multiply by ``1 + weight`` (γ stored zero-centred, as in Gemma).
        casting: one of ``CASTINGS`` (see ``normkit.layer_norm``).
        out_dtype: the output dtype for "torch"/"gemma" casting, or None for the default.
    """

    eps: float | None
    rms: bool
    zero_centered: bool = False
    casting: str = "torch"
    out_dtype: torch.dtype | None = None


def _eps_of(eps):
    """eps as a float, finite and >= 0.  Any real number, as torch takes (numpy scalars too);
    not a bool, which is a flag passed in the wrong place far more often than an eps of 1."""
    if type(eps) is not float:
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a float, got {type(eps).__name__}")
        eps = float(eps)
    if not 0.0 <= eps < math.inf:  # also false for NaN
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _check_casting(casting):
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")


def _check_out_dtype(out_dtype, casting):
    if casting not in ("torch", "gemma"):
        raise ValueError(f"out_dtype is only for casting 'torch'/'gemma', not {casting!r}")
    if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating torch.dtype (or torch.float8_e4m3fn / "
                        f"torch.int8 for a quantized output), got {out_dtype!r}")
