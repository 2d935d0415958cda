"""Dispatch: which backend computes a call, and who hears of its statistics.

* the backend setting (``use_backend`` / ``get_backend``: process-wide, or per thread in a
  block) and the lazy loading of the compiled CPU kernels and of the Triton kernels;
* ``_fast``: the compiled eager entry point (``cpu.infer``) while the eager fast paths may be
  taken, else None — the one global the public functions read on every call;
* the choice of kernels module for the general path and for a custom-op backward;
* the statistics sink: the per-thread hook through which ``normkit.watch`` receives the
  per-row statistics every eager call computes anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
import weakref

import torch

from .kernels import reference

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cpu", "triton")

_backend = "auto"  # the process-wide backend; a use_backend block in a thread wins over it there
_observers = 0  # threads with a statistics sink set (see _set_stats_sink); 0 keeps the fast path
_slow_blocks = 0  # use_backend blocks, in any thread, of a backend the fast paths do not serve
_tls = threading.local()  # per thread: .sink (statistics), .backend and .saved (use_backend)
_lock = threading.Lock()  # guards the counts above, _backend and _pending
_cpu_module = None  # normkit.kernels.cpu (the compiled kernels), loaded on the first CPU call
_cpu_error: str | None = None
_triton_module = None  # normkit.kernels.triton, imported when a CUDA tensor (or test) needs it
_triton_error: str | None = None
# The compiled eager entry point (cpu.infer) while the eager fast paths may be taken (backend
# "auto" or "cpu" for the process and in every block, no statistics sink anywhere), else None:
# one global read on every call instead of four checks.
_fast = None


def _refresh_fast():
    """Recompute _fast; call with _lock held."""
    global _fast
    ok = (_cpu_module is not None and _backend in ("auto", "cpu") and not _observers
          and not _slow_blocks)
    _fast = _cpu_module.infer if ok else None


# ----------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------

# Process-wide settings that entering their use_backend object may still take back: (weak
# reference to the object, name), oldest first, above the settled value _base.  _backend is the
# newest one left.
_pending: list = []
_base = "auto"


class use_backend(contextlib.AbstractContextManager):
    """Select the backend.

    ``normkit.use_backend("cpu")`` sets it for the process: every thread without a block of its
    own uses it.  ``with normkit.use_backend("reference"): ...`` sets it for the calling thread
    only, until the block ends, like ``torch.no_grad``: other threads and the process-wide
    value are untouched, and on exit the thread goes back to what it used before (nested blocks
    in turn).  In a thread, its innermost block wins over the process-wide value, also over one
    set inside the block.  ``get_backend()`` says what the calling thread uses.

    The call itself cannot know that a ``with`` follows, so it sets the process-wide value,
    and entering the block takes that back (whatever other threads set in between); between the
    two, other threads may see it for a moment.  While a block of "reference" or "triton" is
    open in any thread, the eager fast path is off in all of them (~1 µs per call; they still
    compute on their own backend).  A backward pass computes on the backend of the thread that
    runs it.

    Names: "auto" (fastest correct backend for the device, dtype and N — never chosen by the
    number of rows, so a row gets the same bits alone or in a batch), "reference" (pure torch,
    float64-capable), "cpu" (the compiled CPU kernels; raises if it cannot compute a call),
    "triton" (CUDA tensors;
    CPU tensors too when ``TRITON_INTERPRET=1`` was set before first use — how CI tests the
    kernels; raises if it cannot compute a call).
    """

    def __init__(self, name: str):
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        self.name = name
        with _lock:
            _pending.append((weakref.ref(self), name))
            _settle()

    def __enter__(self):
        global _slow_blocks
        with _lock:
            if self.name not in ("auto", "cpu"):
                _slow_blocks += 1
            _pending[:] = [p for p in _pending if p[0]() is not self]  # take the setting back
            _settle()
        saved = getattr(_tls, "saved", None)
        if saved is None:
            saved = _tls.saved = []
        saved.append(getattr(_tls, "backend", None))
        _tls.backend = self.name
        return self

    def __exit__(self, *exc):
        global _slow_blocks
        _tls.backend = _tls.saved.pop()
        if self.name not in ("auto", "cpu"):
            with _lock:
                _slow_blocks -= 1
                _refresh_fast()
        return False


def _settle():
    """Recompute _backend (and _fast) from _pending; with _lock held.  A setting whose object is
    gone can no longer be taken back: the newest such becomes _base, and older ones go."""
    global _backend, _base
    for i in range(len(_pending) - 1, -1, -1):
        if _pending[i][0]() is None:
            _base = _pending[i][1]
            del _pending[:i + 1]
            break
    _backend = _pending[-1][1] if _pending else _base
    _refresh_fast()


def empty_cache() -> None:
    """Free the CPU output buffers normkit keeps for reuse (as ``torch.cuda.empty_cache``).

    Outputs of at least 1M elements (y, h, dx) come from a pool of earlier outputs' buffers,
    which saves their page faults — about as much time as the op itself.  Buffers still used by
    a tensor stay with it.  The pool holds at most ``NORMKIT_CPU_POOL_MB`` MiB (default: an
    eighth of the machine's memory, at most 2048; 0 turns it off), set before the first call.
    """
    if _cpu_module is not None:
        _cpu_module.release_buffers()


def get_backend() -> str:
    """The backend the calling thread uses ("auto", "reference", "cpu" or "triton"): its
    innermost ``use_backend`` block's, else the process-wide one."""
    return getattr(_tls, "backend", None) or _backend


def available_backends() -> list[str]:
    """Backends that can run on this machine (``cpu`` needs the compiled kernels, built when
    normkit is installed; ``triton`` needs triton and a CUDA device, or ``TRITON_INTERPRET=1``).
    """
    names = ["reference"] + (["cpu"] if _load_cpu() is not None else [])
    if (_interpreting() or torch.cuda.is_available()) and _load_triton() is not None:
        names.append("triton")
    return names


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _load_triton():
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from .kernels import triton as triton_kernels

            _triton_module = triton_kernels
        except Exception as e:  # triton missing or broken: auto falls back to the reference
            _triton_error = f"{type(e).__name__}: {e} (pip install 'normkit[gpu]')"
            log.warning("normkit triton backend unavailable (%s); using the reference",
                        _triton_error)
    return _triton_module


def _load_cpu():
    global _cpu_module, _cpu_error
    if _cpu_module is None and _cpu_error is None:
        try:
            from .kernels import cpu

            cpu.configure(_eager_double_backward)
            _cpu_module = cpu
            with _lock:
                _refresh_fast()
        except ImportError as e:  # not built, or built for another torch: the reference serves
            _cpu_error = str(e)
            warnings.warn(f"{e}.  Until then the reference backend serves CPU tensors (slower).",
                          RuntimeWarning, stacklevel=3)
    return _cpu_module


def _eager_double_backward(need, v, weight, bias, dy, dh, eps, rms):
    """(dx, dγ, dβ, d-residual) of the eager path's C++ autograd node (kernels/csrc/host.cpp)
    for ``create_graph=True``: the reference's, on rows of v (x, or h with a residual: what the
    node saved), differentiable again.  ``_load_cpu`` hands it to the node: the kernels sit
    below this layer and do not import it."""
    n = v.shape[-1]
    rows = [None if t is None else t.reshape(-1, n) for t in (v, dy, dh)]
    g = reference.norm_backward_graph(need, rows[0], weight, bias, rows[1], rows[2], eps, rms)
    shaped = [None if t is None else t.view(v.shape) for t in (g[0], g[3])]
    return shaped[0], g[1], g[2], shaped[1]


def _first_call(x):
    """``_fast`` for a call made before the CPU backend was loaded: load it when x is a CPU tensor
    (CUDA-only use never loads it).  None when the fast paths are off."""
    if (_cpu_module is None and _cpu_error is None and isinstance(x, torch.Tensor) and x.is_cpu
            and not torch.compiler.is_compiling()):
        # Under torch.compile the op is traced, not run: its kernels load when the compiled
        # graph first runs (loading configures the extension, which dynamo cannot trace).
        _load_cpu()
    return _fast


def _select(x, weight, bias, casting, out_dtype):
    """The kernels module (cpu or triton), or None for the reference (which also propagates
    meta tensors' shapes and dtypes, whatever the backend)."""
    name = getattr(_tls, "backend", None) or _backend  # get_backend(), inline: every call
    if name == "reference" or x.is_meta:
        return None
    if name == "triton" or (name == "auto" and x.is_cuda):
        return _select_triton(name, x, weight, bias, casting, out_dtype)
    cpu = _cpu_module or _load_cpu()
    ok = cpu is not None and cpu.supports(x, weight, bias, casting, out_dtype)
    if ok:
        return cpu
    if name == "cpu":
        why = _cpu_error or (
            f"x {x.dtype} on {x.device}, weight "
            f"{None if weight is None else (weight.dtype, weight.device)}, casting {casting!r}"
        )
        raise ValueError(f"backend 'cpu' cannot compute this call ({why}); use 'auto'")
    return None


def _select_triton(name, x, weight, bias, casting, out_dtype):
    # A CPU tensor reaches triton only when forced and interpreted (tests); never under "auto".
    tri = _load_triton() if (x.is_cuda or _interpreting()) else None
    if tri is not None and tri.supports(x, weight, bias, casting, out_dtype):
        return tri
    if name == "triton":
        why = _triton_error or (
            f"x {x.dtype} on {x.device}, weight "
            f"{None if weight is None else (weight.dtype, weight.device)}, bias "
            f"{None if bias is None else (bias.dtype, bias.device)}, casting {casting!r}, "
            f"out_dtype {out_dtype}"
        )
        raise ValueError(f"backend 'triton' cannot compute this call ({why}); use 'auto'")
    return None


def _backward_kernels(stats):
    """The kernels module for a custom-op backward.  Every backend writes the same (M, 3)
    [m1, dm, rstd] statistics, so any backend that runs on their device can take them."""
    if stats.is_cpu and not (get_backend() == "triton" and _triton_module is not None
                             and _triton_module.INTERPRET):
        cpu = _load_cpu()
        if cpu is not None:
            return cpu
    return _load_triton()


# ----------------------------------------------------------------------------------------------
# Statistics for telemetry
# ----------------------------------------------------------------------------------------------


def _set_stats_sink(sink):
    """Set this thread's statistics sink; returns the previous one (restore it when done).

    While a sink is set, every eager normkit op in this thread calls
    ``sink(mean, rstd, eps, rms)`` with the per-row statistics the kernel computed anyway:
    ``mean`` (M,) (None for RMSNorm) and ``rstd`` (M,) ``= rsqrt(var + eps)`` (LayerNorm) or
    ``rsqrt(mean(h²) + eps)`` (RMSNorm), float32 (float64 for float64 input), detached.  This is
    how ``normkit.watch`` reads activation mean/variance without another pass over the rows.
    Calls under ``torch.compile`` report nothing.  While any thread has a sink, the eager
    inference fast path is off (it computes no statistics), which costs ~1 µs per call.
    """
    global _observers
    previous = getattr(_tls, "sink", None)
    _tls.sink = sink
    with _lock:
        _observers += (sink is not None) - (previous is not None)
        _refresh_fast()
    return previous


def _report_stats(sink, stats, eps, rms):
    """Hand a kernel's (M, 3) [m1, dm, rstd] statistics to the sink as (mean, rstd)."""
    _report(sink, stats[:, 0] + stats[:, 1], stats[:, 2], eps, rms)


def _report(sink, mean, rstd, eps, rms):
    try:
        sink(None if rms else mean, rstd, eps, rms)
    except Exception:  # telemetry must never break the step
        log.exception("normkit statistics sink failed; statistics for this call are lost")

