"""Benchmark harness: normkit's norms against torch eager, ``torch.compile``, ONNX Runtime and a
memory copy of the same bytes, on a shape x dtype grid, timed in one process.

What is measured, per case (op, pass, dtype, M rows, N features):

* ``ideal_bytes`` — the bytes the op must move:
  forward  = read x + write y            (+ read residual + write h for the fused add+norm);
  backward = read x + read dy + write dx (+ read the float32 row statistics, 8 B/row for LN,
  4 B/row for RMSNorm).  γ, β, dγ, dβ are N-sized and left out, so the bar reads as stated.
* ``gbps`` = ideal_bytes / median time.
* ``copy_fraction`` = time of ``dst.copy_(src)`` moving the same bytes (a buffer of
  ideal_bytes/2 read, the same written, into a preallocated ``dst``) / the op's time.
* ``clone_fraction`` = the same with ``src.clone()``, i.e. a copy that allocates its output the
  way every op here does.  Above glibc's 32 MiB mmap threshold a fresh output is fresh pages, and
  first-touch page faults cost this machine several times the copy itself; this column shows how
  much of an op's time is that.
* ``speedup_vs_torch`` = torch eager time / the op's time (> 1: faster than torch).

Forward runs under ``torch.no_grad()`` (inference, the serving case).  Backward times only
``torch.autograd.grad(y, inputs, dy, retain_graph=True)`` after one forward with grad enabled.
Times are medians of samples taken after warm-up; each sample times enough back-to-back calls
(``inner``) to dwarf the clock's overhead, and enough samples are taken to fill ``min_time_s``.

This package runs the grid and reads the bar off the results; its parts: ``_timing`` (the
adaptive timer), ``_grid`` (ops, shapes, bytes, ``BenchConfig``), ``_peers`` (the
implementations timed side by side).  The harness does not print: ``_terminal`` shows a run
with Rich (for ``normkit bench``, ``normkit demo`` and ``benchmarks/run_cpu.py``, which runs
the full grid).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib.util
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import _provenance
from .._io import write_json_atomic
from .._provenance import find_repo_root
from ._grid import (
    DTYPES,
    FULL_M,
    FULL_N,
    OPS,
    PASSES,
    PEERS,
    QUICK_M,
    QUICK_N,
    BenchConfig,
    Case,
    ideal_bytes,
    with_overrides,
)
from ._peers import _IMPLS, Skip, _error_text, _Inputs, _make_inputs
from ._timing import CpuTimer, CudaTimer, Timer, Timing, TimingPolicy, _Prepared, timer_for

__all__ = [
    "SCHEMA_VERSION",
    "OPS",
    "PASSES",
    "PEERS",
    "DTYPES",
    "FULL_M",
    "FULL_N",
    "QUICK_M",
    "QUICK_N",
    "BAR_COPY_FRACTION",
    "BAR_MAX_SLOWDOWN",
    "TimingPolicy",
    "Timing",
    "Timer",
    "CpuTimer",
    "CudaTimer",
    "timer_for",
    "BenchConfig",
    "Case",
    "ideal_bytes",
    "run_bench",
    "bar_check",
    "machine_info",
    "write_json_atomic",
    "default_json_path",
    "find_repo_root",
    "config_notes",
    "with_overrides",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# The bar (issue text): at 4096x4096 float32 and bfloat16, forward >= 0.75 of a copy of the same
# bytes (0.7 for the fused add+norm), backward >= 0.5; never more than 10% slower than torch
# eager anywhere on the grid, i.e. speedup_vs_torch >= 1 / 1.1.
BAR_SHAPE = (4096, 4096)
BAR_DTYPES = ("float32", "bfloat16")
BAR_COPY_FRACTION = {
    ("ln", "fwd"): 0.75,
    ("rms", "fwd"): 0.75,
    ("add_ln", "fwd"): 0.70,
    ("add_rms", "fwd"): 0.70,
    ("ln", "bwd"): 0.50,
    ("rms", "bwd"): 0.50,
    ("add_ln", "bwd"): 0.50,
    ("add_rms", "bwd"): 0.50,
}
BAR_MAX_SLOWDOWN = 1.10

NOISY_RATIO = 1.5  # median / min above which a measurement is flagged "noisy"


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

ProgressFn = Callable[[int, int, str], None]


def _bench_case(case: Case, cfg: BenchConfig, timer: Timer,
                probe_cache: dict[tuple, bool | str]) -> dict[str, Any]:
    t = _make_inputs(case, cfg.device, cfg.seed)
    enabled = set(cfg.peers) | {"normkit"}
    prepared: dict[str, _Prepared] = {}
    impls: dict[str, dict[str, Any]] = {}
    for name, (builder, peer) in _IMPLS.items():
        if peer not in enabled:
            continue
        try:
            fn = builder(case, t, cfg)
            prepared[name] = timer.prepare(fn, cfg.timing)
        except Skip as s:
            impls[name] = {"skipped": str(s)}
        except Exception as e:  # a broken peer must not stop the grid; its error is the result
            log.warning("%s failed on %s: %s", name, case.label, e)
            impls[name] = {"error": _error_text(e)}
    for _ in range(cfg.timing.rounds):
        for name, prep in list(prepared.items()):
            try:
                timer.sample(prep)
            except Exception as e:
                log.warning("%s failed on %s: %s", name, case.label, e)
                impls[name] = {"error": _error_text(e)}
                del prepared[name]
    for name, prep in prepared.items():
        impls[name] = asdict(prep.result())

    nbytes = case.ideal_bytes
    copy_s = impls.get("copy", {}).get("median_s")
    clone_s = impls.get("clone", {}).get("median_s")
    torch_s = impls.get("torch", {}).get("median_s")
    for rec in impls.values():
        med = rec.get("median_s")
        if med is None:
            continue
        med = max(med, 1e-12)
        rec["gbps"] = nbytes / med / 1e9
        rec["copy_fraction"] = copy_s / med if copy_s else None
        rec["clone_fraction"] = clone_s / med if clone_s else None
        rec["speedup_vs_torch"] = torch_s / med if torch_s else None
        # Median far above the fastest sample: the machine was busy for much of the
        # measurement (on a shared VM, e.g. waking an idle vCPU costs milliseconds).
        rec["noisy"] = rec["median_s"] > NOISY_RATIO * rec["min_s"]
    # Stable column order in the JSON: normkit first, then peers, then the copy references.
    order = ["normkit", "out", "torch", "compile", "onnxruntime", "copy", "clone"]
    record = dict(case.key())
    record["ideal_bytes"] = nbytes
    record["impls"] = {k: impls[k] for k in order if k in impls}
    if "normkit" in prepared and cfg.backend == "auto" and torch.device(cfg.device).type == "cpu":
        # Backends are chosen by device, dtype and N, never by the row count: probe once per
        # (op, dtype, N), on the first (smallest) M of the grid.
        key = (case.op, case.dtype, case.N)
        if key not in probe_cache:
            probe_cache[key] = _cpu_kernel_applies(case, t)
        record["normkit_cpu_kernel"] = probe_cache[key]
    del t, prepared
    if nbytes >= 1 << 28:
        # Refcounting frees everything above; a full collection costs ~0.2 s with torch
        # loaded, so it is paid only where a leaked cycle would hold GBs.
        gc.collect()
    return record


def _cpu_kernel_applies(case: Case, t: _Inputs) -> bool | str:
    """Whether normkit's "cpu" backend computes this case (so "auto" is not timing the
    reference); True, or the reason it does not."""
    import normkit

    fn = normkit.rms_norm if case.rms else normkit.layer_norm
    params = (t.w,) if case.rms else (t.w, t.b)
    kw = {"residual": t.r} if case.fused else {}
    try:
        with torch.no_grad(), normkit.use_backend("cpu"):
            fn(t.x, (case.N,), *params, **kw)
        return True
    except Exception as e:
        return _error_text(e, 300)


def run_bench(config: BenchConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Run the grid and return the JSON-ready result document.

    Args:
        config: the grid, peers, device, backend and timing policy.
        progress: optional callback ``progress(done, total, label)``, called before each case
            (label = the case about to run) and once at the end (label "done").

    Returns:
        dict with ``schema_version``, ``kind``, ``machine``, ``config``, ``notes``,
        ``results`` (one record per case: op, pass, dtype, M, N, ideal_bytes, impls{name:
        timing + gbps, copy_fraction, clone_fraction, speedup_vs_torch | skipped | error}),
        ``bar`` (see :func:`bar_check`) and ``wall_s``.
    """
    t0 = time.perf_counter()
    timer = timer_for(config.device)
    notes = config_notes(config)
    cases = config.cases()
    results = []
    probe_cache: dict[tuple, bool | str] = {}
    with _normkit_backend(config.backend):
        for i, case in enumerate(cases):
            if progress is not None:
                progress(i, len(cases), case.label)
            results.append(_bench_case(case, config, timer, probe_cache))
    if progress is not None:
        progress(len(cases), len(cases), "done")
    if "compile" in config.peers:
        torch._dynamo.reset()  # drop the last case's compiled graphs and what they hold
    doc = {
        "schema_version": SCHEMA_VERSION,
        "kind": "normkit-bench",
        "machine": machine_info(),
        "config": config.to_json(),
        "definitions": {
            "ideal_bytes": "fwd: read x + write y (+ read residual + write h when fused); "
            "bwd: read x + read dy + write dx + float32 row stats",
            "gbps": "ideal_bytes / median_s / 1e9",
            "copy_fraction": "median time of dst.copy_(src) over ideal_bytes/2 bytes, "
            "dst preallocated / median time",
            "clone_fraction": "as copy_fraction, with src.clone() (allocates its output)",
            "speedup_vs_torch": "torch eager median / median",
            "fwd": "under torch.no_grad()",
            "bwd": "torch.autograd.grad(y, (x, [residual,] weight[, bias]), dy, "
            "retain_graph=True) only",
        },
        "notes": notes,
        "results": results,
        "bar": bar_check(results),
        "wall_s": time.perf_counter() - t0,
    }
    return _finite(doc)


