"""The public functional API: ``layer_norm`` and ``rms_norm``, backend dispatch, autograd.

Three ways in, one set of kernels:

* eager, the common CPU call (contiguous x, 1-D γ/β, "torch" casting): straight into the compiled
  entry point (``cpu.infer``), which checks, allocates and launches in C++, with a C++ autograd
  node when a gradient is wanted.  At M=1 every 0.1 µs counts against torch's own ~3 µs op.
* eager, everything else: validate, flatten to rows, call the backend, through
  ``_NormFunction`` (an ``autograd.Function``) when a gradient is wanted.
* under ``torch.compile``: the ``normkit::norm_fwd`` / ``normkit::norm_bwd`` custom ops, with fake
  implementations, so graphs trace through without breaks.  The custom-op machinery costs
  several µs per call in eager mode, which is why eager calls bypass it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import operator
import os
import threading
import warnings
import weakref
from collections.abc import Sequence

import torch

from .kernels import reference

__all__ = [
    "layer_norm",
    "rms_norm",
    "use_backend",
    "get_backend",
    "available_backends",
    "empty_cache",
    "BACKENDS",
    "CASTINGS",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "reference", "cpu", "triton")
CASTINGS = ("torch", "gemma", "llama", "t5")

_backend = "auto"  # the process-wide backend; a use_backend block in a thread wins over it there
_observers = 0  # threads with a statistics sink set (see _set_stats_sink); 0 keeps the fast path
_slow_blocks = 0  # use_backend blocks, in any thread, of a backend the fast paths do not serve
_tls = threading.local()  # per thread: .sink (statistics), .backend and .saved (use_backend)
_lock = threading.Lock()  # guards the counts above, _backend and _pending
_cpu_module = None  # normkit.kernels.cpu (the compiled kernels), loaded on the first CPU call
_cpu_error: str | None = None
_triton_module = None  # normkit.kernels.triton, imported when a CUDA tensor (or test) needs it
_triton_error: str | None = None
_tracing_state = torch._C._get_tracing_state  # bound once: ~60 ns on the M=1 fast path
_is_compiling = torch.compiler.is_compiling
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


class _ArgumentError(RuntimeError, ValueError):
    """A tensor argument that does not fit the others (shape, dtype, device, out= under
    autograd): a RuntimeError, as torch raises for these, and a ValueError, as normkit raised
    before."""


class _DtypeError(NotImplementedError, TypeError):
    """x, weight or bias of a dtype the ops do not compute: NotImplementedError (a RuntimeError),
    as torch raises for these, and a TypeError, as normkit raised before."""


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

            cpu.configure(_fast_double_backward)
            _cpu_module = cpu
            with _lock:
                _refresh_fast()
        except ImportError as e:  # not built, or built for another torch: the reference serves
            _cpu_error = str(e)
            warnings.warn(f"{e}.  Until then the reference backend serves CPU tensors (slower).",
                          RuntimeWarning, stacklevel=3)
    return _cpu_module


def _select(x, weight, bias, casting, out_dtype):
    """The kernels module (cpu or triton), or None for the reference (which also propagates
    meta tensors' shapes and dtypes, whatever the backend)."""
    name = get_backend()
    if name == "reference" or x.is_meta:
        return None
    if name == "triton" or (name == "auto" and x.is_cuda):
        return _select_triton(name, x, weight, bias, casting, out_dtype)
    cpu = _load_cpu()
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


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def layer_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    zero_centered_gamma: bool = False,
    return_residual: bool = False,
    casting: str = "torch",
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
):
    """LayerNorm over the last ``len(normalized_shape)`` dims, optionally fused with a residual add.

    ``y = (h - mean(h)) * rsqrt(var(h) + eps) * g + b`` with ``h = x`` (or ``x + residual``,
    rounded to x.dtype), biased variance, ``g = weight`` (or ``1 + weight`` with
    ``zero_centered_gamma``), statistics in float32 (float64 for float64 input).

    Args:
        x: (..., *normalized_shape) float tensor (float32, bfloat16, float16, float64), dense
            (not nested or sparse).  On the meta device the outputs are meta tensors of the
            right shape and dtype, as with torch's ops.
        normalized_shape: int or shape of the trailing dims to normalize over (anything with
            ``__index__``, such as a numpy integer, counts as an int, as in torch).
        weight, bias: γ and β of shape ``normalized_shape``, or None.  They may have another
            float dtype than x (e.g. float32 γ with bfloat16 activations).
        eps: added to the variance; a real number (numpy scalars too), finite and >= 0.
        residual: tensor like x (same shape, dtype and device), added before normalizing.
        zero_centered_gamma: multiply by ``1 + weight`` (γ stored zero-centred, as in Gemma).
        return_residual: also return ``h`` — the input of the next pre-norm block.
        casting: where the cast back to a 16-bit input dtype happens:
            "torch" / "gemma": everything in float32, one rounding at the end; output dtype
            x.dtype (or ``out_dtype``).  "llama": normalize in float32, cast to x.dtype, then
            apply γ/β with torch's type promotion; output ``promote_types(x.dtype, weight.dtype)``.
            "t5": normalize in float32, cast to weight.dtype only when that is 16-bit, then
            multiply; output weight.dtype (16-bit weight) or float32.
        out_dtype: output dtype for "torch"/"gemma" casting.
        out: a tensor to write y into (shape of x, the output dtype, contiguous, same device);
            it is returned as y.  It may be x itself (each row is read before it is written);
            any other memory it shares with x, residual, weight, bias or residual_out raises
            a RuntimeError, as torch's ``out=`` arguments do (so does an out that overlaps
            itself).  No autograd through it, as with torch's ``out=`` arguments: with a
            gradient wanted this raises.  Saves the allocation and the first-touch page faults
            of a fresh output, which for large tensors cost as much as the op.
        residual_out: with ``residual``, a tensor to write h into (x's shape and dtype,
            contiguous, same device); it is returned as h.  It may be ``residual`` itself — the
            in-place update of the residual stream that serving engines use — or x; other
            memory shared with an input or with ``out`` raises, as for ``out``.  No autograd
            through it, as ``out``.

    Returns:
        ``y`` shaped like x, or ``(y, h)`` with ``return_residual=True`` (h in x.dtype).

    Raises:
        TypeError: an argument of the wrong kind (x not a tensor, a float in normalized_shape,
            a string eps).
        RuntimeError: as torch, for a tensor that does not fit the others: shape, device,
            dtype, out= with autograd, out=/residual_out= sharing memory with an input.  Its
            subclass NotImplementedError for a non-floating x, weight or bias and for nested
            and sparse tensors.  (Shape, device and dtype errors are also ValueError /
            TypeError, which normkit raised before.)
        ValueError: an option out of range: eps < 0, an unknown casting, out_dtype with
            "llama"/"t5", a backend that cannot compute the call.

    Under ``torch.autocast`` the op behaves like torch's own ``layer_norm``: on CUDA (and other
    accelerators) it runs in float32 and returns float32; on the CPU autocast leaves it alone.
    """
    fast = _fast or _first_call(x)
    if (fast is not None and casting == "torch" and out_dtype is None and not zero_centered_gamma
            and type(eps) is float and 0.0 <= eps < math.inf
            and not _is_compiling() and _tracing_state() is None):
        res = fast(x, normalized_shape, weight, bias, eps, False, residual, out, residual_out)
        if res is not None:
            return _finish(res, x, residual, return_residual)
    return _norm(
        x, normalized_shape, weight, bias, eps, residual, zero_centered_gamma,
        return_residual, casting, out_dtype, False, out, residual_out,
    )


