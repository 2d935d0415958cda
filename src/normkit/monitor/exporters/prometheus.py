"""The Prometheus exporter: the metrics (``METRICS``: name, type, labels, help) a step record
becomes, served on ``/metrics`` through ``prometheus_client`` (imported when the exporter is
built)."""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Iterator

from ..._provenance import normkit_version
from ._optional import require

__all__ = ["PrometheusExporter", "METRICS", "LATENCY_BUCKETS", "DEFAULT_PORT",
           "exported_series_names", "record_samples"]

log = logging.getLogger(__name__)

_L = ("model", "version", "rank")
_LL = _L + ("layer",)

# name, type, label names, help.  The deploy/ rules and dashboards may only use these (a test
# checks it); counters are declared without "_total" as prometheus_client appends it.
METRICS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("normkit_watch_info", "gauge", _L + ("normkit_version",), "1 per watched model version"),
    ("normkit_steps", "counter", _L, "Steps seen (as watch(step=...) counts them)"),
    ("normkit_sampled_steps", "counter", _L, "Steps sampled for statistics"),
    ("normkit_nonfinite_steps", "counter", _L,
     "Sampled steps with non-finite values in forward or backward (the NaN-free-steps SLO's "
     "bad events)"),
    ("normkit_nonfinite_origin", "counter", _L + ("pass", "module"),
     "Sampled steps whose first non-finite value was produced by the module"),
    ("normkit_nonfinite_rows", "counter", _LL + ("pass",),
     "Norm-layer input rows (forward) or input-gradient rows (backward) with NaN/Inf"),
    ("normkit_norm_input_mean", "gauge", _LL, "Mean of the norm layer's input elements"),
    ("normkit_norm_input_std", "gauge", _LL, "Std of the norm layer's input elements"),
    ("normkit_norm_input_rms", "gauge", _LL, "RMS of the norm layer's input elements"),
    ("normkit_norm_input_row_scale", "gauge", _LL + ("quantile",),
     "Quantiles of the per-row std (LayerNorm) or RMS (RMSNorm) of the input"),
    ("normkit_norm_output_mean", "gauge", _LL, "Mean of the norm layer's output elements"),
    ("normkit_norm_output_std", "gauge", _LL, "Std of the norm layer's output elements"),
    ("normkit_norm_weight_norm", "gauge", _LL, "L2 norm of gamma"),
    ("normkit_norm_bias_norm", "gauge", _LL, "L2 norm of beta"),
    ("normkit_norm_weight_update_norm", "gauge", _LL,
     "L2 norm of gamma's change since the previous sampled step"),
    ("normkit_norm_bias_update_norm", "gauge", _LL,
     "L2 norm of beta's change since the previous sampled step"),
    ("normkit_norm_input_grad_norm", "gauge", _LL, "L2 norm of the gradient w.r.t. the input"),
    ("normkit_norm_weight_grad_norm", "gauge", _LL, "L2 norm of gamma's gradient"),
    ("normkit_norm_bias_grad_norm", "gauge", _LL, "L2 norm of beta's gradient"),
    ("normkit_norm_forward_latency_seconds", "histogram", _LL,
     "Wall time of the norm layer's forward (sampled)"),
    ("normkit_batch_size", "gauge", _L, "Batch size seen by the first norm layer"),
    ("normkit_sequence_length", "gauge", _L, "Sequence length seen by the first norm layer"),
    ("normkit_drift_mean_shift", "gauge", _LL, "|mean shift| in baseline standard deviations"),
    ("normkit_drift_variance_ratio", "gauge", _LL, "Live / baseline input variance"),
    ("normkit_drift_psi", "gauge", _LL, "Population stability index against the baseline"),
    ("normkit_drift_ks", "gauge", _LL, "Kolmogorov-Smirnov distance against the baseline"),
    ("normkit_drift_breached", "gauge", _LL, "1 if any drift limit is crossed, else 0"),
    ("normkit_drift_evaluable", "gauge", _LL,
     "1 if the last drift check could judge the layer, 0 if not (too few rows, no baseline "
     "for the layer: see the log or the JSONL record's drift reason)"),
    ("normkit_alerts", "counter", _L + ("severity", "rule"), "Alerts opened in process"),
    # shadow traffic (normkit.canary.divergence(...).record(...)): no rank, one per pair
    ("normkit_canary_output_kl", "gauge", ("model", "version", "serving_version"),
     "KL(serving || candidate) of the output distributions on the same inputs, nats per row"),
    ("normkit_canary_top1_agreement", "gauge", ("model", "version", "serving_version"),
     "Fraction of shadow-traffic rows where candidate and serving agree on the top class"),
    ("normkit_guard_trips", "counter", ("model", "version", "layer", "check", "action"),
     "Guarded calls on which the check tripped on the layer (normkit.guard)"),
)

LATENCY_BUCKETS = (2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                   1e-2, 2.5e-2, 0.1, 1.0)


