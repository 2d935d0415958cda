"""Exporters: Prometheus, OpenTelemetry, TensorBoard, JSONL and MLflow, one module each.  Each
receives one record per sampled step; anything with ``export(record)`` and ``close()`` is an
exporter too.

Optional dependencies (prometheus_client, tensorboard, mlflow, the OpenTelemetry SDK) are
imported when an exporter is built, never at ``import normkit.monitor``; a missing one raises
ImportError naming the ``pip install "normkit[monitor]"`` (``[mlflow]``, ``[otel]``) that
provides it.

The JSONL record schema — every field, and how torn lines are read — is the docstring of
``normkit.monitor._schema``, where the schema, its version and ``read_jsonl`` live (re-exported
here).  Prometheus metrics: see ``METRICS`` (name, type, labels, help); their OpenTelemetry
names, units and attributes: ``OTEL_METRICS``, ``OTEL_ATTRIBUTES``.
"""

from .._schema import RECORD_SCHEMA_VERSION as JSONL_SCHEMA_VERSION  # its name here of old
from .._schema import read_jsonl
from .jsonl import JsonlExporter
from .mlflow import MlflowExporter
from .otel import OTEL_ATTRIBUTES, OTEL_METRICS, OpenTelemetryExporter
from .prometheus import (  # noqa: F401  (LATENCY_BUCKETS, exported_series_names: as before)
    DEFAULT_PORT,
    LATENCY_BUCKETS,
    METRICS,
    PrometheusExporter,
    exported_series_names,
)
from .tensorboard import TensorBoardExporter

__all__ = ["PrometheusExporter", "OpenTelemetryExporter", "TensorBoardExporter", "JsonlExporter",
           "MlflowExporter", "read_jsonl", "METRICS", "OTEL_METRICS", "OTEL_ATTRIBUTES",
           "JSONL_SCHEMA_VERSION", "DEFAULT_PORT"]
