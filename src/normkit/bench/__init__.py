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

The harness does not print.  ``normkit.bench._terminal`` shows a run on the terminal with Rich
(for ``normkit bench``, ``normkit demo`` and ``benchmarks/run_cpu.py``, which runs the full
grid).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib.util
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import _provenance
from .._io import write_json_atomic
from .._provenance import find_repo_root, usable_cores

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

OPS = ("ln", "rms", "add_ln", "add_rms")
OP_NAMES = {
    "ln": "LayerNorm",
    "rms": "RMSNorm",
    "add_ln": "add+LayerNorm",
    "add_rms": "add+RMSNorm",
}
PASSES = ("fwd", "bwd")
# "copy" is the reference every ratio divides by; "clone" is a copy that allocates its output
# (see clone_fraction); the others are peers timed side by side.
PEERS = ("torch", "compile", "onnxruntime", "copy", "clone", "out")
DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}

FULL_M = (1, 8, 512, 4096, 16384)
FULL_N = (64, 768, 4096, 8192)
QUICK_M = (1, 512, 4096)
QUICK_N = (768, 4096)
QUICK_BWD_OPS = ("ln", "rms")  # --quick: add_ln and add_rms forward only

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

LN_EPS = 1e-5
RMS_EPS = 1e-6  # passed explicitly: torch's None means finfo(dtype).eps, which differs by dtype


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingPolicy:
    """How long to measure each (case, implementation).

    A measurement takes samples until it has ``min_reps`` of them *and* they add up to
    ``min_time_s``, but stops at ``max_time_s`` (never below ``floor_reps`` samples), so a
    1-second call on the biggest shape does not take 10 s.  ``rounds`` > 1 interleaves the
    implementations of a case (copy, torch, normkit, ..., copy, torch, ...) so slow drift of a
    shared machine hits them alike.
    """

    min_time_s: float = 0.2
    min_reps: int = 10
    max_time_s: float = 5.0
    floor_reps: int = 5
    warmup_reps: int = 3
    warmup_s: float = 0.05
    rounds: int = 4
    # A sample times `inner` back-to-back calls; inner grows until a sample lasts this long, so
    # perf_counter's ~0.1 µs overhead stays below 1% of a 4 µs call.
    min_sample_s: float = 20e-6

    def __post_init__(self):
        if not (self.min_time_s >= 0 and self.max_time_s >= self.min_time_s):
            raise ValueError(
                f"TimingPolicy: need 0 <= min_time_s <= max_time_s, got "
                f"{self.min_time_s} and {self.max_time_s}"
            )
        for name in ("min_reps", "floor_reps", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"TimingPolicy.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_reps < 0:
            raise ValueError(f"TimingPolicy.warmup_reps must be >= 0, got {self.warmup_reps}")

    @classmethod
    def quick(cls) -> TimingPolicy:
        return cls(
            min_time_s=0.025, min_reps=5, max_time_s=0.2, floor_reps=2, warmup_reps=2,
            warmup_s=0.005, rounds=3,
        )


@dataclass
class Timing:
    """Statistics of one measurement, in seconds per call."""

    median_s: float
    min_s: float
    q1_s: float
    q3_s: float
    iqr_s: float
    samples: int
    inner: int
    first_call_s: float  # the very first call: includes JIT / torch.compile work
    total_s: float  # wall time spent in this measurement, warm-up included

    @classmethod
    def from_samples(cls, per_call: Sequence[float], inner: int, first_call_s: float,
                     total_s: float) -> Timing:
        s = sorted(per_call)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(
            median_s=statistics.median(s),
            min_s=s[0],
            q1_s=q1,
            q3_s=q3,
            iqr_s=q3 - q1,
            samples=len(s),
            inner=inner,
            first_call_s=first_call_s,
            total_s=total_s,
        )


class Timer:
    """Adaptive timer.  Subclasses supply ``_time_calls(fn, n)``: the wall time of n calls of fn,
    finished (synchronised) on the device.  The policy logic lives here, shared by all devices.
    """

    def _time_calls(self, fn: Callable[[], object], n: int) -> float:
        raise NotImplementedError

    def prepare(self, fn: Callable[[], object], policy: TimingPolicy) -> _Prepared:
        """First call, warm-up, and the choice of ``inner`` and sample count."""
        t_start = time.perf_counter()
        first = self._time_calls(fn, 1)
        # Warm up by count *and* time: a handful of calls is not enough for a µs op (caches,
        # the branch predictor, and OpenMP workers that went to sleep and must be woken).
        # At least one: the first call may have been a JIT compile, useless as an estimate.
        warm = [self._time_calls(fn, 1)]
        while len(warm) < policy.warmup_reps or sum(warm) < policy.warmup_s:
            if sum(warm) > policy.max_time_s / 2:  # a huge call: warm enough already
                break
            warm.append(self._time_calls(fn, 1))
        est = max(statistics.median(warm[len(warm) // 2:]), 1e-9)  # the settled half
        inner = 1
        while est * inner < policy.min_sample_s and inner < 1 << 20:
            inner *= 2
        if inner > 1:  # re-estimate on a batch: single tiny calls overstate the per-call time
            est = max(self._time_calls(fn, inner) / inner, 1e-9)
        per_sample = est * inner
        want = max(policy.min_reps, math.ceil(policy.min_time_s / per_sample))
        cap = max(policy.floor_reps, math.floor(policy.max_time_s / per_sample))
        total = min(want, cap)
        # Spread over the rounds; a huge call with fewer samples than rounds sits some out.
        per_round = math.ceil(total / policy.rounds)
        return _Prepared(fn, inner, per_round, total, first, time.perf_counter() - t_start)

    def sample(self, prep: _Prepared) -> None:
        """One round: the next ``samples_per_round`` samples (fewer once the total is met)."""
        t0 = time.perf_counter()
        n = min(prep.samples_per_round, prep.samples_total - len(prep.per_call))
        for _ in range(n):
            prep.per_call.append(self._time_calls(prep.fn, prep.inner) / prep.inner)
        prep.total_s += time.perf_counter() - t0

    def measure(self, fn: Callable[[], object], policy: TimingPolicy) -> Timing:
        """Time one callable on its own (all rounds back to back)."""
        prep = self.prepare(fn, policy)
        for _ in range(policy.rounds):
            self.sample(prep)
        return prep.result()


@dataclass
class _Prepared:
    fn: Callable[[], object]
    inner: int
    samples_per_round: int
    samples_total: int
    first_call_s: float
    total_s: float
    per_call: list[float] = field(default_factory=list)

    def result(self) -> Timing:
        return Timing.from_samples(self.per_call, self.inner, self.first_call_s, self.total_s)


class CpuTimer(Timer):
    """``time.perf_counter`` around the calls; CPU ops are synchronous."""

    def _time_calls(self, fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0


class CudaTimer(Timer):
    """CUDA events around the calls, then a synchronize (GPU work is asynchronous; a host clock
    would time the launches, not the kernels).  Not exercised by CI, which has no GPU."""

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)

    def _time_calls(self, fn, n):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def timer_for(device: str | torch.device) -> Timer:
    kind = torch.device(device).type
    if kind == "cpu":
        return CpuTimer()
    if kind == "cuda":
        return CudaTimer(device)
    raise ValueError(f"no timer for device {str(device)!r}; supported: cpu, cuda")


# ----------------------------------------------------------------------------------------------
# Cases and configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str  # one of OPS
    pass_: str  # "fwd" | "bwd"
    dtype: str  # a key of DTYPES
    M: int
    N: int

    @property
    def fused(self) -> bool:
        return self.op.startswith("add_")

    @property
    def rms(self) -> bool:
        return self.op.endswith("rms")

    @property
    def ideal_bytes(self) -> int:
        return ideal_bytes(self.op, self.pass_, self.dtype, self.M, self.N)

    @property
    def label(self) -> str:
        return f"{self.op} {self.pass_} {self.dtype} {self.M}x{self.N}"

    def key(self) -> dict[str, Any]:
        return {"op": self.op, "pass": self.pass_, "dtype": self.dtype, "M": self.M, "N": self.N}


def ideal_bytes(op: str, pass_: str, dtype: str, M: int, N: int) -> int:
    """Bytes the op must move (see the module docstring)."""
    item = torch.empty((), dtype=DTYPES[dtype]).element_size()
    tile = M * N * item
    if pass_ == "fwd":
        return (4 if op.startswith("add_") else 2) * tile  # x, y (+ residual, h)
    if pass_ == "bwd":
        stats = M * (4 if op.endswith("rms") else 8)  # float32 rstd (+ mean) per row
        return 3 * tile + stats  # x, dy, dx
    raise ValueError(f"pass must be 'fwd' or 'bwd', got {pass_!r}")


def _check_choices(what: str, values: Iterable[str], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown {bad}; choose from {', '.join(allowed)}")


@dataclass(frozen=True)
class BenchConfig:
    """What to run.  ``BenchConfig()`` is the full grid; ``BenchConfig.quick()`` the --quick one.

    ``bwd_ops``: the ops whose backward is timed (only those also in ``ops``); empty for forward
    only.  ``backend``: the normkit backend the normkit column runs with.
    """

    ops: tuple[str, ...] = OPS
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    Ms: tuple[int, ...] = FULL_M
    Ns: tuple[int, ...] = FULL_N
    bwd_ops: tuple[str, ...] = OPS
    peers: tuple[str, ...] = PEERS
    device: str = "cpu"
    backend: str = "auto"
    quick: bool = False
    timing: TimingPolicy = field(default_factory=TimingPolicy)
    seed: int = 0

    def __post_init__(self):
        for name in ("ops", "dtypes", "Ms", "Ns", "bwd_ops", "peers"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_choices("ops", self.ops, OPS)
        _check_choices("bwd_ops", self.bwd_ops, OPS)
        _check_choices("dtypes", self.dtypes, DTYPES)
        _check_choices("peers", self.peers, PEERS)
        _check_choices("backend", (self.backend,), ("auto", "reference", "cpu"))
        for name in ("Ms", "Ns"):
            vals = getattr(self, name)
            if not vals or any(not isinstance(v, int) or v < 1 for v in vals):
                raise ValueError(f"{name} must be positive integers, got {vals}")
        if not self.ops or not self.dtypes:
            raise ValueError("need at least one op and one dtype")
        dev = torch.device(self.device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")

    @classmethod
    def quick_grid(cls, **overrides: Any) -> BenchConfig:
        """The --quick grid: under a minute on a 2-core machine."""
        base = dict(
            ops=("ln", "rms", "add_ln"),
            dtypes=("float32", "bfloat16"),
            Ms=QUICK_M,
            Ns=QUICK_N,
            bwd_ops=QUICK_BWD_OPS,
            # torch.compile (~2 s of compiling per case) and clone would not fit in the minute
            peers=("torch", "onnxruntime", "copy"),
            quick=True,
            timing=TimingPolicy.quick(),
        )
        base.update(overrides)
        return cls(**base)

    def cases(self) -> list[Case]:
        # Grouped by (op, pass, dtype) so each kernel signature JIT-compiles once, up front.
        out = []
        for op in self.ops:
            for pass_ in PASSES:
                if pass_ == "bwd" and op not in self.bwd_ops:
                    continue
                for dtype in self.dtypes:
                    for M in self.Ms:
                        for N in self.Ns:
                            out.append(Case(op, pass_, dtype, M, N))
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["timing"] = asdict(self.timing)
        return d


# ----------------------------------------------------------------------------------------------
# Implementations: each builder returns a zero-argument callable that runs the case once
# ----------------------------------------------------------------------------------------------


class Skip(Exception):
    """An implementation does not apply to this case (recorded as "skipped", not an error)."""


@dataclass
class _Inputs:
    x: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor | None
    r: torch.Tensor | None
    dy: torch.Tensor | None


def _make_inputs(case: Case, device: str, seed: int) -> _Inputs:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = DTYPES[case.dtype]
    shape = (case.M, case.N)

    def rand(*s, scale=1.0, shift=0.0):
        # uniform, not randn: 3x cheaper to draw 16M values, and timings do not care
        u = torch.empty(*s).uniform_(-scale, scale, generator=g).add_(shift)
        return u.to(device=device, dtype=dt)

    return _Inputs(
        x=rand(*shape, shift=0.5),
        w=rand(case.N, scale=0.1, shift=1.0),
        b=None if case.rms else rand(case.N, scale=0.1),
        r=rand(*shape) if case.fused else None,
        dy=rand(*shape) if case.pass_ == "bwd" else None,
    )


# torch eager references, module-level so torch.compile sees plain functions.
def _torch_ln(x, w, b):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, LN_EPS)


def _torch_rms(x, w):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, RMS_EPS)


def _torch_add_ln(x, r, w, b):
    h = x + r
    return torch.nn.functional.layer_norm(h, (h.shape[-1],), w, b, LN_EPS), h


def _torch_add_rms(x, r, w):
    h = x + r
    return torch.nn.functional.rms_norm(h, (h.shape[-1],), w, RMS_EPS), h


_TORCH_FNS = {"ln": _torch_ln, "rms": _torch_rms, "add_ln": _torch_add_ln,
              "add_rms": _torch_add_rms}


def _args(case: Case, t: _Inputs, params: tuple[torch.Tensor, ...]) -> tuple:
    """Positional args for the _torch_* functions: (x, [r,] w [, b])."""
    return (t.x,) + ((t.r,) if case.fused else ()) + params


def _params(case: Case, t: _Inputs, grad: bool) -> tuple[torch.Tensor, ...]:
    ps = (t.w,) if case.rms else (t.w, t.b)
    return tuple(p.detach().requires_grad_(grad) for p in ps)


def _wrap(case: Case, t: _Inputs, forward: Callable[..., Any]) -> Callable[[], object]:
    """Turn ``forward(x, [r,] *params)`` into the timed callable for the case's pass.

    fwd: one call under no_grad.  bwd: one forward with grad now, then the timed call is
    autograd.grad of y (the first output) w.r.t. (x, [r,] γ [, β]).
    """
    if case.pass_ == "fwd":
        params = _params(case, t, grad=False)
        args = _args(case, t, params)

        def run_fwd():
            with torch.no_grad():
                return forward(*args)

        return run_fwd

    x = t.x.detach().requires_grad_(True)
    r = t.r.detach().requires_grad_(True) if case.fused else None
    params = _params(case, t, grad=True)
    inputs = (x,) + ((r,) if case.fused else ()) + params
    out = forward(*inputs)
    y = out[0] if isinstance(out, tuple) else out
    dy = t.dy

    def run_bwd():
        return torch.autograd.grad(y, inputs, dy, retain_graph=True)

    return run_bwd


def _build_torch(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    return _wrap(case, t, _TORCH_FNS[case.op])


def _build_compile(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    # A fresh dynamo cache per case: every shape gets its own specialised graph (dynamic=False,
    # the serving case), and no guard chain of 20 earlier shapes is walked on each call.
    torch._dynamo.reset()
    compiled = torch.compile(_TORCH_FNS[case.op], dynamic=False)
    return _wrap(case, t, compiled)


def _build_normkit(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    import normkit

    fn = normkit.rms_norm if case.rms else normkit.layer_norm
    eps = RMS_EPS if case.rms else LN_EPS
    # Fused forward returns (y, h) like the torch peer; the fused backward differentiates y only,
    # so return_residual=False there (an unused h would cost a zero dh in backward).
    ret_h = case.fused and case.pass_ == "fwd"

    if case.fused:
        def forward(x, r, *params):
            return fn(x, (x.shape[-1],), *params, eps, residual=r, return_residual=ret_h)
    else:
        def forward(x, *params):
            return fn(x, (x.shape[-1],), *params, eps)

    # The backend is set once around the whole run (run_bench), not per call: a context
    # manager per call would add its own overhead to the M=1 times.
    return _wrap(case, t, forward)


def _build_normkit_out(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    """normkit forward writing into buffers allocated once (``out=``, and ``residual_out=`` for
    the fused ops): the same bytes moved as the copy reference, which also writes into existing
    buffers."""
    if case.pass_ != "fwd":
        raise Skip("out= peer: forward only")
    import normkit

    fn = normkit.rms_norm if case.rms else normkit.layer_norm
    eps = RMS_EPS if case.rms else LN_EPS
    params = _params(case, t, grad=False)
    buf = torch.empty_like(t.x)
    hbuf = torch.empty_like(t.x) if case.fused else None
    kw = {"residual": t.r, "return_residual": True, "residual_out": hbuf} if case.fused else {}

    def run_out():
        with torch.no_grad():
            return fn(t.x, (t.x.shape[-1],), *params, eps, out=buf, **kw)

    return run_out


def _build_onnxruntime(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    if case.op != "ln" or case.pass_ != "fwd" or case.dtype != "float32":
        raise Skip("ONNX Runtime peer: LayerNormalization forward float32 only")
    if torch.device(cfg.device).type != "cpu":
        raise Skip("ONNX Runtime peer: CPU only")
    if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
        raise Skip("onnxruntime/onnx not installed (pip install 'normkit[export]')")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    M, N = case.M, case.N
    node = helper.make_node("LayerNormalization", ["X", "Scale", "B"], ["Y"], axis=-1,
                            epsilon=LN_EPS)
    graph = helper.make_graph(
        [node],
        "normkit_bench_ln",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, N]),
            helper.make_tensor_value_info("Scale", TensorProto.FLOAT, [N]),
            helper.make_tensor_value_info("B", TensorProto.FLOAT, [N]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # the IR of opset 17; newer onnx writes IRs older runtimes refuse
    so = ort.SessionOptions()
    so.intra_op_num_threads = usable_cores()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # No spin-waiting: ORT's idle worker would otherwise busy-loop after each run and steal one
    # of the cores from the next implementation timed in this process.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {
        "X": t.x.detach().numpy(),
        "Scale": t.w.detach().numpy(),
        "B": t.b.detach().numpy(),
    }
    # IO binding: inputs bound zero-copy once; the output is allocated by ORT (its arena) on
    # each run, as in serving; nothing is converted back to numpy inside the timed call.
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_cpu_input(name, arr)
    binding.bind_output("Y", "cpu")
    run_opts = ort.RunOptions()

    def run():
        sess.run_with_iobinding(binding, run_opts)

    return run


def _build_copy(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    n = case.ideal_bytes // 2
    src = torch.ones(n, dtype=torch.uint8, device=cfg.device)
    dst = torch.empty_like(src).zero_()  # touched once, so timed copies hit mapped pages
    return lambda: dst.copy_(src)


def _build_clone(case: Case, t: _Inputs, cfg: BenchConfig) -> Callable[[], object]:
    n = case.ideal_bytes // 2
    src = torch.ones(n, dtype=torch.uint8, device=cfg.device)
    return src.clone


# name -> (builder, peer that enables it)
_IMPLS: dict[str, tuple[Callable[[Case, _Inputs, BenchConfig], Callable[[], object]], str]] = {
    "copy": (_build_copy, "copy"),
    "clone": (_build_clone, "clone"),
    "torch": (_build_torch, "torch"),
    "normkit": (_build_normkit, "normkit"),
    "out": (_build_normkit_out, "out"),
    "compile": (_build_compile, "compile"),
    "onnxruntime": (_build_onnxruntime, "onnxruntime"),
}


def _error_text(e: BaseException, limit: int = 600) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def with_overrides(config: BenchConfig, **kw: Any) -> BenchConfig:
    """``dataclasses.replace`` that skips None values (CLI flags left unset)."""
    return replace(config, **{k: v for k, v in kw.items() if v is not None})
