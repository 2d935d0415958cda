"""Baselines and drift: what a model's norm inputs looked like, and how far live data moved.

A ``Baseline`` holds one ``LayerStats`` per norm layer (sums, counts and histograms; no rows),
plus who it describes (model name and version, normkit version).  Saved as JSON::

    {"schema": "normkit.baseline", "schema_version": 1, "model_name": ..., "model_version": ...,
     "normkit_version": ..., "created_unix": ..., "layers": {qualified name: LayerStats dict}}

written atomically (temp file + ``os.replace``), so a reader never sees half a baseline.
``Baseline.load`` checks the file against the schema, field by field (``_schema.BASELINE``),
before using it: a wrong type (``"rows": "lots"``), a missing field, a list where an object
belongs, a truncated file or a newer ``schema_version`` raise one ValueError naming the file
and the field (``b.json: layers["blocks.0.ln"].rows: expected an int >= 0, got "lots"``).

Drift of a layer's live input against the baseline (``compute_drift``):

* ``mean_shift`` = |μ_live − μ_base| / σ_base (LayerNorm-like layers; None for RMSNorm, which
  has no mean);
* ``variance_ratio`` = σ²_live / σ²_base (for RMSNorm: the mean-square ratio);
* ``psi`` — population stability index on bins cut at the baseline's quantiles, and ``ks`` —
  the Kolmogorov–Smirnov distance, both on the histograms of per-row mean and per-row scale (std
  or RMS); the larger of the two rows' values is reported.

A layer drifts when any metric reaches its *limit*: the configured ``DriftThresholds`` value
(mean shift 0.05 σ, variance change 10% — the usual SLO starting points — PSI 0.2, KS 0.2), or,
where the live window or the baseline holds few rows, the larger value that sampling noise alone
reaches with probability ``alpha`` at those row counts (rows are the sampling units; under no
drift the baseline's own spread tells how far a window of n rows wanders).  With n live and m
baseline rows and a = alpha / 6 (split evenly, Bonferroni, over up to six tests):

* mean shift: z·s_m·√(1/n + 1/m) / σ_base, s_m the baseline's std of per-row means and z the
  two-sided normal quantile at a;
* variance change: exp(z·τ·√(1/n + 1/m) / σ²_base) − 1, τ the std of a row's contribution to
  σ² (read from the baseline's histograms by ``Histogram.square_spread``: up to 2.2x high
  where rows are alike, within ~7% otherwise; the log scale keeps a variance's skew in check);
* KS: c(a)·√((n + m) / (n·m)), c(a) = √(−ln(a/2) / 2), the two-sample KS critical value;
* PSI: (1/n + 1/m)·χ²_{B−1}(1 − a), the χ² law a PSI of B bins follows under no drift (its
  mean is (B − 1)(1/n + 1/m)); B = 10 bins, fewer below 50 rows (n/5, at least 2), so that
  each bin expects five rows or more, and the bins are smoothed (``_sketch.psi``).

At thousands of rows every limit is the configured threshold; at a few dozen rows only a gross
change crosses.  Rows are treated as independent draws: tokens of one sequence are not quite,
so a sequence model's false-alarm rate at small windows can exceed ``alpha`` somewhat; so can
the variance limit's for heavy-tailed inputs whose row variances have no finite variance
(Student t with 3 degrees of freedom: 4% of 300-row windows at ``alpha`` = 1%).  A
window of fewer than ``min_rows`` rows (or a layer the baseline has no rows for) is not judged:
its ``DriftResult`` says ``evaluable=False`` and why.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from statistics import NormalDist

from .._io import write_text_atomic
from .._provenance import normkit_version as _running_version
from ._schema import (
    BASELINE,
    BASELINE_SCHEMA,
    BASELINE_SCHEMA_VERSION,
    RECORD_SCHEMA,
    STEP_STATS,
    check_document,
    read_jsonl,
)
from ._sketch import ks, psi
from ._stats import LayerStats

__all__ = ["Baseline", "DriftThresholds", "DriftResult", "compute_drift", "BASELINE_SCHEMA_VERSION"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftThresholds:
    """When a layer counts as drifted.  A metric at or above its limit crosses it; the limit is
    the threshold here, or more where few rows make noise alone reach it (module docstring).

    Args:
        mean_shift: |Δμ| in units of the baseline std (default 0.05).
        variance_change: |σ²_live/σ²_base − 1| (default 0.10).
        psi: population stability index (default 0.2; 0.1–0.2 is "watch", ≥ 0.2 "act").
        ks: Kolmogorov–Smirnov distance (default 0.2).
        min_rows: rows the live window and the baseline need before drift is judged at all
            (default 20): below that the normal approximations behind the limits fail, and a
            handful of rows is one request, not a distribution.
        alpha: the chance that one check of one undrifted layer is called drifted (default
            0.001), which sets the limits at small row counts.
    """

    mean_shift: float = 0.05
    variance_change: float = 0.10
    psi: float = 0.2
    ks: float = 0.2
    min_rows: int = 20
    alpha: float = 0.001

    def __post_init__(self):
        for name in ("mean_shift", "variance_change", "psi", "ks"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"DriftThresholds.{name} must be a positive number, got {v!r}")
        if not (isinstance(self.min_rows, int) and self.min_rows >= 1):
            raise ValueError(f"DriftThresholds.min_rows must be an int >= 1, got {self.min_rows!r}")
        if not (isinstance(self.alpha, float) and 0 < self.alpha < 1):
            raise ValueError(f"DriftThresholds.alpha must be a float in (0, 1), got {self.alpha!r}")


@dataclass(frozen=True)
class DriftResult:
    """Drift of one layer.  Metrics are None where they do not apply or data is missing.

    Attributes:
        crossed: names of the metrics at or over their limit.
        evaluable: False when drift cannot be judged (too few rows, no baseline for the layer);
            ``reason`` says why, and every metric is None.
        limits: the limit each metric was held to ("mean_shift", "variance_change", "psi",
            "ks"): the configured threshold, or more at small row counts.
    """

    layer: str
    rows: int
    mean_shift: float | None
    variance_ratio: float | None
    psi: float | None
    ks: float | None
    crossed: tuple[str, ...]
    evaluable: bool = True
    reason: str | None = None
    limits: dict[str, float] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        return bool(self.crossed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crossed"] = list(self.crossed)
        return d


# Tests one check may run: mean shift, variance ratio, and KS and PSI on each of the per-row mean
# and per-row scale histograms.  alpha is split evenly over them (Bonferroni).
_TESTS = 6
_PSI_BINS = 10
_ROWS_PER_PSI_BIN = 5


def _nan_to_none(v: float | None) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _unjudgeable(base: LayerStats, live: LayerStats, min_rows: int) -> str | None:
    """Why drift of this layer cannot be judged, or None."""
    if base.rows == 0:
        return "the baseline has no rows for this layer"
    if base.rows < min_rows:
        return f"the baseline has {base.rows} rows, fewer than min_rows={min_rows}"
    if live.rows < min_rows:
        return f"the live window has {live.rows} rows, fewer than min_rows={min_rows}"
    return None


def _chi2_quantile(df: int, p: float) -> float:
    """The p-quantile of χ² with ``df`` degrees of freedom (Wilson–Hilferty).  At df 1–9 and
    p ≥ 0.99 it lies a little above the true quantile (its tail holds 0.6–1x of 1 − p), so a
    limit built on it errs towards fewer alarms."""
    z = NormalDist().inv_cdf(p)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _row_contribution_sd(base: LayerStats, center: float) -> float:
    """Std of one row's contribution to the pooled second moment about ``center``: its
    scale² (variance or mean square) plus (row mean − center)²; the two std are added, which
    bounds the std of their sum whatever their correlation."""
    sd = base.hist_scale.square_spread()
    if base.hist_mean.n:
        sd += base.hist_mean.square_spread(center)
    return 0.0 if math.isnan(sd) else sd


def compute_drift(layer: str, base: LayerStats, live: LayerStats,
                  thresholds: DriftThresholds = DriftThresholds()) -> DriftResult:
    """Drift of ``live`` against ``base`` for one layer, with limits for these row counts.

    Returns a result with ``evaluable=False`` (and the reason) when either side has fewer than
    ``thresholds.min_rows`` rows."""
    th = thresholds
    reason = _unjudgeable(base, live, th.min_rows)
    if reason is not None:
        return DriftResult(layer, live.rows, None, None, None, None, (), evaluable=False,
                           reason=reason)
    n, m = live.rows, base.rows
    a = th.alpha / _TESTS
    z = NormalDist().inv_cdf(1 - a / 2)
    noise = math.sqrt(1 / n + 1 / m)  # std of a difference of two means, per unit row std
    limits: dict[str, float] = {}
    shift = ratio = None
    if base.kind == "ln" and live.kind == "ln":
        bv = base.input_var
        if bv and bv > 0:
            shift = abs(live.input_mean - base.input_mean) / math.sqrt(bv)
            ratio = live.input_var / bv
            row_mean_sd = math.sqrt(max(base.sum_mean_sq / m - base.input_mean ** 2, 0.0))
            limits["mean_shift"] = max(th.mean_shift, z * row_mean_sd * noise / math.sqrt(bv))
            level, center = bv, base.input_mean
    elif base.input_ms:
        ratio = live.input_ms / base.input_ms
        level, center = base.input_ms, 0.0
    if ratio is not None:
        rel = z * _row_contribution_sd(base, center) * noise / level
        limits["variance_change"] = max(th.variance_change, math.expm1(rel))
    p = k = None
    bins = min(_PSI_BINS, max(2, min(n, m) // _ROWS_PER_PSI_BIN))
    for hb, hl in ((base.hist_mean, live.hist_mean), (base.hist_scale, live.hist_scale)):
        if hb.n and hl.n:
            p = max(p or 0.0, psi(hb, hl, bins))
            k = max(k or 0.0, ks(hb, hl))
    if p is not None:
        limits["psi"] = max(th.psi, (1 / n + 1 / m) * _chi2_quantile(bins - 1, 1 - a))
        limits["ks"] = max(th.ks, math.sqrt(-math.log(a / 2) / 2) * noise)
    crossed = []
    if shift is not None and shift >= limits["mean_shift"]:
        crossed.append("mean_shift")
    if ratio is not None and abs(ratio - 1.0) >= limits["variance_change"]:
        crossed.append("variance_ratio")
    if p is not None and p >= limits["psi"]:
        crossed.append("psi")
    if k is not None and k >= limits["ks"]:
        crossed.append("ks")
    return DriftResult(layer, n, _nan_to_none(shift), _nan_to_none(ratio), _nan_to_none(p),
                       _nan_to_none(k), tuple(crossed), limits=limits)


def warn_unjudged(results: dict[str, DriftResult], said: set[str], who: str) -> None:
    """Logs one warning naming the layers of ``results`` whose drift cannot be judged, and why;
    ``said`` remembers the layers already named, so each is named once."""
    new = [r for name, r in results.items() if not r.evaluable and name not in said]
    if not new:
        return
    said.update(r.layer for r in new)
    log.warning("normkit cannot judge drift of %s for %d layer(s): %s.  Their records say "
                "evaluable=false and normkit_drift_evaluable is 0 until they can (said once "
                "per layer).", who, len(new), "; ".join(f"{r.layer}: {r.reason}" for r in new))


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
        self.normkit_version = normkit_version or _running_version()
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
    def from_dict(cls, d: dict, source: str = "baseline") -> Baseline:
        """The baseline ``to_dict`` made, checked against the schema first
        (``normkit.monitor._schema.BASELINE``).

        Raises:
            ValueError: another schema, another version (a newer one says to upgrade normkit)
                or a field that does not match; the message starts with ``source``, then the
                field, e.g. ``b.json: layers["blocks.0.ln"].rows: expected an int >= 0``.
        """
        check_document(d, BASELINE, BASELINE_SCHEMA, source)
        layers = {k: LayerStats.from_dict(s) for k, s in d["layers"].items()}
        return cls(d["model_name"], d["model_version"], layers, d.get("normkit_version"),
                   d.get("created_unix"))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the baseline as versioned JSON, atomically."""
        write_text_atomic(path, json.dumps(self.to_dict(), separators=(",", ":")))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Baseline:
        """Reads a baseline saved by ``save``.

        Raises:
            OSError: it cannot be read.
            ValueError: it is not JSON (a truncated file), or ``from_dict`` refuses it; the
                message starts with the path.
        """
        with open(path, "rb") as f:
            data = f.read()
        try:
            doc = json.loads(data.decode("utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path}: not JSON ({e})") from None
        return cls.from_dict(doc, source=str(path))

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
        return cls.from_records(read_jsonl(path), model_version=model_version, rank=rank,
                                source=str(path))

    @classmethod
    def from_records(cls, records: Iterable[dict], *, model_version: str | None = None,
                     rank: int | str | None = None, source: str = "records") -> Baseline:
        """``from_jsonl`` on records already read (``read_jsonl``'s dicts); ``source`` names
        them in errors.  What is read of each step record is checked against the schema
        (``ValueError`` naming ``source``, the record's position and the field)."""
        layers: dict[str, LayerStats] = {}
        name = version = None
        for i, rec in enumerate(records):
            if type(rec) is dict and rec.get("type") != "step":
                continue
            check_document(rec, STEP_STATS, RECORD_SCHEMA, f"{source}: record {i + 1}")
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
        """Drift per layer in the baseline or in ``live`` (baseline order first); a layer
        missing on one side, or with too few rows, gets ``evaluable=False`` and the reason."""
        out = {}
        for name in dict.fromkeys([*self.layers, *live]):
            base, cur = self.layers.get(name), live.get(name)
            kind = (base or cur).kind
            out[name] = compute_drift(name, base or LayerStats(kind=kind),
                                      cur or LayerStats(kind=kind), thresholds)
        return out
