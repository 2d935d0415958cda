"""The TensorBoard exporter: event files written as ``torch.utils.tensorboard.SummaryWriter``
writes them (tensorboard is imported when the exporter is built)."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from .._schema import EDGES, SUMMARY_SCALARS
from ._optional import require

__all__ = ["TensorBoardExporter"]


class TensorBoardExporter:
    """Writes TensorBoard event files: scalars ``normkit/<layer>/<metric>`` every record and
    histograms ``normkit/<layer>/row_mean`` / ``row_scale`` every ``histogram_every`` records;
    step = the watch's step.

    One event per step holding every value: SummaryWriter's ``add_scalar`` writes an event per
    value (~30 µs each, ~200 per step here), which alone would cost more than the 5% budget;
    histograms are rarer for the same reason (~80 buckets each, 26 per step).  The files are
    the ones ``torch.utils.tensorboard.SummaryWriter`` writes (same writer class).

    Args:
        log_dir: directory for the event files (created).
        histogram_every: write histograms on every n-th record (default 10; 1 = always).
    """

    def __init__(self, log_dir: str | os.PathLike, histogram_every: int = 10):
        require("tensorboard")
        from tensorboard.compat.proto import event_pb2, summary_pb2

        if histogram_every < 1:
            raise ValueError(f"histogram_every must be >= 1, got {histogram_every!r}")
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
        self.log_dir = str(log_dir)
        self.histogram_every = histogram_every
        self._n = 0
        self._tags: dict = {}
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        self._writer = _EventFile(self.log_dir, event_pb2)

    def _tag(self, *parts: str) -> str:
        t = self._tags.get(parts)
        if t is None:
            t = self._tags[parts] = "/".join(parts)
        return t

    def _histo(self, h: dict):
        limits, counts = [], []
        last = len(EDGES)
        for i, c in h["buckets"]:
            limits.append(EDGES[i] if i < last else h["max"])
            counts.append(float(c))
        return self._summary_pb2.HistogramProto(
            min=h["min"], max=h["max"], num=float(h["n"]), bucket_limit=limits, bucket=counts)

    def export(self, record: dict) -> None:
        if record.get("type") != "step":
            return
        summary = self._summary_pb2.Summary()
        add = summary.value.add
        prefix = "normkit"
        if record["rank"] not in ("0", "all"):
            prefix = f"normkit/rank{record['rank']}"
        histos = self._n % self.histogram_every == 0
        self._n += 1
        lat_all = record.get("latency_seconds", {})
        for layer, s in record["summary"].items():
            for k in SUMMARY_SCALARS:
                v = s.get(k)
                if v is not None:
                    add(tag=self._tag(prefix, layer, k), simple_value=v)
            lat = lat_all.get(layer)
            if lat:
                add(tag=self._tag(prefix, layer, "latency_seconds"),
                    simple_value=sorted(lat)[len(lat) // 2])
            if histos:
                raw = record["layers"][layer]
                for hk, name in (("hist_mean", "row_mean"), ("hist_scale", "row_scale")):
                    if raw[hk]["n"]:
                        add(tag=self._tag(prefix, layer, name), histo=self._histo(raw[hk]))
        for pname in ("forward", "backward"):
            bad = record["nonfinite"][pname]["origin"] is not None
            add(tag=self._tag(prefix, "nonfinite", pname), simple_value=float(bad))
        for layer, d in (record.get("drift") or {}).items():
            for k in ("mean_shift", "variance_ratio", "psi", "ks"):
                if d.get(k) is not None:
                    add(tag=self._tag(prefix, layer, "drift_" + k), simple_value=d[k])
        ev = self._event_pb2.Event(wall_time=record["time_unix"], step=int(record["step"]),
                                   summary=summary)
        self._writer.write(ev)

    def close(self) -> None:
        self._writer.close()


class _EventFile:
    """A TensorBoard event file: TFRecord framing (length, masked CRC-32C of the length, the
    serialized ``Event``, masked CRC-32C of it), a ``brain.Event:2`` version event first, named
    ``events.out.tfevents.<time>.<host>.<pid>.<n>`` like TensorBoard's own writer.

    Written in place of tensorboard's ``EventFileWriter``, whose pure-Python CRC takes ~1 ms per
    6 KB event on its own thread — holding the GIL, i.e. stealing it from the training step
    (~0.3% of a 460 ms step by itself).  Here the CRC is google-crc32c's (``_crc``) and the write
    happens on the caller's thread (the watch's export thread).
    """

    _uid = 0

    def __init__(self, log_dir: str, event_pb2):
        import socket

        _EventFile._uid += 1
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{_EventFile._uid}")
        self.path = os.path.join(log_dir, name)
        self._f = open(self.path, "ab")
        self.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write(self, event) -> None:
        data = event.SerializeToString()
        head = struct.pack("<Q", len(data))
        self._f.write(b"".join((head, struct.pack("<I", _masked_crc32c(head)), data,
                                struct.pack("<I", _masked_crc32c(data)))))
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _masked_crc32c(data: bytes) -> int:
    from .._crc import masked_crc32c

    return masked_crc32c(data)
