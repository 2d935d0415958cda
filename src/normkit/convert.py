"""Model conversion: swap torch and Hugging Face norms for normkit modules, and back.

``convert(model)`` walks the module tree post-order and replaces every norm it can reproduce
*exactly* with a ``normkit.nn`` module that holds the very same Parameter objects (nothing is
copied or re-initialised), so optimizers, tied weights and state_dict keys are untouched.
``revert(model)`` puts the original module objects back.

What is converted, and how each keeps its semantics:

| module                                          | becomes          | casting  | 1+γ |
| ----------------------------------------------- | ---------------- | -------- | --- |
| ``torch.nn.LayerNorm`` (BERT, GPT-2, ...)       | ``nn.LayerNorm`` | "torch"  | no  |
| ``torch.nn.RMSNorm``                            | ``nn.RMSNorm``   | "torch"  | no  |
| Llama / Qwen2 / Mistral RMSNorm (and copies)    | ``nn.RMSNorm``   | "llama"  | no  |
| GPT-OSS-style RMSNorm: ``(w * n).to(in_dtype)`` | ``nn.RMSNorm``   | "torch"  | no  |
| Gemma / Gemma2 / Gemma3 RMSNorm (and copies)    | ``nn.RMSNorm``   | "gemma"  | yes |
| T5 LayerNorm (RMS, no mean; and copies)         | ``nn.RMSNorm``   | "t5"     | no  |

Hugging Face classes are recognised by behaviour, not by name alone: the class name ends in
"RMSNorm" or "LayerNorm", the module holds exactly one 1-D ``weight`` Parameter (no bias, buffers
or children), its epsilon attribute is a real number, and the source of its ``forward`` (and of
the helpers it calls) is, up to comments, docstrings and type annotations, one of the sources
below.  Anything else that looks like a norm is left alone and logged at debug level — a norm
converted with the wrong cast order would silently change a model's outputs.
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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .nn import LayerNorm, RMSNorm

__all__ = ["convert", "revert"]

log = logging.getLogger(__name__)

# The module a converted one replaced lives in the converted module's __dict__ under this name:
# set with object.__setattr__, so it is not registered as a submodule and the state_dict, .to()
# and named_modules() never see it; copy.deepcopy carries it along (sharing the parameters).
_ORIGINAL = "_normkit_original"

Filter = Callable[[torch.nn.Module, str], bool]


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
def _method_ast(fn) -> str | None:
    """Normalized AST of a function, or None when its source cannot be read or parsed.

    Cached per function object, so a class whose method is later replaced is looked at anew."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
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
# Deciding what a module becomes
# ----------------------------------------------------------------------------------------------


def _valid_eps(eps, allow_none: bool = False) -> bool:
    if eps is None:
        return allow_none
    return (
        isinstance(eps, numbers.Real)
        and not isinstance(eps, bool)
        and math.isfinite(eps)
        and eps >= 0
    )


def _not_plain_leaf(module: torch.nn.Module, params: set[str]) -> str:
    """Why ``module`` is not a leaf holding exactly the parameter slots ``params`` and nothing
    else, with its class's forward; "" if it is."""
    if set(module._parameters) != params:
        return f"parameters {sorted(module._parameters)}, expected {sorted(params)}"
    if module._buffers or module._modules:
        return "it has buffers or submodules"
    if "forward" in vars(module):  # e.g. accelerate's hooks wrap forward per instance
        return "its forward is replaced on the instance"
    return ""


def _plan(module: torch.nn.Module) -> tuple[Callable[[], torch.nn.Module] | None, str]:
    """(a builder of the replacement, "") if ``module`` is a norm convert reproduces exactly,
    else (None, why not) — the reason is empty for modules that do not even look like norms."""
    cls = type(module)
    if isinstance(module, (LayerNorm, RMSNorm)):
        return None, ""  # already converted
    if isinstance(module, torch.nn.LayerNorm):
        if cls.forward is not torch.nn.LayerNorm.forward:
            return None, "it subclasses torch.nn.LayerNorm but overrides forward"
        if why := _not_plain_leaf(module, {"weight", "bias"}):
            return None, why
        if not _valid_eps(module.eps):
            return None, f"eps={module.eps!r}"
        return functools.partial(_from_torch_layer_norm, module), ""
    if isinstance(module, torch.nn.RMSNorm):
        if cls.forward is not torch.nn.RMSNorm.forward:
            return None, "it subclasses torch.nn.RMSNorm but overrides forward"
        if why := _not_plain_leaf(module, {"weight"}):
            return None, why
        if not _valid_eps(module.eps, allow_none=True):
            return None, f"eps={module.eps!r}"
        return functools.partial(_from_torch_rms_norm, module), ""
    if not cls.__name__.endswith(("RMSNorm", "LayerNorm")):
        return None, ""
    pattern = _hf_pattern_of(cls)
    if pattern is None:
        return None, "its forward matches no known Hugging Face norm implementation"
    if why := _not_plain_leaf(module, {"weight"}):
        return None, f"{pattern.name}-style forward, but {why}"
    weight = module._parameters["weight"]
    if not (isinstance(weight, torch.nn.Parameter) and weight.dim() == 1):
        return None, f"{pattern.name}-style forward, but weight is not a 1-D Parameter"
    eps = vars(module).get(pattern.eps_attr)
    if not _valid_eps(eps):
        return None, f"{pattern.name}-style forward, but {pattern.eps_attr}={eps!r}"
    return functools.partial(_from_hf, module, pattern), ""