def exported_series_names() -> set[str]:
    """Every series name a scrape can contain (counters' ``_total``/``_created``, histograms'
    ``_bucket``/``_sum``/``_count``)."""
    out = set()
    for name, kind, _, _ in METRICS:
        if kind == "counter":
            out |= {name + "_total", name + "_created"}
        elif kind == "histogram":
            out |= {name + "_bucket", name + "_sum", name + "_count", name + "_created"}
        else:
            out.add(name)
    return out


# (metric, summary key) of the per-layer gauges and of the drift gauges
_LAYER_GAUGES = (("normkit_norm_input_mean", "input_mean"),
                 ("normkit_norm_input_std", "input_std"),
                 ("normkit_norm_input_rms", "input_rms"),
                 ("normkit_norm_output_mean", "output_mean"),
                 ("normkit_norm_output_std", "output_std"),
                 ("normkit_norm_weight_norm", "weight_norm"),
                 ("normkit_norm_bias_norm", "bias_norm"),
                 ("normkit_norm_weight_update_norm", "weight_update_norm"),
                 ("normkit_norm_bias_update_norm", "bias_update_norm"),
                 ("normkit_norm_input_grad_norm", "grad_input_norm"),
                 ("normkit_norm_weight_grad_norm", "weight_grad_norm"),
                 ("normkit_norm_bias_grad_norm", "bias_grad_norm"))
_DRIFT_GAUGES = (("normkit_drift_mean_shift", "mean_shift"),
                 ("normkit_drift_variance_ratio", "variance_ratio"),
                 ("normkit_drift_psi", "psi"), ("normkit_drift_ks", "ks"))


def record_samples(record: dict, last_step: dict) -> Iterator[tuple[str, tuple, str, float]]:
    """What a record does to ``METRICS``: ``(metric, label values, op, value)``, the label
    values in the order ``METRICS`` gives, op ``"inc"`` (counter), ``"set"`` (gauge) or
    ``"observe"`` (histogram).  Every exporter of ``METRICS`` (Prometheus, OpenTelemetry)
    applies these, so they agree by construction.

    Args:
        record: a step record, a canary's ``"divergence"`` record or a guard's ``"guard"``
            record; other types do nothing.
        last_step: the exporter's ``{(model, version, rank): step of its last record}``,
            updated here (``normkit_steps`` grows by the steps since that record).
    """
    kind = record.get("type")
    if kind == "step":
        yield from _step_samples(record, last_step)
    elif kind == "divergence":  # shadow traffic: normkit.canary.divergence(...).record(...)
        labels = (record["model"], record["version"], record["serving_version"])
        # a KL of null is a non-finite one (NaN/Inf candidate logits): +Inf crosses any alert
        kl = record.get("kl")
        yield "normkit_canary_output_kl", labels, "set", float("inf") if kl is None else kl
        yield "normkit_canary_top1_agreement", labels, "set", record["top1_agreement"]
    elif kind == "guard":  # normkit.guard's tripped calls
        for t in record["trips"]:
            yield ("normkit_guard_trips", (record["model"], record["version"], t["layer"],
                                           t["check"], record["action"]), "inc", 1)


def _step_samples(record: dict, last_step: dict) -> Iterator[tuple[str, tuple, str, float]]:
    base = (record["model"], record["version"], str(record["rank"]))
    if base not in last_step:
        yield "normkit_watch_info", base + (normkit_version(),), "set", 1
    prev = last_step.get(base, 0)
    last_step[base] = record["step"]
    yield "normkit_steps", base, "inc", max(record["step"] - prev, 0)
    yield "normkit_sampled_steps", base, "inc", 1
    bad = 0
    for pname in ("forward", "backward"):
        origin = record["nonfinite"][pname]["origin"]
        if origin is not None:
            bad = 1
            yield "normkit_nonfinite_origin", base + (pname, origin), "inc", 1
    # Incremented by 0 on a clean step, so the SLO's rate() exists (as 0) before an incident.
    yield "normkit_nonfinite_steps", base, "inc", bad
    if record.get("batch_size") is not None:
        yield "normkit_batch_size", base, "set", record["batch_size"]
    if record.get("seq_len") is not None:
        yield "normkit_sequence_length", base, "set", record["seq_len"]
    latencies = record.get("latency_seconds", {})
    for layer, s in record["summary"].items():
        lb = base + (layer,)
        raw = record["layers"][layer]
        yield "normkit_nonfinite_rows", lb + ("forward",), "inc", raw["nonfinite_rows"]
        yield "normkit_nonfinite_rows", lb + ("backward",), "inc", raw["grad_nonfinite_rows"]
        for metric, key in _LAYER_GAUGES:
            if s.get(key) is not None:
                yield metric, lb, "set", s[key]
        rs = s.get("row_scale")
        if rs:
            for q, k in (("0.01", "p01"), ("0.5", "p50"), ("0.99", "p99")):
                yield "normkit_norm_input_row_scale", lb + (q,), "set", rs[k]
        for t in latencies.get(layer, ()):
            yield "normkit_norm_forward_latency_seconds", lb, "observe", t
    for layer, d in (record.get("drift") or {}).items():
        lb = base + (layer,)
        for metric, key in _DRIFT_GAUGES:
            if d.get(key) is not None:
                yield metric, lb, "set", d[key]
        yield "normkit_drift_breached", lb, "set", 1.0 if d["crossed"] else 0.0
        yield "normkit_drift_evaluable", lb, "set", 1.0 if d.get("evaluable", True) else 0.0
    for a in record.get("alerts", ()):
        yield "normkit_alerts", base + (a["severity"], a["rule"]), "inc", 1


