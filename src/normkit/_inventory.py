"""Which modules are norms: the one inventory that convert, watch and audit share.

``describe(module)`` answers, for one module, what kind of norm it is (``NormInfo``) or None;
``find(model)`` lists a model's norms.  ``normkit.convert`` replaces the ones it can reproduce
exactly, ``normkit.watch`` takes their input statistics, ``normkit audit`` checks them — all
three see the same modules.  This module sits beside ``nn`` and imports nothing above it.

A module is a norm when it is, in this order:

* a normkit module (``nn.LayerNorm``, ``nn.RMSNorm`` and their fused variants, ``nn.DyT``);
  normkit's LN-LSTM (``nn.LayerNormLSTM``, ``nn.LayerNormLSTMCell``) is not, its norms are;
* a class declared with ``normkit.register_norm`` (the declaration wins over anything below);
* one of torch's norms (``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm*d``,
  ``InstanceNorm*d``, and subclasses);
* a Hugging Face norm recognised by behaviour, not name alone: the class name ends in
  "RMSNorm" or "LayerNorm" and the source of its forward (and the helpers it calls) is, up to
  comments, docstrings and type annotations, one of the sources below;
* a Dynamic Tanh class named ``DyT`` or ``DynamicTanh`` holding a Parameter ``alpha``;
* an unknown *look-alike*: its class name contains "Norm" (or "Normalization"), or its forward's
  source calls both ``rsqrt`` and ``mean`` — and it holds a scale tensor or an eps, and no norm
  among its children (a block named "...Norm" is not one).  Look-alikes get kind "rms" (when
  the name says RMS) or "custom", generic statistics over the last dim, and one warning per
  class and process naming ``normkit.register_norm``, which declares what they really are.
"""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import logging
import math
import numbers
import textwrap
from dataclasses import dataclass

import torch

from . import nn as nk
from .functional import CASTINGS

__all__ = ["KINDS", "NormInfo", "describe", "find", "register_norm"]

log = logging.getLogger(__name__)

# layer: mean and variance over trailing dims; rms: mean square over trailing dims; batch: per
# channel over batch and space; group: per sample and channel group; instance: per sample and
# channel over space; dyt: Dynamic Tanh (no statistics); custom: an unknown look-alike.
KINDS = ("layer", "rms", "batch", "group", "instance", "dyt", "custom")
# How ``watch`` forms the rows it takes statistics of, per kind ("last": the trailing ``ndims``
# dims form a row).
_ROWS = {"layer": "last", "rms": "last", "batch": "channel", "group": "group",
         "instance": "instance", "dyt": "last", "custom": "last"}


@dataclass(frozen=True)
class NormInfo:
    """What one norm module is.

    Attributes:
        kind: one of ``KINDS``.
        eps: the epsilon as stored (0.0 stays 0.0); None when there is none, or torch's
            ``RMSNorm(eps=None)`` (finfo(dtype).eps at run time).
        weight: attribute name of the scale γ, None without one.
        bias: attribute name of the shift β, None without one.
        rows: how statistics are taken — "last" (the trailing ``ndims`` dims form a row),
            "instance" (InstanceNorm: a row per sample and channel over the ``ndims`` spatial
            dims), "channel" (BatchNorm: a row per channel over batch and space) or "group"
            (GroupNorm: a row per sample and group).
        ndims: the dims a "last" or "instance" row spans (0 for "channel" and "group").
        family: "normkit", "torch", the Hugging Face pattern ("llama", "gpt-oss", "gemma",
            "t5"), "registered" or "dyt"; None for a look-alike.
        casting: the normkit casting mode (``normkit.CASTINGS``) that reproduces the module's
            cast order — "llama" and "t5" normalise in fp32 — or None when unknown.
        zero_centered_gamma: γ is stored zero-centred and the output uses 1 + γ (Gemma).
    """

    kind: str
    eps: float | None
    weight: str | None
    bias: str | None
    rows: str
    ndims: int
    family: str | None
    casting: str | None = None
    zero_centered_gamma: bool = False


