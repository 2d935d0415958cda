"""Backward time of ``memory_efficient=True`` (x̂ recomputed from the saved y) on the CPU, side
by side with normkit's default backward (x̂ from the saved input), torch's backward, and a copy
of the backward's own ideal bytes.

The bar (issue 27, the "normkit bench" bars): the backward reaches >= 0.5 of a memory copy of
its ideal bytes — it reads dy and y (or x) and writes dx, 3·M·N elements; γ, β and the
statistics are negligible — and is never more than 10% slower than torch's backward of
``F.layer_norm`` / ``F.rms_norm``.

Each implementation is timed as the user sees it, ``torch.autograd.grad(y, [x, γ, (β)], dy,
retain_graph=True)`` on a graph built once (so every call runs only the backward), medians
after warm-up, the implementations interleaved in rounds (``normkit.bench._timing``).  The
copy moves the same bytes: ``dst.copy_(src)`` of 1.5·M·N elements (1.5 read + 1.5 written).
On a shared machine the figures move by 10-20% from run to run; the lead re-measures on a
quiet one.

    python benchmarks/memory_efficient.py [--quick] [--threads N] [--json PATH]
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

SHAPES = [(4096, 4096), (4096, 1024), (1024, 8192)]
QUICK_SHAPES = [(4096, 4096)]


def _grad_fn(fn, x, params, dy):
    """A backward-only callable: the graph of fn(x, *params) built once, retained."""
    leaves = [x.detach().requires_grad_()] + [p.detach().requires_grad_() for p in params]
    y = fn(*leaves)
    return lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True)


def case(m, n, dtype, rms, timer, policy):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, n, generator=g).to(dtype)
    dy = torch.randn(m, n, generator=g).to(dtype)
    w = (1 + 0.25 * torch.randn(n, generator=g)).to(dtype)
    params = [w] if rms else [w, (0.5 * torch.randn(n, generator=g)).to(dtype)]

    def ours(lean):
        if rms:
            return lambda xx, ww: normkit.rms_norm(xx, n, ww, 1e-5, memory_efficient=lean)
        return lambda xx, ww, bb: normkit.layer_norm(xx, n, ww, bb, 1e-5, memory_efficient=lean)

    def theirs(xx, *p):
        return F.rms_norm(xx, (n,), p[0], 1e-5) if rms else F.layer_norm(xx, (n,), *p, 1e-5)

    src = torch.empty(m * n * 3 // 2, dtype=dtype).normal_()
    dst = torch.empty_like(src)
    impls = {
        "copy": lambda: dst.copy_(src),
        "normkit memory_efficient": _grad_fn(ours(True), x, params, dy),
        "normkit default": _grad_fn(ours(False), x, params, dy),
        "torch": _grad_fn(theirs, x, params, dy),
    }
    preps = {k: timer.prepare(f, policy) for k, f in impls.items()}
    for _ in range(policy.rounds):
        for p in preps.values():
            timer.sample(p)
    t = {k: p.result().median_s for k, p in preps.items()}
    ideal = 3 * m * n * x.element_size()
    return {
        "op": "rms" if rms else "ln", "dtype": str(dtype).removeprefix("torch."), "M": m, "N": n,
        "ideal_bytes": ideal, "median_s": t,
        "fraction_of_copy": {k: t["copy"] / v for k, v in t.items() if k != "copy"},
        "lean_vs_torch": t["normkit memory_efficient"] / t["torch"],
        "lean_vs_default": t["normkit memory_efficient"] / t["normkit default"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, short timings")
    ap.add_argument("--json", type=Path, help="where to write the result")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a "
                    "loaded machine, where OpenMP threads waiting for a busy core add ~10 ms")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = TimingPolicy.quick() if args.quick else TimingPolicy()
    timer = timer_for("cpu")
    rows = [case(m, n, dtype, rms, timer, policy)
            for m, n in (QUICK_SHAPES if args.quick else SHAPES)
            for dtype in (torch.float32, torch.bfloat16) for rms in (False, True)]
    now = dt.datetime.now(dt.timezone.utc)
    doc = {"benchmark": "memory_efficient backward (CPU)",
           "date": now.isoformat(timespec="seconds"), "quick": args.quick,
           "threads": torch.get_num_threads(), "rows": rows, "machine": machine_info()}
    path = args.json or (Path(__file__).parent / "results"
                         / f"memory-efficient-{now.strftime('%Y%m%d-%H%M%S')}.json")
    write_json_atomic(path, doc)
    for r in rows:
        f, t = r["fraction_of_copy"], {k: v * 1e3 for k, v in r["median_s"].items()}
        print(f"{r['op']:3} {r['dtype']:8} {r['M']}x{r['N']}: "
              f"lean {t['normkit memory_efficient']:7.2f} ms "
              f"({f['normkit memory_efficient']:.2f} of copy), "
              f"default {t['normkit default']:7.2f} ms ({f['normkit default']:.2f}), "
              f"torch {t['torch']:7.2f} ms ({f['torch']:.2f}); lean/torch "
              f"{r['lean_vs_torch']:.2f}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
