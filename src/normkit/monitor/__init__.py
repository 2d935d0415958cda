"""Telemetry for normalization layers: ``watch``, exporters, baselines, drift and alerts.

    with normkit.watch(model, model_name="lm", model_version="2026-11-23",
                       exporters=[PrometheusExporter(), JsonlExporter("run.jsonl")]) as w:
        train()
    w.nonfinite_origin, w.alerts, w.summary(), w.baseline().save("baseline.json")

Importing this package imports torch and the standard library only; prometheus_client,
tensorboard, mlflow and the OpenTelemetry SDK are imported when an exporter that needs them is
built.
"""

from .alerts import Alert, AlertRules, TrainingLimits
from .drift import Baseline, DriftResult, DriftThresholds, compute_drift
from .exporters import (
    METRICS,
    JsonlExporter,
    MlflowExporter,
    OpenTelemetryExporter,
    PrometheusExporter,
    TensorBoardExporter,
    read_jsonl,
)
from .watch import Watch, find_norms, watch

__all__ = [
    # watching
    "watch",
    "Watch",
    "find_norms",
    # exporters
    "PrometheusExporter",
    "OpenTelemetryExporter",
    "TensorBoardExporter",
    "JsonlExporter",
    "MlflowExporter",
    "read_jsonl",
    "METRICS",
    # baselines and drift
    "Baseline",
    "DriftThresholds",
    "DriftResult",
    "compute_drift",
    # alerts
    "Alert",
    "AlertRules",
    "TrainingLimits",
]
