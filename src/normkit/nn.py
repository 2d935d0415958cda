"""Drop-in modules: ``LayerNorm``, ``RMSNorm`` and ``GroupNorm`` backed by normkit's kernels,
and the LN-LSTM.

Each class subclasses the torch module it replaces and overrides only ``forward`` (STYLE habit 4),
so the constructor, the parameters (``weight``, ``bias``), the state_dict keys and
``reset_parameters`` are torch's own: a checkpoint saved from ``torch.nn.LayerNorm`` loads into
``normkit.nn.LayerNorm`` with ``strict=True`` and back.

The constructors take torch's arguments, plus two keyword-only options of the functional API
that select model-specific numerics (``normkit.convert`` sets them from a Hugging Face norm):

* ``casting`` — where the cast back to a 16-bit dtype happens ("torch", "gemma", "llama", "t5";
  see ``normkit.layer_norm``).  Output dtype: x.dtype for "torch"/"gemma";
  ``promote_types(x.dtype, weight.dtype)`` for "llama"; for "t5" weight.dtype when the weight is
  16-bit, else float32.  With the default "torch" the output dtype is always x.dtype, as in torch.
* ``zero_centered_gamma`` — multiply by ``1 + weight`` (γ stored zero-centred, as in Gemma); the
  weight then starts at zeros, so that a fresh module is the identity scale as torch's is.
* ``memory_efficient`` — training saves the output y for backward instead of the input (see
  ``normkit.layer_norm``); needs casting "torch" or "gemma".

They are configuration, not state: shown by ``extra_repr`` when not the default, kept by
``copy.deepcopy`` and pickle, and absent from the state_dict, whose keys stay torch's (a
state_dict loads into a module built with the same options).  ``normalized_shape`` and ``eps``
are stored as plain ints and a float (numpy scalars are taken, as torch takes them).

``DyT`` (Dynamic Tanh, ``weight * tanh(alpha * x) + bias``) has no statistics at all; it is here
so that ``normkit study`` can compare it with the norms on equal footing.

``LayerNormLSTMCell`` and ``LayerNormLSTM`` are the layer-normalized LSTM of Ba et al. 2016, built
on ``LayerNorm`` modules, with ``torch.nn.LSTMCell``'s / ``torch.nn.LSTM``'s arguments and call
(see docs/lstm.md).
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F

from ._dropout import _check as _check_dropout
from ._options import _check_casting, _eps_of
from ._validate import _shape_of
from .functional import group_norm, layer_norm, rms_norm

__all__ = ["LayerNorm", "RMSNorm", "FusedAddLayerNorm", "FusedAddRMSNorm", "GroupNorm", "DyT",
           "LayerNormLSTMCell", "LayerNormLSTM", "FusedDropoutAddLayerNorm",
           "FusedDropoutAddRMSNorm"]


def _set_options(module, casting, zero_centered_gamma, elementwise_affine) -> None:
    """Checks and sets the two options (before torch's constructor, whose reset_parameters
    reads zero_centered_gamma)."""
    _check_casting(casting)
    if not isinstance(zero_centered_gamma, bool):
        raise TypeError(f"zero_centered_gamma must be a bool, got "
                        f"{type(zero_centered_gamma).__name__}")
    if zero_centered_gamma and not elementwise_affine:
        raise ValueError("zero_centered_gamma=True needs elementwise_affine=True: it says how "
                         "the weight is stored")
    module.casting = casting
    module.zero_centered_gamma = zero_centered_gamma


def _set_lean(module, memory_efficient) -> None:
    """Checks and sets ``memory_efficient`` (after _set_options: it needs the casting)."""
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"memory_efficient must be a bool, got {type(memory_efficient).__name__}")
    if memory_efficient and module.casting not in ("torch", "gemma"):
        raise ValueError(f"memory_efficient=True needs casting 'torch' or 'gemma', not "
                         f"{module.casting!r}: there x_hat is rounded before weight is applied, "
                         f"so y does not give it back exactly")
    module.memory_efficient = memory_efficient


def _reset_zero_centered(module) -> None:
    """After torch's reset_parameters (weight = 1): a zero-centred weight starts at 0."""
    if module.zero_centered_gamma and module.weight is not None:
        with torch.no_grad():
            module.weight.zero_()


