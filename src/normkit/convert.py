"""Model conversion: swap torch and Hugging Face norms for normkit modules, and back.

``convert(model)`` walks the module tree post-order and replaces every norm it can reproduce
*exactly* with a ``normkit.nn`` module that holds the very same Parameter objects (nothing is
copied or re-initialised), so optimizers, tied weights and state_dict keys are untouched.
``revert(model)`` puts the original module objects back.  Every call logs one INFO line saying
what it replaced and what it left alone, and why; ``return_plan=True`` returns the same as a
``ConvertPlan``, and ``dry_run=True`` makes that plan without changing anything.

What is converted, and how each keeps its semantics:

| module                                          | becomes          | casting  | 1+γ |
| ----------------------------------------------- | ---------------- | -------- | --- |
| ``torch.nn.LayerNorm`` (BERT, GPT-2, ...)       | ``nn.LayerNorm`` | "torch"  | no  |
| ``torch.nn.RMSNorm``                            | ``nn.RMSNorm``   | "torch"  | no  |
| ``torch.nn.GroupNorm`` (U-Nets, vision models)  | ``nn.GroupNorm`` | "torch"  | no  |
| Llama / Qwen2 / Mistral RMSNorm (and copies)    | ``nn.RMSNorm``   | "llama"  | no  |
| GPT-OSS-style RMSNorm: ``(w * n).to(in_dtype)`` | ``nn.RMSNorm``   | "torch"  | no  |
| Gemma / Gemma2 / Gemma3 RMSNorm (and copies)    | ``nn.RMSNorm``   | "gemma"  | yes |
| T5 LayerNorm (RMS, no mean; and copies)         | ``nn.RMSNorm``   | "t5"     | no  |
| a class registered with ``casting=``            | per ``kind``     | as given | as given |

A Hugging Face BERT-style output block (``BertSelfOutput``, ``BertOutput`` and copies: dense →
dropout → ``LayerNorm(h + input_tensor)``, recognised by its forward's source) whose LayerNorm is
converted and whose dropout is a plain ``torch.nn.Dropout`` is also fused: its LayerNorm becomes a
``normkit.nn.FusedDropoutAddLayerNorm`` (same γ/β, the dropout's p), which does dropout,
residual add and norm in one pass.  In eval mode the block's output is bit for bit the unfused
conversion's; in training mode the dropout mask is drawn by normkit's generator, not torch's.

Which modules are norms, and of which kind, is ``normkit._inventory``'s answer (the same one
watch and audit use).  Hugging Face classes are recognised there by behaviour, not by name alone
(the source of their forward).  Convert additionally needs the module to hold exactly one 1-D
``weight`` Parameter (no bias, buffers or children) and a real epsilon.  Anything else that
looks like a norm is left alone, with the reason in the plan (and one debug line) — a norm
converted with the wrong cast order would silently change a model's outputs.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import logging
import math
import numbers
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._inventory import NormInfo, _method_ast, _normalized, describe
from .nn import FusedDropoutAddLayerNorm, GroupNorm, LayerNorm, RMSNorm

__all__ = ["convert", "revert", "ConvertPlan", "PlannedNorm"]

log = logging.getLogger(__name__)

# The module a converted one replaced lives in the converted module's __dict__ under this name:
# set with object.__setattr__, so it is not registered as a submodule and the state_dict, .to()
# and named_modules() never see it; copy.deepcopy carries it along (sharing the parameters).
_ORIGINAL = "_normkit_original"

Filter = Callable[[torch.nn.Module, str], bool]


# ----------------------------------------------------------------------------------------------
# The plan: what convert did (or, in a dry run, would do) to each norm
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedNorm:
    """One norm of the model, as ``convert`` saw it.

    Attributes:
        name: qualified module name ("" is the root).
        type_name: the class name of the module convert found there.
        kind: the inventory's kind ("layer", "rms", "batch", "group", "instance", "dyt",
            "custom").
        becomes: "LayerNorm", "RMSNorm" or "GroupNorm" (``normkit.nn``) when replaced, None
            when left alone.
        casting: the replacement's casting mode (None when left alone).
        zero_centered_gamma: the replacement multiplies by 1 + γ.
        reason: why it is left alone ("" when replaced).
        note: what changes besides the module, e.g. hooks that are not carried over ("" if
            nothing).
    """

    name: str
    type_name: str
    kind: str
    becomes: str | None
    casting: str | None = None
    zero_centered_gamma: bool = False
    reason: str = ""
    note: str = ""

    def outcome(self) -> str:
        """What became of it, in words: "→ normkit.nn.RMSNorm (casting='llama')" or
        "left alone: <reason>"."""
        if self.becomes is None:
            return f"left alone: {self.reason}"
        what = f"→ normkit.nn.{self.becomes} (casting={self.casting!r}"
        what += ", zero_centered_gamma=True)" if self.zero_centered_gamma else ")"
        return f"{what}; {self.note}" if self.note else what


@dataclass(frozen=True)
class ConvertPlan:
    """Every norm ``convert`` met, in the order it met them (post-order: children first; a
    module shared by two parents once, under its first name), and what became of each.

    ``str(plan)`` is ``summary()`` followed by one line per norm: its qualified name ("<root>"
    for the root), class and ``PlannedNorm.outcome()``.

    Attributes:
        norms: a ``PlannedNorm`` per norm (modules that are no norm are not listed).
        dry_run: nothing was changed; ``becomes`` says what convert would do.
    """

    norms: tuple[PlannedNorm, ...]
    dry_run: bool = False

    @property
    def replaced(self) -> tuple[PlannedNorm, ...]:
        return tuple(n for n in self.norms if n.becomes is not None)

    @property
    def skipped(self) -> tuple[PlannedNorm, ...]:
        return tuple(n for n in self.norms if n.becomes is None)

    def counts(self) -> dict[str, int]:
        """How many modules of each class were (or would be) replaced."""
        return dict(Counter(n.type_name for n in self.replaced))

    def summary(self) -> str:
        """One line: how many norms of each class were replaced, by what, and which were left
        alone and why — the line ``convert`` logs at INFO."""
        if not self.norms:
            return "found no norms"
        replaced = Counter((n.type_name, n.becomes) for n in self.replaced)
        line = (f"{'dry run: would replace' if self.dry_run else 'replaced'} "
                f"{len(self.replaced)} of {len(self.norms)} norms")
        if replaced:
            line += ": " + ", ".join(f"{k} {old} → normkit.nn.{new}"
                                     for (old, new), k in replaced.items())
        skipped = Counter((n.type_name, n.reason) for n in self.skipped)
        if skipped:
            line += "; left alone: " + ", ".join(f"{k} {cls} ({why})"
                                                 for (cls, why), k in skipped.items())
        return line

    def __str__(self) -> str:
        rows = [(n.name or "<root>", n.type_name, n.outcome()) for n in self.norms]
        w0, w1 = (max((len(r[i]) for r in rows), default=0) for i in (0, 1))
        return "\n".join([self.summary(),
                          *(f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)])


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


def _plan(module: torch.nn.Module) -> tuple[NormInfo | None, Callable[[], torch.nn.Module] | None,
                                          str]:
    """(info, a builder of the replacement, "") if ``module`` is a norm convert reproduces
    exactly; (info, None, why not) for any other norm; (None, None, "") for a module that is no
    norm (``_inventory``)."""
    info = describe(module)
    if info is None:
        return None, None, ""
    if info.family == "normkit":
        return info, None, "already a normkit module"
    if info.family is None and info.kind == "custom":
        return info, None, ("looks like a norm but normkit does not know it; declare it with "
                            "normkit.register_norm")
    if info.kind == "group":
        return info, *_group_builder(module, info)
    if info.kind not in ("layer", "rms"):
        return info, None, f"no normkit module computes {info.kind} norms"
    build, why = _builder(module, info)
    return info, build, why


def _builder(module: torch.nn.Module, info: NormInfo
             ) -> tuple[Callable[[], torch.nn.Module] | None, str]:
    """(a builder of the replacement, "") for a LayerNorm- or RMSNorm-kind ``module`` convert
    reproduces exactly, else (None, why not)."""
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
    if info.family == "registered" and info.casting is None:
        return None, "registered without casting=, which convert needs to reproduce it"
    if info.casting is None:  # a look-alike
        return None, ("its forward matches no known norm implementation; declare it with "
                      "normkit.register_norm(..., casting=...)")
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


def _group_builder(module: torch.nn.Module, info: NormInfo
                   ) -> tuple[Callable[[], torch.nn.Module] | None, str]:
    """(a builder of the replacement, "") for a ``torch.nn.GroupNorm`` that keeps torch's
    forward, else (None, why not).  (InstanceNorm is left alone: see docs/group_norm.md.)"""
    if not (isinstance(module, torch.nn.GroupNorm) and info.family == "torch"):
        return None, "a group norm that is not torch.nn.GroupNorm"
    if type(module).forward is not torch.nn.GroupNorm.forward:
        return None, "it subclasses torch.nn.GroupNorm but overrides forward"
    if why := _not_plain_leaf(module, {"weight", "bias"}):
        return None, why
    if not _valid_eps(module.eps):
        return None, f"eps={module.eps!r}"
    return functools.partial(_from_torch_group_norm, module), ""


def _from_torch_group_norm(old: torch.nn.GroupNorm) -> GroupNorm:
    new = GroupNorm(old.num_groups, old.num_channels, old.eps, old.affine, device="meta",
                    bias=old.bias is not None)
    new.weight, new.bias = old.weight, old.bias
    return _finish(new, old)


# what a replaced norm of each kind becomes (``normkit.nn``)
_BECOMES = {"rms": "RMSNorm", "group": "GroupNorm"}


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
# BERT-style output blocks: dense → dropout → LayerNorm(h + input_tensor), fused
# ----------------------------------------------------------------------------------------------

# The forward of Hugging Face's BertSelfOutput and BertOutput (and their copies in RoBERTa,
# ELECTRA, ...), source for source (checked against transformers 5.25).
_OUTPUT_BLOCK_FORWARD = """
def forward(self, hidden_states, input_tensor):
    hidden_states = self.dense(hidden_states)
    hidden_states = self.dropout(hidden_states)
    hidden_states = self.LayerNorm(hidden_states + input_tensor)
    return hidden_states
