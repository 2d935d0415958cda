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
| a class registered with ``casting=``            | per ``kind``     | as given | as given |

Which modules are norms, and of which kind, is ``normkit._inventory``'s answer (the same one
watch and audit use).  Hugging Face classes are recognised there by behaviour, not by name alone
(the source of their forward).  Convert additionally needs the module to hold exactly one 1-D
``weight`` Parameter (no bias, buffers or children) and a real epsilon.  Anything else that
looks like a norm is left alone and logged at debug level — a norm converted with the wrong cast
order would silently change a model's outputs.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import numbers
from collections.abc import Callable

import torch

from ._inventory import NormInfo, describe
from .nn import LayerNorm, RMSNorm

__all__ = ["convert", "revert"]

log = logging.getLogger(__name__)

# The module a converted one replaced lives in the converted module's __dict__ under this name:
# set with object.__setattr__, so it is not registered as a submodule and the state_dict, .to()
# and named_modules() never see it; copy.deepcopy carries it along (sharing the parameters).
_ORIGINAL = "_normkit_original"

Filter = Callable[[torch.nn.Module, str], bool]


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
    else (None, why not) — the reason is empty for modules that are no norm (``_inventory``)
    or one no normkit module computes (BatchNorm, GroupNorm, InstanceNorm, DyT)."""
    if isinstance(module, (LayerNorm, RMSNorm)):
        return None, ""  # already converted
    info = describe(module)
    if info is None or info.kind not in ("layer", "rms"):
        return None, ""
    cls = type(module)
    if isinstance(module, torch.nn.LayerNorm) and info.family == "torch":
        if cls.forward is not torch.nn.LayerNorm.forward:
            return None, "it subclasses torch.nn.LayerNorm but overrides forward"
        if why := _not_plain_leaf(module, {"weight", "bias"}):
            return None, why
        if not _valid_eps(module.eps):
            return None, f"eps={module.eps!r}"
        return functools.partial(_from_torch_layer_norm, module), ""
    if isinstance(module, torch.nn.RMSNorm) and info.family == "torch":
        if cls.forward is not torch.nn.RMSNorm.forward:
            return None, "it subclasses torch.nn.RMSNorm but overrides forward"
        if why := _not_plain_leaf(module, {"weight"}):
            return None, why
        if not _valid_eps(module.eps, allow_none=True):
            return None, f"eps={module.eps!r}"
        return functools.partial(_from_torch_rms_norm, module), ""
    if info.casting is None:  # a look-alike, or registered without a casting
        return None, ("its forward matches no known norm implementation (declare one with "
                      "normkit.register_norm(..., casting=...))")
    what = "registered" if info.family == "registered" else f"{info.family}-style forward"
    params = {"weight"}
    if info.kind == "layer" and "bias" in module._parameters:
        params.add("bias")
    if why := _not_plain_leaf(module, params):
        return None, f"{what}, but {why}"
    weight = module._parameters["weight"]
    if not (isinstance(weight, torch.nn.Parameter) and weight.dim() == info.ndims):
        return None, f"{what}, but weight is not a {info.ndims}-D Parameter"
    if not _valid_eps(info.eps):
        return None, f"{what}, but eps={info.eps!r}"
    return functools.partial(_from_info, module, info), ""


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


def _from_info(old: torch.nn.Module, info: NormInfo) -> LayerNorm | RMSNorm:
    """A Hugging Face or registered norm: the inventory knows its eps (taken as is — 0.0
    stays 0.0), casting order and 1+γ."""
    shape = tuple(old.weight.shape)
    if info.kind == "rms":
        new = RMSNorm(shape, info.eps, elementwise_affine=True, device="meta")
        new.weight = old.weight
    else:
        bias = old._parameters.get("bias")
        new = LayerNorm(shape, info.eps, elementwise_affine=True, bias=bias is not None,
                        device="meta")
        new.weight, new.bias = old.weight, bias
    if info.casting != new.casting:
        new.casting = info.casting
    if info.zero_centered_gamma:
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
