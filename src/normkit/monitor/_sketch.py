"""A mergeable histogram on fixed, signed log-spaced buckets.

Every histogram in normkit uses the same bucket edges, so histograms from different steps,
ranks, runs and baselines add bucket by bucket (mergeable, like a DDSketch) and compare directly
for PSI and KS.  Edges: 0, ±2^(j/4) for j in [-80, 80] (±9.5e-7 … ±1.05e6); each bucket is 19%
wide relative to its value, so a quantile read back is within ~10% of the true one.  Values
outside ±2^20 fall into the two end buckets (min/max are kept exactly alongside).
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from ._schema import EDGES, EDGES_ID, NBUCKETS  # the layout files store (and name)

EDGES_NP = np.array(EDGES, dtype=np.float64)
_EDGES_T = {torch.float32: torch.tensor(EDGES, dtype=torch.float32),
            torch.float64: torch.tensor(EDGES, dtype=torch.float64)}


def _finite_values(values: torch.Tensor) -> torch.Tensor:
    v = values.detach()
    if v.dtype not in _EDGES_T:
        v = v.float()
    if v.device.type != "cpu":
        v = v.cpu()
    return v[torch.isfinite(v)]


def bucket_counts(values: torch.Tensor) -> torch.Tensor:
    """Counts (NBUCKETS,) int64 of the finite entries of a 1-D tensor."""
    v = _finite_values(values)
    return torch.bincount(torch.bucketize(v, _EDGES_T[v.dtype]), minlength=NBUCKETS)


class Histogram:
    """Counts on the shared edges (an int64 tensor, so merging is one add), plus exact
    count/min/max.

    Attributes:
        counts: (NBUCKETS,) int64 tensor.
        n: total count.
        lo, hi: exact min and max seen (inf/-inf when empty).
    """

    __slots__ = ("counts", "n", "lo", "hi")

    def __init__(self, counts=None, n=0, lo=math.inf, hi=-math.inf):
        if counts is None:
            counts = torch.zeros(NBUCKETS, dtype=torch.int64)
        elif not isinstance(counts, torch.Tensor):
            counts = torch.tensor(counts, dtype=torch.int64)
        self.counts = counts
        self.n = int(n)
        self.lo = float(lo)
        self.hi = float(hi)

    @classmethod
    def of(cls, values: torch.Tensor) -> Histogram:
        """The histogram of a 1-D tensor's finite values."""
        v = _finite_values(values)
        if v.numel() == 0:
            return cls()
        c = torch.bincount(torch.bucketize(v, _EDGES_T[v.dtype]), minlength=NBUCKETS)
        lo, hi = torch.stack(torch.aminmax(v)).tolist()
        return cls(c, v.numel(), lo, hi)

    def add(self, value: float) -> None:
        """Adds one finite value (bisect on the edges: no tensor op for a single number)."""
        if not math.isfinite(value):
            return
        self.counts[bisect.bisect_left(EDGES, value)] += 1
        self.n += 1
        self.lo = min(self.lo, value)
        self.hi = max(self.hi, value)

    def merge(self, other: Histogram) -> Histogram:
        """Adds ``other`` into self (in place); returns self."""
        if other.n:
            self.counts = self.counts + other.counts
            self.n += other.n
            self.lo = min(self.lo, other.lo)
            self.hi = max(self.hi, other.hi)
        return self

    def copy(self) -> Histogram:
        return Histogram(self.counts.clone(), self.n, self.lo, self.hi)

    # -- reading -------------------------------------------------------------------------------

    def _bucket_range(self, i: int) -> tuple[float, float]:
        a = EDGES[i - 1] if i > 0 else self.lo
        b = EDGES[i] if i < len(EDGES) else self.hi
        # Clamp to the exact extremes so quantiles never leave [min, max].
        a, b = max(a, self.lo), min(b, self.hi)
        return (a, b) if a <= b else (b, b)

    def quantile(self, q: float) -> float:
        """The q-quantile (0 ≤ q ≤ 1), linear within a bucket; NaN when empty."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs) -> list[float]:
        """Several quantiles in one pass over the counts (a cumsum and a searchsorted)."""
        if self.n == 0:
            return [math.nan] * len(qs)
        cum = self.counts.cumsum(0)
        targets = torch.tensor([q * self.n for q in qs], dtype=torch.float64)
        idx = torch.searchsorted(cum.double(), targets).clamp_max(NBUCKETS - 1)
        rows = torch.stack([idx, cum[idx], self.counts[idx]], 1).tolist()
        out = []
        for (i, c_hi, c), t in zip(rows, targets.tolist(), strict=True):
            if c == 0:
                out.append(self.hi)
                continue
            a, b = self._bucket_range(i)
            out.append(a + (b - a) * min(max((t - (c_hi - c)) / c, 0.0), 1.0))
        return out

    def cdf(self, x: float) -> float:
        """Fraction of values ≤ x (linear within a bucket)."""
        if self.n == 0:
            return math.nan
        if x < self.lo:
            return 0.0
        if x >= self.hi:
            return 1.0
        i = bisect.bisect_left(EDGES, x)  # x's bucket: every bucket before it lies below x
        a, b = self._bucket_range(i)
        c = int(self.counts[i])
        part = c if x >= b else c * (x - a) / (b - a) if x > a else 0.0
        return (int(self.counts[:i].sum()) + part) / self.n

    def square_spread(self, center: float = 0.0) -> float:
        """Standard deviation of (x − center)² over the values, each bucket's values taken as
        spread evenly between its edges (clamped to the exact min/max).  Within ~7% where the
        values span many buckets (lognormal values, whose few largest dominate), up to ~2.2x
        high where they span one or two (buckets are 19% wide; the std of rows of 1024 normal
        values).  NaN when empty."""
        if self.n == 0:
            return math.nan
        idx = torch.nonzero(self.counts).flatten().tolist()
        c = self.counts[idx].double().numpy()
        a, b = np.array([self._bucket_range(i) for i in idx]).T - center
        w = b - a
        flat = w <= 1e-12 * np.maximum(np.abs(a), np.abs(b))
        w = np.where(flat, 1.0, w)

        def mean_power(k):  # E[(x - center)^k] of a uniform spread over [a, b], per bucket
            return np.where(flat, a ** k, (b ** (k + 1) - a ** (k + 1)) / ((k + 1) * w))

        m2 = float((c * mean_power(2)).sum() / self.n)
        m4 = float((c * mean_power(4)).sum() / self.n)
        return math.sqrt(max(m4 - m2 * m2, 0.0))

    # -- plain data ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Sparse form: ``{"edges": EDGES_ID, "n", "min", "max",
        "buckets": [[index, count], ...]}``."""
        return {
            "edges": EDGES_ID,
            "n": self.n,
            "min": self.lo if self.n else None,
            "max": self.hi if self.n else None,
            "buckets": _sparse(self.counts),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Histogram:
        if d.get("edges") != EDGES_ID:
            raise ValueError(f"histogram bucket layout {d.get('edges')!r} is not {EDGES_ID!r}")
        h = cls()
        if d["buckets"]:
            idx, cnt = zip(*d["buckets"], strict=True)
            h.counts[list(idx)] = torch.tensor(cnt, dtype=torch.int64)
        h.n = int(d["n"])
        if h.n:
            h.lo, h.hi = float(d["min"]), float(d["max"])
        return h


def _sparse(counts: torch.Tensor) -> list[list[int]]:
    c = counts.numpy()
    idx = np.flatnonzero(c)
    return np.stack([idx, c[idx]], 1).tolist()


def psi(base: Histogram, live: Histogram, bins: int = 10) -> float:
    """Population stability index over ``bins`` bins cut at the baseline's quantiles (the usual
    decile PSI): Σ (l − b)·ln(l / b).  Each bin's count gets half a row added on both sides
    (Jeffreys smoothing), so an empty bin is finite and a small sample's empty bins do not
    dominate (against a floor on the fractions, it moves PSI by 5% at 200 rows, under 1% at
    2000).  NaN when either side is empty."""
    if base.n == 0 or live.n == 0:
        return math.nan
    cuts = sorted(set(base.quantiles([k / bins for k in range(1, bins)])))
    k = len(cuts) + 1
    total = 0.0
    pb = pl = 0.0
    for c in cuts + [math.inf]:
        cb, cl = base.cdf(c), live.cdf(c)
        b = ((cb - pb) * base.n + 0.5) / (base.n + 0.5 * k)
        l = ((cl - pl) * live.n + 0.5) / (live.n + 0.5 * k)
        total += (l - b) * math.log(l / b)
        pb, pl = cb, cl
    return total


def ks(base: Histogram, live: Histogram) -> float:
    """Kolmogorov–Smirnov distance sup |F_base − F_live|, read at the shared bucket edges and
    both sides' extremes; NaN when either side is empty."""
    if base.n == 0 or live.n == 0:
        return math.nan
    fa = base.counts.cumsum(0).double() / base.n
    fb = live.counts.cumsum(0).double() / live.n
    return float((fa - fb).abs().max())
