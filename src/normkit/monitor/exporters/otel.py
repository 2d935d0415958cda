"""The OpenTelemetry exporter: the metrics of ``METRICS`` under OpenTelemetry's names
(``OTEL_METRICS``, ``OTEL_ATTRIBUTES``), exported over OTLP/HTTP through the OpenTelemetry SDK
(imported when the exporter is built: ``pip install "normkit[otel]"``)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping

from ..._provenance import normkit_version
from ._optional import require
from .prometheus import LATENCY_BUCKETS, METRICS, record_samples

__all__ = ["OpenTelemetryExporter", "OTEL_METRICS", "OTEL_ATTRIBUTES"]

log = logging.getLogger(__name__)

# Prometheus name (METRICS) -> (OpenTelemetry name, UCUM unit).  OpenTelemetry's naming rules
# (semantic conventions, "Naming"): lower-case names namespaced with dots under the project's
# name, no unit and no "_total" in the name (the unit is the instrument's), counters of
# discrete things pluralized with a "{thing}" unit, durations in "s", plain numbers in "1".
OTEL_METRICS: dict[str, tuple[str, str]] = {
    "normkit_watch_info": ("normkit.watch.info", "1"),
    "normkit_steps": ("normkit.watch.steps", "{step}"),
    "normkit_sampled_steps": ("normkit.watch.sampled_steps", "{step}"),
    "normkit_nonfinite_steps": ("normkit.nonfinite.steps", "{step}"),
    "normkit_nonfinite_origin": ("normkit.nonfinite.origins", "{step}"),
    "normkit_nonfinite_rows": ("normkit.nonfinite.rows", "{row}"),
    "normkit_norm_input_mean": ("normkit.norm.input.mean", "1"),
    "normkit_norm_input_std": ("normkit.norm.input.std", "1"),
    "normkit_norm_input_rms": ("normkit.norm.input.rms", "1"),
    "normkit_norm_input_row_scale": ("normkit.norm.input.row_scale", "1"),
    "normkit_norm_output_mean": ("normkit.norm.output.mean", "1"),
    "normkit_norm_output_std": ("normkit.norm.output.std", "1"),
    "normkit_norm_weight_norm": ("normkit.norm.weight.norm", "1"),
    "normkit_norm_bias_norm": ("normkit.norm.bias.norm", "1"),
    "normkit_norm_weight_update_norm": ("normkit.norm.weight.update.norm", "1"),
    "normkit_norm_bias_update_norm": ("normkit.norm.bias.update.norm", "1"),
    "normkit_norm_input_grad_norm": ("normkit.norm.input.grad.norm", "1"),
    "normkit_norm_weight_grad_norm": ("normkit.norm.weight.grad.norm", "1"),
    "normkit_norm_bias_grad_norm": ("normkit.norm.bias.grad.norm", "1"),
    "normkit_norm_forward_latency_seconds": ("normkit.norm.forward.duration", "s"),
    "normkit_batch_size": ("normkit.batch.size", "{sample}"),
    "normkit_sequence_length": ("normkit.sequence.length", "{token}"),
    "normkit_drift_mean_shift": ("normkit.drift.mean_shift", "1"),
    "normkit_drift_variance_ratio": ("normkit.drift.variance_ratio", "1"),
    "normkit_drift_psi": ("normkit.drift.psi", "1"),
    "normkit_drift_ks": ("normkit.drift.ks", "1"),
    "normkit_drift_breached": ("normkit.drift.breached", "1"),
    "normkit_drift_evaluable": ("normkit.drift.evaluable", "1"),
    "normkit_alerts": ("normkit.alerts", "{alert}"),
    "normkit_canary_output_kl": ("normkit.canary.output.kl", "1"),
    "normkit_canary_top1_agreement": ("normkit.canary.top1_agreement", "1"),
    "normkit_guard_trips": ("normkit.guard.trips", "{call}"),
}

# Prometheus label -> OpenTelemetry attribute (namespaced like the metrics).
OTEL_ATTRIBUTES: dict[str, str] = {
    "model": "normkit.model.name",
    "version": "normkit.model.version",
    "rank": "normkit.rank",
    "layer": "normkit.layer",
    "pass": "normkit.pass",
    "module": "normkit.module",
    "quantile": "normkit.quantile",
    "severity": "normkit.alert.severity",
    "rule": "normkit.alert.rule",
    "normkit_version": "normkit.version",
    "serving_version": "normkit.model.serving_version",
    "check": "normkit.guard.check",
    "action": "normkit.guard.action",
}

_DEFAULT_TIMEOUT = 10.0  # seconds: the SDK's default for one OTLP export, retries included


class OpenTelemetryExporter:
    """Exports ``METRICS`` through the OpenTelemetry metrics SDK, by default over OTLP/HTTP
    (protobuf) to a collector.

    Counters and gauges are observable instruments read from the values of the last record when
    the SDK collects (``export`` only updates a table); the forward latency is a histogram with
    the Prometheus exporter's buckets.  The SDK's reader exports on its own thread, so a slow
    or down collector never holds up the watch; its failures are logged once, as one line,
    until an export succeeds again.

    Args:
        endpoint: the OTLP/HTTP metrics URL, e.g. ``http://collector:4318/v1/metrics``.
            Default: the SDK's (``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``, else
            ``OTEL_EXPORTER_OTLP_ENDPOINT`` + ``/v1/metrics``, else
            ``http://localhost:4318/v1/metrics``).
        headers: HTTP headers sent with every export (e.g. an API key).  Default: the SDK's
            (``OTEL_EXPORTER_OTLP_METRICS_HEADERS`` / ``OTEL_EXPORTER_OTLP_HEADERS``).
        export_interval: seconds between exports.  Default: ``OTEL_METRIC_EXPORT_INTERVAL``
            (milliseconds) or 60 s.
        timeout: seconds one OTLP export may take, retries included; ``close()`` waits at most
            this long for the last export.  Default: 10 s.
        meter_provider: a ``MeterProvider`` of yours to export through instead (its readers,
            exporters and resource): your pipeline as it is.  ``close()`` flushes it and leaves
            it running.
        reader: a ``MetricReader`` of yours (e.g. the SDK's ``InMemoryMetricReader``, or a
            ``PeriodicExportingMetricReader`` around your exporter), which normkit attaches to
            a ``MeterProvider`` of its own; ``close()`` shuts both down.

    Attributes:
        endpoint: where normkit's OTLP export goes (None with your reader or provider).
        failed_exports: how many of those exports failed so far.

    Raises:
        ValueError: a bad argument, or ``meter_provider``/``reader`` combined with arguments
            that configure normkit's own OTLP export.
        ImportError: the OpenTelemetry SDK is not installed (``pip install "normkit[otel]"``).
    """

    def __init__(self, endpoint: str | None = None, headers: Mapping[str, str] | None = None, *,
                 export_interval: float | None = None, timeout: float | None = None,
                 meter_provider=None, reader=None):
        _check_args(endpoint, headers, export_interval, timeout, meter_provider, reader)
        api = require("opentelemetry.metrics", "otel")
        sdk = require("opentelemetry.sdk.metrics", "otel")
        self._observation = api.Observation
        self.endpoint = None
        self._otlp = None  # normkit's own OTLP exporter (None with your reader or provider)
        self._timeout = _DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self._owned = meter_provider is None
        if meter_provider is None:
            if reader is None:
                reader = self._otlp_reader(endpoint, headers, export_interval)
            meter_provider = sdk.MeterProvider(metric_readers=[reader])
        self._provider = meter_provider
        meter = meter_provider.get_meter("normkit", normkit_version())
        self._values: dict[str, dict[tuple, float]] = {}  # metric -> {label values: value}
        self._histograms: dict = {}
        self._keys: dict[str, tuple[str, ...]] = {}  # metric -> its attribute names
        self._attrs: dict[tuple, dict] = {}  # (metric, label values) -> attributes, cached
        for name, kind, labels, doc in METRICS:
            otel_name, unit = OTEL_METRICS[name]
            self._keys[name] = tuple(OTEL_ATTRIBUTES[label] for label in labels)
            if kind == "histogram":
                self._histograms[name] = meter.create_histogram(
                    otel_name, unit=unit, description=doc,
                    explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS))
                continue
            self._values[name] = {}
            create = (meter.create_observable_counter if kind == "counter"
                      else meter.create_observable_gauge)
            create(otel_name, callbacks=[lambda _options, name=name: self._observe(name)],
                   unit=unit, description=doc)
        self._last_step: dict = {}
        # export() runs on the watch's export thread, the callbacks on the SDK reader's.
        self._lock = threading.Lock()
        self._closed = False

    def _otlp_reader(self, endpoint, headers, export_interval):
        """A periodic reader exporting over OTLP/HTTP, its failures logged once."""
        otlp = require("opentelemetry.exporter.otlp.proto.http.metric_exporter", "otel")
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        inner = otlp.OTLPMetricExporter(endpoint=endpoint, headers=headers,
                                        timeout=self._timeout)
        self.endpoint = endpoint or getattr(inner, "_endpoint", "the SDK's default endpoint")
        interval = None if export_interval is None else 1000.0 * export_interval
        self._otlp = _log_once(inner, self.endpoint)
        return PeriodicExportingMetricReader(self._otlp, export_interval_millis=interval)

    @property
    def failed_exports(self) -> int:
        """Exports to ``endpoint`` that failed so far (0 with your own reader or provider)."""
        return 0 if self._otlp is None else self._otlp.failed

    def _attributes(self, name: str, labels: tuple) -> dict:
        key = (name, labels)
        a = self._attrs.get(key)
        if a is None:
            a = self._attrs[key] = dict(zip(self._keys[name], labels, strict=True))
        return a

    def _observe(self, name: str) -> list:
        # A non-finite value (a gauge of a layer whose γ went NaN) is left out: the SDK refuses
        # it anyway, with a warning per series and collection; normkit.nonfinite.* tell.
        with self._lock:
            return [self._observation(v, self._attributes(name, labels))
                    for labels, v in self._values[name].items() if math.isfinite(v)]

    def export(self, record: dict) -> None:
        if record.get("type") not in ("step", "divergence", "guard"):
            return
        if self._closed:
            raise ValueError("OpenTelemetryExporter is closed")
        with self._lock:
            for name, labels, op, value in record_samples(record, self._last_step):
                if op == "set":
                    self._values[name][labels] = value
                elif op == "inc":
                    series = self._values[name]
                    series[labels] = series.get(labels, 0) + value
                else:
                    self._histograms[name].record(value, self._attributes(name, labels))

    def close(self) -> None:
        """Exports the last values (waiting at most ``timeout``), then ends: a ``MeterProvider``
        normkit built is shut down; one of yours is flushed, and stops reporting this
        exporter's counters and gauges."""
        if self._closed:
            return
        self._closed = True
        ms = 1000.0 * self._timeout
        if self._owned:
            self._provider.shutdown(timeout_millis=ms)
        else:
            self._provider.force_flush(timeout_millis=ms)
        with self._lock:
            for series in self._values.values():
                series.clear()