# ----------------------------------------------------------------------------------------------
# Hugging Face norms, by the source of their forward
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HFPattern:
    """A Hugging Face norm implementation and the normkit options that reproduce it exactly."""

    name: str
    source: str  # the methods, as Hugging Face writes them (checked against transformers 5.23)
    eps_attr: str
    casting: str
    zero_centered_gamma: bool = False


_HF_PATTERNS = (
    # normalize in fp32, cast to the input dtype, *then* multiply: output promote(x, γ) dtype.
    _HFPattern("llama", """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)
""", "variance_epsilon", "llama"),
    # multiply in fp32 (γ of any float dtype promotes to fp32), one cast at the end: "torch".
    _HFPattern("gpt-oss", """
def forward(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return (self.weight * hidden_states).to(input_dtype)
""", "variance_epsilon", "torch"),
    # zero-centred γ, (1 + γ) in fp32, one cast at the end.
    _HFPattern("gemma", """
def _norm(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

def forward(self, x):
    output = self._norm(x.float())
    output = output * (1.0 + self.weight.float())
    return output.type_as(x)
""", "eps", "gemma", zero_centered_gamma=True),
    # x * rstd promotes to fp32; cast to γ's dtype only when γ is 16-bit.
    _HFPattern("t5", """
def forward(self, hidden_states):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    if self.weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(self.weight.dtype)
    return self.weight * hidden_states
""", "variance_epsilon", "t5"),
)


def _normalized(fn: ast.FunctionDef) -> str:
    """``ast.dump`` of a function without its docstring and type annotations (comments and
    formatting are already gone in the AST); decorators are kept, since they change behaviour."""
    fn = copy.deepcopy(fn)
    fn.returns = None
    args = fn.args
    for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg):
        if a is not None:
            a.annotation = None
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    fn.body = body or [ast.Pass()]
    return ast.dump(fn)


@functools.cache
def _pattern_methods(pattern: _HFPattern) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(pattern.source))
    return {fn.name: _normalized(fn) for fn in tree.body if isinstance(fn, ast.FunctionDef)}


@functools.lru_cache(maxsize=1024)
def _source(fn) -> str | None:
    """The dedented source of a function, or None when it cannot be read.

    Cached per function object, so a class whose method is later replaced is looked at anew."""
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=1024)
def _method_ast(fn) -> str | None:
    """Normalized AST of a function, or None when its source cannot be read or parsed."""
    src = _source(fn)
    try:
        tree = ast.parse(src) if src is not None else None
    except SyntaxError:
        return None
    node = tree.body[0] if tree is not None and tree.body else None
    return _normalized(node) if isinstance(node, ast.FunctionDef) else None


def _hf_pattern_of(cls: type) -> _HFPattern | None:
    """The pattern whose methods ``cls`` has, source for source; None if none matches."""
    for pattern in _HF_PATTERNS:
        want = _pattern_methods(pattern)
        if all(
            inspect.isfunction(fn := getattr(cls, name, None)) and _method_ast(fn) == dump
            for name, dump in want.items()
        ):
            return pattern
    return None


# ----------------------------------------------------------------------------------------------
# Users' own norms
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Registration:
    kind: str
    eps: str | float | None
    weight: str | None
    bias: str | None
    ndims: int
    casting: str | None
    zero_centered_gamma: bool