@contextlib.contextmanager
def _normkit_backend(name: str):
    try:
        import normkit

        ctx = normkit.use_backend(name)
    except Exception as e:  # normkit broken: every normkit cell will carry the error
        log.warning("normkit.use_backend(%r) failed: %s", name, e)
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def config_notes(cfg: BenchConfig) -> list[str]:
    notes = []
    if "compile" not in cfg.peers:
        notes.append(
            "torch.compile peer skipped"
            + (" in --quick mode (~2 s of compiling per case); add --peers "
               "torch,compile,onnxruntime,copy to include it" if cfg.quick else "")
        )
    if "clone" not in cfg.peers:
        notes.append("clone (allocating copy) not run: no clone_fraction")
    if "onnxruntime" in cfg.peers:
        if importlib.util.find_spec("onnxruntime") is None:
            notes.append("onnxruntime not installed: ONNX Runtime peer skipped "
                         "(pip install 'normkit[export]')")
        else:
            notes.append("ONNX Runtime peer: LayerNormalization-17 forward float32 only "
                         "(other cases skipped); intra-op threads = cores, spinning off")
    if "copy" not in cfg.peers:
        notes.append("copy reference not run: no copy_fraction")
    if "torch" not in cfg.peers:
        notes.append("torch eager peer not run: no speedup_vs_torch")
    if cfg.backend != "auto":
        notes.append(f"normkit backend forced to {cfg.backend!r}")
    return notes


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so the JSON is strict (json.dump(allow_nan=False))."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# The bar
# ----------------------------------------------------------------------------------------------