def rms_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    residual: torch.Tensor | None = None,
    zero_centered_gamma: bool = False,
    return_residual: bool = False,
    casting: str = "torch",
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
):
    """RMSNorm: ``y = h * rsqrt(mean(h²) + eps) * g``, optionally fused with a residual add.

    Args:
        x, normalized_shape, weight, residual, zero_centered_gamma, return_residual, casting,
            out_dtype, out, residual_out: as in ``layer_norm`` (no bias).
        eps: added to the mean square; None means ``torch.finfo(x.dtype).eps``, as in
            ``torch.nn.functional.rms_norm``.

    Returns:
        ``y`` shaped like x, or ``(y, h)`` with ``return_residual=True``.  Output dtype: see
        ``layer_norm``.
    """
    fast = _fast or _first_call(x)
    if fast is not None and casting == "torch" and out_dtype is None and not zero_centered_gamma:
        if eps is None and isinstance(x, torch.Tensor) and x.is_floating_point():
            eps = torch.finfo(x.dtype).eps
        if (type(eps) is float and 0.0 <= eps < math.inf and not _is_compiling()
                and _tracing_state() is None):
            res = fast(x, normalized_shape, weight, None, eps, True, residual, out,
                       residual_out)
            if res is not None:
                return _finish(res, x, residual, return_residual)
    return _norm(
        x, normalized_shape, weight, None, eps, residual, zero_centered_gamma,
        return_residual, casting, out_dtype, True, out, residual_out,
    )