_REGISTERED: dict[type, _Registration] = {}


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def register_norm(
    cls: type,
    *,
    kind: str,
    eps: str | float | None = "eps",
    weight: str | None = "weight",
    bias: str | None = None,
    ndims: int = 1,
    casting: str | None = None,
    zero_centered_gamma: bool = False,
) -> type:
    """Declare a norm class of your own, so convert, watch and audit treat it as one.

    Registering a class again replaces its declaration; subclasses are covered too.

    Args:
        cls: the ``torch.nn.Module`` subclass.
        kind: what it computes — "layer", "rms", "batch", "group", "instance" or "dyt".
        eps: the name of the attribute holding its epsilon, the epsilon itself, or None.
        weight: the attribute name of its scale γ, or None.
        bias: the attribute name of its shift β, or None.
        ndims: how many trailing dims a row spans ("layer", "rms", "dyt"; "instance": the
            spatial dims).
        casting: the normkit casting mode (one of ``normkit.CASTINGS``) that reproduces the
            class's forward exactly.  Only then does ``normkit.convert`` replace it (kinds
            "layer" and "rms", with ``weight="weight"`` and ``bias`` None or "bias", so the
            state_dict keys stay the same); None leaves it unconverted.
        zero_centered_gamma: the output uses 1 + γ (γ stored zero-centred, as in Gemma).

    Returns:
        ``cls``, so it can be used as a decorator: ``@functools.partial(register_norm, ...)``.

    Raises:
        TypeError, ValueError: an argument is not what is described above (the message names it).
    """
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise TypeError(f"cls must be a torch.nn.Module subclass, got {cls!r}")
    kinds = tuple(k for k in KINDS if k != "custom")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    if not (eps is None or isinstance(eps, str)
            or (_is_real(eps) and math.isfinite(eps) and eps >= 0)):
        raise ValueError(f"eps must be an attribute name, a finite number >= 0 or None, "
                         f"got {eps!r}")
    for arg, value in (("weight", weight), ("bias", bias)):
        if not (value is None or (isinstance(value, str) and value.isidentifier())):
            raise ValueError(f"{arg} must be an attribute name or None, got {value!r}")
    if isinstance(ndims, bool) or not isinstance(ndims, int) or ndims < 1:
        raise ValueError(f"ndims must be an int >= 1, got {ndims!r}")
    if casting is not None:
        if casting not in CASTINGS:
            raise ValueError(f"casting must be one of {CASTINGS} or None, got {casting!r}")
        if kind not in ("layer", "rms") or weight != "weight" or bias not in (None, "bias"):
            raise ValueError("casting (convertible) needs kind 'layer' or 'rms', "
                             f"weight='weight' and bias None or 'bias'; got kind={kind!r}, "
                             f"weight={weight!r}, bias={bias!r}")
    if not isinstance(zero_centered_gamma, bool):
        raise TypeError(f"zero_centered_gamma must be a bool, got {zero_centered_gamma!r}")
    _REGISTERED[cls] = _Registration(kind, eps, weight, bias, ndims, casting,
                                     zero_centered_gamma)
    return cls


def _registration(cls: type) -> _Registration | None:
    for c in cls.__mro__:
        reg = _REGISTERED.get(c)
        if reg is not None:
            return reg
    return None


# ----------------------------------------------------------------------------------------------
# Describing one module
# ----------------------------------------------------------------------------------------------

# Attribute names under which norm implementations keep eps (torch, HF, Keras-style ports).
EPS_ATTRS = ("eps", "variance_epsilon", "epsilon")
GAMMA_ATTRS = ("weight", "gamma", "scale", "g")
BETA_ATTRS = ("bias", "beta", "b")


def eps_of(module: torch.nn.Module, attrs: tuple[str, ...] = EPS_ATTRS) -> float | None:
    """The module's eps, read as is — 0.0 stays 0.0 (never ``eps or default``)."""
    for attr in attrs:
        v = vars(module).get(attr, getattr(type(module), attr, None))
        if _is_real(v):
            return float(v)
    return None


def _tensor_attr(module: torch.nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), torch.Tensor)), None)


def _affine(module: torch.nn.Module) -> tuple[str | None, str | None]:
    return _tensor_attr(module, ("weight",)), _tensor_attr(module, ("bias",))


_TORCH = (
    (torch.nn.LayerNorm, "layer"),
    (torch.nn.RMSNorm, "rms"),
    (torch.nn.GroupNorm, "group"),
    (torch.nn.modules.batchnorm._BatchNorm, "batch"),
    (torch.nn.modules.instancenorm._InstanceNorm, "instance"),
)


@functools.lru_cache(maxsize=1024)
def _looks_like_norm(cls: type) -> bool:
    """The cheap guess behind look-alikes: a norm-like class name, or a forward whose source
    calls both rsqrt and mean (read once per forward function)."""
    if "Norm" in cls.__name__:  # also "...Normalization"
        return True
    src = _source(getattr(cls, "forward", None)) or ""
    return "rsqrt(" in src and "mean(" in src


