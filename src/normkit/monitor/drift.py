"""Baselines and drift: what a model's norm inputs looked like, and how far live data moved.

A ``Baseline`` holds one ``LayerStats`` per norm layer (sums, counts and histograms; no rows),
plus who it describes (model name and version, normkit version).  Saved as JSON::

    {"schema": "normkit.baseline", "schema_version": 1, "model_name": ..., "model_version": ...,
     "normkit_version": ..., "created_unix": ..., "layers": {qualified name: LayerStats dict}}

written atomically (temp file + ``os.replace``), so a reader never sees half a baseline.

Drift of a layer's live input against the baseline (``compute_drift``):

* ``mean_shift`` = |μ_live − μ_base| / σ_base (LayerNorm-like layers; None for RMSNorm, which
  has no mean);
* ``variance_ratio`` = σ²_live / σ²_base (for RMSNorm: the mean-square ratio);
* ``psi`` — population stability index on the baseline's deciles, and ``ks`` — the
  Kolmogorov–Smirnov distance, both on the histograms of per-row mean and per-row scale (std or
  RMS); the larger of the two rows' values is reported.

A layer drifts when any metric crosses its ``DriftThresholds`` (defaults: mean shift 0.05 σ,
variance change 10% — the usual SLO starting points — PSI 0.2, KS 0.2).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from .._io import write_text_atomic
from ._sketch import ks, psi
from ._stats import LayerStats

__all__ = ["Baseline", "DriftThresholds", "DriftResult", "compute_drift", "BASELINE_SCHEMA_VERSION"]

BASELINE_SCHEMA = "normkit.baseline"
BASELINE_SCHEMA_VERSION = 1


def _normkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("normkit")
    except Exception:
        return "unknown"


@dataclass(frozen=True)
class DriftThresholds:
    """When a layer counts as drifted.  A metric at or above its threshold crosses it.

    Args:
        mean_shift: |Δμ| in units of the baseline std (default 0.05).
        variance_change: |σ²_live/σ²_base − 1| (default 0.10).
        psi: population stability index (default 0.2; 0.1–0.2 is "watch", ≥ 0.2 "act").
        ks: Kolmogorov–Smirnov distance (default 0.2).
        min_rows: rows the live window needs before drift is judged at all (default 1000):
            with fewer, PSI/KS noise alone can cross the thresholds.
    """

    mean_shift: float = 0.05
    variance_change: float = 0.10
    psi: float = 0.2
    ks: float = 0.2
    min_rows: int = 1000

    def __post_init__(self):
        for name in ("mean_shift", "variance_change", "psi", "ks"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"DriftThresholds.{name} must be a positive number, got {v!r}")
        if not (isinstance(self.min_rows, int) and self.min_rows >= 1):
            raise ValueError(f"DriftThresholds.min_rows must be an int >= 1, got {self.min_rows!r}")


@dataclass(frozen=True)
class DriftResult:
    """Drift of one layer.  Metrics are None where they do not apply or data is missing."""

    layer: str
    rows: int
    mean_shift: float | None
    variance_ratio: float | None
    psi: float | None
    ks: float | None
    crossed: tuple[str, ...]  # names of the metrics at or over threshold

    @property
    def drifted(self) -> bool:
        return bool(self.crossed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crossed"] = list(self.crossed)
        return d


def _nan_to_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def compute_drift(layer: str, base: LayerStats, live: LayerStats,
                  thresholds: DriftThresholds = DriftThresholds()) -> DriftResult | None:
    """Drift of ``live`` against ``base`` for one layer; None while ``live`` has fewer than
    ``thresholds.min_rows`` rows or the baseline has none."""
    if live.rows < thresholds.min_rows or base.rows == 0:
        return None
    shift = ratio = None
    if base.kind == "ln" and live.kind == "ln":
        bv = base.input_var
        if bv and bv > 0:
            shift = abs(live.input_mean - base.input_mean) / math.sqrt(bv)
            ratio = live.input_var / bv
    elif base.input_ms:
        ratio = live.input_ms / base.input_ms
    p = k = None
    for hb, hl in ((base.hist_mean, live.hist_mean), (base.hist_scale, live.hist_scale)):
        if hb.n and hl.n:
            p = max(p or 0.0, psi(hb, hl))
            k = max(k or 0.0, ks(hb, hl))
    crossed = []
    if shift is not None and shift >= thresholds.mean_shift:
        crossed.append("mean_shift")
    if ratio is not None and abs(ratio - 1.0) >= thresholds.variance_change:
        crossed.append("variance_ratio")
    if p is not None and p >= thresholds.psi:
        crossed.append("psi")
    if k is not None and k >= thresholds.ks:
        crossed.append("ks")
    return DriftResult(layer, live.rows, _nan_to_none(shift), _nan_to_none(ratio),
                       _nan_to_none(p), _nan_to_none(k), tuple(crossed))


class Baseline:
    """Per-layer input statistics of a model version, to compare live data against.

    Build one with ``Watch.baseline()``, ``Baseline.from_jsonl(path)`` or ``Baseline.load``.

    Attributes:
        model_name, model_version: who it describes.
        layers: {qualified layer name: LayerStats}.
        normkit_version: the normkit that captured it.
        created_unix: capture time (seconds since the epoch).
    """

    def __init__(self, model_name: str, model_version: str, layers: dict[str, LayerStats],
                 normkit_version: str | None = None, created_unix: float | None = None):
        self.model_name = str(model_name)
        self.model_version = str(model_version)
        self.layers = dict(layers)
        self.normkit_version = normkit_version or _normkit_version()
        self.created_unix = time.time() if created_unix is None else float(created_unix)

    def __repr__(self) -> str:
        return (f"Baseline(model_name={self.model_name!r}, model_version={self.model_version!r}, "
                f"layers={len(self.layers)})")

    def to_dict(self) -> dict:
        return {
            "schema": BASELINE_SCHEMA,
            "schema_version": BASELINE_SCHEMA_VERSION,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "normkit_version": self.normkit_version,
            "created_unix": self.created_unix,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Baseline:
        if d.get("schema") != BASELINE_SCHEMA:
            raise ValueError(f"not a normkit baseline (schema {d.get('schema')!r})")
        v = d.get("schema_version")
        if v != BASELINE_SCHEMA_VERSION:
            raise ValueError(f"baseline schema_version {v!r} is not supported "
                             f"(this normkit reads {BASELINE_SCHEMA_VERSION})")
        layers = {k: LayerStats.from_dict(s) for k, s in d["layers"].items()}
        return cls(d["model_name"], d["model_version"], layers, d.get("normkit_version"),
                   d.get("created_unix"))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the baseline as versioned JSON, atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Baseline:
        """Reads a baseline saved by ``save``; raises ValueError on another schema/version."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike, *, model_version: str | None = None,
                   rank: int | str | None = None) -> Baseline:
        """Merges the per-layer statistics of every step record in a ``JsonlExporter`` file.

        Args:
            path: the JSONL file.
            model_version: only records of this version (default: all; the last one seen
                names the baseline).
            rank: only records of this rank label (default: all ranks merged).

        Raises:
            ValueError: no usable step record, or a record of another schema version.
        """
        from .exporters import read_jsonl

        return cls.from_records(read_jsonl(path), model_version=model_version, rank=rank,
                                source=str(path))

    @classmethod
    def from_records(cls, records: Iterable[dict], *, model_version: str | None = None,
                     rank: int | str | None = None, source: str = "records") -> Baseline:
        """``from_jsonl`` on records already read (``read_jsonl``'s dicts); ``source`` names
        them in errors."""
        from .exporters import JSONL_SCHEMA_VERSION

        layers: dict[str, LayerStats] = {}
        name = version = None
        for rec in records:
            if rec.get("type") != "step":
                continue
            if rec.get("schema_version") != JSONL_SCHEMA_VERSION:
                raise ValueError(f"{source}: record schema_version "
                                 f"{rec.get('schema_version')!r}")
            if model_version is not None and rec["version"] != model_version:
                continue
            if rank is not None and str(rec["rank"]) != str(rank):
                continue
            name, version = rec["model"], rec["version"]
            for lname, d in rec["layers"].items():
                s = LayerStats.from_dict(d)
                if lname in layers:
                    layers[lname].merge(s)
                else:
                    layers[lname] = s
        if name is None:
            raise ValueError(f"{source}: no step records to build a baseline from")
        return cls(name, version, layers)

    def drift(self, live: dict[str, LayerStats],
              thresholds: DriftThresholds = DriftThresholds()) -> dict[str, DriftResult]:
        """Drift per layer present in both; layers without enough live rows are left out."""
        out = {}
        for name, base in self.layers.items():
            if name in live:
                r = compute_drift(name, base, live[name], thresholds)
                if r is not None:
                    out[name] = r
        return out