def _get_name(module) -> str:
    """The name ``print(model)`` shows: ``normkit.nn.LayerNorm((768,), eps=1e-05, ...)`` for
    normkit's own classes, so that a converted model shows which norms were replaced (torch's
    repr is otherwise the same); a user's subclass keeps its plain name, as in torch."""
    cls = type(module)
    return f"normkit.nn.{cls.__name__}" if cls.__module__ == __name__ else cls.__name__


def _options_repr(module) -> str:
    """The non-default casting options, formatted to append to torch's ``extra_repr``."""
    parts = []
    if module.casting != "torch":
        parts.append(f"casting={module.casting!r}")
    if module.zero_centered_gamma:
        parts.append("zero_centered_gamma=True")
    if module.memory_efficient:
        parts.append("memory_efficient=True")
    return "".join(", " + p for p in parts)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by normkit; same constructor, parameters and state_dict.

    ``y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias`` over the trailing
    ``normalized_shape`` dims, statistics in float32 (float64 for float64 input).

    Output dtype: x.dtype with the default ``casting="torch"`` (also when weight/bias have
    another dtype, e.g. float32 γ with bfloat16 activations); see the module docstring for the
    other casting modes.

    Args: torch's (``normalized_shape``, ``eps=1e-5``, ``elementwise_affine``, ``bias``,
    ``device``, ``dtype``), and keyword-only ``casting="torch"``,
    ``zero_centered_gamma=False`` and ``memory_efficient=False`` (see the module docstring).
    """

    casting: str = "torch"  # class defaults: instances made before these were arguments
    zero_centered_gamma: bool = False
    memory_efficient: bool = False

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, casting: str = "torch",
                 zero_centered_gamma: bool = False, memory_efficient: bool = False):
        _set_options(self, casting, zero_centered_gamma, elementwise_affine)
        _set_lean(self, memory_efficient)
        super().__init__(_shape_of(normalized_shape), _eps_of(eps), elementwise_affine, bias,
                         device, dtype)

    def reset_parameters(self) -> None:
        """torch's (weight 1, bias 0), with weight 0 when zero-centred."""
        super().reset_parameters()
        _reset_zero_centered(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalizes ``input`` of shape (..., *normalized_shape); returns the same shape."""
        return layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps,
            zero_centered_gamma=self.zero_centered_gamma, casting=self.casting,
            memory_efficient=self.memory_efficient,
        )

    _get_name = _get_name

    def extra_repr(self) -> str:
        return super().extra_repr() + _options_repr(self)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by normkit; same constructor, parameters and state_dict.

    ``y = x * rsqrt(mean(x²) + eps) * weight`` over the trailing ``normalized_shape`` dims;
    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as in torch.

    Output dtype: x.dtype with the default ``casting="torch"``; see the module docstring for the
    other casting modes.

    Args: torch's (``normalized_shape``, ``eps=None``, ``elementwise_affine``, ``device``,
    ``dtype``), and keyword-only ``casting="torch"``, ``zero_centered_gamma=False`` and
    ``memory_efficient=False`` (see the module docstring).
    """

    casting: str = "torch"  # class defaults: instances made before these were arguments
    zero_centered_gamma: bool = False
    memory_efficient: bool = False

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 casting: str = "torch", zero_centered_gamma: bool = False,
                 memory_efficient: bool = False):
        _set_options(self, casting, zero_centered_gamma, elementwise_affine)
        _set_lean(self, memory_efficient)
        super().__init__(_shape_of(normalized_shape), None if eps is None else _eps_of(eps),
                         elementwise_affine, device, dtype)

    def reset_parameters(self) -> None:
        """torch's (weight 1), with weight 0 when zero-centred."""
        super().reset_parameters()
        _reset_zero_centered(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalizes ``x`` of shape (..., *normalized_shape); returns the same shape."""
        return rms_norm(
            x, self.normalized_shape, self.weight, self.eps,
            zero_centered_gamma=self.zero_centered_gamma, casting=self.casting,
            memory_efficient=self.memory_efficient,
        )

    _get_name = _get_name

    def extra_repr(self) -> str:
        return super().extra_repr() + _options_repr(self)


class FusedAddLayerNorm(LayerNorm):
    """``LayerNorm`` fused with the residual add of a pre-norm block.

    ``forward(x, residual)`` returns ``(y, h)`` with ``h = x + residual`` (rounded to x.dtype)
    and ``y = LayerNorm(h)``; ``h`` is the residual stream for the next block.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x, residual: same shape, dtype and device.  Returns: (y, h), both shaped like x;
        h in x.dtype, y in the output dtype of ``LayerNorm``."""
        return layer_norm(
            x, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual,
            zero_centered_gamma=self.zero_centered_gamma, return_residual=True,
            casting=self.casting, memory_efficient=self.memory_efficient,
        )


class FusedAddRMSNorm(RMSNorm):
    """``RMSNorm`` fused with the residual add of a pre-norm block.

    ``forward(x, residual)`` returns ``(y, h)`` with ``h = x + residual`` (rounded to x.dtype)
    and ``y = RMSNorm(h)``; ``h`` is the residual stream for the next block.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x, residual: same shape, dtype and device.  Returns: (y, h), both shaped like x;
        h in x.dtype, y in the output dtype of ``RMSNorm``."""
        return rms_norm(
            x, self.normalized_shape, self.weight, self.eps, residual=residual,
            zero_centered_gamma=self.zero_centered_gamma, return_residual=True,
            casting=self.casting, memory_efficient=self.memory_efficient,
        )


class GroupNorm(torch.nn.GroupNorm):
    """``torch.nn.GroupNorm`` computed by normkit (``normkit.group_norm``); same constructor
    (``num_groups``, ``num_channels``, ``eps=1e-5``, ``affine=True``, ``device``, ``dtype``),
    parameters, state_dict and repr (as ``normkit.nn.GroupNorm(...)``).

    Input (B, C, *), output the same shape, dtype and memory format; statistics per sample and
    group in float32 (float64 for float64 input).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    _get_name = _get_name


class DyT(torch.nn.Module):
    """Dynamic Tanh (Zhu et al. 2025), the normalization-free drop-in, over the trailing
    ``normalized_shape`` dims.

    Args:
        normalized_shape: int or tuple, the trailing shape ``weight`` and ``bias`` cover (the
            same meaning as ``torch.nn.LayerNorm``'s, so DyT can replace it in a model).
        alpha_init: initial value of the scalar ``alpha``; the paper's default 0.5.
        elementwise_affine: learn ``weight`` (init 1) and ``bias`` (init 0).
        bias: learn ``bias`` (only with ``elementwise_affine``).
        device, dtype: for the parameters.

    Shapes: input (..., *normalized_shape) → output of the same shape and dtype.
    """

    def __init__(self, normalized_shape, alpha_init: float = 0.5,
                 elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in normalized_shape)
        if not self.normalized_shape or any(s < 1 for s in self.normalized_shape):
            raise ValueError(
                f"normalized_shape must be a non-empty tuple of positive ints, "
                f"got {normalized_shape!r}"
            )
        if not float(alpha_init) > 0:
            raise ValueError(f"alpha_init must be positive, got {alpha_init!r}")
        self.alpha_init = float(alpha_init)
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        self.alpha = torch.nn.Parameter(torch.empty((), **factory))
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, **factory))
            self.bias = (torch.nn.Parameter(torch.empty(self.normalized_shape, **factory))
                         if bias else None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """alpha = alpha_init, weight = 1, bias = 0."""
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
            if self.weight is not None:
                self.weight.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies ``weight * tanh(alpha * x) + bias``; returns the shape and dtype of ``x``."""
        n = len(self.normalized_shape)
        if tuple(x.shape[-n:]) != self.normalized_shape:
            raise ValueError(
                f"DyT: input's trailing shape must be {self.normalized_shape}, "
                f"got input of shape {tuple(x.shape)}"
            )
        y = torch.tanh(self.alpha.to(x.dtype) * x)
        if self.weight is not None:
            y = y * self.weight.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    _get_name = _get_name

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, alpha_init={self.alpha_init}, "
                f"elementwise_affine={self.elementwise_affine}")


# ----------------------------------------------------------------------------------------------
# Layer-normalized LSTM (Ba et al. 2016, "Layer Normalization", §3.2, eq. 20–22)
# ----------------------------------------------------------------------------------------------


def _check_size(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_tensor(who: str, name: str, t, like: torch.Tensor, shape: tuple | None = None):
    """``t`` is a tensor (of ``shape``) with the dtype and device of the parameter ``like``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{who}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{who}: {name} must be {like.dtype} on {like.device} like the "
                        f"parameters, got {t.dtype} on {t.device}")


