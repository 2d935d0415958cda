"""What a model version showed over a window: per-layer statistics merged from its telemetry.

Read from a ``watch`` JSONL file (``read_jsonl``), from records already read, or from a
Prometheus server (``PrometheusSource``: the HTTP API's ``query_range`` and ``query``).  A
JSONL file gives the exact mergeable sums and histograms (``LayerStats``); Prometheus holds
only what the exporter serves — gauges of the input and output mean/std, counters and the
latency histogram — so its ``LayerStats`` carry means and variances without histograms (the
watch's own PSI/KS gauges stand in, where its watch had a baseline) and its row counts are
estimated as sampled steps × batch size × sequence length.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..monitor._stats import LayerStats
from ..monitor.exporters import read_jsonl

__all__ = ["Evidence", "LayerEvidence", "PrometheusSource", "gather"]


@dataclass
class LayerEvidence:
    """One layer over the window.  ``latency_p50``/``p99`` in seconds, from ``latency_calls``
    timed calls (None: none timed); ``psi``/``ks``: the watch's own drift gauges (Prometheus
    only; a JSONL window is compared on its histograms instead)."""

    stats: LayerStats
    latency_p50: float | None = None
    latency_p99: float | None = None
    latency_calls: int = 0
    psi: float | None = None
    ks: float | None = None


@dataclass
class Evidence:
    """A model version's telemetry over a window.

    Attributes:
        model, version: who it describes.
        steps: sampled steps; ``nonfinite_steps``: those with NaN/Inf anywhere.
        first_unix, last_unix: when the window's first and last step ran.
        layers: {qualified layer name: LayerEvidence}.
        source: where it was read (a path, "records", a Prometheus URL).
    """

    model: str
    version: str
    steps: int
    nonfinite_steps: int
    first_unix: float | None
    last_unix: float | None
    layers: dict[str, LayerEvidence] = field(default_factory=dict)
    source: str = "records"

    @property
    def seconds(self) -> float:
        if self.first_unix is None or self.last_unix is None:
            return 0.0
        return self.last_unix - self.first_unix


def _latency(stats: LayerStats) -> dict:
    h = stats.hist_latency
    if not h.n:
        return {}
    p50, p99 = h.quantiles((0.5, 0.99))
    return {"latency_p50": p50, "latency_p99": p99, "latency_calls": h.n}


def from_records(records: Iterable[dict], source: str = "records", model: str | None = None,
                 version: str | None = None) -> Evidence:
    """Merges the step records of one model version (``model``/``version`` pick it; a window
    holding several versions must be told which)."""
    merged: dict[tuple[str, str], Evidence] = {}
    for rec in records:
        if rec.get("type") != "step":
            continue
        key = (rec["model"], rec["version"])
        if (model is not None and key[0] != model) or (version is not None
                                                       and key[1] != version):
            continue
        ev = merged.get(key)
        if ev is None:
            ev = merged[key] = Evidence(*key, 0, 0, None, None, {}, source)
        ev.steps += 1
        nf = rec["nonfinite"]
        ev.nonfinite_steps += any(nf[p]["origin"] is not None for p in ("forward", "backward"))
        t = rec["time_unix"]
        ev.first_unix = t if ev.first_unix is None else min(ev.first_unix, t)
        ev.last_unix = t if ev.last_unix is None else max(ev.last_unix, t)
        for name, d in rec["layers"].items():
            s = LayerStats.from_dict(d)
            if name in ev.layers:
                ev.layers[name].stats.merge(s)
            else:
                ev.layers[name] = LayerEvidence(s)
    if not merged:
        picked = [f"{what} {v!r}" for what, v in (("model", model), ("version", version))
                  if v is not None]
        raise ValueError(f"{source}: no step records" + (f" of {' '.join(picked)}"
                                                         if picked else ""))
    if len(merged) > 1:
        names = ", ".join(f"{m} {v}" for m, v in merged)
        raise ValueError(f"{source}: holds several model versions ({names}); say which one "
                         "(model=, version=; --model, --version)")
    ev = next(iter(merged.values()))
    for le in ev.layers.values():
        for k, v in _latency(le.stats).items():
            setattr(le, k, v)
    return ev


class PrometheusSource:
    """A model version's telemetry in a Prometheus server, over [since, until].

    Args:
        url: the server, e.g. ``http://127.0.0.1:9090``.
        since, until: the window, Unix seconds (``until`` None: now).
        model, version: the ``model`` and ``version`` labels of the candidate's series.
        timeout: seconds per HTTP request.
    """

    def __init__(self, url: str, since: float, until: float | None = None, *, model: str,
                 version: str, timeout: float = 10.0):
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"PrometheusSource: url must start with http:// or https://, "
                             f"got {url!r}")
        self.url = str(url).rstrip("/")
        self.until = float(time.time() if until is None else until)
        self.since = float(since)
        if not self.since < self.until:
            raise ValueError(f"PrometheusSource: since ({self.since}) must be before until "
                             f"({self.until})")
        self.model, self.version, self.timeout = str(model), str(version), timeout

    def __repr__(self) -> str:
        return (f"PrometheusSource({self.url!r}, since={self.since}, until={self.until}, "
                f"model={self.model!r}, version={self.version!r})")

    def _api(self, endpoint: str, params: dict) -> list:
        q = f"{self.url}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(q, timeout=self.timeout) as r:
                doc = json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise OSError(f"{self.url}: Prometheus answered HTTP {e.code}: {body[:200]}") from None
        except (urllib.error.URLError, OSError) as e:
            raise OSError(f"{self.url}: cannot reach Prometheus ({getattr(e, 'reason', e)})") \
                from None
        except ValueError:
            raise OSError(f"{self.url}: Prometheus did not answer JSON") from None
        if doc.get("status") != "success":
            raise OSError(f"{self.url}: Prometheus query failed: {doc.get('error')}")
        return doc["data"]["result"]

    def _sel(self, extra: str = "") -> str:
        esc = lambda s: s.replace("\\", "\\\\").replace('"', '\\"')  # noqa: E731
        return f'{{model="{esc(self.model)}",version="{esc(self.version)}"{extra}}}'

    def _range(self, metric: str) -> dict[str, list[float]]:
        """Samples of a gauge over the window, per layer ("" for a series without one)."""
        step = max(1.0, (self.until - self.since) / 200)
        out: dict[str, list[float]] = {}
        for s in self._api("query_range", {"query": metric + self._sel(), "start": self.since,
                                           "end": self.until, "step": step}):
            vals = [float(v) for _, v in s["values"] if math.isfinite(float(v))]
            out.setdefault(s["metric"].get("layer", ""), []).extend(vals)
        return out

    def _increase(self, expr: str) -> dict[str, float]:
        """``sum by (layer)(increase(expr[window]))`` at ``until``."""
        span = max(1, round(self.until - self.since))
        q = f"sum by (layer) (increase({expr}[{span}s]))"
        return {s["metric"].get("layer", ""): float(s["value"][1])
                for s in self._api("query", {"query": q, "time": self.until})}

    def _quantile(self, q: float) -> dict[str, float]:
        span = max(1, round(self.until - self.since))
        expr = (f"histogram_quantile({q}, sum by (layer, le) (increase("
                f"normkit_norm_forward_latency_seconds_bucket{self._sel()}[{span}s])))")
        return {s["metric"]["layer"]: float(s["value"][1])
                for s in self._api("query", {"query": expr, "time": self.until})}

    def evidence(self) -> Evidence:
        """Reads the window.

        Raises:
            OSError: the server cannot be reached or refuses a query.
            ValueError: it holds no sampled step of this model version in the window.
        """
        where = f"{self.url} (model={self.model!r}, version={self.version!r})"
        steps_t = self._api("query_range", {
            "query": "normkit_sampled_steps_total" + self._sel(), "start": self.since,
            "end": self.until, "step": max(1.0, (self.until - self.since) / 200)})
        steps = round(sum(self._increase("normkit_sampled_steps_total" + self._sel()).values()))
        if not steps_t or steps < 1:
            raise ValueError(f"{where}: no sampled steps between {self.since:.0f} and "
                             f"{self.until:.0f}")
        times = [float(t) for s in steps_t for t, _ in s["values"]]
        bad_steps = round(sum(self._increase("normkit_nonfinite_steps_total"
                                             + self._sel()).values()))
        nf_rows = self._increase("normkit_nonfinite_rows_total" + self._sel(',pass="forward"'))
        g = {name: self._range(f"normkit_{name}") for name in (
            "norm_input_mean", "norm_input_std", "norm_input_rms", "norm_output_mean",
            "norm_output_std", "drift_psi", "drift_ks", "batch_size", "sequence_length")}
        mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
        batch = mean(g["batch_size"].get("", [])) or 1.0
        seq = mean(g["sequence_length"].get("", [])) or 1.0
        rows = round(steps * batch * seq)
        p50, p99 = self._quantile(0.5), self._quantile(0.99)
        calls = self._increase("normkit_norm_forward_latency_seconds_count" + self._sel())
        ev = Evidence(self.model, self.version, steps, bad_steps, min(times), max(times), {},
                      self.url)
        for layer in sorted(set(g["norm_input_rms"]) | set(g["norm_input_std"])):
            mu, sd = mean(g["norm_input_mean"].get(layer, [])), mean(
                g["norm_input_std"].get(layer, []))
            rms = mean(g["norm_input_rms"].get(layer, []))
            s = LayerStats(kind="ln" if mu is not None else "rms", rows=rows, steps=steps,
                           nonfinite_rows=round(nf_rows.get(layer, 0.0)))
            if mu is not None and sd is not None:
                s.sum_mean, s.sum_mean_sq, s.sum_var = rows * mu, rows * mu * mu, rows * sd * sd
            if rms is not None:
                s.sum_ms = rows * rms * rms
            om, osd = mean(g["norm_output_mean"].get(layer, [])), mean(
                g["norm_output_std"].get(layer, []))
            if om is not None and osd is not None:
                s.out_n, s.out_sum, s.out_sumsq = rows, rows * om, rows * (osd * osd + om * om)
            psi, ks = g["drift_psi"].get(layer), g["drift_ks"].get(layer)
            n_calls = round(calls.get(layer, 0.0))
            ev.layers[layer] = LayerEvidence(
                s, p50.get(layer) if n_calls else None, p99.get(layer) if n_calls else None,
                n_calls, max(psi) if psi else None, max(ks) if ks else None)
        return ev


def gather(source, what: str, model: str | None = None,
           version: str | None = None) -> Evidence:
    """Evidence from a JSONL path, an iterable of records, a ``PrometheusSource`` or an
    ``Evidence`` (returned as is); ``what`` names the argument in errors."""
    if isinstance(source, Evidence):
        return source
    if isinstance(source, PrometheusSource):
        return source.evidence()
    if isinstance(source, (str, os.PathLike)):
        return from_records(read_jsonl(source), str(source), model, version)
    if isinstance(source, Iterable) and not isinstance(source, (bytes, dict)):
        return from_records(source, what, model, version)
    raise TypeError(f"{what}: expected a JSONL path, records, a PrometheusSource or Evidence, "
                    f"got {type(source).__name__}")
