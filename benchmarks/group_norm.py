"""GroupNorm: ``normkit.group_norm`` against ``torch.nn.functional.group_norm`` and a copy of
the op's own ideal bytes, forward and forward+backward, at diffusion U-Net shapes, contiguous
and channels-last, float32 and bfloat16, side by side in one process.

Ideal bytes (elements of x's dtype, γ/β and statistics left out: < 0.1%):
  forward          read x, write y                      2 x numel
  forward+backward forward, then read x and dy, write dx 5 x numel
The backward alone (``backward_fraction_of_copy``) is the forward+backward time less the
forward's, against 3/5 of the forward+backward copy.
A copy of the same bytes is ``dst.copy_(src)`` of half as many elements (a copy reads and
writes each).  Where those bytes are as many as the last-level cache holds or more, each call
copies the next slice of buffers of at least twice the cache, so that no call finds its source
still in the cache from the call before: (16, 512, 32, 32) bfloat16's forward moves 32 MiB (a
16 MiB source into a 16 MiB destination), and copied from one buffer pair that ran at 90-100
GB/s on this 2-core VM's 32 MiB L3, three times memory's speed.  Medians after warm-up
(``normkit.bench._timing``), the implementations of a case interleaved round by round so a
shared machine's drift hits them alike.

    python benchmarks/group_norm.py [--quick] [--device cpu|cuda] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import glob
import itertools
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import normkit
from normkit._io import write_json_atomic
from normkit.bench import machine_info
from normkit.bench._timing import TimingPolicy, timer_for

# (shape, groups): the U-Net's first and deepest levels (SD 1.x: 320 and 1280 channels), a
# high-resolution level of a small model, and the bar's two (16.8M and 8.4M elements, the first
# the size of 4096x4096)
BAR = [((4, 256, 128, 128), 32), ((16, 512, 32, 32), 32)]
SHAPES = [((8, 320, 64, 64), 32), ((8, 1280, 16, 16), 32), ((1, 64, 256, 256), 32), *BAR]
QUICK = [((2, 320, 64, 64), 32), ((8, 1280, 16, 16), 32), ((1, 64, 256, 256), 32), *BAR]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cache_bytes() -> int:
    """The largest CPU cache's size (Linux sysfs), or 32 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[text[-1]])
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return max(sizes, default=32 << 20)


def _copy(n, dtype, device):
    """A call that copies n elements of dtype (reads and writes 2·n elements' bytes).  Where those
    bytes fill the cache, the calls take turns over slices of buffers of at least twice the
    cache.  Buffers written before they are timed: an untouched buffer reads the kernel's
    shared zero page, which stays in cache, and the copy would look several times faster than
    memory."""
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    cache = _cache_bytes()
    k = 1 if 2 * nbytes < cache else math.ceil(2 * cache / nbytes)
    src = torch.randn(k * n, device=device).to(dtype)
    dst = torch.zeros_like(src)
    turn = itertools.cycle(range(0, k * n, n))

    def run():
        i = next(turn)
        dst[i:i + n].copy_(src[i:i + n])
    return run


def _case(shape, g, fmt, dtype, device):
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(shape[1], device=device, dtype=dtype)
    b = torch.randn(shape[1], device=device, dtype=dtype)
    dy = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
    n = x.numel()

    def fwd(op):
        def run():
            with torch.no_grad():
                op(x, g, w, b)
        return run

    def train(op):
        def run():
            op(xg, g, wg, bg).backward(dy)
            xg.grad = wg.grad = bg.grad = None
        return run

    return {
        "forward": ({"normkit": fwd(normkit.group_norm), "torch": fwd(F.group_norm),
                     "copy": _copy(n, dtype, device)}, 2 * n * x.element_size()),
        "forward+backward": ({"normkit": train(normkit.group_norm), "torch": train(F.group_norm),
                              "copy": _copy(5 * n // 2, dtype, device)}, 5 * n * x.element_size()),
    }


def run(quick: bool, device: str) -> list[dict]:
    timer = timer_for(device)
    policy = TimingPolicy.quick() if quick else TimingPolicy()
    rows = []
    for shape, g in QUICK if quick else SHAPES:
        for fname, fmt in FORMATS.items():
            for dname, dtype in DTYPES.items():
                for what, (impls, nbytes) in _case(shape, g, fmt, dtype, device).items():
                    prep = {k: timer.prepare(fn, policy) for k, fn in impls.items()}
                    for _ in range(policy.rounds):
                        for p in prep.values():
                            timer.sample(p)
                    t = {k: p.result().median_s for k, p in prep.items()}
                    row = {"shape": list(shape), "groups": g, "format": fname, "dtype": dname,
                           "pass": what, "ideal_bytes": nbytes,
                           **{f"{k}_median_s": v for k, v in t.items()},
                           "normkit_gb_s": nbytes / t["normkit"] / 1e9,
                           "fraction_of_copy": t["copy"] / t["normkit"],
                           "speedup_vs_torch": t["torch"] / t["normkit"]}
                    if what == "forward":
                        forward_s = t["normkit"]
                    else:
                        # the backward alone: forward+backward less the forward, against a copy
                        # of its own bytes (read x and dy, write dx: 3/5 of the pass's); None
                        # where a noisy pass took no longer than its forward
                        bwd_s = t["normkit"] - forward_s
                        row["backward_fraction_of_copy"] = (
                            0.6 * t["copy"] / bwd_s if bwd_s > 0 else None)
                    rows.append(row)
                    bwd = row.get("backward_fraction_of_copy")
                    tail = "" if what == "forward" else "  backward of copy " + (
                        "?" if bwd is None else f"{bwd:.2f}")
                    print(f"{str(shape):18} {fname:13} {dname:8} {what:16} normkit "
                          f"{t['normkit'] * 1e3:8.2f} ms  torch {t['torch'] * 1e3:8.2f} ms  "
                          f"copy {t['copy'] * 1e3:8.2f} ms  of copy {row['fraction_of_copy']:.2f}"
                          f"  vs torch {row['speedup_vs_torch']:.2f}x{tail}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller grid, shorter timing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/group-norm-<time>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.quick, args.device)
    path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                    f"group-norm-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json_atomic(path, {"schema_version": 1, "benchmark": "group_norm",
                             "quick": args.quick, "device": args.device,
                             "threads": torch.get_num_threads(),
                             "machine": machine_info(), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