def _check_state(who: str, hx, shape: tuple, like: torch.Tensor):
    """The initial ``(h, c)``, each of ``shape``; zeros when ``hx`` is None."""
    if hx is None:
        zeros = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return zeros, zeros
    if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
        got = (f"a {type(hx).__name__} of {len(hx)}" if isinstance(hx, (tuple, list))
               else type(hx).__name__)
        raise TypeError(f"{who}: hx must be a tuple (h, c) of two tensors or None, got {got}")
    for name, t in zip(("hx[0] (h)", "hx[1] (c)"), hx, strict=True):
        _check_tensor(who, name, t, like, shape)
    return hx[0], hx[1]


def _check_input(who: str, x, dims: tuple[int, int], input_size: int, like: torch.Tensor):
    """``x`` is a tensor of one of the two ranks ``dims`` (unbatched, batched) whose last dim is
    ``input_size``; returns whether it is batched."""
    if not isinstance(x, torch.Tensor):
        hint = (": pad the batch instead (torch.nn.utils.rnn.pad_packed_sequence)"
                if type(x).__name__ == "PackedSequence" else "")
        raise TypeError(f"{who}: input must be a torch.Tensor, got {type(x).__name__}{hint}")
    if x.dim() not in dims or x.shape[-1] != input_size:
        raise ValueError(f"{who}: input must be {dims[0]}-D (unbatched) or {dims[1]}-D (batched) "
                         f"with last dim input_size={input_size}, got shape {tuple(x.shape)}")
    _check_tensor(who, "input", x, like)
    return x.dim() == dims[1]


