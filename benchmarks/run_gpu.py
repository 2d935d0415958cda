#!/usr/bin/env python
"""GPU benchmark of normkit's Triton kernels against torch eager, torch.compile (default and
max-autotune) and Liger-Kernel, with a device-to-device copy of the same bytes as the limit.

    python benchmarks/run_gpu.py                       # the issue-3 grid on cuda:0
    python benchmarks/run_gpu.py --quick               # a handful of shapes, ~1-2 minutes
    python benchmarks/run_gpu.py --ops rms --dtypes bfloat16 --N 4096,262144 --passes fwd

Grid (default): LN, RMSNorm, fused add+LN, fused add+RMS × forward/backward × bfloat16 (and
whatever ``--dtypes`` adds) × N ∈ {1024 … 262,144} at M·N = 2^27 (the bar's grid), plus M = 1
decode rows at N ∈ {4096, 8192} (latency).

Method:

* **CUDA events** around groups of ``inner`` back-to-back calls (a group lasts ≥ 200 µs, so the
  ~5 µs of event overhead stays small), after **warm-up** (first call timed separately: it
  includes Triton/inductor compilation); **medians** over ``--reps`` groups, with quartiles.
  Implementations of a case are sampled in interleaved rounds, so clock/thermal drift hits all
  of them alike.
* **Rotating buffers**: when a case's working set is below 4× the GPU's L2 (50 MiB on H100),
  ``k`` independent input sets are allocated and the calls cycle through them, so the inputs are
  read from HBM, not L2 — otherwise small cases would report cache bandwidth.
* **Poisoned outputs, checked**: before each implementation's first (checked) call, the
  allocator's free memory of the output's size is filled with NaN (a NaN tensor allocated and
  freed: the caching allocator hands the same blocks to the op), and the copy's destination is
  NaN-filled; the output must then be finite where the truth is and within the accuracy rule of
  tests/helpers.py (≤ 2 × torch's error + atol against float64 on the first rows).  The last
  output of the timed runs is checked again.
* **The limit**: ``dst.copy_(src)`` of uint8 buffers of ideal_bytes/2 each (read + write =
  ideal_bytes), timed the same way, rotating the same way.  ``copy_fraction`` = copy time / op
  time.

JSON (schema_version 1) to ``benchmarks/results/bench-gpu-<gpu>-<UTC date-time>.json`` (or
``--json PATH``), written atomically; see ``result_doc`` for the fields.  Needs CUDA; the parts
that do not (arguments, grid, bytes, summary, JSON) are tested in tests/test_bench_gpu.py with a
fake timer on CPU tensors.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# The case and its byte count are normkit bench's own, so CPU and GPU results compare.
from normkit.bench import Case, ideal_bytes  # noqa: F401  (ideal_bytes: re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
OPS = ("ln", "rms", "add_ln", "add_rms")
PASSES = ("fwd", "bwd")
PEERS = ("normkit", "torch", "compile", "compile-max", "liger", "copy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRID_NS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
GRID_ELEMENTS = 1 << 27  # M·N of the bar's grid
DECODE_NS = (4096, 8192)
QUICK_NS = (4096, 65536, 262144)
EPS = 1e-6
# The accuracy rule's atol (tests/helpers.py ATOL).
ATOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
CHECK_ROWS = 64  # rows compared against float64 (enough to catch a wrong block; cheap at 262K)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def grid(ops: Sequence[str], passes: Sequence[str], dtypes: Sequence[str],
         ns: Sequence[int], ms: Sequence[int] | None, decode: bool) -> list[Case]:
    """Cases: each N at M = GRID_ELEMENTS / N (or at each of ``ms``), plus M = 1 decode rows."""
    cases = []
    for op in ops:
        for p in passes:
            for dt in dtypes:
                for n in ns:
                    for m in (ms or [max(1, GRID_ELEMENTS // n)]):
                        cases.append(Case(op, p, dt, m, n))
                if decode and p == "fwd" and not ms:
                    cases.extend(Case(op, p, dt, 1, n) for n in DECODE_NS)
    return cases


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{bad or text!r} not in {', '.join(allowed)}")
        return values

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="run_gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=_choices(OPS), default=list(OPS))
    p.add_argument("--passes", type=_choices(PASSES), default=list(PASSES))
    p.add_argument("--dtypes", type=_choices(tuple(DTYPES)), default=["bfloat16"])
    p.add_argument("--N", dest="ns", type=_int_list, default=None,
                   help="row lengths (default: 1024 ... 262144)")
    p.add_argument("--M", dest="ms", type=_int_list, default=None,
                   help="rows (default: 2^27 / N, the bar's grid)")
    p.add_argument("--peers", type=_choices(PEERS), default=list(PEERS))
    p.add_argument("--no-decode", dest="decode", action="store_false",
                   help="leave out the M=1 latency cases")
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_NS}, fewer repetitions")
    p.add_argument("--reps", type=int, default=None, help="timed groups per implementation")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: tests only
    p.add_argument("--normkit-backend", default="triton", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ns is None:
        args.ns = list(QUICK_NS if args.quick else GRID_NS)
    if args.reps is None:
        args.reps = 7 if args.quick else 21
    if args.reps < 3:
        p.error("--reps must be >= 3 (medians and quartiles)")
    return args


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


class CudaEventTimer:
    """Seconds per call of ``fn`` over ``inner`` back-to-back calls between two CUDA events."""

    def __call__(self, fn: Callable[[], object], inner: int) -> float:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner


def _inner_for(timer, fn, target_s: float = 200e-6, cap: int = 1000) -> tuple[int, float]:
    """(calls per group so a group lasts >= target_s, seconds of the first call)."""
    t0 = time.perf_counter()
    first = timer(fn, 1)
    first_wall = time.perf_counter() - t0
    for _ in range(3):  # warm-up
        timer(fn, 1)
    one = max(timer(fn, 3), 1e-9)
    return max(1, min(cap, math.ceil(target_s / one))), max(first, first_wall)


def _summary(samples: list[float], inner: int, first_s: float) -> dict[str, Any]:
    qs = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "min_s": min(samples), "q1_s": qs[0],
            "q3_s": qs[2], "samples": len(samples), "inner": inner, "first_call_s": first_s}


# ----------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------


class Skip(Exception):
    """An implementation that does not apply here (missing package, unsupported case)."""


def _inputs(case: Case, device: str, sets: int, grad: bool, seed: int = 0) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[case.dtype]
    m, n = case.M, case.N
    out = []
    for _ in range(sets):
        d = {"x": (torch.randn(m, n, generator=g) * 2 + 0.5).to(device, dt)}
        d["r"] = torch.randn(m, n, generator=g).to(device, dt) if case.fused else None
        d["w"] = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dt)
        d["b"] = None if case.rms else (0.1 * torch.randn(n, generator=g)).to(device, dt)
        if grad:
            for k in ("x", "r", "w", "b"):
                if d[k] is not None:
                    d[k].requires_grad_()
            d["dy"] = torch.randn(m, n, generator=g).to(device, dt)
        out.append(d)
    return out


def _torch_fn(case: Case):
    n = case.N
    if case.rms:
        def norm(h, w, b):
            return F.rms_norm(h, (n,), w, EPS)
    else:
        def norm(h, w, b):
            return F.layer_norm(h, (n,), w, b, EPS)
    if case.fused:
        def fwd(x, r, w, b):
            h = x + r
            return norm(h, w, b), h
    else:
        def fwd(x, r, w, b):
            return norm(x, w, b)
    return fwd


def _normkit_fn(case: Case, backend: str):
    import normkit

    n = case.N

    def fwd(x, r, w, b):
        with normkit.use_backend(backend):
            if case.rms:
                return normkit.rms_norm(x, n, w, EPS, residual=r, return_residual=r is not None)
            return normkit.layer_norm(x, n, w, b, EPS, residual=r, return_residual=r is not None)

    return fwd


def _liger_fn(case: Case):
    try:
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm
    except ImportError as e:
        raise Skip(f"liger-kernel not installed ({e})") from None
    if case.fused:
        try:
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        except ImportError:
            raise Skip("this liger-kernel has no fused add+norm") from None
        if not case.rms:
            raise Skip("liger-kernel has no fused add+LayerNorm")

        def fwd(x, r, w, b):
            # (x, residual, weight, eps, offset, casting_mode, in_place) -> (y, h)
            return LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False)

        return fwd
    if case.rms:
        # in_place=False: Liger's default writes dx into dy, which would corrupt the next call
        return lambda x, r, w, b: liger_rms_norm(x, w, EPS, 0.0, "llama", False)
    return lambda x, r, w, b: liger_layer_norm(x, w, b, EPS)


def build(peer: str, case: Case, args) -> Callable[..., Any]:
    """fn(x, r, w, b) -> y or (y, h) for a peer, or raises Skip."""
    if peer == "normkit":
        return _normkit_fn(case, args.normkit_backend)
    if peer == "torch":
        return _torch_fn(case)
    if peer in ("compile", "compile-max"):
        if args.device != "cuda":
            raise Skip("compiled peers run on CUDA only")
        mode = "max-autotune" if peer == "compile-max" else None
        return torch.compile(_torch_fn(case), dynamic=False, mode=mode)
    if peer == "liger":
        if args.device != "cuda":
            raise Skip("liger-kernel runs on CUDA only")
        return _liger_fn(case)
    raise ValueError(peer)


def _runner(case: Case, fn, sets: list[dict]) -> Callable[[], object]:
    """A zero-argument call that cycles through the input sets (forward or backward)."""
    state = {"i": 0, "out": None}
    if case.pass_ == "fwd":
        def run():
            d = sets[state["i"] % len(sets)]
            state["i"] += 1
            state["out"] = fn(d["x"], d["r"], d["w"], d["b"])
            return state["out"]
    else:
        graphs = []
        for d in sets:  # one forward per set, kept; only backward is timed
            out = fn(d["x"], d["r"], d["w"], d["b"])
            y = out[0] if isinstance(out, tuple) else out
            leaves = [d[k] for k in ("x", "r", "w", "b") if d[k] is not None]
            graphs.append((y, leaves, d["dy"]))

        def run():
            y, leaves, dy = graphs[state["i"] % len(graphs)]
            state["i"] += 1
            state["out"] = torch.autograd.grad(y, leaves, dy, retain_graph=True)
            return state["out"]
    run.state = state
    return run


def _truth_and_torch(case: Case, d: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 truth, torch's own result in the dtype) of the first rows: y (fwd) or dx (bwd)."""
    k = min(case.M, CHECK_ROWS)
    fn = _torch_fn(case)
    sl = {key: (None if d[key] is None else (d[key][:k] if d[key].dim() == 2 else d[key]))
          for key in ("x", "r", "w", "b")}

    def run(dtype):
        args = {key: (None if t is None else t.detach().to(dtype).requires_grad_())
                for key, t in sl.items()}
        if dtype == torch.float64 and args["r"] is not None:  # h rounded to x's dtype
            h = (args["x"] + args["r"]).to(DTYPES[case.dtype]).double()
            out = fn(h, torch.zeros_like(h), args["w"], args["b"])
        else:
            out = fn(args["x"], args["r"], args["w"], args["b"])
        y = out[0] if isinstance(out, tuple) else out
        if case.pass_ == "fwd":
            return y.detach()
        (dx,) = torch.autograd.grad(y, [args["x"]], d["dy"][:k].to(dtype))
        return dx

    return run(torch.float64), run(DTYPES[case.dtype])


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a.double() - b.double()).abs()
    d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
    return float(d.max()) if d.numel() else 0.0


