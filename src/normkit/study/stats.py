"""Mean, spread and a "within noise" verdict over seeds."""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["summarize", "compare", "NOISE_K"]

# Two configurations differ "beyond noise" when their means are more than NOISE_K standard
# errors of the difference apart (Welch's s.e., sqrt(s1²/n1 + s2²/n2)).  With 2–3 seeds that
# is a rough screen, not a significance test — the report says so.
NOISE_K = 2.0


def summarize(values: list[float | None]) -> dict[str, Any]:
    """``{"n", "n_missing", "mean", "std", "min", "max", "values"}`` over the finite values
    (None marks a missing value, e.g. a diverged run); std is the sample std (n-1), None for
    fewer than two values."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"n": len(vals), "n_missing": len(values) - len(vals),
                           "values": list(values)}
    if not vals:
        out.update(mean=None, std=None, min=None, max=None)
        return out
    out.update(mean=statistics.fmean(vals),
               std=statistics.stdev(vals) if len(vals) > 1 else None,
               min=min(vals), max=max(vals))
    return out


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Compare two :func:`summarize` results: ``{"diff": b.mean - a.mean, "noise": NOISE_K·s.e.,
    "within_noise": bool or None}``; None when either side has fewer than two values."""
    if a["mean"] is None or b["mean"] is None:
        return {"diff": None, "noise": None, "within_noise": None}
    diff = b["mean"] - a["mean"]
    if a["std"] is None or b["std"] is None:
        return {"diff": diff, "noise": None, "within_noise": None}
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    noise = NOISE_K * se
    return {"diff": diff, "noise": noise, "within_noise": abs(diff) <= noise}
