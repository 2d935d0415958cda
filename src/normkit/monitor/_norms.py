"""Which modules a watch treats as norms, and how their input statistics are read (the
kernel's own for normkit layers, two passes over the rows for the others)."""

from __future__ import annotations

import math

import torch

from .. import _inventory

__all__ = ["find_norms"]


def find_norms(
    model: torch.nn.Module,
) -> list[tuple[str, torch.nn.Module, str, str, int, _inventory.NormInfo]]:
    """The normalization layers of ``model`` in registration order — the norms of
    ``normkit._inventory`` (the same ones convert and audit see).

    Returns:
        (qualified name, module, kind, how, ndims, info): kind "ln" (mean and variance per row)
        or "rms" (mean square per row) — the statistics the records carry; how "sink" (normkit
        layer: statistics from the kernel), "last" (the trailing ``ndims`` dims form a row),
        "instance" (InstanceNorm: the ``ndims`` spatial dims of one sample and channel),
        "group" (GroupNorm: a row per sample and group) or "channel" (BatchNorm: a row per
        channel); info the inventory's ``NormInfo`` — its kind ("layer", "rms", "batch",
        "group", "instance", "dyt", "custom") is each record's ``norm``, its ``weight`` and
        ``bias`` name the γ and β that are tracked.
    """
    from .. import nn as nk

    out = []
    for name, m, info in _inventory.find(model):
        kind = "rms" if info.kind == "rms" else "ln"
        # DyT has no statistics of its own: its input rows are summarised.
        how = "sink" if isinstance(m, (nk.LayerNorm, nk.RMSNorm, nk.GroupNorm)) else info.rows
        out.append((name, m, kind, how, info.ndims, info))
    return out


def _affine(m: torch.nn.Module, info: _inventory.NormInfo):
    """("weight", γ) and ("bias", β) of a norm — the record's slot names, whatever attributes the
    module keeps them in (``normkit.register_norm(weight=..., bias=...)``); None when absent."""
    return [(slot, getattr(m, attr) if attr else None)
            for slot, attr in (("weight", info.weight), ("bias", info.bias))]


def _row_stats(x: torch.Tensor, kind: str, how: str, ndims: int):
    """(mean or None, variance or mean square) per row of a norm's input, float32/64."""
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if how == "last":
        n = math.prod(x.shape[x.dim() - ndims:]) if ndims else 1
        rows = x.reshape(-1, n)
    elif how == "group":
        raise AssertionError("group rows are built by the caller")
    else:  # channel: a row per channel over batch and spatial dims
        rows = x.movedim(1, 0).reshape(x.shape[1], -1) if x.dim() > 1 else x.reshape(1, -1)
    # vector_norm instead of var_mean: torch's CPU var_mean is ~15x slower on (1024, 256)
    # float32 (3.3 ms vs 0.2 ms); two passes keep the variance free of cancellation.
    n = rows.shape[1]
    if kind == "rms":
        return None, torch.linalg.vector_norm(rows, dim=1).square_().div_(n)
    mean = rows.mean(dim=1)
    var = torch.linalg.vector_norm(rows - mean.unsqueeze(1), dim=1).square_().div_(n)
    return mean, var
