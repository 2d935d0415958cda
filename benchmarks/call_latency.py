"""Per-call latency of normkit's ops at M=1 (one row of 768 float32), the cost of the Python
and dispatch layers: the default call (the compiled eager entry point), the general path
(non-default options), ``out=``, and torch's own op beside them.

Compares source trees A/B (e.g. before and after a refactor) in alternating fresh processes,
so the drift of a shared machine cancels: each process times every case (median of 25 blocks of
2,000 calls after warm-up) and the report keeps, per tree and case, the minimum over the
processes.

    python benchmarks/call_latency.py --tree new=src --tree old=/tmp/old/src [--rounds 6]
        [--out benchmarks/results/call-latency-....json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

CASES = {
    "layer_norm": "F.layer_norm(x, 768, w, b)",
    "layer_norm out=": "F.layer_norm(x, 768, w, b, out=o)",
    "layer_norm zero-centred γ": "F.layer_norm(x, 768, w, b, zero_centered_gamma=True)",
    "rms_norm casting=gemma": "F.rms_norm(x, 768, w, casting='gemma')",
    "rms_norm residual": "F.rms_norm(x, 768, w, residual=r)",
    "torch layer_norm": "torch.nn.functional.layer_norm(x, (768,), w, b)",
}

_CHILD = r"""
import json, statistics, sys, time, timeit
import torch
import normkit as F
torch.set_num_threads(1)
x = torch.randn(1, 768); r = torch.randn(1, 768); o = torch.empty(1, 768)
w = torch.randn(768); b = torch.randn(768)
out = {}
with torch.no_grad():
    for name, stmt in json.loads(sys.argv[1]).items():
        t = timeit.Timer(stmt, globals=globals())
        t.timeit(2000)
        out[name] = statistics.median(t.repeat(25, 2000)) / 2000
print(json.dumps(out))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=SRC",
                    help="a source tree to import normkit from (repeat for each)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args(argv)
    trees = dict(t.split("=", 1) for t in args.tree)
    best: dict[str, dict[str, float]] = {name: {} for name in trees}
    for _ in range(args.rounds):
        for name, src in trees.items():
            env = dict(os.environ, PYTHONPATH=os.path.abspath(src), OMP_NUM_THREADS="1")
            got = json.loads(subprocess.run(
                [sys.executable, "-c", _CHILD, json.dumps(CASES)], env=env, check=True,
                capture_output=True, text=True).stdout)
            for case, s in got.items():
                best[name][case] = min(best[name].get(case, float("inf")), s)
    names = list(trees)
    print(f"{'case':<28}" + "".join(f"{n:>12}" for n in names)
          + ("   ratio" if len(names) == 2 else ""))
    for case in CASES:
        row = f"{case:<28}" + "".join(f"{best[n][case] * 1e6:>10.3f}µs" for n in names)
        if len(names) == 2:
            row += f"   {best[names[1]][case] / best[names[0]][case]:.3f}"
        print(row)
    if args.out:
        doc = {"what": "per-call latency at M=1 (1x768 float32), min over processes of the "
                       "median of 25x2000 calls", "trees": trees, "rounds": args.rounds,
               "seconds": best, "machine": {"platform": platform.platform(),
                                            "processor": platform.processor(),
                                            "cpus": os.cpu_count(),
                                            "loadavg": os.getloadavg()},
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        from normkit._io import write_json_atomic

        write_json_atomic(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