def check(case: Case, out, truth: torch.Tensor, torch_out: torch.Tensor) -> str:
    """'ok' or what is wrong with an output (y for fwd, dx for bwd) on the first rows."""
    got = out[0] if isinstance(out, (tuple, list)) else out
    k = min(case.M, CHECK_ROWS)
    got = got[:k]
    if not torch.isfinite(got).all():
        return "non-finite output (poison left or NaN produced)"
    err = _max_err(got, truth)
    bound = 2 * _max_err(torch_out, truth) + ATOL[DTYPES[case.dtype]] * (4 if case.pass_ ==
                                                                          "bwd" else 1)
    return "ok" if err <= bound else f"error {err:.3g} > bound {bound:.3g}"


def _poison(nbytes: int, device: str) -> None:
    """Fill freed allocator blocks of this size with NaN so an output that is not fully written
    shows up in the check."""
    junk = torch.full((max(1, nbytes // 4),), math.nan, dtype=torch.float32, device=device)
    del junk


def _rotating_sets(case: Case, l2_bytes: int) -> int:
    """Input sets to cycle through so the working set is >= 4x L2 (1 when it already is)."""
    ws = case.ideal_bytes
    return 1 if ws >= 4 * l2_bytes else min(64, math.ceil(4 * l2_bytes / max(ws, 1)))


# ----------------------------------------------------------------------------------------------
# One case, the run, the document
# ----------------------------------------------------------------------------------------------


def bench_case(case: Case, args, timer, l2_bytes: int) -> dict[str, Any]:
    sets_n = _rotating_sets(case, l2_bytes)
    sets = _inputs(case, args.device, sets_n, grad=case.pass_ == "bwd")
    truth, torch_out = _truth_and_torch(case, sets[0])
    runs: dict[str, Callable[[], object]] = {}
    result: dict[str, Any] = {"op": case.op, "pass": case.pass_, "dtype": case.dtype,
                              "M": case.M, "N": case.N, "ideal_bytes": case.ideal_bytes,
                              "rotating_sets": sets_n, "impls": {}}
    impls = result["impls"]
    for peer in args.peers:
        if peer == "copy":
            half = case.ideal_bytes // 2
            bufs = [(torch.empty(half, dtype=torch.uint8, device=args.device),
                     torch.empty(half, dtype=torch.uint8, device=args.device))
                    for _ in range(sets_n)]
            for src, dst in bufs:
                src.fill_(7)
                dst.fill_(255)  # poison
            state = {"i": 0}

            def run_copy(bufs=bufs, state=state):
                src, dst = bufs[state["i"] % len(bufs)]
                state["i"] += 1
                return dst.copy_(src)

            run_copy()
            if not bool((bufs[0][1] == 7).all()):
                impls[peer] = {"error": "copy check failed"}
                continue
            runs[peer] = run_copy
            continue
        try:
            fn = build(peer, case, args)
            run = _runner(case, fn, sets)
            _poison(case.M * case.N * 4, args.device)
            verdict = check(case, _first_output(case, run), truth, torch_out)
            if verdict != "ok":
                impls[peer] = {"error": f"check failed: {verdict}"}
                continue
            runs[peer] = run
        except Skip as e:
            impls[peer] = {"skipped": str(e)}
        except Exception as e:  # a peer failing to compile must not stop the run
            impls[peer] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    # Warm-up and group size, then interleaved rounds of timed groups.
    inner, first, samples = {}, {}, {}
    for name, run in runs.items():
        inner[name], first[name] = _inner_for(timer, run)
        samples[name] = []
    for _ in range(args.reps):
        for name, run in runs.items():
            samples[name].append(timer(run, inner[name]))
    for name, run in runs.items():
        entry = _summary(samples[name], inner[name], first[name])
        if name != "copy":
            verdict = check(case, _last_output(case, run), truth, torch_out)
            entry["check"] = verdict
        impls[name] = entry
    _derive(result)
    return result


def _first_output(case: Case, run):
    run.state["i"] = 0
    out = run()
    run.state["i"] = 0
    return _dx(case, out)


def _last_output(case: Case, run):
    run.state["i"] = 0  # set 0 holds the inputs the truth was computed from
    return _dx(case, run())


def _dx(case: Case, out):
    if case.pass_ == "bwd":
        return out[0]  # gradient of x (first leaf)
    return out[0] if isinstance(out, tuple) else out


def _derive(result: dict[str, Any]) -> None:
    impls = result["impls"]
    copy = impls.get("copy", {}).get("median_s")
    base = impls.get("torch", {}).get("median_s")
    for name, e in impls.items():
        t = e.get("median_s")
        if t is None:
            continue
        e["gbps"] = result["ideal_bytes"] / t / 1e9
        e["copy_fraction"] = (copy / t) if copy and name != "copy" else None
        e["speedup_vs_torch"] = (base / t) if base and name != "torch" else None


def summarize(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's bar, from the results: forward copy fraction >= 0.92 for N in [1024, 262144]
    at M·N >= 2^27, geometric-mean speed-ups over that grid vs torch (>= 1.5) and compile
    (>= 1.0); backward fraction of the copy >= 0.75 and >= 1.5x Liger; M=1 latency within 10%
    of the fastest peer."""
    def med(r, name):
        e = r["impls"].get(name, {})
        return e.get("median_s")

    def gmean(xs):
        xs = [x for x in xs if x]
        return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None

    bar_rows = [r for r in results if r["M"] * r["N"] >= GRID_ELEMENTS and
                1024 <= r["N"] <= 262144 and med(r, "normkit")]
    fwd = [r for r in bar_rows if r["pass"] == "fwd"]
    bwd = [r for r in bar_rows if r["pass"] == "bwd"]
    out: dict[str, Any] = {}
    fr = [r["impls"]["normkit"].get("copy_fraction") for r in fwd]
    fr = [f for f in fr if f is not None]
    out["fwd_min_copy_fraction"] = min(fr) if fr else None
    out["fwd_geomean_vs_torch"] = gmean(med(r, "torch") / med(r, "normkit") for r in fwd
                                        if med(r, "torch"))
    out["fwd_geomean_vs_compile"] = gmean(med(r, "compile") / med(r, "normkit") for r in fwd
                                          if med(r, "compile"))
    br = [r["impls"]["normkit"].get("copy_fraction") for r in bwd]
    br = [f for f in br if f is not None]
    out["bwd_min_copy_fraction"] = min(br) if br else None
    out["bwd_geomean_vs_liger"] = gmean(med(r, "liger") / med(r, "normkit") for r in bwd
                                        if med(r, "liger"))
    decode = [r for r in results if r["M"] == 1 and med(r, "normkit")]
    worst = None
    for r in decode:
        peers = [e["median_s"] for n, e in r["impls"].items()
                 if n not in ("normkit", "copy") and e.get("median_s")]
        if peers:
            ratio = med(r, "normkit") / min(peers)
            worst = ratio if worst is None else max(worst, ratio)
    out["decode_worst_vs_fastest_peer"] = worst
    need = {"fwd_min_copy_fraction": (0.92, 1), "fwd_geomean_vs_torch": (1.5, 1),
            "fwd_geomean_vs_compile": (1.0, 1), "bwd_min_copy_fraction": (0.75, 1),
            "bwd_geomean_vs_liger": (1.5, 1), "decode_worst_vs_fastest_peer": (1.10, -1)}
    out["checks"] = {k: (None if out[k] is None else (out[k] - v) * sign >= 0)
                     for k, (v, sign) in need.items()}
    out["ok"] = all(v is not False for v in out["checks"].values()) and any(
        v is not None for v in out["checks"].values())
    return out


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for mod in ("triton", "liger_kernel"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    try:
        import normkit

        info["normkit"] = getattr(normkit, "__version__", None)
    except Exception:
        info["normkit"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "memory_gb": round(p.total_memory / 2**30, 1),
                       "sm_count": p.multi_processor_count,
                       "l2_bytes": getattr(p, "L2_cache_size", None), "cuda": torch.version.cuda}
    else:
        info["gpu"] = None
    return info


def result_doc(args, results: list[dict[str, Any]], info: dict[str, Any], wall_s: float,
               now: _dt.datetime) -> dict[str, Any]:
    """schema_version, kind, date_utc, wall_s, machine{gpu{name, capability, memory_gb,
    sm_count, l2_bytes, cuda}, torch, triton, liger_kernel, normkit, python}, config{...},
    method{...}, results[{op, pass, dtype, M, N, ideal_bytes, rotating_sets,
    impls{name: {median_s, min_s, q1_s, q3_s, samples, inner, first_call_s, gbps,
    copy_fraction, speedup_vs_torch, check} | {skipped} | {error}}}], summary{...}."""
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "normkit-bench-gpu",
        "date_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_s": wall_s,
        "machine": info,
        "config": {"ops": args.ops, "passes": args.passes, "dtypes": args.dtypes, "Ns": args.ns,
                   "Ms": args.ms, "peers": args.peers, "decode": args.decode,
                   "quick": args.quick, "reps": args.reps, "eps": EPS,
                   "normkit_backend": args.normkit_backend},
        "method": {"timer": "CUDA events around groups of >= 200 us of back-to-back calls",
                   "statistic": "median over reps groups, interleaved rounds",
                   "rotation": "input sets cycled until the working set is >= 4x L2",
                   "check": "outputs poisoned with NaN before the first call; first and last "
                            "outputs within 2x torch's error + atol of float64 on the first "
                            f"{CHECK_ROWS} rows",
                   "limit": "dst.copy_(src) of uint8 buffers of ideal_bytes/2 each"},
        "results": results,
        "summary": summarize(results),
    }


def default_path(info: dict[str, Any], now: _dt.datetime) -> Path:
    name = (info.get("gpu") or {}).get("name") or "cpu"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return REPO / "benchmarks" / "results" / f"bench-gpu-{slug}-{now:%Y%m%d-%H%M%S}.json"


def run(args, timer=None, l2_bytes: int | None = None, progress=print) -> dict[str, Any]:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("run_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    timer = timer or CudaEventTimer()
    info = machine(args.device)
    if l2_bytes is None:
        l2_bytes = (info.get("gpu") or {}).get("l2_bytes") or (50 << 20)
    cases = grid(args.ops, args.passes, args.dtypes, args.ns, args.ms, args.decode)
    t0 = time.perf_counter()
    results = []
    for i, case in enumerate(cases, 1):
        if args.device == "cuda":
            torch._dynamo.reset()
        r = bench_case(case, args, timer, l2_bytes)
        results.append(r)
        if progress:
            nk = r["impls"].get("normkit", {})
            progress(f"[{i}/{len(cases)}] {case.op} {case.pass_} {case.dtype} {case.M}x{case.N}: "
                     f"normkit {nk.get('gbps', float('nan')):.0f} GB/s, "
                     f"x copy {nk.get('copy_fraction') or float('nan'):.3f}")
    return result_doc(args, results, info, time.perf_counter() - t0,
                      _dt.datetime.now(_dt.timezone.utc))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    from normkit.bench import write_json_atomic

    path = Path(args.json_path) if args.json_path else default_path(
        doc["machine"], _dt.datetime.now(_dt.timezone.utc))
    write_json_atomic(path, doc)
    print(json.dumps(doc["summary"], indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
