"""Norm + quantize in one pass (``out_dtype=torch.float8_e4m3fn`` / ``torch.int8``) against the
torch composition it replaces and against a copy of its own ideal bytes.

Per case (op: RMSNorm or the fused add+RMSNorm; q dtype; x dtype; M; N), side by side in one
process, in interleaved rounds (``normkit.bench._timing``), forward under ``torch.no_grad()``:

* normkit: ``normkit.rms_norm(x, N, w, residual=r, out_dtype=q)`` (dynamic per-row scale);
* torch: vLLM's composition — ``h = x + r``; ``y = F.rms_norm(h, (N,), w, eps)``; per row
  ``s = amax(|y|) / qmax`` (float32), ``q = (y / s).clamp(-qmax, qmax)`` (int8: ``.round()``)
  ``.to(q)``;
* copy: ``dst.copy_(src)`` of a uint8 buffer of half the ideal bytes (read + write = ideal).
  Ideal bytes: x in (its dtype), q out (1 B/element) and the float32 scales; fused: + the
  residual in and h out (x's dtype).

Reported per case: medians, ``copy_fraction`` (copy time ÷ normkit time; the bar is ≥ 0.75) and
``vs_torch`` (torch time ÷ normkit time; the bar is ≥ 1/1.1).  The machine is the shared 2-core
CI-class box unless said otherwise: re-measure on a quiet one before quoting.

    python benchmarks/quant_out.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import normkit
from normkit._io import write_json_atomic
from normkit.bench import machine_info
from normkit.bench._timing import TimingPolicy, timer_for

QMAX = {torch.float8_e4m3fn: 448.0, torch.int8: 127.0}
EPS = 1e-6


def torch_composition(x, w, r, q_dtype):
    """vLLM's unfused reference: norm, then per-token quantization."""
    h = x if r is None else x + r
    y = F.rms_norm(h, (x.shape[-1],), w, EPS).float()
    s = y.abs().amax(-1, keepdim=True) / QMAX[q_dtype]
    t = (y / s).clamp(-QMAX[q_dtype], QMAX[q_dtype])
    if q_dtype == torch.int8:
        t = t.round()
    return t.to(q_dtype), s, h


def cases(quick):
    shapes = [(4096, 4096), (256, 4096), (16, 4096), (1, 4096), (4096, 8192), (256, 8192)]
    if quick:
        shapes = [(4096, 4096), (256, 4096), (16, 8192), (1, 4096)]
    for m, n in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            for q_dtype in (torch.float8_e4m3fn, torch.int8):
                for fused in (False, True):
                    yield m, n, dtype, q_dtype, fused


def run_case(m, n, dtype, q_dtype, fused, policy, timer):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    r = torch.randn(m, n, generator=g).to(dtype) if fused else None
    esize = x.element_size()
    ideal = m * n * (esize + 1) + 4 * m + (2 * m * n * esize if fused else 0)
    src = torch.empty(ideal // 2, dtype=torch.uint8)
    dst = torch.empty_like(src)
    fns = {
        "normkit": lambda: normkit.rms_norm(x, n, w, EPS, residual=r, out_dtype=q_dtype),
        "torch": lambda: torch_composition(x, w, r, q_dtype),
        "copy": lambda: dst.copy_(src),
    }
    with torch.no_grad():
        preps = {k: timer.prepare(f, policy) for k, f in fns.items()}
        for _ in range(policy.rounds):
            for p in preps.values():
                timer.sample(p)
    t = {k: p.result() for k, p in preps.items()}
    med = {k: v.median_s for k, v in t.items()}
    return {
        "op": "add+rms" if fused else "rms", "q_dtype": str(q_dtype).removeprefix("torch."),
        "dtype": str(dtype).removeprefix("torch."), "M": m, "N": n, "ideal_bytes": ideal,
        "median_s": med, "min_s": {k: v.min_s for k, v in t.items()},
        "copy_fraction": med["copy"] / med["normkit"], "vs_torch": med["torch"] / med["normkit"],
        "noisy": {k: v.median_s > 1.5 * v.min_s for k, v in t.items()},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    ap.add_argument("--json", help="result file (default: benchmarks/results/quant-out-*.json)")
    args = ap.parse_args(argv)
    policy = TimingPolicy.quick() if args.quick else TimingPolicy()
    timer = timer_for("cpu")
    rows = []
    print(f"{'op':8} {'q':14} {'x':9} {'M':>5} {'N':>5} {'normkit µs':>11} {'torch µs':>9} "
          f"{'copy µs':>8} {'copy_frac':>9} {'vs_torch':>8}")
    for case in cases(args.quick):
        row = run_case(*case, policy, timer)
        rows.append(row)
        med = row["median_s"]
        flag = " ~" if any(row["noisy"].values()) else ""
        print(f"{row['op']:8} {row['q_dtype']:14} {row['dtype']:9} {row['M']:>5} {row['N']:>5} "
              f"{med['normkit'] * 1e6:>11.1f} {med['torch'] * 1e6:>9.1f} "
              f"{med['copy'] * 1e6:>8.1f} {row['copy_fraction']:>9.2f} "
              f"{row['vs_torch']:>8.2f}{flag}", flush=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = f"quant-out-{stamp}{'-quick' if args.quick else ''}.json"
    path = Path(args.json) if args.json else Path(__file__).parent / "results" / name
    doc = {"schema": 1, "benchmark": "quant_out", "created_utc": stamp, "quick": args.quick,
           "machine": machine_info(), "cases": rows}
    print(f"wrote {write_json_atomic(path, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