class LayerNormLSTMCell(torch.nn.Module):
    """An LSTM cell with layer normalization (Ba et al. 2016, §3.2, eq. 20–22), its norms
    ``normkit.nn.LayerNorm`` modules (so ``normkit.watch`` sees them)::

        gates = norm_ih(x @ weight_ih.T) + norm_hh(h @ weight_hh.T) + bias   # (…, 4·hidden)
        i, f, g, o = gates.chunk(4)                                          # torch's order
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g)
        h' = sigmoid(o) * tanh(norm_c(c'))

    The input and the recurrent projections are normalized separately, each with its own gain
    and bias, and the cell state is normalized before the output tanh, as in the paper.

    Args:
        input_size: features of x.
        hidden_size: features of h and c.
        bias: False drops ``bias`` and the biases (β) of the three norms: then nothing is added.
        eps: the norms' epsilon.
        device, dtype: for the parameters.

    Parameters: ``weight_ih`` (4·hidden, input), ``weight_hh`` (4·hidden, hidden), ``bias``
    (4·hidden), and the norms ``norm_ih``, ``norm_hh`` (4·hidden) and ``norm_c`` (hidden).
    Initialization: the weights uniform in ±1/√hidden (as ``torch.nn.LSTMCell``), ``bias`` zero
    but 1 on the forget gate (so memory flows at the start), the norms' gains 1 and biases 0.

    Shapes: ``forward(input, hx=None)`` takes input (batch, input_size) or (input_size,) and
    ``hx = (h, c)``, each (batch, hidden_size) or (hidden_size,) (zeros when None), and returns
    ``(h', c')`` of the same shapes, in the parameters' dtype (the input must have it).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, eps: float = 1e-5,
                 device=None, dtype=None):
        super().__init__()
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = hidden = _check_size("hidden_size", hidden_size)
        self.eps = _eps_of(eps)
        factory = {"device": device, "dtype": dtype}
        # bias first: parameters() then runs in the order the study's private cell had, so the
        # study's recorded gradient norms (a sum over parameters()) keep their bits
        if _check_flag("bias", bias):
            self.bias = torch.nn.Parameter(torch.empty(4 * hidden, **factory))
        else:
            self.register_parameter("bias", None)
        self.weight_ih = torch.nn.Parameter(torch.empty(4 * hidden, self.input_size, **factory))
        self.weight_hh = torch.nn.Parameter(torch.empty(4 * hidden, hidden, **factory))
        self.norm_ih = LayerNorm(4 * hidden, self.eps, bias=bias, **factory)
        self.norm_hh = LayerNorm(4 * hidden, self.eps, bias=bias, **factory)
        self.norm_c = LayerNorm(hidden, self.eps, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights uniform in ±1/√hidden, ``bias`` 0 with the forget gate's 1, the norms' own."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.weight_ih.uniform_(-bound, bound)
            self.weight_hh.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.zero_()
                self.bias[self.hidden_size:2 * self.hidden_size].fill_(1.0)
        for norm in (self.norm_ih, self.norm_hh, self.norm_c):
            norm.reset_parameters()

    def forward(self, input: torch.Tensor, hx=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; see the class docstring for the shapes."""
        who = "LayerNormLSTMCell"
        batched = _check_input(who, input, (1, 2), self.input_size, self.weight_ih)
        state = (input.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        h, c = _check_state(who, hx, state, self.weight_ih)
        if batched:
            return self._step(self._input_gates(input), h, c)
        h, c = self._step(self._input_gates(input.unsqueeze(0)), h.unsqueeze(0), c.unsqueeze(0))
        return h.squeeze(0), c.squeeze(0)

    def _input_gates(self, x: torch.Tensor) -> torch.Tensor:
        """norm_ih(x @ weight_ih.T), for any leading dims: ``LayerNormLSTM`` projects all the
        time steps of a layer at once (one matmul, not one per step)."""
        return self.norm_ih(F.linear(x, self.weight_ih))

    def _step(self, gx: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """The cell's update from the normalized input gates ``gx`` (batch, 4·hidden)."""
        gates = gx + self.norm_hh(F.linear(h, self.weight_hh))
        if self.bias is not None:
            gates = gates + self.bias
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.norm_c(c))
        return h, c

    _get_name = _get_name

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}"
                + (", bias=False" if self.bias is None else "")
                + (f", eps={self.eps}" if self.eps != 1e-5 else ""))


