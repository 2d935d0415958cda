"""Overhead of ``normkit.watch`` on a small transformer training step on CPU.

The bar (issue 4): with every exporter on (Prometheus, TensorBoard, JSONL), a training step is
at most 5% slower at ``every=1`` and at most 1% slower at ``every=10``.  ``--otel`` adds the
OpenTelemetry exporter (issue 26) with the SDK's defaults: OTLP/HTTP to
``OTEL_EXPORTER_OTLP_ENDPOINT`` (localhost:4318 unless set; a collector that is not there is
the "down" case), every ``OTEL_METRIC_EXPORT_INTERVAL`` (60 s unless set).

Method.  Three identical copies of a 6-block pre-LN transformer (d=256, 4 heads, seq 128,
batch 8, vocab 512, AdamW; its 13 LayerNorms converted to normkit's, the intended use: the
statistics then come from the kernel): one unwatched (A), one watched with every=1 (B1), one
with every=10 (B10), fed random token batches of the same shape.

* every=1: single steps alternated A, B1, A, B1, ..., each B1 step against the mean of the A
  steps just before and after it (about a second apart, so the drift of a shared, noisy machine
  cancels).  A B1 step is timed up to ``flush()``: its record completed and every exporter
  done, so none of its work spills into the next A step (conservative: the background export
  thread's overlap with the step is not credited).
* every=10: blocks of 10 consecutive steps (a B10 block holds exactly one sampled step), A,
  B10, A; overhead = the B10 block's mean / the mean of the two A blocks − 1.

``--mlflow URI`` adds an ``MlflowExporter`` logging to that tracking server (issue 26: every
exporter on, MLflow included).

Reported: medians with the 25–75% spread (every=1 over 10 pairs per round, every=10 over one
block per round), plus the machine's load average before and after.  One torch thread: on a
shared 2-core machine OpenMP threads spinning against other processes make timings
meaningless (100x swings).

    python benchmarks/watch_overhead.py [--rounds 24] [--mlflow http://127.0.0.1:5000] [--otel]
                                        [--out benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import os
import platform
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
from normkit._io import write_json_atomic  # noqa: E402
from normkit.monitor import (  # noqa: E402
    JsonlExporter,
    OpenTelemetryExporter,
    PrometheusExporter,
    TensorBoardExporter,
    watch,
)

log = logging.getLogger("watch_overhead")

CFG = dict(vocab=512, d=256, heads=4, layers=6, seq=128)
BATCH = 8
BLOCK = 10


def _machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(), "torch_threads": 1}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def header(schema: str, load0, load1, t_start: float) -> dict:
    """The fields every result file of these benchmarks starts with (shared with
    guard_overhead.py): what it is, when, on what machine, under what load, how long."""
    return {"schema": schema, "schema_version": 1,
            "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": _machine(), "load_average_before": load0, "load_average_after": load1,
            "wall_seconds": time.time() - t_start}


def stats(v: list[float]) -> dict:
    """Median with the 25-75% spread (shared with guard_overhead.py)."""
    q = statistics.quantiles(v, n=4)
    return {"median": statistics.median(v), "p25": q[0], "p75": q[2], "n": len(v)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=24,
                   help="rounds of 10 A/B1 step pairs and one A/B10/A block triple")
    p.add_argument("--mlflow", metavar="TRACKING_URI", default=None,
                   help="also export to MLflow (a tracking server or store URI)")
    p.add_argument("--otel", action="store_true",
                   help="add the OpenTelemetry exporter (OTLP/HTTP, the SDK's defaults)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = normkit.convert(TinyTransformer(**CFG))  # normkit norms: statistics come free
    models = {k: copy.deepcopy(base) for k in ("A", "B1", "B10")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    tmp = Path(tempfile.mkdtemp(prefix="normkit-watch-bench-"))
    watches = {}
    for k, every in (("B1", 1), ("B10", 10)):
        exps = [PrometheusExporter(port=0), TensorBoardExporter(tmp / f"tb{k}"),
                JsonlExporter(tmp / f"{k}.jsonl")]
        if args.mlflow:
            from normkit.monitor import MlflowExporter

            exps.append(MlflowExporter(args.mlflow, experiment="normkit-watch-overhead",
                                       run_name=f"every={every}"))
        if args.otel:
            exps.append(OpenTelemetryExporter())
        watches[k] = watch(models[k], model_name="bench", model_version=k, every=every,
                           exporters=exps)
    gen = torch.Generator().manual_seed(1)

    def one_step(k: str) -> float:
        m, opt = models[k], opts[k]
        idx = torch.randint(0, CFG["vocab"], (BATCH, CFG["seq"] + 1), generator=gen)
        t0 = time.perf_counter()
        logits = m(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG["vocab"]),
                                                 idx[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k == "B1":
            watches[k].flush()  # the record built and exported: charged to this step
        return time.perf_counter() - t0

    def block(k: str) -> float:
        return sum(one_step(k) for _ in range(BLOCK)) / BLOCK

    load0 = os.getloadavg()
    for k in ("A", "B1", "B10"):  # warm-up: first calls allocate, threads settle
        block(k)
    t_start = time.time()
    over = {"B1": [], "B10": []}
    a_ms = []
    for r in range(args.rounds):
        # every=1: single steps alternated A, B1, A, B1, ..., A — each B1 step against the mean
        # of the A steps just before and after it (one second apart), so the drift of a shared
        # machine cancels far better than between 5-second blocks.
        seq = [one_step("A")]
        for _ in range(BLOCK):
            seq += [one_step("B1"), one_step("A")]
        for i in range(1, len(seq), 2):
            over["B1"].append(seq[i] / ((seq[i - 1] + seq[i + 1]) / 2) - 1)
        a_ms += [t * 1e3 for t in seq[0::2]]
        # every=10: a block of 10 steps holds exactly one sampled step; A, B10, A blocks.
        ta, tb, tc = block("A"), block("B10"), block("A")
        over["B10"].append(tb / ((ta + tc) / 2) - 1)
        log.info("round %d/%d: A %.1f ms/step; every=1 %+.2f%% (median so far), every=10 "
                 "%+.2f%%", r + 1, args.rounds, ta * 1e3, 100 * statistics.median(over["B1"]),
                 100 * over["B10"][-1])
    load1 = os.getloadavg()
    for w in watches.values():
        w.stop()

    result = {
        **header("normkit.bench.watch_overhead", load0, load1, t_start),
        "model": {**CFG, "batch": BATCH, "norm_layers": 13, "norms": "normkit.nn.LayerNorm",
                  "optimizer": "AdamW"},
        "method": "every=1: single steps alternated A,B1,A,...; overhead = B1 step / mean of the "
                  "A steps before and after - 1.  every=10: blocks of 10 steps A,B10,A; "
                  "overhead = B10 block mean / mean of the two A blocks - 1",
        "exporters": [type(e).__name__ for e in watches["B1"].exporters],
        "otel_endpoint": watches["B1"].exporters[-1].endpoint if args.otel else None,
        "unwatched_step_ms": stats(a_ms),
        "overhead_every_1": stats(over["B1"]),
        "overhead_every_10": stats(over["B10"]),
        "bar": {"every_1": 0.05, "every_10": 0.01},
    }
    result["meets_bar"] = (result["overhead_every_1"]["median"] <= 0.05
                           and result["overhead_every_10"]["median"] <= 0.01)
    out = args.out or (ROOT / "benchmarks" / "results" /
                       f"watch-overhead-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)  # atomic, like every file normkit writes
    log.info("unwatched step %.1f ms; overhead every=1 %.2f%% [%.2f, %.2f], every=10 %.2f%% "
             "[%.2f, %.2f]; load %s -> %s; written %s",
             result["unwatched_step_ms"]["median"],
             *(100 * result["overhead_every_1"][k] for k in ("median", "p25", "p75")),
             *(100 * result["overhead_every_10"][k] for k in ("median", "p25", "p75")),
             load0, load1, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
