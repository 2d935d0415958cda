"""Drop-in modules: ``LayerNorm`` and ``RMSNorm`` backed by normkit's kernels.

Each class subclasses the torch module it replaces and overrides only ``forward`` (STYLE habit 4),
so the constructor, the parameters (``weight``, ``bias``), the state_dict keys and
``reset_parameters`` are torch's own: a checkpoint saved from ``torch.nn.LayerNorm`` loads into
``normkit.nn.LayerNorm`` with ``strict=True`` and back.

Two class attributes select model-specific numerics; an instance (for example one made by
``normkit.convert`` from a Hugging Face norm) may override them:

* ``casting`` — where the cast back to a 16-bit dtype happens ("torch", "gemma", "llama", "t5";
  see ``normkit.layer_norm``).  Output dtype: x.dtype for "torch"/"gemma";
  ``promote_types(x.dtype, weight.dtype)`` for "llama"; for "t5" weight.dtype when the weight is
  16-bit, else float32.  With the default "torch" the output dtype is always x.dtype, as in torch.
* ``zero_centered_gamma`` — multiply by ``1 + weight`` (γ stored zero-centred, as in Gemma).
"""

from __future__ import annotations

import torch

from .functional import layer_norm, rms_norm

__all__ = ["LayerNorm", "RMSNorm", "FusedAddLayerNorm", "FusedAddRMSNorm"]


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
    """

    casting: str = "torch"
    zero_centered_gamma: bool = False

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalizes ``input`` of shape (..., *normalized_shape); returns the same shape."""
        return layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps,
            zero_centered_gamma=self.zero_centered_gamma, casting=self.casting,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + _options_repr(self)


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` computed by normkit; same constructor, parameters and state_dict.

    ``y = x * rsqrt(mean(x²) + eps) * weight`` over the trailing ``normalized_shape`` dims;
    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as in torch.

    Output dtype: x.dtype with the default ``casting="torch"``; see the module docstring for the
    other casting modes.
    """

    casting: str = "torch"
    zero_centered_gamma: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalizes ``x`` of shape (..., *normalized_shape); returns the same shape."""
        return rms_norm(
            x, self.normalized_shape, self.weight, self.eps,
            zero_centered_gamma=self.zero_centered_gamma, casting=self.casting,
        )

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
