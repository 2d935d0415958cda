"""The MLflow exporter: per-layer scalars as MLflow metrics of a run, the watch's configuration
as params and tags, and at the end of the watch the run's telemetry (JSONL, baseline, the
``normkit report`` page) as artifacts — through ``mlflow``'s own ``MlflowClient`` (imported when
the exporter is built).

The network work happens on a thread of the exporter's own: ``export`` (the watch's export
thread, or the step's with ``background_export=False``) writes the record to a local JSONL copy
and queues its metrics, so a slow or unreachable tracking server holds up neither the step nor
the other exporters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ..._io import write_text_atomic
from ..._provenance import normkit_version
from ..._report import render_html
from .._schema import SUMMARY_SCALARS
from ..drift import Baseline
from ..report import build_telemetry_report
from ._optional import require
from .jsonl import JsonlExporter

__all__ = ["MlflowExporter", "MAX_METRICS_PER_BATCH"]

log = logging.getLogger(__name__)

# MLflow's documented LogBatch limits: at most 1000 metrics, 100 params and 100 tags, 1000
# entities in all, 1 MB per request; keys at most 250 characters.  A metric here is at most
# ~300 bytes of JSON (a key under 250 characters, value, step, timestamp): 1000 stay under 1 MB.
MAX_METRICS_PER_BATCH = 1000
# A layer's part of a key: a 6-block model's "blocks.5.attn.ln" is 16 characters; longer names
# are cut and told apart by a hash, leaving room within MLflow's 250 for "normkit/rank<r>/" and
# the longest stat ("drift_variance_ratio").
_LAYER_KEY_MAX = 160
# MLflow accepts letters, digits, "_", "-", ".", " ", "/" (and ":" except on Windows); "/"
# separates the key's parts, so a layer name keeps none.
_NOT_IN_KEY = re.compile(r"[^A-Za-z0-9_.\- ]")
_DRIFT = ("mean_shift", "variance_ratio", "psi", "ks")


class MlflowExporter:
    """Logs a watch to an MLflow run.

    * Metrics, at every sampled step (``step`` = the watch's step): ``normkit/<layer>/<stat>``
      for the per-layer scalars of the record's summary (input/output mean and std, input RMS,
      non-finite rows, γ/β norms and updates, gradient norms), ``normkit/<layer>/latency_seconds``
      (the step's median forward time), ``normkit/<layer>/drift_<stat>`` when drift was checked,
      and ``normkit/nonfinite_forward`` / ``normkit/nonfinite_backward`` (1 when that pass had
      NaN/Inf).  Ranks other than 0 and "all" write under ``normkit/rank<r>/``.  Layer names
      become MLflow-valid (characters other than letters, digits, ``_ - . space`` become
      ``_``; over 160 characters cut and suffixed with a hash; two names that would meet get
      a hash each); ``metric_key(layer, stat)`` gives the key.
    * Params (the first record's): ``normkit.model``, ``normkit.model_version``,
      ``normkit.every``, ``normkit.version``; the same as tags, to search runs by.
    * Artifacts, at the end of the watch (``close``), under ``normkit/``: the run's records
      (``telemetry.jsonl``), its ``Baseline`` (``baseline.json``), its ``normkit report`` page
      (``report.html``, if the ``report`` extra is installed) and every file passed in
      ``artifacts`` or to ``log_artifact`` (audit or canary results).

    Requests follow MLflow's LogBatch limits (at most 1000 metrics per request); a step logs at
    most ``max_metrics_per_step`` metrics (the rest are left out, said once).  A failure never
    breaks the step: the tracking server is talked to on this exporter's own thread; while it
    fails, ``export`` raises its error, which the watch logs once and lists in ``Watch.off``.
    After a failed request the server is left alone for ``retry_seconds``; the metrics of a
    failed request and of the steps in that pause are dropped (counted in ``failed_batches``),
    as are those of steps that find the queue full (``dropped_steps``).

    Args:
        tracking_uri: the tracking server or store; default ``mlflow.get_tracking_uri()``.
        experiment: the experiment (name) a new run goes to, created if missing; default
            mlflow's (``mlflow.set_experiment``, ``MLFLOW_EXPERIMENT_NAME``/``_ID``, else
            "Default").
        run_id: the run to log to; default the active run (``mlflow.active_run()``, when
            neither ``tracking_uri`` nor ``experiment`` is given), else a new run, which
            ``close`` ends (FINISHED).
        run_name: the name of a new run.
        artifacts: files logged as artifacts at the end (see ``log_artifact``).
        max_metrics_per_step: metrics logged per sampled step at most.
        queue_size: sampled steps waiting for the tracking server at most.
        close_timeout: seconds ``close`` waits for the last requests and the artifacts.
        retry_seconds: after a failed request, seconds before the server is tried again (an
            attempt costs mlflow's HTTP client a few ms of CPU, and its own retries).

    Attributes:
        tracking_uri, run_id (None until a new run is created), failed_batches,
        dropped_steps.

    Raises:
        ImportError: mlflow is missing (``pip install "normkit[mlflow]"``).
        ValueError: a bad argument (named).
        FileNotFoundError: an ``artifacts`` file does not exist.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str | None = None,
                 run_id: str | None = None, *, run_name: str | None = None,
                 artifacts=(), max_metrics_per_step: int = 10_000, queue_size: int = 64,
                 close_timeout: float = 30.0, retry_seconds: float = 10.0):
        mlflow = require("mlflow", "mlflow")
        for name, v in (("max_metrics_per_step", max_metrics_per_step),
                        ("queue_size", queue_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MlflowExporter: {name} must be an int >= 1, got {v!r}")
        for name, v in (("close_timeout", close_timeout), ("retry_seconds", retry_seconds)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"MlflowExporter: {name} must be a number of seconds >= 0, "
                                 f"got {v!r}")
        for name, v in (("tracking_uri", tracking_uri), ("experiment", experiment),
                        ("run_id", run_id), ("run_name", run_name)):
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"MlflowExporter: {name} must be a non-empty string or None, "
                                 f"got {v!r}")
        if run_id is None and tracking_uri is None and experiment is None:
            active = mlflow.active_run()  # thread-local in mlflow: read on the caller's thread
            if active is not None:
                run_id = active.info.run_id
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.experiment = experiment
        self.run_id = run_id
        self.run_name = run_name
        self._owns_run = run_id is None
        self.max_metrics_per_step = max_metrics_per_step
        self.close_timeout = float(close_timeout)
        self.retry_seconds = float(retry_seconds)
        self._retry_at = 0.0  # time.monotonic() before which the server is not tried
        self._client = mlflow.MlflowClient(self.tracking_uri)
        self._entities = require("mlflow.entities", "mlflow")
        self._artifacts: list[Path] = []
        for path in artifacts:
            self._artifacts.append(self._existing(path))
        self._dir = Path(tempfile.mkdtemp(prefix="normkit-mlflow-"))
        self._copy = JsonlExporter(self._dir / "telemetry.jsonl")
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, str, str], str] = {}
        self._segments: dict[str, str] = {}
        self._taken: dict[str, str] = {}
        self._params_sent = False
        self._error: str | None = None
        self._said = False
        self._capped = False
        self._closed = False
        self.failed_batches = 0
        self.dropped_steps = 0

    # -- keys ----------------------------------------------------------------------------------

    def _segment(self, layer: str) -> str:
        """The layer's part of a metric key: MLflow-valid, bounded, distinct per layer."""
        seg = self._segments.get(layer)
        if seg is not None:
            return seg
        seg = _NOT_IN_KEY.sub("_", layer) or "_"
        if set(seg) == {"."}:  # "." or ".." would resolve to another path: MLflow refuses it
            seg = "_" + seg
        digest = hashlib.sha1(layer.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        if len(seg) > _LAYER_KEY_MAX:
            seg = f"{seg[:_LAYER_KEY_MAX - 9]}-{digest}"
        if self._taken.get(seg, layer) != layer:  # another layer's name sanitised alike
            seg = f"{seg[:_LAYER_KEY_MAX - 9]}-{digest}"
        self._taken[seg] = layer
        self._segments[layer] = seg
        return seg

    def metric_key(self, layer: str, stat: str, rank: str = "0") -> str:
        """The MLflow metric key of ``stat`` (a summary field, ``latency_seconds`` or
        ``drift_<stat>``) of ``layer`` for ``rank``."""
        k = (rank, layer, stat)
        key = self._keys.get(k)
        if key is None:
            key = self._keys[k] = f"{self._prefix(rank)}/{self._segment(layer)}/{stat}"
        return key

    @staticmethod
    def _prefix(rank: str) -> str:
        return "normkit" if rank in ("0", "all") else f"normkit/rank{rank}"

    def _metrics(self, record: dict) -> list[tuple[str, float]]:
        rank = str(record["rank"])
        out = []
        lat_all = record.get("latency_seconds", {})
        for layer, s in record["summary"].items():
            for k in SUMMARY_SCALARS:
                v = s.get(k)
                if v is not None:
                    out.append((self.metric_key(layer, k, rank), float(v)))
            lat = lat_all.get(layer)
            if lat:
                out.append((self.metric_key(layer, "latency_seconds", rank),
                            sorted(lat)[len(lat) // 2]))
        for layer, d in (record.get("drift") or {}).items():
            for k in _DRIFT:
                if d.get(k) is not None:
                    out.append((self.metric_key(layer, "drift_" + k, rank), float(d[k])))
        prefix = self._prefix(rank)
        for pname in ("forward", "backward"):
            bad = record["nonfinite"][pname]["origin"] is not None
            out.append((f"{prefix}/nonfinite_{pname}", float(bad)))
        return out

    # -- the exporter protocol -----------------------------------------------------------------

    def start(self) -> None:
        """Starts the thread that talks to the tracking server (``Watch.start`` calls it)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("MlflowExporter is closed; make a new one for a new watch")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="normkit-mlflow",
                                                daemon=True)
                self._thread.start()

    def export(self, record: dict) -> None:
        if record.get("type") != "step":
            return
        if self._thread is None:
            self.start()
        self._copy.export(record)
        metrics = self._metrics(record)
        if len(metrics) > self.max_metrics_per_step:
            if not self._capped:
                self._capped = True
                log.warning("MlflowExporter: a step has %d metrics; logging the first %d "
                            "(max_metrics_per_step), said once", len(metrics),
                            self.max_metrics_per_step)
            metrics = metrics[:self.max_metrics_per_step]
        try:
            self._q.put_nowait(("step", record, metrics))
        except queue.Full:
            self.dropped_steps += 1
        error = self._error
        if error is not None:
            self._said = True  # the watch logs it (once) and lists the exporter in Watch.off
            raise ConnectionError(error)

    def log_artifact(self, path: str | os.PathLike) -> None:
        """Logs the file ``path`` (an audit or canary result) as an artifact under ``normkit/``:
        at the end of the watch, or at once if it has ended.

        Raises:
            FileNotFoundError: no such file.
            RuntimeError: after the end, there is no run (the server never answered).
            mlflow's own error: the upload after the end failed.
        """
        p = self._existing(path)
        with self._lock:
            if not self._closed:
                self._artifacts.append(p)
                return
        if self.run_id is None:
            raise RuntimeError(f"MlflowExporter: no run to log {str(p)!r} to: "
                               f"{self.tracking_uri} never made one")
        self._client.log_artifact(self.run_id, str(p), "normkit")

    def close(self) -> None:
        """Sends what is queued, then the artifacts, and ends a run it created; waits at most
        ``close_timeout`` seconds (what is left is said once, never raised)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._copy.close()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="normkit-mlflow",
                                            daemon=True)
            self._thread.start()
        self._q.put(("close", None, None))
        self._thread.join(self.close_timeout)
        if self._thread.is_alive():
            self._say(f"MlflowExporter: {self.tracking_uri} did not answer within "
                      f"{self.close_timeout:g} s (close_timeout); {self._q.qsize()} steps and the "
                      f"artifacts are not logged")
        elif self._error is not None:
            self._say(f"MlflowExporter: {self._error}")
        if not self._thread.is_alive():
            shutil.rmtree(self._dir, ignore_errors=True)

    # -- the thread ----------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        if not self._said:
            self._said = True
            log.warning("%s (logged once)", message)

    @staticmethod
    def _existing(path) -> Path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"MlflowExporter: artifact {str(p)!r} is not a file")
        return p

    def _require_run(self) -> str:
        if self.run_id is None:
            mlflow = require("mlflow", "mlflow")
            if self.experiment is not None:
                exp = self._client.get_experiment_by_name(self.experiment)
                exp_id = (exp.experiment_id if exp is not None
                          else self._client.create_experiment(self.experiment))
            else:  # mlflow's own default: set_experiment, MLFLOW_EXPERIMENT_NAME/_ID, "Default"
                exp_id = mlflow.tracking.fluent._get_experiment_id() or "0"
            self.run_id = self._client.create_run(exp_id, run_name=self.run_name).info.run_id
        return self.run_id

    def _run(self) -> None:
        while True:
            kind, record, metrics = self._q.get()
            try:
                if kind == "close":
                    self._finish()
                    return
                if time.monotonic() < self._retry_at:
                    self.failed_batches += 1  # the server failed a moment ago: left alone
                    continue
                self._log_step(record, metrics)
                self._error = None
            except Exception as e:
                if kind == "step":
                    self.failed_batches += 1
                self._retry_at = time.monotonic() + self.retry_seconds
                self._error = (f"MLflow at {self.tracking_uri} failed: {type(e).__name__}: "
                               f"{e}".splitlines()[0])
                log.debug("MlflowExporter request failed", exc_info=True)
                if kind == "close":
                    return

    def _log_step(self, record: dict, metrics: list[tuple[str, float]]) -> None:
        ent = self._entities
        run_id = self._require_run()
        params, tags = [], []
        if not self._params_sent:
            conf = {"normkit.model": record["model"], "normkit.model_version": record["version"],
                    "normkit.every": str(record["every"]), "normkit.version": normkit_version()}
            params = [ent.Param(k, v) for k, v in conf.items()]
            tags = [ent.RunTag(k, v) for k, v in conf.items() if k != "normkit.every"]
        ms = int(record["time_unix"] * 1000)
        step = int(record["step"])
        rows = [ent.Metric(k, v, ms, step) for k, v in metrics]
        first = MAX_METRICS_PER_BATCH - len(params) - len(tags)
        self._client.log_batch(run_id, metrics=rows[:first], params=params, tags=tags,
                               synchronous=True)
        self._params_sent = True
        for i in range(first, len(rows), MAX_METRICS_PER_BATCH):
            self._client.log_batch(run_id, metrics=rows[i:i + MAX_METRICS_PER_BATCH],
                                   synchronous=True)

    def _finish(self) -> None:
        """The end of the watch: the artifacts, then the run ends if this exporter made it."""
        with self._lock:
            files = list(self._artifacts)
        try:
            base = Baseline.from_jsonl(self._copy.path)
        except ValueError:
            base = None  # no step record: no telemetry, no baseline, no report
        if base is None and not files and self.run_id is None:
            return  # nothing was watched: no run is made for it
        run_id = self._require_run()
        if base is not None:
            base.save(self._dir / "baseline.json")
            files[:0] = [self._copy.path, self._dir / "baseline.json"]
            try:
                page = render_html(build_telemetry_report(self._copy.path))
            except ImportError as e:  # matplotlib (the report extra) is missing
                log.info("MlflowExporter: no report.html artifact: %s", e)
            else:
                files.append(write_text_atomic(self._dir / "report.html", page))
        for f in files:
            self._client.log_artifact(run_id, str(f), "normkit")
        if self._owns_run:
            self._client.set_terminated(run_id, "FINISHED", int(time.time() * 1000))