class LayerNormLSTM(torch.nn.Module):
    """A multi-layer LSTM of :class:`LayerNormLSTMCell` s, with ``torch.nn.LSTM``'s constructor
    and call: ``forward(input, hx=None)`` returns ``(output, (h_n, c_n))``.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout: torch's meaning
            (``dropout`` is applied to the output of every layer but the last, in training).
        bidirectional, proj_size: accepted for torch's signature; only the defaults (False, 0)
            are supported — other values raise NotImplementedError.
        eps: the norms' epsilon (keyword-only).
        device, dtype: for the parameters.

    Shapes (L = num_layers, T = time steps, B = batch, H = hidden_size):
        input: (T, B, input_size), or (B, T, input_size) with ``batch_first``, or (T, input_size)
            unbatched.
        hx: ``(h_0, c_0)``, each (L, B, H), or (L, H) for unbatched input — never batch-first,
            as in torch; zeros when None.
        output: the last layer's h at every step: (T, B, H), (B, T, H) or (T, H).
        h_n, c_n: every layer's final state, shaped like h_0.

    Parameters: ``cells.{layer}.*`` (see :class:`LayerNormLSTMCell`); torch's flat
    ``weight_ih_l0`` names do not apply, because each layer has norms too.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, device=None, dtype=None, *,
                 eps: float = 1e-5):
        super().__init__()
        if _check_flag("bidirectional", bidirectional):
            raise NotImplementedError("LayerNormLSTM: bidirectional=True is not supported; run "
                                      "a second LayerNormLSTM on the time-reversed input")
        if _check_size("proj_size", proj_size, low=0):
            raise NotImplementedError("LayerNormLSTM: proj_size > 0 is not supported")
        if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
                or not 0 <= dropout <= 1):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        self.input_size = _check_size("input_size", input_size)
        self.hidden_size = _check_size("hidden_size", hidden_size)
        self.num_layers = _check_size("num_layers", num_layers)
        self.bias = _check_flag("bias", bias)
        self.batch_first = _check_flag("batch_first", batch_first)
        self.dropout = float(dropout)
        self.eps = _eps_of(eps)
        if self.dropout and self.num_layers == 1:
            warnings.warn(f"LayerNormLSTM: dropout={self.dropout} acts between layers, and "
                          "num_layers=1 has none", stacklevel=2)
        self.cells = torch.nn.ModuleList(
            LayerNormLSTMCell(input_size if k == 0 else hidden_size, hidden_size, bias, eps,
                              device, dtype)
            for k in range(self.num_layers))

    def reset_parameters(self) -> None:
        """Every layer's :meth:`LayerNormLSTMCell.reset_parameters`, bottom up."""
        for cell in self.cells:
            cell.reset_parameters()

    def forward(self, input: torch.Tensor, hx=None):
        """Runs the layers over the sequence; see the class docstring for the shapes."""
        like = self.cells[0].weight_ih
        batched = _check_input("LayerNormLSTM", input, (2, 3), self.input_size, like)
        x = input if batched else input.unsqueeze(1)
        t_dim = 1 if batched and self.batch_first else 0
        if x.shape[t_dim] == 0:
            raise ValueError(f"LayerNormLSTM: input has no time steps (shape "
                             f"{tuple(input.shape)})")
        state = (self.num_layers, *([x.shape[1 - t_dim]] if batched else []), self.hidden_size)
        h0, c0 = _check_state("LayerNormLSTM", hx, state, like)
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        h_n, c_n = [], []
        for k, cell in enumerate(self.cells):
            if k and self.dropout:
                x = F.dropout(x, self.dropout, self.training)
            gx = cell._input_gates(x)
            h, c = h0[k], c0[k]
            out = []
            for s in range(x.shape[t_dim]):
                h, c = cell._step(gx.select(t_dim, s), h, c)
                out.append(h)
            x = torch.stack(out, dim=t_dim)
            h_n.append(h)
            c_n.append(c)
        h_n, c_n = torch.stack(h_n), torch.stack(c_n)
        if not batched:
            x, h_n, c_n = x.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        return x, (h_n, c_n)

    _get_name = _get_name

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                              ("dropout", 0.0), ("eps", 1e-5)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s