"""


@functools.cache
def _output_block_ast() -> str:
    return _normalized(ast.parse(_OUTPUT_BLOCK_FORWARD).body[0])


def _fused_forward(self, hidden_states, input_tensor):
    """A converted output block's forward: dense, then dropout + residual add + LayerNorm in one
    op (``FusedDropoutAddLayerNorm``, holding the block's γ/β and its dropout's p)."""
    return self.LayerNorm(self.dense(hidden_states), input_tensor)[0]


def _fuse_output_block(module, name, planned, dry_run) -> None:
    """Fuse a BERT-style output block whose LayerNorm this conversion replaces (post-order: it
    is planned already) with torch's semantics ("torch" casting, plain γ), whose dropout is a
    plain ``torch.nn.Dropout`` without hooks, and whose forward is the pattern above.

    Exact: in eval mode the block computes LayerNorm(dense(x) + input) as the unfused converted
    block does, bit for bit; in training mode the dropout mask comes from normkit's generator
    instead of torch's (a different draw of the same distribution).  The block keeps its
    children, parameters and state_dict keys; its forward becomes an instance attribute, which
    ``revert`` removes."""
    fwd = getattr(type(module), "forward", None)
    if "forward" in vars(module) or not inspect.isfunction(fwd) or \
            _method_ast(fwd) != _output_block_ast():
        return
    drop, ln = module._modules.get("dropout"), module._modules.get("LayerNorm")
    key = f"{name}.LayerNorm" if name else "LayerNorm"
    i = next((i for i, p in enumerate(planned) if p.name == key), None)
    if (type(drop) is not torch.nn.Dropout or _has_hooks(drop) or i is None
            or planned[i].becomes != "LayerNorm" or planned[i].casting != "torch"
            or planned[i].zero_centered_gamma):
        return
    planned[i] = dataclasses.replace(planned[i], note="; ".join(filter(None, (
        planned[i].note, f"fused with the dropout (p={drop.p}) and residual add of "
        f"{type(module).__name__} (normkit.nn.FusedDropoutAddLayerNorm)"))))
    if dry_run:
        return
    fused = FusedDropoutAddLayerNorm(ln.normalized_shape, ln.eps, ln.elementwise_affine,
                                     bias=ln.bias is not None, device="meta", p=drop.p)
    fused.weight, fused.bias = ln.weight, ln.bias
    module.LayerNorm = _finish(fused, vars(ln).get(_ORIGINAL, ln))
    module.forward = types.MethodType(_fused_forward, module)


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


def _has_hooks(module: torch.nn.Module) -> bool:
    return any((module._forward_pre_hooks, module._forward_hooks, module._backward_hooks,
                module._backward_pre_hooks))


def convert(
    model: torch.nn.Module,
    *,
    filter: Filter | None = None,
    inplace: bool = True,
    dry_run: bool = False,
    return_plan: bool = False,
) -> torch.nn.Module | tuple[torch.nn.Module, ConvertPlan]:
    """Replace the norms of ``model`` with normkit modules that compute exactly the same thing.

    Converted: ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm`` and ``torch.nn.GroupNorm`` (and
    subclasses that keep their forward), and the Hugging Face RMSNorm variants of
    Llama/Qwen2/Mistral, Gemma/Gemma2/Gemma3 and T5, and fuses BERT-style output blocks'
    dropout + add + LayerNorm (see the module docstring).  Each replacement keeps the
    original's eps exactly, its casting order and output dtype, its plain attributes (e.g.
    ``variance_epsilon``), its training flag and the same Parameter objects — so state_dict
    keys and optimizer state are unchanged.  Every other norm is left alone, with the reason in
    the plan.  Hooks registered on a replaced module are not carried over (a warning names the
    module's path).

    Each call logs one INFO line on the ``normkit.convert`` logger: ``ConvertPlan.summary()``,
    e.g. "replaced 5 of 5 norms: 5 LlamaRMSNorm → normkit.nn.RMSNorm".

    Args:
        model: the root module; it may itself be a norm.
        filter: ``filter(module, qualified_name) -> bool``, called for each module that would be
            converted ("" names the root); only those for which it returns True are replaced.
        inplace: modify ``model`` (default), or convert a ``copy.deepcopy`` of it.
        dry_run: change nothing and copy nothing: the plan (and the log line) say what a
            conversion with the same arguments would do, and ``model`` itself is returned.
        return_plan: also return the ``ConvertPlan``.

    Returns:
        The converted root — a new object when ``model`` itself was a norm, else ``model``
        (or its copy) — or ``(root, plan)`` with ``return_plan=True``.  Undo with
        ``normkit.revert``.
    """
    _check_model(model)
    if filter is not None and not callable(filter):
        raise TypeError(f"filter must be callable or None, got {type(filter).__name__}")
    for flag, value in (("inplace", inplace), ("dry_run", dry_run),
                        ("return_plan", return_plan)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {value!r}")
    if not (inplace or dry_run):
        model = copy.deepcopy(model)
    planned: list[PlannedNorm] = []

    def fn(module: torch.nn.Module, name: str) -> torch.nn.Module:
        info, build, why = _plan(module)
        if info is None:
            _fuse_output_block(module, name, planned, dry_run)
            return module
        if build is not None and filter is not None and not filter(module, name):
            build, why = None, "the filter returned False"
        if build is None:
            log.debug("normkit.convert leaves %r (%s) alone: %s",
                      name, type(module).__name__, why)
            planned.append(PlannedNorm(name, type(module).__name__, info.kind, None,
                                       reason=why))
            return module
        note = "its hooks are not carried over" if _has_hooks(module) else ""
        planned.append(PlannedNorm(name, type(module).__name__, info.kind,
                                   _BECOMES.get(info.kind, "LayerNorm"),
                                   info.casting, info.zero_centered_gamma, note=note))
        if dry_run:
            return module
        if note:
            log.warning("hooks registered on %s (%s) are not carried over to its normkit "
                        "replacement", name or "the root module", type(module).__name__)
        return build()

    root = _swap(model, fn, "", {})
    plan = ConvertPlan(tuple(planned), dry_run)
    log.info("%s", plan.summary())
    return (root, plan) if return_plan else root


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
        if getattr(vars(module).get("forward"), "__func__", None) is _fused_forward:
            del module.forward  # a fused output block: its class's forward again
        original = vars(module).get(_ORIGINAL)
        if original is None:
            return module
        for pname, param in module._parameters.items():
            if pname in original._parameters and original._parameters[pname] is not param:
                setattr(original, pname, param)
        original.training = module.training
        return original

    return _swap(model, fn, "", {})