# ----------------------------------------------------------------------------------------------
# Validation and dispatch
# ----------------------------------------------------------------------------------------------


def _finish(res, x, residual, return_residual):
    """The fast path's result in the public form: y, or (y, h) with h = x when no residual."""
    if residual is None:
        return (res, x) if return_residual else res
    return res if return_residual else res[0]


def _first_call(x):
    """``_fast`` for a call made before the CPU backend was loaded: load it when x is a CPU tensor
    (CUDA-only use never loads it).  None when the fast paths are off."""
    if _cpu_module is None and _cpu_error is None and isinstance(x, torch.Tensor) and x.is_cpu:
        _load_cpu()
    return _fast


def _check_param(name, p, shape, x):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
    _check_dense(name, p)
    if p.shape != shape:
        raise _ArgumentError(f"{name} must have shape {shape} (normalized_shape), got "
                             f"{tuple(p.shape)}")
    if not p.is_floating_point():
        raise _DtypeError(f"{name} must be a floating-point tensor, got {p.dtype}")
    if not (p.is_cpu and x.is_cpu) and p.device != x.device:
        raise _ArgumentError(f"{name} is on {p.device} but x is on {x.device}")


def _check_dense(name, t):
    """Nested and sparse tensors: named, with the way to a dense one (the kernels read rows)."""
    if t.layout is not torch.strided or t.is_nested:
        if t.is_nested:
            raise NotImplementedError(
                f"{name} must be a dense (strided) tensor, got a nested tensor: normalize the "
                f"rows of a jagged one, {name}.values(), and nest the result again with "
                f"torch.nested.nested_tensor_from_jagged(result, {name}.offsets())")
        raise NotImplementedError(f"{name} must be a dense (strided) tensor, got layout "
                                  f"{t.layout}: pass {name}.to_dense()")


def _shape_of(normalized_shape):
    """normalized_shape as a tuple of ints.  Like torch: an int, or anything with
    ``__index__`` (numpy integers, 0-dim integer tensors), or a sequence of those; not a bool,
    a float or a string."""
    if type(normalized_shape) is int:
        return (normalized_shape,)
    dims = normalized_shape
    if not isinstance(dims, (str, bytes, bool)):
        try:
            dims = (operator.index(dims),)
        except TypeError:
            pass
        try:
            return tuple(_dim(d) for d in dims)
        except TypeError:
            pass
    raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                    f"{normalized_shape!r}")


def _dim(d):
    if isinstance(d, bool):
        raise TypeError(d)
    return operator.index(d)