def _check_args(endpoint, headers, export_interval, timeout, meter_provider, reader) -> None:
    if meter_provider is not None and reader is not None:
        raise ValueError("OpenTelemetryExporter: pass meter_provider or reader, not both")
    if meter_provider is not None or reader is not None:
        own = [k for k, v in (("endpoint", endpoint), ("headers", headers),
                              ("export_interval", export_interval)) if v is not None]
        if own:
            raise ValueError(f"OpenTelemetryExporter: {', '.join(own)} configure normkit's own "
                             "OTLP export; with meter_provider= or reader= configure your "
                             "exporter instead")
    if endpoint is not None and not (isinstance(endpoint, str)
                                     and endpoint.startswith(("http://", "https://"))):
        raise ValueError("OpenTelemetryExporter: endpoint must be an http:// or https:// URL "
                         f"such as http://localhost:4318/v1/metrics, got {endpoint!r}")
    if headers is not None and not (isinstance(headers, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
        raise ValueError("OpenTelemetryExporter: headers must be a mapping of str to str, got "
                         f"{headers!r}")
    for arg, v in (("export_interval", export_interval), ("timeout", timeout)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not 0 < v < float("inf")):
            raise ValueError(f"OpenTelemetryExporter: {arg} must be a number of seconds > 0, "
                             f"got {v!r}")


# The OTLP exporter logs each failed try and retry (a down collector: three to six lines per
# export, every export).  Inside normkit's export those records are dropped — the first kept
# as the reason — and summed up in one line of normkit's per outage.
_inside = threading.local()


class _DropInsideExport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(_inside, "exporting", False):
            return True  # another thread's or another pipeline's: not ours to drop
        if _inside.reason is None:
            _inside.reason = record.getMessage()
        return False


_DROP = _DropInsideExport()


def _log_once(inner, endpoint: str):
    """``inner`` (an SDK ``MetricExporter``) with its failures logged as one line per outage
    and its exceptions turned into a failed result."""
    from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult

    sdk_log = logging.getLogger(type(inner).__module__)
    if _DROP not in sdk_log.filters:
        sdk_log.addFilter(_DROP)

    class LogOnce(MetricExporter):
        def __init__(self):
            # the OTLP exporter's temporality and aggregation (from OTEL_EXPORTER_OTLP_METRICS_*
            # variables), which the SDK's reader reads from the exporter it is given
            super().__init__(preferred_temporality=inner._preferred_temporality,
                             preferred_aggregation=inner._preferred_aggregation)
            self.failing = False
            self.failed = 0

        def export(self, metrics_data, timeout_millis: float = 10_000, **kwargs):
            _inside.exporting, _inside.reason = True, None
            try:
                result = inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)
            except Exception as e:  # an exporter bug must not kill the reader's thread
                result, _inside.reason = MetricExportResult.FAILURE, f"{type(e).__name__}: {e}"
            finally:
                _inside.exporting = False
            if result is MetricExportResult.SUCCESS:
                if self.failing:
                    self.failing = False
                    log.info("normkit OpenTelemetry export to %s works again", endpoint)
                return result
            self.failed += 1
            if not self.failing:
                self.failing = True
                log.warning("normkit OpenTelemetry export to %s failed (%s); the watch goes on "
                            "and exports every interval, and says so when one works again",
                            endpoint, _inside.reason or "no reason given")
            return result

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            return inner.force_flush(timeout_millis=timeout_millis)

        def shutdown(self, timeout_millis: float = 30_000, **kwargs) -> None:
            inner.shutdown(timeout_millis=timeout_millis, **kwargs)

    return LogOnce()
