"""Output divergence of two model versions on the same inputs (shadow traffic)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..monitor._schema import RECORD_SCHEMA, RECORD_SCHEMA_VERSION

__all__ = ["Divergence", "divergence"]


@dataclass(frozen=True)
class Divergence:
    """How far the candidate's outputs are from the serving model's on the same rows.

    Attributes:
        kl: KL(serving ‖ candidate) of the softmax distributions, in nats, mean over rows
            (the serving model is the reference); inf or NaN when the candidate's logits are
            not finite.
        top1_agreement: fraction of rows whose arg-max class is the same.
        rows: rows compared.
    """

    kl: float
    top1_agreement: float
    rows: int

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self, model: str, version: str, serving_version: str) -> dict:
        """A telemetry record (type "divergence") for an exporter's ``export``: the
        ``PrometheusExporter`` serves it as ``normkit_canary_output_kl`` and
        ``normkit_canary_top1_agreement``; a ``JsonlExporter`` writes it as a line."""
        return {"type": "divergence", "schema": RECORD_SCHEMA,
                "schema_version": RECORD_SCHEMA_VERSION, "model": str(model),
                "version": str(version), "serving_version": str(serving_version),
                "kl": self.kl if math.isfinite(self.kl) else None,  # JSON has no NaN/Inf
                "top1_agreement": self.top1_agreement, "rows": self.rows}


def divergence(candidate_logits: torch.Tensor, serving_logits: torch.Tensor) -> Divergence:
    """KL divergence and top-1 agreement of two models' logits for the same inputs.

    Args:
        candidate_logits, serving_logits: floating tensors of one shape (..., classes); the
            leading dims are rows (e.g. (batch, tokens, vocab)).

    Returns:
        ``Divergence``: KL(serving ‖ candidate) = Σ p_s·(log p_s − log p_c) per row, in nats,
        averaged over rows (computed in float64), and the fraction of rows whose arg-max
        agrees.

    Raises:
        TypeError / ValueError: not floating tensors, shapes differ, or no rows or classes.
    """
    for name, t in (("candidate_logits", candidate_logits), ("serving_logits", serving_logits)):
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            raise TypeError(f"divergence: {name} must be a floating torch.Tensor, got "
                            f"{type(t).__name__ if not isinstance(t, torch.Tensor) else t.dtype}")
        if t.dim() < 1 or t.numel() == 0:
            raise ValueError(f"divergence: {name} must have rows and classes, got shape "
                             f"{tuple(t.shape)}")
    if candidate_logits.shape != serving_logits.shape:
        raise ValueError(f"divergence: candidate_logits {tuple(candidate_logits.shape)} and "
                         f"serving_logits {tuple(serving_logits.shape)} must have one shape")
    c = candidate_logits.detach().reshape(-1, candidate_logits.shape[-1]).double()
    s = serving_logits.detach().reshape(-1, serving_logits.shape[-1]).to(c.device).double()
    log_c, log_s = torch.log_softmax(c, -1), torch.log_softmax(s, -1)
    # xlogy-style: a class the serving model gives probability 0 adds nothing
    p_s = log_s.exp()
    terms = torch.where(p_s > 0, p_s * (log_s - log_c), torch.zeros_like(p_s))
    kl = float(terms.sum(-1).mean())
    agree = float((c.argmax(-1) == s.argmax(-1)).double().mean())
    return Divergence(kl, agree, c.shape[0])
