"""Fused dropout + residual add + LayerNorm (``layer_norm(..., dropout_p=)``) on the CPU, against
the torch composition it replaces and a copy of its own ideal bytes.

For each shape (M, N) and dtype, side by side in one process, interleaved round by round
(``normkit.bench._timing``: warm-up, then medians):

* forward (no grad): normkit ``layer_norm(x, N, w, b, residual=r, dropout_p=p, seed=s,
  return_residual=True)`` against torch's ``h = F.dropout(x, p) + r; F.layer_norm(h, ...)``;
* backward alone, as ``normkit bench`` times it: one forward with x, r, γ, β requiring grad,
  then ``torch.autograd.grad(y, (x, r, γ, β), dy, retain_graph=True)`` per call (so no .grad
  accumulates into the leaves); normkit's also with the mask applied in dx's pass
  (``normkit_bwd_fused``) and in a pass of its own (``normkit_bwd_two_pass``), whichever the
  default (``normkit_bwd``) does not pick for the dtype (the kernels' ``fuse_dropout`` setting);
* forward + backward (the same leaves; ``torch.autograd.grad`` after a fresh forward) for both;
* ``copy``: ``dst.copy_(src)`` of 2·M·N elements — the bytes of the op's ideal traffic, x and r
  read, h and y written (4·M·N elements), which is also the backward's (dy and h read, dx and
  d-residual written).

Reported per point: medians, ``fwd_vs_copy`` = copy / normkit forward (the bar: ≥ 0.75),
``bwd_vs_copy`` = copy / normkit backward (≥ 0.5), and normkit / torch for the forward, the
backward and both (the bar: ≤ 1.10).  The machine's load average is recorded: on a shared
machine the figures move by tens of percent between runs.

    python benchmarks/dropout.py [--quick] [--out benchmarks/results/dropout-cpu-....json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import normkit
from normkit._io import write_json_atomic
from normkit.bench import machine_info
from normkit.bench._timing import TimingPolicy, timer_for
from normkit.kernels.cpu import _cpu

P = 0.1  # BERT's hidden_dropout_prob
SHAPES = [(4096, 4096), (16384, 1024), (512, 8192)]
QUICK_SHAPES = [(4096, 4096), (16384, 1024)]


def _cases(m, n, dtype):
    x, r = torch.randn(m, n, dtype=dtype), torch.randn(m, n, dtype=dtype)
    w, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    dy = torch.randn(m, n, dtype=dtype)
    src, dst = torch.randn(2 * m * n, dtype=dtype), torch.empty(2 * m * n, dtype=dtype)
    g = [t.clone().requires_grad_() for t in (x, r, w, b)]

    def nk_fwd():
        with torch.no_grad():
            return normkit.layer_norm(x, n, w, b, residual=r, dropout_p=P, seed=1,
                                      return_residual=True)

    def torch_fwd():
        with torch.no_grad():
            h = F.dropout(x, P) + r
            return F.layer_norm(h, (n,), w, b), h

    def nk_graph():
        return normkit.layer_norm(g[0], n, g[2], g[3], residual=g[1], dropout_p=P, seed=1,
                                  return_residual=True)[0]

    def torch_graph():
        return F.layer_norm(F.dropout(g[0], P) + g[1], (n,), g[2], g[3])

    y_nk, y_torch = nk_graph(), torch_graph()

    def nk_bwd_with(mode):
        def run():
            _cpu.set_fuse_dropout(mode)
            try:
                return torch.autograd.grad(y_nk, g, dy, retain_graph=True)
            finally:
                _cpu.set_fuse_dropout(-1)
        return run

    return {"copy": lambda: dst.copy_(src), "normkit_fwd": nk_fwd, "torch_fwd": torch_fwd,
            "normkit_bwd": lambda: torch.autograd.grad(y_nk, g, dy, retain_graph=True),
            "normkit_bwd_fused": nk_bwd_with(1), "normkit_bwd_two_pass": nk_bwd_with(0),
            "torch_bwd": lambda: torch.autograd.grad(y_torch, g, dy, retain_graph=True),
            "normkit_fwd_bwd": lambda: torch.autograd.grad(nk_graph(), g, dy),
            "torch_fwd_bwd": lambda: torch.autograd.grad(torch_graph(), g, dy)}


def run(shapes, dtypes, policy):
    timer = timer_for("cpu")
    points = []
    for dtype in dtypes:
        for m, n in shapes:
            fns = _cases(m, n, dtype)
            preps = {k: timer.prepare(f, policy) for k, f in fns.items()}
            for _ in range(policy.rounds):
                for prep in preps.values():
                    timer.sample(prep)
            t = {k: p.result().median_s for k, p in preps.items()}
            point = {
                "m": m, "n": n, "dtype": str(dtype).removeprefix("torch."), "p": P,
                "median_s": t,
                "fwd_vs_copy": t["copy"] / t["normkit_fwd"],
                "bwd_vs_copy": t["copy"] / t["normkit_bwd"],
                "fwd_vs_torch": t["normkit_fwd"] / t["torch_fwd"],
                "bwd_vs_torch": t["normkit_bwd"] / t["torch_bwd"],
                "fwd_bwd_vs_torch": t["normkit_fwd_bwd"] / t["torch_fwd_bwd"],
            }
            points.append(point)
            print(f"{point['dtype']:>8} {m:>6}x{n:<6} copy {t['copy'] * 1e3:6.2f} ms  fwd "
                  f"{t['normkit_fwd'] * 1e3:6.2f} (torch {t['torch_fwd'] * 1e3:7.2f}; "
                  f"{point['fwd_vs_copy']:.2f} of copy)  bwd {t['normkit_bwd'] * 1e3:6.2f} "
                  f"(torch {t['torch_bwd'] * 1e3:7.2f}; {point['bwd_vs_copy']:.2f} of copy; fused "
                  f"{t['normkit_bwd_fused'] * 1e3:6.2f}, two passes "
                  f"{t['normkit_bwd_two_pass'] * 1e3:6.2f})  "
                  f"fwd+bwd {t['normkit_fwd_bwd'] * 1e3:6.2f} (torch "
                  f"{t['torch_fwd_bwd'] * 1e3:7.2f})", flush=True)
    return points


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="two shapes, float32, short timings")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    policy = TimingPolicy.quick() if args.quick else TimingPolicy()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    load_before = os.getloadavg()
    points = run(shapes, dtypes, policy)
    now = dt.datetime.now(dt.timezone.utc)
    out = args.out or (Path(__file__).resolve().parent / "results"
                       / f"dropout-cpu-{now:%Y%m%d-%H%M%S}.json")
    write_json_atomic(out, {
        "schema": 1, "benchmark": "dropout", "utc": now.isoformat(timespec="seconds"),
        "machine": machine_info(), "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "quick": args.quick, "points": points,
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
