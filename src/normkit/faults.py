"""Fault injection for game days: break a live model's norms on purpose, and undo it exactly.

Each function is a context manager.  On entry it changes the model in place (a weight value, a
hook, an attribute); on exit — also when the body raises — it puts back every bit it changed
and removes every hook it added, so a serving model can be rehearsed on and go on serving::

    from normkit import faults
    with faults.nonfinite(model, "blocks.1.ln1", where="weight", value=float("inf"), index=0):
        model(x)            # the NaN page fires, naming blocks.1.ln1
    with faults.eps(model, 1e-2):            # every norm's eps, changed at run time
        ...
    with faults.scale_inputs(model, 3.0):    # a distribution shift: the inputs times 3
        ...

Layers are named by their qualified module name (``model.get_submodule(name)``); a name that
is not there, or names a module that is not a norm (``normkit._inventory.describe``), is a
ValueError listing the model's norms.  The faults are those the runbooks rehearse: NaN/Inf in
a layer's weight or output, a layer run in a lower precision (float16 overflows above 65504),
a changed eps, and γ/β dropped or zeroed (what a bad export or checkpoint conversion does).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch

from ._inventory import EPS_ATTRS, NormInfo, describe, find

__all__ = ["nonfinite", "precision", "eps", "affine", "scale_inputs"]


def _norm(model: torch.nn.Module, layer: str, fault: str) -> tuple[torch.nn.Module, NormInfo]:
    """The norm module ``layer`` of ``model`` and what it is, or a ValueError naming the
    fault, the layer and the norms there are."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"faults.{fault}: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        module = None
    info = describe(module) if module is not None else None
    if info is None:
        norms = ", ".join(n or "<root>" for n, _, _ in find(model)) or "none"
        what = "no module" if module is None else f"a {type(module).__name__}, not a norm, as"
        raise ValueError(f"faults.{fault}: the model has {what} {layer!r} (its norms: {norms})")
    return module, info