def _ndims(module: torch.nn.Module) -> int:
    shape = getattr(module, "normalized_shape", None)
    return len(shape) if isinstance(shape, (tuple, list)) else 1


def _classify(module: torch.nn.Module) -> NormInfo | None:
    cls = type(module)
    if isinstance(module, (nk.LayerNorm, nk.RMSNorm)):
        kind = "rms" if isinstance(module, nk.RMSNorm) else "layer"
        return NormInfo(kind, module.eps, *_affine(module), "last", _ndims(module), "normkit",
                        module.casting, bool(module.zero_centered_gamma))
    if isinstance(module, nk.GroupNorm):
        return NormInfo("group", module.eps, *_affine(module), "group", 0, "normkit", "torch")
    if isinstance(module, nk.DyT):
        return NormInfo("dyt", None, *_affine(module), "last", _ndims(module), "normkit")
    if isinstance(module, (nk.LayerNormLSTMCell, nk.LayerNormLSTM)):
        return None  # named "...Norm..." with an eps, but their norms are their submodules
    reg = _registration(cls)
    if reg is not None:
        if isinstance(reg.eps, str):
            eps = eps_of(module, (reg.eps,))
        else:
            eps = None if reg.eps is None else float(reg.eps)
        weight = reg.weight if reg.weight and _tensor_attr(module, (reg.weight,)) else None
        bias = reg.bias if reg.bias and _tensor_attr(module, (reg.bias,)) else None
        rows = _ROWS[reg.kind]
        ndims = reg.ndims if rows in ("last", "instance") else 0
        return NormInfo(reg.kind, eps, weight, bias, rows, ndims, "registered", reg.casting,
                        reg.zero_centered_gamma)
    for base, kind in _TORCH:
        if isinstance(module, base):
            if kind == "instance":  # the dims after (batch,) channel: 2 for InstanceNorm2d
                ndims = module._get_no_batch_dim() - 1
            else:
                ndims = _ndims(module) if _ROWS[kind] == "last" else 0
            return NormInfo(kind, eps_of(module, ("eps",)), *_affine(module), _ROWS[kind], ndims,
                            "torch", "torch")
    name = cls.__name__
    if name.endswith(("RMSNorm", "LayerNorm")) and (pattern := _hf_pattern_of(cls)) is not None:
        return NormInfo("rms", eps_of(module, (pattern.eps_attr,)), "weight", None, "last", 1,
                        pattern.name, pattern.casting, pattern.zero_centered_gamma)
    if name in ("DyT", "DynamicTanh") and isinstance(getattr(module, "alpha", None),
                                                      torch.nn.Parameter):
        return NormInfo("dyt", None, *_affine(module), "last", _ndims(module), "dyt")
    if not _looks_like_norm(cls):
        return None
    weight, eps = _tensor_attr(module, GAMMA_ATTRS), eps_of(module)
    if weight is None and eps is None:
        return None
    # A container named "...Norm" that holds another norm (e.g. a block) is not itself one.
    if any(_classify(c) is not None for c in module.children()):
        return None
    kind = "rms" if "rms" in name.lower() else "custom"
    return NormInfo(kind, eps, weight, _tensor_attr(module, BETA_ATTRS), "last", 1, None)


_warned: set[type] = set()


def describe(module: torch.nn.Module) -> NormInfo | None:
    """What norm ``module`` is, or None when it is none (see the module docstring).

    A look-alike (``family`` None) is logged as a warning once per class and process."""
    info = _classify(module)
    if info is not None and info.family is None and type(module) not in _warned:
        _warned.add(type(module))
        cls = type(module)
        log.warning("%s.%s looks like a norm but normkit does not know it: watch and audit "
                    "treat it as kind %r with statistics over the last dim, convert leaves it "
                    "alone; declare what it is with normkit.register_norm(%s, kind=...)",
                    cls.__module__, cls.__qualname__, info.kind, cls.__name__)
    return info


def find(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, NormInfo]]:
    """(qualified name, module, info) for every norm of ``model``, in module order (a module
    shared by two parents once, under its first name)."""
    out = []
    for name, m in model.named_modules():  # named_modules yields a shared module once
        info = describe(m)
        if info is not None:
            out.append((name, m, info))
    return out
