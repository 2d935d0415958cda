"""Time normkit's LayerNorm, RMSNorm and fused add+norm against torch eager, torch.compile,
ONNX Runtime and a memory copy of the same bytes, on a shape x dtype grid.

Prints a table (time, GB/s, fraction of copy, speed-up vs torch), a bar check for the
4096x4096 points, and writes JSON with the machine description
(default: benchmarks/results/bench-<device>-<date>.json inside a normkit checkout, else
./normkit-bench.json).

examples:
  normkit bench --quick
  normkit bench --ops ln,rms --dtypes bfloat16 --M 4096 --N 4096
  normkit bench --no-backward --peers torch,copy --json /tmp/fwd.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import int_list, names, positive_float

HELP = "benchmark the norms against torch, torch.compile, ONNX Runtime and a memory copy"

# Kept in sync with normkit.bench (not imported here: this module loads for `normkit --help`).
_OPS = ("ln", "rms", "add_ln", "add_rms")
_DTYPES = ("float32", "bfloat16", "float16", "float64")
_PEERS = ("torch", "compile", "onnxruntime", "copy", "clone", "out")


_ints = int_list(1, "positive integers", "1,8,512")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="small grid (M 1,512,4096; N 768,4096; ln+rms fwd+bwd, add_ln fwd; "
                        "no torch.compile): about 30 s on a 2-core CPU")
    p.add_argument("--ops", type=names(_OPS), metavar="LIST",
                   help=f"ops to time, from {','.join(_OPS)} "
                        "(default: all; --quick: ln,rms,add_ln)")
    p.add_argument("--dtypes", type=names(_DTYPES), metavar="LIST",
                   help="dtypes, from " + ",".join(_DTYPES) + " (default: float32,bfloat16)")
    p.add_argument("--M", type=_ints, metavar="LIST", dest="Ms",
                   help="rows (default: 1,8,512,4096,16384; --quick: 1,512,4096)")
    p.add_argument("--N", type=_ints, metavar="LIST", dest="Ns",
                   help="features (default: 64,768,4096,8192; --quick: 768,4096)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--peers", type=names(_PEERS), metavar="LIST",
                   help=f"peers, from {','.join(_PEERS)} (default: all; --quick: "
                        "torch,onnxruntime,copy)")
    p.add_argument("--backend", choices=("auto", "cpu", "reference"), default="auto",
                   help="normkit backend to time (default: auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="device (default: cpu)")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="where to write the results (default: benchmarks/results/"
                        "bench-<device>-<date>.json in a normkit checkout, else "
                        "./normkit-bench.json)")
    p.add_argument("--min-time", type=positive_float, metavar="SECONDS",
                   help="minimum measuring time per implementation and case "
                        "(default: 0.2; --quick: 0.025)")
    p.add_argument("--check", action="store_true",
                   help="exit with code 1 when a point of the bar check fails")


def config_from_args(args: argparse.Namespace):
    """The BenchConfig the flags describe (raises ValueError for a bad combination)."""
    from dataclasses import replace

    from normkit import bench

    base = bench.BenchConfig.quick_grid() if args.quick else bench.BenchConfig()
    timing = base.timing
    if args.min_time is not None:
        timing = replace(timing, min_time_s=args.min_time,
                         max_time_s=max(timing.max_time_s, args.min_time))
    return bench.with_overrides(
        base,
        ops=args.ops,
        dtypes=args.dtypes,
        Ms=args.Ms,
        Ns=args.Ns,
        peers=args.peers,
        bwd_ops=() if args.no_backward else None,
        backend=args.backend,
        device=args.device,
        timing=timing,
    )


def run(args: argparse.Namespace) -> int:
    from normkit import bench
    from normkit.bench._terminal import run_and_print

    from .._console import console
    from ._out import error

    out = console(width=160)  # piped to a file: keep the table whole rather than 80 wide
    err = console(stderr=True)
    try:
        config = config_from_args(args)
    except ValueError as e:
        return error(err, "bench", e)
    json_path = args.json or bench.default_json_path(config.device)
    doc = run_and_print(config, json_path, out=out, err=err)
    if args.check and doc["bar"]["ok"] is False:
        return 1
    return 0