DEFAULT_PORT = 9464  # the port deploy/prometheus/prometheus.yml scrapes


class PrometheusExporter:
    """Exports to Prometheus through ``prometheus_client``.

    Args:
        port: port to serve ``/metrics`` on: 9464 by default, the one
            ``deploy/prometheus/prometheus.yml`` scrapes; 0: a free one (read ``url``); None:
            do not serve (register into ``registry`` and expose it yourself, e.g.
            ``prometheus_client.make_asgi_app``).
        addr: bind address; loopback by default — expose it deliberately, not by accident.
        registry: a ``CollectorRegistry`` to register into; default: a private one (so two
            exporters in one process never collide on metric names).

    Attributes:
        url: ``http://addr:port/metrics`` once serving, else None.
        registry: the registry holding normkit's metrics.

    Raises:
        OSError: the port is in use; the message names it and how to choose another.
    """

    def __init__(self, port: int | None = DEFAULT_PORT, addr: str = "127.0.0.1", registry=None):
        pc = require("prometheus_client")
        self.registry = registry if registry is not None else pc.CollectorRegistry()
        self._m = {}
        for name, kind, labels, doc in METRICS:
            if kind == "counter":
                self._m[name] = pc.Counter(name, doc, labels, registry=self.registry)
            elif kind == "gauge":
                self._m[name] = pc.Gauge(name, doc, labels, registry=self.registry)
            else:
                self._m[name] = pc.Histogram(name, doc, labels, buckets=LATENCY_BUCKETS,
                                             registry=self.registry)
        self._children: dict = {}
        self._last_step: dict = {}
        # export() runs on the watch's export thread, remove_series() on the caller's.
        self._lock = threading.Lock()
        self._server = self._thread = None
        self.url = None
        if port is not None:
            try:
                self._server, self._thread = pc.start_http_server(port, addr=addr,
                                                                  registry=self.registry)
            except OSError as e:
                for metric in self._m.values():  # leave the registry as it was: a retry on
                    self.registry.unregister(metric)  # another port must not collide
                if e.errno != errno.EADDRINUSE:
                    raise
                raise OSError(e.errno, f"PrometheusExporter: port {port} on {addr} is in use "
                                       "(another exporter or process); pass port=<another "
                                       "port> and scrape that, or port=0 for a free one "
                                       "(its address is then in .url)") from e
            host = f"[{addr}]" if ":" in addr else addr
            self.url = f"http://{host}:{self._server.server_port}/metrics"
            log.info("normkit metrics served at %s", self.url)

    def _c(self, name: str, *labels):
        # Children cached: labels() takes a lock and builds a key, ~3 µs per call, ~300 per step.
        key = (name, labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = self._m[name].labels(*labels)
        return c

    def export(self, record: dict) -> None:
        with self._lock:
            for name, labels, op, value in record_samples(record, self._last_step):
                getattr(self._c(name, *labels), op)(value)  # op: inc, set or observe

    def remove_series(self, model: str | None = None, version: str | None = None) -> int:
        """Removes the series of ``model`` and/or ``version`` (every series when both are None)
        with prometheus_client's own label removal, e.g. when a model version is retired while
        the endpoint keeps serving others.  Prometheus marks them stale at its next scrape.  A
        later record of that version brings its series back (its counters restart, which
        ``rate()`` takes as a reset).

        Returns:
            The number of label sets removed.
        """
        def hit(labels: tuple) -> bool:  # every label set starts with (model, version, ...)
            return ((model is None or labels[0] == str(model))
                    and (version is None or labels[1] == str(version)))

        with self._lock:
            gone = [(name, labels) for name, labels in self._children if hit(labels)]
            for name, labels in gone:
                self._m[name].remove(*labels)
                del self._children[(name, labels)]
            for base in [b for b in self._last_step if hit(b)]:
                del self._last_step[base]
        return len(gone)

    def close(self) -> None:
        """Removes every series this exporter exported (``remove_series``) and stops the HTTP
        server if this exporter started one.  ``Watch.stop`` calls it, so a registry that
        outlives the watch (``port=None``, your own) no longer shows a model version whose
        watch ended; the exporter can be handed to a later watch."""
        self.remove_series()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def asgi_app(self):
        """An ASGI app serving this exporter's registry (mount it in your own server)."""
        return require("prometheus_client").make_asgi_app(registry=self.registry)