def bar_check(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Read the issue's bar off the results.

    Returns:
        ``points``: for each normkit measurement at 4096x4096 float32/bfloat16, its
        copy_fraction against the threshold and its speedup_vs_torch against 1/1.1;
        ``worst_speedup``: the lowest speedup_vs_torch anywhere on the grid and where;
        ``ok``: every present point and the grid minimum meet the bar (None if nothing to
        judge).  Absent points are not failures: a grid may not contain 4096x4096.
    """
    min_speedup = 1.0 / BAR_MAX_SLOWDOWN
    points = []
    worst = None
    for r in results:
        nk = r.get("impls", {}).get("normkit", {})
        sp = nk.get("speedup_vs_torch")
        if sp is not None and (worst is None or sp < worst["speedup_vs_torch"]):
            worst = {k: r[k] for k in ("op", "pass", "dtype", "M", "N")}
            worst["speedup_vs_torch"] = sp
        if (r["M"], r["N"]) != BAR_SHAPE or r["dtype"] not in BAR_DTYPES:
            continue
        need = BAR_COPY_FRACTION[(r["op"], r["pass"])]
        cf = nk.get("copy_fraction")
        point = {k: r[k] for k in ("op", "pass", "dtype", "M", "N")}
        point.update(
            copy_fraction=cf,
            copy_fraction_needed=need,
            copy_ok=None if cf is None else cf >= need,
            clone_fraction=nk.get("clone_fraction"),
            # normkit with out= (and residual_out=; forward only): the copy reference's own
            # terms, no allocation
            copy_fraction_out=r.get("impls", {}).get("out", {}).get("copy_fraction"),
            speedup_vs_torch=sp,
            speedup_needed=min_speedup,
            speedup_ok=None if sp is None else sp >= min_speedup,
            error=nk.get("error"),
        )
        points.append(point)
    verdicts = [p[k] for p in points for k in ("copy_ok", "speedup_ok") if p[k] is not None]
    verdicts += [False for p in points if p["error"]]
    if worst is not None:
        verdicts.append(worst["speedup_vs_torch"] >= min_speedup)
    return {
        "shape": list(BAR_SHAPE),
        "dtypes": list(BAR_DTYPES),
        "copy_fraction_needed": {f"{op}/{p}": v for (op, p), v in BAR_COPY_FRACTION.items()},
        "speedup_needed": min_speedup,
        "points": points,
        "worst_speedup": worst,
        "ok": all(verdicts) if verdicts else None,
    }


# ----------------------------------------------------------------------------------------------
# Machine description (normkit._provenance's, with the compiled kernels' path)
# ----------------------------------------------------------------------------------------------


def _cpu_kernels_info() -> dict[str, Any]:
    """The compiled CPU kernels: the instruction-set path they run on, and the machine's."""
    try:
        from normkit.kernels import cpu
    except Exception as e:  # not built, or built for another torch
        return {"error": _error_text(e, 200)}
    return cpu.status()


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare two result files (:func:`normkit._provenance.machine_info`:
    CPU, cores, memory, library versions, threads, OS, the checkout; never the hostname), and
    ``normkit_cpu``: the instruction-set path the compiled kernels run on."""
    return {**_provenance.machine_info(), "normkit_cpu": _cpu_kernels_info()}


# ----------------------------------------------------------------------------------------------
# Output files
# ----------------------------------------------------------------------------------------------


def default_json_path(device: str = "cpu", now: _dt.datetime | None = None,
                      cwd: str | os.PathLike | None = None) -> Path:
    """``benchmarks/results/bench-<device>-<UTC date-time>.json`` inside a normkit checkout,
    else ``./normkit-bench.json``."""
    root = find_repo_root(cwd)
    if root is None:
        return Path(cwd or os.getcwd()) / "normkit-bench.json"
    now = now or _dt.datetime.now(_dt.timezone.utc)
    dev = torch.device(device).type
    return root / "benchmarks" / "results" / f"bench-{dev}-{now.strftime('%Y%m%d-%H%M%S')}.json"
