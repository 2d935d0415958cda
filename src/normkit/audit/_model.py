"""What the checks share: the norm inventory, example inputs, and instrumented forward passes."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .. import _inventory
from .._inventory import BETA_ATTRS, GAMMA_ATTRS

log = logging.getLogger(__name__)

# The inventory's kinds, as the audit reports them.
_KINDS = {"layer": "layer_norm", "rms": "rms_norm", "batch": "batch_norm", "group": "group_norm",
          "instance": "instance_norm", "dyt": "dyt", "custom": "custom"}


@dataclass
class Norm:
    """One normalization layer of a model."""

    name: str
    module: torch.nn.Module
    kind: str  # layer_norm | rms_norm | batch_norm | group_norm | instance_norm | dyt | custom
    eps: float | None
    # the HF pattern ("llama", "gemma", "t5", ...) when recognised, "normkit:<casting>" for a
    # normkit module, "registered" for a class declared with normkit.register_norm
    family: str | None = None
    zero_centered: bool = False
    placement: str | None = None
    # attribute names of γ and β from the inventory; None: look under the usual names
    affine: tuple[str | None, str | None] | None = None

    @property
    def type(self) -> str:
        return type(self.module).__name__

    def gamma(self) -> tuple[str, torch.Tensor] | None:
        """(attribute name, tensor) of the scale, registered or not."""
        return _tensor_attr(self.module, GAMMA_ATTRS if self.affine is None else self.affine[:1])

    def beta(self) -> tuple[str, torch.Tensor] | None:
        return _tensor_attr(self.module, BETA_ATTRS if self.affine is None else self.affine[1:])

    def normalized_shape(self) -> list[int] | None:
        shape = getattr(self.module, "normalized_shape", None)
        if shape is not None:
            return [int(s) for s in shape]
        if self.kind in ("batch_norm", "instance_norm"):
            return [int(self.module.num_features)]
        if self.kind == "group_norm":
            return [int(self.module.num_channels)]
        g = self.gamma()
        return list(g[1].shape) if g is not None else None

    def describe(self) -> dict[str, Any]:
        """The inventory row."""
        g, b = self.gamma(), self.beta()
        tensors = [t for t in (g, b) if t is not None]
        dtype = str(tensors[0][1].dtype).removeprefix("torch.") if tensors else None
        return {
            "name": self.name,
            "type": self.type,
            "kind": self.kind,
            "family": self.family,
            "normalized_shape": self.normalized_shape(),
            "eps": self.eps,
            "affine": g is not None,
            "bias": b is not None,
            "zero_centered_gamma": self.zero_centered,
            "dtype": dtype,
            "params": sum(t.numel() for _, t in tensors),
            "placement": self.placement,
        }


def _tensor_attr(module, names) -> tuple[str, torch.Tensor] | None:
    for n in names:
        v = getattr(module, n, None) if n else None
        if isinstance(v, torch.Tensor):
            return n, v
    return None


def find_norms(model: torch.nn.Module) -> list[Norm]:
    """Every normalization layer of ``model`` (``normkit._inventory``'s, the same ones convert
    and watch see), in module order (shared modules once)."""
    out = []
    for name, m, info in _inventory.find(model):
        family = info.family
        if family == "normkit":
            family = f"normkit:{info.casting}" if info.casting else None
        elif family in ("torch", "dyt"):
            family = None
        out.append(Norm(name, m, _KINDS[info.kind], info.eps, family,
                        info.zero_centered_gamma, affine=(info.weight, info.bias)))
    return out


# ----------------------------------------------------------------------------------------------
# Example inputs
# ----------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """Positional and keyword inputs for ``model(*args, **kwargs)``; ``batch_dim`` is the dim
    that indexes samples (1 for a sequence-first RNN)."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    batch_dim: int = 0

    def tensors(self) -> Iterator[torch.Tensor]:
        for v in (*self.args, *self.kwargs.values()):
            if isinstance(v, torch.Tensor):
                yield v

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        f = lambda v: fn(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Inputs(tuple(f(a) for a in self.args), {k: f(v) for k, v in self.kwargs.items()},
                      self.batch_dim)

    def batch_size(self) -> int | None:
        sizes = {t.shape[self.batch_dim] for t in self.tensors() if t.dim() > self.batch_dim}
        return sizes.pop() if len(sizes) == 1 else None

    def sample(self, i: int) -> Inputs:
        d = self.batch_dim
        return self.map(lambda t: t.narrow(d, i, 1) if t.dim() > d else t)

    def floating(self) -> bool:
        return any(t.is_floating_point() for t in self.tensors())

    def cast(self, dtype: torch.dtype) -> Inputs:
        return self.map(lambda t: t.to(dtype) if t.is_floating_point() else t)


def as_inputs(example) -> Inputs:
    """A tensor, a tuple/list of positional args, a dict of keyword args (a tokenizer's
    output), or an ``Inputs``."""
    if isinstance(example, Inputs):
        return example
    if isinstance(example, torch.Tensor):
        return Inputs((example,))
    if isinstance(example, (tuple, list)):
        return Inputs(tuple(example))
    if hasattr(example, "keys") and hasattr(example, "__getitem__"):  # dict, BatchEncoding
        return Inputs((), {k: example[k] for k in example.keys()})
    raise TypeError("example_inputs must be a tensor, a tuple of positional args or a dict of "
                    f"keyword args, got {type(example).__name__}")


def synthesize_inputs(model: torch.nn.Module, batch: int = 3, seq: int = 8,
                      shapes: list[tuple[int, ...]] | None = None) -> Inputs:
    """Inputs built from the model's first layer (or from ``shapes``).

    Hugging Face models get ``input_ids`` (plus ``decoder_input_ids`` for encoder-decoders);
    an Embedding first gets token ids, Linear (batch, seq, in), Conv (batch, C, 16[, 16]),
    RNNs (batch, seq, input) — seq-first when not ``batch_first``, LayerNorm (batch, seq, N).
    The batch of 3 is odd on purpose: a dim of 3 is unlikely to be mistaken for another one.

    Raises:
        ValueError: the first layer gives no clue; pass example inputs.
    """
    gen = torch.Generator().manual_seed(0)
    first = next((m for m in model.modules() if not list(m.children())), None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if shapes:
        as_ids = isinstance(first, torch.nn.Embedding) or vocab is not None
        high = vocab or (first.num_embeddings if isinstance(first, torch.nn.Embedding) else 2)
        ts = [torch.randint(0, high, s, generator=gen) if as_ids
              else torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        if vocab is not None and getattr(config, "is_encoder_decoder", False) and len(ts) == 1:
            return Inputs((), {"input_ids": ts[0], "decoder_input_ids": ts[0]})
        if vocab is not None and len(ts) == 1:
            return Inputs((), {getattr(model, "main_input_name", "input_ids"): ts[0]})
        return Inputs(tuple(ts))
    if vocab is not None:
        ids = torch.randint(0, int(vocab), (batch, seq), generator=gen)
        kw = {getattr(model, "main_input_name", "input_ids"): ids}
        if getattr(config, "is_encoder_decoder", False):
            kw["decoder_input_ids"] = ids[:, : max(1, seq // 2)].clone()
        return Inputs((), kw)
    if isinstance(first, torch.nn.Embedding):
        return Inputs((torch.randint(0, first.num_embeddings, (batch, seq), generator=gen),))
    if isinstance(first, torch.nn.Linear):
        return Inputs((torch.randn(batch, seq, first.in_features, generator=gen, dtype=dtype),))
    if isinstance(first, torch.nn.modules.conv._ConvNd):
        spatial = (16,) * (first.weight.dim() - 2)
        return Inputs((torch.randn(batch, first.in_channels, *spatial, generator=gen,
                                   dtype=dtype),))
    if isinstance(first, torch.nn.RNNBase):
        if first.batch_first:
            return Inputs((torch.randn(batch, seq, first.input_size, generator=gen,
                                       dtype=dtype),))
        return Inputs((torch.randn(seq, batch, first.input_size, generator=gen, dtype=dtype),),
                      batch_dim=1)
    if isinstance(first, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return Inputs((torch.randn(batch, seq, *first.normalized_shape, generator=gen,
                                   dtype=dtype),))
    raise ValueError(
        f"cannot synthesise inputs for a model whose first layer is "
        f"{type(first).__name__ if first is not None else 'missing'}; pass example_inputs "
        "(CLI: --input-shape)")


def widen_batch(inputs: Inputs, batch: int = 3) -> Inputs:
    """``inputs`` with at least ``batch`` samples: extra samples drawn from the same value
    range (ids stay valid ids, a mask of ones stays ones)."""
    n = inputs.batch_size()
    if n is None or n >= batch:
        return inputs
    gen = torch.Generator().manual_seed(1)
    d = inputs.batch_dim

    def widen(t: torch.Tensor) -> torch.Tensor:
        if t.dim() <= d:
            return t
        shape = list(t.shape)
        shape[d] = batch - n
        if t.is_floating_point():
            extra = (torch.randn(shape, generator=gen, dtype=torch.float64) * t.double().std()
                     + t.double().mean()).to(t.dtype) if t.numel() > 1 else t.expand(shape)
        else:
            extra = torch.randint(int(t.min()), int(t.max()) + 1, shape, generator=gen,
                                  dtype=t.dtype)
        return torch.cat([t, extra], dim=d)

    return inputs.map(widen)


def call(model: torch.nn.Module, inputs: Inputs):
    return model(*inputs.args, **inputs.kwargs)


def flat_outputs(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, dict, HF ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flat_outputs(o)]
    return []  # None, HF caches and other objects: nothing to compare


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


# ----------------------------------------------------------------------------------------------
# Instrumented forward passes
# ----------------------------------------------------------------------------------------------


def first_tensor(v) -> torch.Tensor | None:
    """The first tensor in a module's inputs or outputs (tensor, tuple, list, HF output)."""
    if isinstance(v, torch.Tensor):
        return v
    if hasattr(v, "to_tuple"):
        v = v.to_tuple()
    if isinstance(v, (tuple, list)):
        return next((t for t in map(first_tensor, v) if t is not None), None)
    return None


@contextmanager
def capture(norms: list[Norm], keep_inputs: bool = True):
    """Record each norm's first-call input and output (detached) during a forward.

    Yields a dict name → {"in": tensor, "out": tensor}; modules called again later keep their
    first call (a shared norm is audited on its first use)."""
    rec: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for n in norms:
        def hook(mod, args, out, _name=n.name):
            if _name in rec:
                return
            x, y = first_tensor(args), first_tensor(out)
            if y is None:
                return
            rec[_name] = {"in": x.detach() if (keep_inputs and x is not None) else None,
                          "out": y.detach()}
        handles.append(n.module.register_forward_hook(hook))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()


def order_of(rec: dict[str, Any]) -> list[str]:
    """Names in the order their first call finished (dicts keep insertion order)."""
    return list(rec)


class _AddTracer(TorchFunctionMode):
    """Records residual-style additions (two tensors of the same rank ≥ 2 and last dim) with
    their operand and result objects, so placement can be read off tensor identity."""

    _ADDS = {"add", "__add__", "__radd__", "__iadd__", "add_"}

    def __init__(self):
        super().__init__()
        self.events: list[tuple[int, tuple, torch.Tensor]] = []
        self.clock = 0
        self._keep: list[torch.Tensor] = []  # keeps ids unique while the trace lives

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in self._ADDS and len(args) >= 2:
            a, b = args[0], args[1]
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                    and isinstance(out, torch.Tensor) and a.dim() >= 2 and a.dim() == b.dim()
                    and a.shape[-1] == b.shape[-1]):
                self.clock += 1
                self.events.append((self.clock, (a, b), out))
                self._keep += [a, b, out]
        return out


def trace_placement(model: torch.nn.Module, norms: list[Norm], inputs: Inputs) -> dict[str, str]:
    """Placement of each norm relative to the residual additions around it.

    * "pre": the norm's input is also added to a later result (the skip path bypasses it);
    * "peri": the output is added straight onto a residual (an output norm), input not a sum;
    * "post": the input is a residual sum and the output feeds a later residual sum;
    * "final": the input is a residual sum and the output leaves the residual stream;
    * "standalone": none of the above (e.g. a norm after an LSTM).
    """
    tracer = _AddTracer()
    calls: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
    handles = []
    for n in norms:
        def hook(mod, args, out, _name=n.name):
            x, y = first_tensor(args), first_tensor(out)
            if _name not in calls and x is not None and y is not None:
                calls[_name] = (tracer.clock, x, y)
                tracer._keep += [x, y]
        handles.append(n.module.register_forward_hook(hook))
    try:
        with torch.no_grad(), tracer:
            call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for name, (t, x, y) in calls.items():
        before = [e for e in tracer.events if e[0] <= t]
        after = [e for e in tracer.events if e[0] > t]
        from_add = any(out is x for _, _, out in before)
        input_reused = any(x is a or x is b for _, (a, b), _ in after)
        out_added = any(y is a or y is b for _, (a, b), _ in after)
        if input_reused:
            result[name] = "pre"
        elif out_added and not from_add:
            result[name] = "peri"
        elif from_add and out_added:
            result[name] = "post"
        elif from_add:
            result[name] = "final"
        else:
            result[name] = "standalone"
    return result


def model_placement(placements: dict[str, str]) -> str | None:
    """pre-norm / post-norm / peri-norm for the model, from its layers' placements."""
    kinds = set(placements.values())
    if "peri" in kinds and "pre" in kinds:
        return "peri-norm"
    if "pre" in kinds:
        return "pre-norm"
    if "post" in kinds:
        return "post-norm"
    return None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a-b|, max |a-b| / max(1e-30, max |b|)) in float64; any NaN/Inf mismatch is inf."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return math.inf, math.inf
    if a.numel() == 0:
        return 0.0, 0.0
    same_nonfinite = (~torch.isfinite(a)) & (~torch.isfinite(b)) & (
        (torch.isnan(a) & torch.isnan(b)) | (a == b))
    d = (a - b).abs()
    d = torch.where(same_nonfinite, torch.zeros_like(d), d)
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    mx = float(d.max())
    ref = float(b[torch.isfinite(b)].abs().max()) if torch.isfinite(b).any() else 0.0
    return mx, mx / max(ref, 1e-30)


# Relative tolerance (max abs diff / max |reference|) for "the same result" in a dtype: a few
# units in the last place of the largest output — float32 2^-23 ≈ 1.2e-7 (×~100 for reordered
# reductions through a model), bfloat16 2^-8 ≈ 3.9e-3, float16 2^-11 ≈ 4.9e-4 (×4).
TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 1.6e-2,
    torch.float16: 2e-3,
}


def tol_for(dtype: torch.dtype) -> float:
    return TOL.get(dtype, 1e-5)
