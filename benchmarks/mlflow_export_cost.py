"""What ``MlflowExporter`` costs per record of the watch-overhead benchmark model, part by part.

On a shared machine a step-time A/B cannot resolve a few ms in a 455 ms step; this measures the
exporter's own work on a real record instead (medians over repeats, wall and thread CPU time):

* ``export()`` — on the watch's export thread (waited for by ``flush()``): its work is the local
  JSONL copy and the metric list (then a queue put), timed here as those two calls; next to
  ``JsonlExporter.export`` for scale.
* one ``log_batch`` round of that record — on the exporter's own thread: mlflow's client
  building and sending the request (its CPU time competes with the step only for the GIL; the
  wall time is mostly the server's).

    python benchmarks/mlflow_export_cost.py http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared helper model

from _monitor_models import TinyTransformer  # noqa: E402

import normkit  # noqa: E402
from normkit.monitor import JsonlExporter, MlflowExporter, watch  # noqa: E402

CFG = dict(vocab=512, d=256, heads=4, layers=6, seq=128)  # as benchmarks/watch_overhead.py


class _Keep:
    def __init__(self):
        self.records = []

    def export(self, record):
        self.records.append(record)

    def close(self):
        pass


def _median_ms(fn, n: int) -> tuple[float, float]:
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tracking_uri", help="an MLflow tracking server, e.g. http://127.0.0.1:5000")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = normkit.convert(TinyTransformer(**CFG))
    keep = _Keep()
    with watch(model, model_name="bench", model_version="cost", exporters=[keep]):
        for _ in range(3):
            idx = torch.randint(0, CFG["vocab"], (8, CFG["seq"] + 1))
            model(idx[:, :-1]).sum().backward()
    record = keep.records[-1]
    tmp = Path(tempfile.mkdtemp(prefix="normkit-mlflow-cost-"))
    jsonl = JsonlExporter(tmp / "run.jsonl")
    exp = MlflowExporter(args.tracking_uri, experiment="normkit-export-cost")

    def export_work():  # what export() does on the calling thread, but the queue put
        exp._copy.export(record)
        exp._metrics(record)

    metrics = exp._metrics(record)
    print(f"record: {len(record['summary'])} layers, {len(metrics)} metrics")
    for what, fn, n in (("JsonlExporter.export", lambda: jsonl.export(record), args.repeats),
                         ("MlflowExporter.export", export_work, args.repeats),
                         ("one log_batch round (exporter thread)",
                          lambda: exp._log_step(record, metrics), max(args.repeats // 2, 1))):
        wall, cpu = _median_ms(fn, n)
        print(f"{what}: wall {wall:.3f} ms, cpu {cpu:.3f} ms")
    exp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