def _validate(x, normalized_shape, weight, bias, eps, residual, casting, out_dtype, rms):
    """Checks every argument; returns (normalized_shape tuple, N, eps float).

    This runs on every call, so the checks are ordered and written to cost ~1 µs in all.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_dense("x", x)
    if not x.is_floating_point():
        raise _DtypeError(f"x must be a floating-point tensor, got {x.dtype}")
    ns = _shape_of(normalized_shape)
    k = len(ns)
    if k == 0 or k > x.dim() or x.shape[-k:] != ns:
        raise _ArgumentError(
            f"normalized_shape {ns} must match the trailing dims of x, whose shape is "
            f"{tuple(x.shape)}"
        )
    if weight is not None:
        _check_param("weight", weight, ns, x)
    if bias is not None:
        _check_param("bias", bias, ns, x)
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(
                f"residual must be a torch.Tensor or None, got {type(residual).__name__}"
            )
        _check_dense("residual", residual)
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise _ArgumentError(
                f"residual must match x: shape {tuple(x.shape)}, {x.dtype}, {x.device}; got "
                f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}"
            )
    if eps is None and rms:
        eps = torch.finfo(x.dtype).eps
    else:
        eps = _eps_of(eps)
    _check_casting(casting)
    if out_dtype is not None:
        if casting not in ("torch", "gemma"):
            raise ValueError(f"out_dtype is only for casting 'torch'/'gemma', not {casting!r}")
        if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
            raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    n = ns[0] if k == 1 else math.prod(ns)
    return ns, n, eps


def _eps_of(eps):
    """eps as a float, finite and >= 0.  Any real number, as torch takes (numpy scalars too);
    not a bool, which is a flag passed in the wrong place far more often than an eps of 1."""
    if type(eps) is not float:
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"eps must be a float, got {type(eps).__name__}")
        eps = float(eps)
    if not 0.0 <= eps < math.inf:  # also false for NaN
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    return eps


def _check_casting(casting):
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")


def _check_out(out, x, weight, bias, residual, casting, out_dtype):
    """``out=``: a contiguous tensor shaped like x in the output dtype, outside autograd."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    _check_dense("out", out)
    want = reference.output_dtype(x.dtype, None if weight is None else weight.dtype, casting,
                                  out_dtype)
    if out.shape != x.shape or out.dtype != want or out.device != x.device:
        raise _ArgumentError(f"out must have x's shape {tuple(x.shape)}, dtype {want} and "
                             f"device {x.device}; got {tuple(out.shape)}, {out.dtype}, "
                             f"{out.device}")
    if not out.is_contiguous():
        _check_internal_overlap("out", out)
        raise _ArgumentError("out must be contiguous")
    _check_no_autograd("out", x, weight, bias, residual, out)


def _check_residual_out(residual_out, x, weight, bias, residual):
    """``residual_out=``: where h goes; like x, contiguous, outside autograd."""
    if not isinstance(residual_out, torch.Tensor):
        raise TypeError(f"residual_out must be a torch.Tensor or None, got "
                        f"{type(residual_out).__name__}")
    if residual is None:
        raise ValueError("residual_out needs residual: without it there is no h to write")
    _check_dense("residual_out", residual_out)
    if (residual_out.shape != x.shape or residual_out.dtype != x.dtype
            or residual_out.device != x.device):
        raise _ArgumentError(f"residual_out must have x's shape {tuple(x.shape)}, dtype "
                             f"{x.dtype} and device {x.device}; got "
                             f"{tuple(residual_out.shape)}, {residual_out.dtype}, "
                             f"{residual_out.device}")
    if not residual_out.is_contiguous():
        _check_internal_overlap("residual_out", residual_out)
        raise _ArgumentError("residual_out must be contiguous")
    _check_no_autograd("residual_out", x, weight, bias, residual, residual_out)


# torch's words for the same errors (aten/src/ATen/MemoryOverlap.cpp), so that a torch user
# recognises them.
_PARTIAL_OVERLAP = ("unsupported operation: some elements of the input tensor and the written-to "
                    "tensor refer to a single memory location")
_INTERNAL_OVERLAP = ("unsupported operation: more than one element of the written-to tensor "
                     "refers to a single memory location")
_CLONE = "Please clone() the tensor before performing the operation."


def _check_writes(x, weight, bias, residual, out, residual_out):
    """``out=`` / ``residual_out=`` (already checked to be contiguous tensors like x) share no
    memory with an input or with each other, as torch requires of its out= arguments
    (RuntimeError in torch's words), except in the in-place forms (``out=x``;
    ``residual_out=residual`` or ``x``: the same elements exactly, which the kernels read row by
    row before writing).  Anything else would be read after it was overwritten.

    Memory, not storage: two tensors over one numpy array overlap, and two disjoint slices of one
    buffer do not (``torch._C._overlaps`` compares storages only, and costs ~0.4 µs a pair).
    The eager fast path (kernels/csrc/host.cpp, ``run``) declines any call whose byte ranges
    meet, so the error is raised here; other calls cost a few pointer reads.
    """
    if out is not None:
        _check_write("out", out, (x, residual, weight, bias, residual_out), 1)
    if residual_out is not None:
        _check_write("residual_out", residual_out, (x, residual, weight, bias), 2)


_SOURCES = ("x", "residual", "weight", "bias", "residual_out")  # _check_write's sources, in order