def _finish(new: torch.nn.Module, old: torch.nn.Module) -> torch.nn.Module:
    """Carry over what model code may read from ``old`` and remember it for ``revert``."""
    new.training = old.training
    for key, value in vars(old).items():
        # Attributes the new module lacks, e.g. HF's ``variance_epsilon`` and
        # ``_is_hf_initialized`` (which keeps HF's init_weights off the reused γ).  torch's own
        # bookkeeping (_parameters, hooks, ...) is already in vars(new), and a Module or
        # Parameter value would be registered by setattr and change the state_dict.
        if key in vars(new) or isinstance(value, (torch.nn.Module, torch.nn.Parameter)):
            continue
        setattr(new, key, value)
    if any((old._forward_pre_hooks, old._forward_hooks, old._backward_hooks,
            old._backward_pre_hooks)):
        log.warning("hooks registered on %s are not carried over to its normkit replacement",
                    type(old).__name__)
    object.__setattr__(new, _ORIGINAL, old)
    return new


def _from_torch_layer_norm(old: torch.nn.LayerNorm) -> LayerNorm:
    # Built on the meta device, so no memory is allocated for parameters that are then replaced.
    new = LayerNorm(old.normalized_shape, old.eps, old.elementwise_affine,
                        bias=old.bias is not None, device="meta")
    new.weight, new.bias = old.weight, old.bias
    return _finish(new, old)


def _from_torch_rms_norm(old: torch.nn.RMSNorm) -> RMSNorm:
    new = RMSNorm(old.normalized_shape, old.eps, old.elementwise_affine, device="meta")
    new.weight = old.weight
    return _finish(new, old)


def _from_hf(old: torch.nn.Module, pattern: _HFPattern) -> RMSNorm:
    # The eps is taken as is — 0.0 stays 0.0 (never ``eps or default``).
    eps = float(vars(old)[pattern.eps_attr])
    new = RMSNorm(tuple(old.weight.shape), eps, elementwise_affine=True, device="meta")
    new.weight = old.weight
    if pattern.casting != RMSNorm.casting:
        new.casting = pattern.casting
    if pattern.zero_centered_gamma:
        new.zero_centered_gamma = True
    return _finish(new, old)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _swap(module: torch.nn.Module, fn, prefix: str, memo: dict) -> torch.nn.Module:
    """Post-order walk: children first, then ``fn(module, qualified_name)`` for the module.

    ``memo`` maps id(original) → result, so a module shared by two parents is replaced by one
    shared module."""
    if id(module) in memo:
        return memo[id(module)]
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _swap(child, fn, f"{prefix}.{name}" if prefix else name, memo)
        if new is not child:
            setattr(module, name, new)
    result = fn(module, prefix)
    memo[id(module)] = result
    return result


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def convert(
    model: torch.nn.Module, *, filter: Filter | None = None, inplace: bool = True
) -> torch.nn.Module:
    """Replace the norms of ``model`` with normkit modules that compute exactly the same thing.

    Converted: ``torch.nn.LayerNorm`` and ``torch.nn.RMSNorm`` (and subclasses that keep their
    forward), and the Hugging Face RMSNorm variants of Llama/Qwen2/Mistral, Gemma/Gemma2/Gemma3
    and T5 (see the module docstring).  Each replacement keeps the original's eps exactly, its
    casting order and output dtype, its plain attributes (e.g. ``variance_epsilon``), its
    training flag and the same Parameter objects — so state_dict keys and optimizer state are
    unchanged.  Modules that merely look like norms are left alone (logged at debug level).
    Hooks registered on a replaced module are not carried over (logged as a warning).

    Args:
        model: the root module; it may itself be a norm.
        filter: ``filter(module, qualified_name) -> bool``, called for each module that would be
            converted ("" names the root); only those for which it returns True are replaced.
        inplace: modify ``model`` (default), or convert a ``copy.deepcopy`` of it.

    Returns:
        The converted root — a new object when ``model`` itself was a norm, else ``model``
        (or its copy).  Undo with ``normkit.revert``.
    """
    _check_model(model)
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be callable or None, got {type(filter).__name__}")
    if not inplace:
        model = copy.deepcopy(model)

    def fn(module: torch.nn.Module, name: str) -> torch.nn.Module:
        build, why = _plan(module)
        if build is None:
            if why:
                log.debug("normkit.convert leaves %r (%s) alone: %s",
                          name, type(module).__name__, why)
            return module
        if filter is not None and not filter(module, name):
            return module
        return build()

    return _swap(model, fn, "", {})


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Put back the original module objects that ``convert`` replaced.

    The originals get the converted modules' current parameters (the same objects, unless they
    were replaced in the meantime, e.g. by ``load_state_dict(assign=True)``) and training flag,
    so reverting never loses training progress.

    Args:
        model: a model (or a single norm) returned by ``normkit.convert``.

    Returns:
        The reverted root — the original object when ``model`` itself was a converted norm.
    """
    _check_model(model)

    def fn(module: torch.nn.Module, name: str) -> torch.nn.Module:
        original = vars(module).get(_ORIGINAL)
        if original is None:
            return module
        for pname, param in module._parameters.items():
            if pname in original._parameters and original._parameters[pname] is not param:
                setattr(original, pname, param)
        original.training = module.training
        return original

    return _swap(model, fn, "", {})