@contextlib.contextmanager
def _restoring(*tensors: torch.Tensor) -> Iterator[None]:
    """Copies ``tensors`` on entry and writes the copies back on exit (bit for bit: a copy_
    of the same dtype moves bits, it does not round)."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved, strict=True):
                t.copy_(s)


@contextlib.contextmanager
def nonfinite(model: torch.nn.Module, layer: str, *, where: str = "weight",
              value: float = float("nan"), index: int = 0) -> Iterator[None]:
    """Puts ``value`` (NaN or ±Inf) into one element of a norm layer's γ, β or output.

    Args:
        model: the model (changed in place, restored on exit).
        layer: qualified name of a norm module in ``model``.
        where: "weight" (γ), "bias" (β) — one stored element — or "output": the element at
            flat ``index`` of every output the layer returns while the block runs.
        value: a non-finite float.
        index: the flat index of the element.
    """
    module, info = _norm(model, layer, "nonfinite")
    if where not in ("weight", "bias", "output"):
        raise ValueError(f"faults.nonfinite: where must be 'weight', 'bias' or 'output', got "
                         f"{where!r}")
    if not (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"faults.nonfinite: value must be NaN or ±Inf, got {value!r}")
    if where == "output":
        def poison(_module, _args, out):
            y = out[0] if isinstance(out, tuple) else out  # fused norms return (y, h)
            if not 0 <= index < y.numel():
                raise IndexError(f"faults.nonfinite: index {index} is outside {layer}'s output "
                                 f"of {y.numel()} elements")
            y = y.clone()
            y.view(-1)[index] = value
            return (y, *out[1:]) if isinstance(out, tuple) else y

        handle = module.register_forward_hook(poison)
        try:
            yield
        finally:
            handle.remove()
        return
    attr = info.weight if where == "weight" else info.bias
    if attr is None:
        raise ValueError(f"faults.nonfinite: {layer} has no {where}")
    t = getattr(module, attr)
    if not 0 <= index < t.numel():
        raise ValueError(f"faults.nonfinite: index {index} is outside {layer}.{attr} of "
                         f"{t.numel()} elements")
    with _restoring(t):
        with torch.no_grad():
            t.view(-1)[index] = value
        yield


@contextlib.contextmanager
def precision(model: torch.nn.Module, layer: str, *,
              dtype: torch.dtype = torch.float16) -> Iterator[None]:
    """Runs one norm layer in ``dtype``: its input and parameters are cast to ``dtype`` for
    the call (an input above float16's 65504 becomes Inf, as a layer exported or autocast to
    half would see it), and its output cast back to the input's dtype.

    Args:
        model: the model; the layer's forward is wrapped for the block, its parameters swapped
            for the call only.
        layer: qualified name of a norm module in ``model``.
        dtype: a floating dtype (default float16).
    """
    module, _ = _norm(model, layer, "precision")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"faults.precision: dtype must be a floating torch.dtype, got {dtype!r}")
    params = list(module.parameters(recurse=False))
    originals = [p.data for p in params]
    input_dtype: list[torch.dtype] = []

    def to_low(_module, args):
        first, *rest = args
        input_dtype[:] = [first.dtype]
        for p in params:  # a half copy for this call; the parameter's own tensor is kept
            p.data = p.data.to(dtype)
        return (first.to(dtype), *rest)

    def back(_module, _args, out):
        for p, d in zip(params, originals, strict=True):
            p.data = d
        if isinstance(out, tuple):  # fused norms return (y, h)
            return tuple(o.to(input_dtype[0]) if torch.is_tensor(o) else o for o in out)
        return out.to(input_dtype[0])

    handles = [module.register_forward_pre_hook(to_low), module.register_forward_hook(back)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        # a forward that raised after the pre-hook left the half copies in place
        for p, d in zip(params, originals, strict=True):
            p.data = d


@contextlib.contextmanager
def eps(model: torch.nn.Module, value: float, *,
        layers: Iterable[str] | None = None) -> Iterator[None]:
    """Sets the eps of norm layers to ``value`` (e.g. 1e-5 → 1e-2: a config typo or a port
    from a framework with another default).

    Args:
        model: the model (its modules' eps attributes changed, restored on exit).
        value: the eps, a finite number >= 0.
        layers: qualified names of norm modules; None: every norm that has an eps.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ValueError(f"faults.eps: value must be a finite number >= 0, got {value!r}")
    if layers is None:
        targets = [(n, m) for n, m, _ in find(model)]  # those without an eps are skipped
    else:
        if isinstance(layers, str):
            raise TypeError("faults.eps: layers must be a list of layer names, not one string")
        targets = [(n, _norm(model, n, "eps")[0]) for n in layers]
    changed = []
    for name, m in targets:
        attr = next((a for a in EPS_ATTRS if a in vars(m)), None)
        if attr is None:
            if layers is not None:
                raise ValueError(f"faults.eps: {name} has no eps attribute "
                                 f"({', '.join(EPS_ATTRS)})")
            continue
        changed.append((m, attr, vars(m)[attr]))
    try:
        for m, attr, _ in changed:
            setattr(m, attr, float(value))
        yield
    finally:
        for m, attr, old in changed:
            setattr(m, attr, old)


@contextlib.contextmanager
def affine(model: torch.nn.Module, layer: str, *, mode: str = "drop") -> Iterator[None]:
    """γ/β of one norm layer as a bad export leaves them.

    Args:
        model: the model (the layer's γ/β values changed, restored bit for bit on exit).
        layer: qualified name of a norm module in ``model``.
        mode: "drop": γ/β lost, so the layer runs with the defaults an exporter or loader falls
            back to (γ = 1, β = 0 — a stored 0 for a zero-centred γ, which means 1);
            "zero": γ/β zeroed (the layer's output is β = 0 everywhere).
    """
    module, info = _norm(model, layer, "affine")
    if mode not in ("drop", "zero"):
        raise ValueError(f"faults.affine: mode must be 'drop' or 'zero', got {mode!r}")
    if info.weight is None and info.bias is None:
        raise ValueError(f"faults.affine: {layer} has no γ or β")
    gamma = getattr(module, info.weight) if info.weight else None
    beta = getattr(module, info.bias) if info.bias else None
    with _restoring(*(t for t in (gamma, beta) if t is not None)):
        with torch.no_grad():
            if gamma is not None:
                one = 0.0 if info.zero_centered_gamma else 1.0  # the stored value meaning γ = 1
                gamma.fill_(one if mode == "drop" else one - 1.0)
            if beta is not None:
                beta.zero_()
        yield


@contextlib.contextmanager
def scale_inputs(model: torch.nn.Module, factor: float) -> Iterator[None]:
    """Multiplies the model's inputs by ``factor`` (a distribution shift: a client that stops
    normalizing its features, a unit change).

    Floating-point tensors passed to the model's forward are scaled.  A model fed token ids has
    no floating input to scale: in a call where none is, the outputs of its ``nn.Embedding``
    modules (the ids' vectors, the first floats the model sees) are scaled instead.

    Args:
        model: the model (hooks added, removed on exit).
        factor: a finite number.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(
            factor):
        raise ValueError(f"faults.scale_inputs: factor must be a finite number, got {factor!r}")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"faults.scale_inputs: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    scaled_inputs = [False]

    def scale(v):
        if torch.is_tensor(v) and v.is_floating_point():
            scaled_inputs[0] = True
            return v * factor
        return v

    def scale_root(_module, args, kwargs):
        scaled_inputs[0] = False
        return tuple(scale(a) for a in args), {k: scale(v) for k, v in kwargs.items()}

    def scale_embedding(_module, _args, out):
        return out if scaled_inputs[0] else out * factor

    handles = [model.register_forward_pre_hook(scale_root, with_kwargs=True)]
    handles += [m.register_forward_hook(scale_embedding) for m in model.modules()
                if isinstance(m, torch.nn.Embedding)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