def _check_write(name, dst, sources, in_place):
    """Raises when output ``dst`` shares memory with one of ``sources`` (named as in _SOURCES;
    None for an absent one), other than an exact alias of one of the first ``in_place``."""
    lo = dst.data_ptr()
    hi = lo + dst.nbytes
    for i, src in enumerate(sources):
        if src is None or (src is dst and i < in_place):
            continue
        start = src.data_ptr()
        # A contiguous source spans [start, start + nbytes); a strided one may reach further.
        if start < hi and (start + src.nbytes > lo or not src.is_contiguous()):
            _check_pair(name, dst, _SOURCES[i], src, lo, hi, i < in_place)


def _check_pair(name, dst, src_name, src, lo, hi, in_place):
    """The exact test, for a source whose span meets the output's bytes [lo, hi)."""
    if not _shares_memory(src, dst, lo, hi):
        return
    if in_place and src.dtype == dst.dtype and src.data_ptr() == lo and (
            src.shape == dst.shape and src.is_contiguous()):
        return  # the same elements: the documented in-place form
    unless = f" unless it is {src_name} itself" if in_place else ""
    raise RuntimeError(f"{name}= and {src_name}: {_PARTIAL_OVERLAP} ({name} must not share "
                       f"memory with {src_name}{unless}). {_CLONE}")


def _shares_memory(src, dst, lo, hi):
    """Whether an element of ``src`` has a byte in [lo, hi), the bytes of contiguous ``dst``."""
    if not (dst.numel() and src.numel()) or src.device != dst.device or dst.is_meta:
        return False  # nothing written or read; other devices, meta: no memory in common
    size = src.element_size()
    # (count, byte step) per dim, largest step first; repeated (step 0) and single dims add no
    # address.  Negative steps do not exist in torch.
    dims = sorted(((n, s * size) for n, s in zip(src.shape, src.stride(), strict=True)
                   if n > 1 and s), key=lambda d: -d[1])
    return _touches(src.data_ptr(), dims, size, lo, hi)


