"""Drop-in modules: ``LayerNorm`` and ``RMSNorm`` backed by normkit's kernels.

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

They are configuration, not state: shown by ``extra_repr`` when not the default, kept by
``copy.deepcopy`` and pickle, and absent from the state_dict, whose keys stay torch's (a
state_dict loads into a module built with the same options).  ``normalized_shape`` and ``eps``
are stored as plain ints and a float (numpy scalars are taken, as torch takes them).

``DyT`` (Dynamic Tanh, ``weight * tanh(alpha * x) + bias``) has no statistics at all; it is here
so that ``normkit study`` can compare it with the norms on equal footing.
"""

from __future__ import annotations

import torch

from ._options import _check_casting, _eps_of
from ._validate import _shape_of
from .functional import layer_norm, rms_norm

__all__ = ["LayerNorm", "RMSNorm", "FusedAddLayerNorm", "FusedAddRMSNorm", "DyT"]


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
    return "".join(", " + p for p in parts)


class LayerNorm(torch.nn.LayerNorm):
    """``torch.nn.LayerNorm`` computed by normkit; same constructor, parameters and state_dict.

    ``y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias`` over the trailing
    ``normalized_shape`` dims, statistics in float32 (float64 for float64 input).

    Output dtype: x.dtype with the default ``casting="torch"`` (also when weight/bias have
    another dtype, e.g. float32 γ with bfloat16 activations); see the module docstring for the
    other casting modes.

    Args: torch's (``normalized_shape``, ``eps=1e-5``, ``elementwise_affine``, ``bias``,
    ``device``, ``dtype``), and keyword-only ``casting="torch"`` and
    ``zero_centered_gamma=False`` (see the module docstring).
    """

    casting: str = "torch"  # class defaults: instances made before these were arguments
    zero_centered_gamma: bool = False

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, casting: str = "torch",
                 zero_centered_gamma: bool = False):
        _set_options(self, casting, zero_centered_gamma, elementwise_affine)
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
    ``dtype``), and keyword-only ``casting="torch"`` and ``zero_centered_gamma=False`` (see
    the module docstring).
    """

    casting: str = "torch"  # class defaults: instances made before these were arguments
    zero_centered_gamma: bool = False

    def __init__(self, normalized_shape, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 casting: str = "torch", zero_centered_gamma: bool = False):
        _set_options(self, casting, zero_centered_gamma, elementwise_affine)
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
            casting=self.casting,
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
            casting=self.casting,
        )


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
