"""torch.distributed (gloo, 2 CPU processes): each rank exports with its rank label, and
``reduce="all"`` merges per-layer statistics across ranks before rank 0 exports them."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3
ROWS = 32  # rows per rank per step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1]))  # _monitor_models
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from _monitor_models import Branches

        from normkit.monitor import JsonlExporter, watch

        torch.manual_seed(0)  # same weights on both ranks, as under DDP
        m = Branches(k=2, d=8)
        for reduce in (None, "all"):
            g = torch.Generator().manual_seed(100 + rank)  # the same data in both runs
            path = Path(out) / f"{reduce}-{rank}.jsonl"
            with watch(m, model_name="d", model_version="1", reduce=reduce,
                       exporters=[JsonlExporter(path)]) as w:
                for step in range(STEPS):
                    # Rank 1's inputs are shifted by +2: a rank-local difference reduce merges.
                    x = torch.randn(ROWS, 16, generator=g) + 2.0 * rank
                    if rank == 1 and step == 1:
                        x[5, 0] = float("nan")  # one bad row on rank 1 only
                    m(x).sum().backward()
            summary = {n: {k: s[k] for k in ("rows", "nonfinite_rows", "input_mean")}
                       for n, s in w.summary().items()}
            (Path(out) / f"{reduce}-{rank}.summary.json").write_text(json.dumps(
                {"summary": summary, "origin": w.nonfinite_origin, "rank": w.rank_label}))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_gloo_ranks_reduce_all(tmp_path):
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD,
                             start_method="spawn", join=False)
    # join() with a timeout returns False while workers run; bound the whole run.
    import time

    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo workers did not finish in 120 s")

    def records(name):
        lines = (tmp_path / name).read_text().splitlines()
        return [json.loads(x) for x in lines if json.loads(x)["type"] == "step"]

    def summary(name):
        return json.loads((tmp_path / name).read_text())

    # Without reduce: each rank exports its own statistics with its rank label.
    for rank in range(WORLD):
        recs = records(f"None-{rank}.jsonl")
        assert len(recs) == STEPS and {r["rank"] for r in recs} == {str(rank)}
        assert all(r["world_size"] == WORLD for r in recs)
        assert recs[0]["layers"]["norm.0"]["rows"] == ROWS
    local = [summary(f"None-{r}.summary.json")["summary"]["norm.0"] for r in range(WORLD)]
    assert local[0]["nonfinite_rows"] == 0 and local[1]["nonfinite_rows"] == 1
    assert summary("None-1.summary.json")["origin"] == "<input>"
    assert summary("None-0.summary.json")["origin"] is None

    # reduce="all": rank 0 alone writes, rank label "all", rows of both ranks merged.
    recs = records("all-0.jsonl")
    assert len(recs) == STEPS and {r["rank"] for r in recs} == {"all"}
    assert records("all-1.jsonl") == []  # header only
    assert all(r["layers"]["norm.0"]["rows"] + r["layers"]["norm.0"]["nonfinite_rows"]
               == WORLD * ROWS for r in recs)
    assert recs[1]["nonfinite"]["forward"]["origin"] == "<input>"  # seen on rank 1 only
    merged = [summary(f"all-{r}.summary.json") for r in range(WORLD)]
    for s in merged:  # every rank holds the same merged view
        assert s["rank"] == "all"
        assert s["summary"]["norm.0"]["rows"] == WORLD * ROWS * STEPS - 1
        assert s["summary"]["norm.0"]["nonfinite_rows"] == 1
    # The merged mean is the row-weighted mean of the two ranks' own means.
    want = ((local[0]["input_mean"] * local[0]["rows"] + local[1]["input_mean"] * local[1]["rows"])
            / (local[0]["rows"] + local[1]["rows"]))
    assert merged[0]["summary"]["norm.0"]["input_mean"] == pytest.approx(want, rel=1e-9)