def _touches(base, dims, size, lo, hi):
    """Whether the elements ``base + Σ i_k·step_k`` (0 <= i_k < count_k over ``dims``, largest
    step first), each ``size`` bytes, touch [lo, hi).  Exact, in O(len(dims)) steps: the blocks
    of the outer dim lie one after another, so only the first block that ends past ``lo`` can
    straddle it; any later block that starts before ``hi`` starts inside."""
    if not dims:
        return base < hi and lo < base + size
    (count, step), inner = dims[0], dims[1:]
    span = size + sum((n - 1) * s for n, s in inner)  # bytes one block reaches
    if step < span:  # blocks interleave (an unusual as_strided view): assume they touch
        return True
    i = max(0, (lo - base - span) // step + 1)  # the first block that ends past lo
    start = base + i * step
    if i >= count or start >= hi:
        return False
    return (start >= lo or _touches(start, inner, size, lo, hi)
            or (i + 1 < count and start + step < hi))


def _check_internal_overlap(name, t):
    """An output with a repeated (stride 0) dim: several elements would be written to one place.
    torch's own test (``MemOverlap::Yes``; it answers "too hard" for other strided layouts)."""
    if torch._debug_has_internal_overlap(t) == 1:
        raise RuntimeError(f"{name}=: {_INTERNAL_OVERLAP} ({name} has stride "
                           f"{tuple(t.stride())} for shape {tuple(t.shape)}). {_CLONE}")


def _check_no_autograd(name, *tensors):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise _ArgumentError(f"{name}= does not support autograd (as torch's out= arguments: "
                             f"functions with out=... arguments don't support automatic "
                             f"differentiation): call without {name}, or under "
                             f"torch.no_grad()")


def _rows(t, m, n, flat):
    """(M, N) view of t (a copy only when the last dim is not contiguous: the kernels read rows
    with a stride but need unit stride within a row)."""
    t2 = t if flat else t.reshape(m, n)
    if n > 1 and t2.stride(1) != 1:
        t2 = t2.contiguous()
    return t2


def _norm(x, normalized_shape, weight, bias, eps, residual, zc, return_residual, casting,
          out_dtype, rms, out=None, residual_out=None):
    ns, n, eps = _validate(x, normalized_shape, weight, bias, eps, residual, casting, out_dtype,
                           rms)
    if out is not None:
        _check_out(out, x, weight, bias, residual, casting, out_dtype)
    if residual_out is not None:
        _check_residual_out(residual_out, x, weight, bias, residual)
    if (out is not None or residual_out is not None) and not torch.compiler.is_compiling():
        _check_writes(x, weight, bias, residual, out, residual_out)
    if not x.is_cpu and not x.is_meta and torch.is_autocast_enabled(x.device.type):
        # torch's autocast runs layer_norm / rms_norm in float32 on accelerators (CPU: no policy).
        x, weight, bias, residual = (
            None if t is None else t.float() for t in (x, weight, bias, residual)
        )
    if _tracing_state() is not None or (
            torch.compiler.is_compiling() and torch.onnx.is_in_onnx_export()):
        # Tracing (torch.jit.trace, both ONNX exporters): a compiled call is opaque to tracers and
        # would be recorded as a constant output, so trace torch's own ops instead — on x as
        # it is, so that a dynamic batch dim stays dynamic in the graph.
        y, h = _traceable(x, ns, n, weight, bias, residual, eps, rms, zc, casting, out_dtype)
        if out is not None:
            y = out.copy_(y)
        if residual_out is not None:
            h = residual_out.copy_(h)
        return (y, x if h is None else h) if return_residual else y
    # Flatten to rows here, never inside the autograd.Function (STYLE habit 2).
    flat = x.dim() == 2 and len(ns) == 1
    m = x.shape[0] if flat else (x.numel() // n if n else 0)
    x2 = _rows(x, m, n, flat)
    r2 = None if residual is None else _rows(residual, m, n, flat)
    w = weight if weight is None or weight.dim() == 1 else weight.reshape(n)
    b = bias if bias is None or bias.dim() == 1 else bias.reshape(n)

    if torch.compiler.is_compiling():
        y, h = _compiled_path(x2, w, b, r2, eps, rms, zc, casting, out_dtype)
    else:
        kern = _select(x2, w, b, casting, out_dtype) if m and n else None
        sink = getattr(_tls, "sink", None) if _observers else None
        if kern is None:
            y, h, mean, rstd = reference.norm_forward(x2, w, b, r2, eps, rms, zc, casting,
                                                      out_dtype)
            if sink is not None:
                _report(sink, mean.detach(), rstd.detach(), eps, rms)
        elif not (torch.is_grad_enabled() and (
            x.requires_grad
            or (w is not None and w.requires_grad)
            or (b is not None and b.requires_grad)
            or (r2 is not None and r2.requires_grad)
        )):
            if (out is not None or residual_out is not None) and kern is _cpu_module:
                y, h, stats = kern.forward(
                    x2, w, b, r2, eps, rms, zc, casting, out_dtype, sink is not None,
                    y=None if out is None else _rows(out, m, n, flat),
                    h=None if residual_out is None else _rows(residual_out, m, n, flat))
            else:
                y, h, stats = kern.forward(x2, w, b, r2, eps, rms, zc, casting, out_dtype,
                                           sink is not None)
            if sink is not None:
                _report_stats(sink, stats, eps, rms)
        else:
            res = _NormFunction.apply(x2, w, b, r2, eps, rms, zc, casting, out_dtype, kern)
            y, h = res if r2 is not None else (res, None)
    if not flat:
        y = y.view(x.shape)
        h = None if h is None else h.view(x.shape)
    if out is not None:
        if y.data_ptr() != out.data_ptr():
            out.copy_(y)
        y = out
    if residual_out is not None:
        if h.data_ptr() != residual_out.data_ptr():
            residual_out.copy_(h)
        h = residual_out
    if return_residual:
        return y, (x if h is None else h)  # no residual: h is x itself
    return y


def _traceable(x, ns, n, weight, bias, residual, eps, rms, zc, casting, out_dtype):
    """The op in torch's own ops, for tracers and exporters: ``F.layer_norm`` (ONNX
    LayerNormalization, opset >= 17) and ``F.rms_norm`` (RMSNormalization, opset 23, dynamo
    exporter) where torch's semantics are ours, the reference formulas (plain ONNX ops)
    elsewhere.  Same values as the kernels within rounding; eps and γ/β stay the module's."""
    h = None if residual is None else x + residual  # in x.dtype, rounded once, as the kernels
    v = x if h is None else h
    same = (casting in ("torch", "gemma") and not zc and out_dtype in (None, v.dtype)
            and all(p is None or p.dtype == v.dtype for p in (weight, bias)))
    # The TorchScript exporter has no symbolic for aten::rms_norm (pytorch#159249).
    if same and not (rms and _tracing_state() is not None):
        y = (torch.nn.functional.rms_norm(v, ns, weight, eps) if rms
             else torch.nn.functional.layer_norm(v, ns, weight, bias, eps))
    else:
        flat = lambda t: None if t is None else t.reshape(n)  # noqa: E731
        y, _, _, _ = reference.norm_forward(v.reshape(-1, n), flat(weight), flat(bias), None,
                                            eps, rms, zc, casting, out_dtype)
        y = y.reshape(v.shape)
    return y, h


# ----------------------------------------------------------------------------------------------
# Autograd (eager)
# ----------------------------------------------------------------------------------------------


class _NormFunction(torch.autograd.Function):
    """Stashes what backward needs; shapes are already (M, N)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, rms, zc, casting, out_dtype, kern):
        y, h, stats = kern.forward(x, weight, bias, residual, eps, rms, zc, casting, out_dtype,
                                   True)
        if _observers:
            sink = getattr(_tls, "sink", None)
            if sink is not None:
                _report_stats(sink, stats, eps, rms)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, residual, h, stats)
        ctx.opts = (eps, rms, zc, casting, out_dtype)
        ctx.kern = kern  # backward runs on the backend that ran the forward
        if residual is not None:
            return y, h
        return y

    @staticmethod
    def backward(ctx, dy, dh=None):
        x, weight, bias, residual, h, stats = ctx.saved_tensors
        eps, rms, zc, casting, out_dtype = ctx.opts
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference instead (double backward).
            return _reference_backward(need, x, weight, bias, residual, dy, dh, ctx.opts) + (None,)
        v = h if h is not None else x
        if dy is None:  # only h was used
            dy = _zero_dy(x, weight, casting, out_dtype)
        dx, dw, db = _kernel_backward(
            ctx.kern, v, weight, bias, stats, dy, dh, rms, zc, casting, need[1] or need[2]
        )
        if dw is not None and dw.dtype != weight.dtype:
            dw = dw.to(weight.dtype)
        if db is not None and db.dtype != bias.dtype:
            db = db.to(bias.dtype)
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if need[2] else None,
            dx if need[3] else None,
            None, None, None, None, None, None,
        )


def _fast_double_backward(need, x, weight, bias, residual, dy, dh, eps, rms):
    """(dx, dγ, dβ, d-residual) of the eager path's C++ autograd node (kernels/csrc/host.cpp)
    for ``create_graph=True``: the reference's, on rows, differentiable again."""
    n = x.shape[-1]
    rows = [None if t is None else t.reshape(-1, n) for t in (x, residual, dy, dh)]
    g = _reference_backward(need, rows[0], weight, bias, rows[1], rows[2], rows[3],
                            (eps, rms, False, "torch", None))
    shaped = [None if t is None else t.view(x.shape) for t in (g[0], g[3])]
    return shaped[0], g[1], g[2], shaped[1]


def _zero_dy(x, weight, casting, out_dtype):
    """The gradient of an unused y: zeros shaped like x in y's dtype."""
    return torch.zeros(x.shape, device=x.device, dtype=reference.output_dtype(
        x.dtype, None if weight is None else weight.dtype, casting, out_dtype))


def _kernel_backward(cpu, v, weight, bias, stats, dy, dh, rms, zc, casting, need_dw):
    dy = dy.contiguous()
    if dh is not None:
        dh = dh.contiguous()
    return cpu.backward(dy, dh, v.contiguous(), weight, bias is not None, stats, rms, zc,
                        casting, need_dw)


def _reference_backward(need, x, weight, bias, residual, dy, dh, opts):
    eps, rms, zc, casting, out_dtype = opts
    inputs = [(i, t) for i, t in enumerate((x, weight, bias, residual)) if need[i]]
    y, h, _, _ = reference.norm_forward(x, weight, bias, residual, eps, rms, zc, casting, out_dtype)
    outs, grads = [y], [dy if dy is not None else torch.zeros_like(y)]
    if h is not None and dh is not None:
        outs.append(h)
        grads.append(dh)
    got = torch.autograd.grad(outs, [t for _, t in inputs], grads, create_graph=True,
                              allow_unused=True)
    result = [None] * 9
    for (i, _), g in zip(inputs, got, strict=True):
        result[i] = g
    return tuple(result)


# ----------------------------------------------------------------------------------------------
# torch.library custom ops (the torch.compile path)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("normkit::norm_fwd", mutates_args=())
def _norm_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    rms: bool,
    zero_centered: bool,
    casting: str,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, stats) on rows; h and stats are empty when not produced."""
    kern = _select(x, weight, bias, casting, out_dtype) if x.numel() else None
    if kern is None:
        y, h, mean, rstd = reference.norm_forward(
            x, weight, bias, residual, eps, rms, zero_centered, casting, out_dtype
        )
        stats = x.new_empty(0, dtype=reference.compute_dtype(x.dtype))
    else:
        y, h, stats = kern.forward(
            x, weight, bias, residual, eps, rms, zero_centered, casting, out_dtype, True
        )
    return y, (x.new_empty(0) if h is None else h), stats


@_norm_fwd_op.register_fake
def _(x, weight, bias, residual, eps, rms, zero_centered, casting, out_dtype):
    m, n = x.shape
    od = reference.output_dtype(
        x.dtype, None if weight is None else weight.dtype, casting, out_dtype
    )
    y = x.new_empty((m, n), dtype=od)
    h = x.new_empty((m, n)) if residual is not None else x.new_empty(0)
    stats = x.new_empty((m, 3), dtype=reference.compute_dtype(x.dtype))
    return y, h, stats


@torch.library.custom_op("normkit::norm_bwd", mutates_args=())
def _norm_bwd_op(
    dy: torch.Tensor,
    dh: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    h: torch.Tensor,
    stats: torch.Tensor,
    eps: float,
    rms: bool,
    zero_centered: bool,
    casting: str,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias); dweight/dbias empty when there is no weight/bias."""
    v = h if residual is not None else x
    if stats.numel() == 0:  # forward ran on the reference (autograd cannot run in here)
        dx, dw, db = reference.norm_backward(dy, dh, v, weight, bias is not None, eps, rms,
                                             zero_centered, casting)
    else:
        dx, dw, db = _kernel_backward(_backward_kernels(stats), v, weight, bias, stats, dy, dh,
                                      rms, zero_centered, casting, True)
    dw = x.new_empty(0) if dw is None else dw.to(weight.dtype)
    db = x.new_empty(0) if db is None else db.to(bias.dtype)
    # A kernel may return dγ and dβ as rows of one buffer (the triton backend with one row
    # block); the outputs of a custom op must not alias each other.
    if dw.numel() and db.numel() and (dw.untyped_storage().data_ptr()
                                      == db.untyped_storage().data_ptr()):
        db = db.clone()
    return dx, dw, db


@_norm_bwd_op.register_fake
def _(dy, dh, x, weight, bias, residual, h, stats, eps, rms, zero_centered, casting, out_dtype):
    dw = x.new_empty(0) if weight is None else torch.empty_like(weight)
    db = x.new_empty(0) if bias is None else torch.empty_like(bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw, db


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, rms, zc, casting, out_dtype = inputs
    _, h, stats = output
    ctx.save_for_backward(x, weight, bias, residual, h, stats)
    ctx.opts = (eps, rms, zc, casting, out_dtype)


def _fwd_backward(ctx, dy, dh, dstats):
    x, weight, bias, residual, h, stats = ctx.saved_tensors
    eps, rms, zc, casting, out_dtype = ctx.opts
    if dh is not None and residual is None:
        dh = None
    if dy is None:
        dy = _zero_dy(x, weight, casting, out_dtype)
    dx, dw, db = _norm_bwd_op(dy, dh, x, weight, bias, residual, h, stats, eps, rms, zc,
                              casting, out_dtype)
    return (
        dx,
        dw if weight is not None else None,
        db if bias is not None else None,
        dx if residual is not None else None,
        None, None, None, None, None,
    )


torch.library.register_autograd(
    "normkit::norm_fwd", _fwd_backward, setup_context=_fwd_setup_context
)


def _compiled_path(x, w, b, r, eps, rms, zc, casting, out_dtype):
    y, h, _ = _norm_fwd_op(x, w, b, r, eps, rms, zc, casting, out_dtype)
    return y, (h if r is not None else None)