# ----------------------------------------------------------------------------------------------
# Dropout, residual add and norm in one pass (the post-attention step of BERT-style models)
# ----------------------------------------------------------------------------------------------


class _FusedDropout:
    """``p`` (as ``torch.nn.Dropout``'s, checked: a float in [0, 1]) and the forward of the
    fused dropout modules: dropout while training, none in eval mode."""

    def _set_p(self, p) -> None:
        self.p = _check_dropout(p, None)[0]

    def _dropout_args(self, seed) -> dict:
        if not self.training or self.p == 0.0:
            return {}  # the plain fused add + norm
        return {"dropout_p": self.p, "seed": seed}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}"


class FusedDropoutAddLayerNorm(_FusedDropout, LayerNorm):
    """``LayerNorm(dropout(x) + residual)`` in one pass; parameters and state_dict are
    ``LayerNorm``'s.

    ``forward(x, residual=None, *, seed=None)`` returns ``(y, h)``: ``h = dropout(x) +
    residual`` (``dropout(x)`` without a residual), rounded to x.dtype, and ``y =
    LayerNorm(h)``.  In training mode elements of x are dropped with probability ``p`` and the
    kept ones scaled by 1/(1-p), as ``torch.nn.Dropout``; in eval mode there is no dropout.  The
    mask's seed is drawn from torch's default generator at each call unless given (see
    ``normkit.layer_norm``: ``seed``, ``dropout_p``).

    Args: ``LayerNorm``'s, and keyword-only ``p=0.5`` (as ``torch.nn.Dropout``).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, p: float = 0.5,
                 casting: str = "torch", zero_centered_gamma: bool = False):
        self._set_p(p)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype,
                         casting=casting, zero_centered_gamma=zero_centered_gamma)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None, *, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x, residual (None or like x), seed (None: drawn).  Returns: (y, h)."""
        return layer_norm(
            x, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual,
            zero_centered_gamma=self.zero_centered_gamma, return_residual=True,
            casting=self.casting, **self._dropout_args(seed),
        )


class FusedDropoutAddRMSNorm(_FusedDropout, RMSNorm):
    """``RMSNorm(dropout(x) + residual)`` in one pass: as ``FusedDropoutAddLayerNorm``, with
    ``RMSNorm``'s arguments, parameters and state_dict."""

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *, p: float = 0.5,
                 casting: str = "torch", zero_centered_gamma: bool = False):
        self._set_p(p)
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype,
                         casting=casting, zero_centered_gamma=zero_centered_gamma)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, residual: torch.Tensor | None = None, *, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x, residual (None or like x), seed (None: drawn).  Returns: (y, h)."""
        return rms_norm(
            x, self.normalized_shape, self.weight, self.eps, residual=residual,
            zero_centered_gamma=self.zero_centered_gamma, return_residual=True,
            casting=self.casting, **self._dropout_args(seed),
        )
