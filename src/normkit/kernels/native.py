"""The native eager entry point: ``_native.cpp``, built on first use, around the numba drivers.

At a few rows the op is all overhead: torch's LayerNorm takes ~4 µs at M=1 on the CI machine,
our Python argument checks and allocation ~5 µs, and a Python ``autograd.Function`` costs the
autograd engine ~15 µs per backward more than a C++ node.  ``_native.cpp`` does what
``cpu.infer`` and ``functional._FastNorm`` do for the same calls, in C++, and calls the serial
drivers' compiled code itself — the C entry point numba emits next to each compiled function,
which runs the very machine code the Python path runs — so both paths give the same bits by
construction (and the tests compare them bit for bit).  Its parallel launches call the same
serial drivers on ranges of rows (of row blocks, in the backward) on torch's own OpenMP threads
(``at::parallel_for``), which costs less than a launch of numba's parallel driver (see
_native.cpp).

It is built with torch's C++ extension tooling (a C++ compiler and ninja), once per machine
and torch version, into the user cache, by a child process that a background thread starts on
the first CPU call: until it is ready, or where it cannot be built, the Python path serves
every call, so nothing waits on a compiler.  ``wait()`` blocks until the build is over (the
benchmark and the tests use it).  ``NORMKIT_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

import numba
import torch
from numba import types

log = logging.getLogger("normkit")

__all__ = ["start", "wait", "status", "calls"]

_SOURCE = os.path.join(os.path.dirname(__file__), "_native.cpp")

_module = None  # the loaded extension, once built and configured
_error: str | None = None  # why there is none
_thread: threading.Thread | None = None
_start_lock = threading.Lock()

_i64 = types.int64
# The serial drivers' argument types before their dtype markers (see cpu._fwd_serial and
# cpu._bwd_serial): the types the Python path's calls give them, so that both paths run one
# specialization.
_FWD_TYPES = (_i64, _i64, types.boolean, _i64, types.float64, *[_i64] * 9)
_BWD_TYPES = (_i64, _i64, _i64, _i64, _i64, types.boolean, _i64, *[_i64] * 11)


def enabled() -> bool:
    """On unless ``NORMKIT_NATIVE=0``."""
    return os.environ.get("NORMKIT_NATIVE", "1") != "0"


def start() -> None:
    """Begin building/loading the extension in the background (once per process)."""
    global _thread, _error
    with _start_lock:
        if _thread is not None or _module is not None or _error is not None:
            return
        if not enabled():
            _error = "off (NORMKIT_NATIVE=0)"
            return
        _thread = threading.Thread(target=_build, name="normkit-native-build", daemon=True)
        _thread.start()


def wait(timeout: float | None = None):
    """The extension module once the background build has finished (starting it if needed), or
    None where it could not be built (``status()`` says why)."""
    start()
    t = _thread
    if t is not None:
        t.join(timeout)
    return _module


def status() -> str:
    if _module is not None:
        return "ready"
    if _error is not None:
        return f"unavailable: {_error}"
    return "building" if _thread is not None else "not started"


def calls() -> int:
    """Calls the native entry point has served in this process (0 without it)."""
    return 0 if _module is None else _module.calls()


def _build() -> None:
    global _module, _error
    try:
        name, build = _location()
        so = os.path.join(build, name + ".so")
        if not os.path.exists(so):
            # Compile in a child process: it runs to the end even if this process exits first
            # (a build killed halfway would leave torch's build lock behind).
            # The environment's own bin first: pip's ninja lives there, on PATH or not.
            path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
            env = dict(os.environ, NORMKIT_NATIVE="0", PATH=path)
            r = subprocess.run(
                [sys.executable, "-c", "from normkit.kernels import native; native._compile()"],
                env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
            if r.returncode != 0:
                lines = (r.stderr or r.stdout).strip().splitlines()
                raise RuntimeError(lines[-1] if lines else f"build exited with {r.returncode}")
        # Load the built library directly: torch's loader would import setuptools and run ninja
        # first (~0.3 s, in a thread that shares the GIL with the caller's first calls).
        spec = importlib.util.spec_from_file_location(name, so)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        from .. import functional
        from . import cpu

        mod.configure(torch.nn.Parameter, functional._fast_double_backward)
        _sync_limits(mod)
        cpu._native_ready(mod)  # registers the plans made so far; later ones as they are made
        _module = mod
    except Exception as e:  # no compiler, no ninja, a broken toolchain: the Python path serves
        _error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        log.info("normkit native entry point unavailable (%s); the Python path serves all "
                 "calls", _error)


def _location():
    """(module name, build directory): one per torch version and source text, in the user
    cache (a library built from another version of the source is never loaded)."""
    with open(_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    name = "normkit_native_" + re.sub(r"\W", "_", torch.__version__) + "_" + digest
    root = os.environ.get("NORMKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "normkit")
    return name, os.path.join(root, name)


def _compile():
    """Build the extension (torch's tooling: ninja and a C++ compiler) in a directory of this
    process's own, then move the library into place: processes that start together each build,
    and none ever loads a library another one is still writing.

    With OpenMP, as torch itself is built: the extension's parallel launches then run on the
    OpenMP runtime torch has loaded (its GOMP_* symbols are found there first), the threads
    torch's own ops run on.  A compiler without OpenMP gets a second try without it: that
    extension leaves its parallel launches to cpu._launch."""
    from torch.utils.cpp_extension import load

    name, build = _location()
    os.makedirs(build, exist_ok=True)
    for openmp in (["-fopenmp"], []):
        work = tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=build)
        try:
            load(name, [_SOURCE], build_directory=work, extra_cflags=["-O2", *openmp],
                 extra_ldflags=openmp, verbose=False)
            os.replace(os.path.join(work, name + ".so"), os.path.join(build, name + ".so"))
            return
        except Exception:
            if not openmp:
                raise
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _sync_limits(mod) -> None:
    from . import cpu

    mod.set_limits(cpu.PARALLEL_MIN_ELEMENTS, cpu._HUGE_MIN_ELEMENTS, cpu._MIN_BLOCK_ROWS,
                   cpu._MIN_BLOCK_ELEMENTS, cpu._MAX_BLOCKS, cpu._MIN_PAR_BLOCKS)


def register(mod, key, plan) -> None:
    """Hand the extension the serial drivers of one (x, γ, β) dtype plan, compiled or loaded
    from numba's cache as the Python path's first call would.  ``plan`` is cpu's
    [fwd markers, entry, bwd markers, param dtype]."""
    from . import cpu

    fwd_markers, bwd_markers, param = plan[0], plan[2], plan[3]
    fwd = _c_entry(cpu._fwd_serial, _FWD_TYPES, fwd_markers)
    bwd = _c_entry(cpu._bwd_serial, _BWD_TYPES, bwd_markers)
    stats = torch.float64 if key[0] == torch.float64 else torch.float32

    # The parallel launches the extension leaves to cpu._launch: all of them where it was
    # built without OpenMP, and those of a forked child (see _native.cpp).
    def par_fwd(*args):
        cpu._launch(cpu._fwd_serial, cpu._fwd_parallel, args[0] * args[1], args + fwd_markers,
                    fwd_markers)

    def par_bwd(*args):
        cpu._launch(cpu._bwd_serial, cpu._bwd_parallel, args[2] * args[4], args + bwd_markers,
                    bwd_markers)

    mod.register_plan(key[0], key[1], key[2], fwd, bwd, [m.itemsize for m in fwd_markers],
                      [m.itemsize for m in bwd_markers], par_fwd, par_bwd, param, stats)


def _c_entry(driver, argtypes, markers) -> int:
    """The address of the C entry point numba emits next to a compiled function, in the
    driver's own compiled library: it calls the very machine code the Python path's calls run.
    (The kernels carry no fast-math flag, so even a second compilation would give the same bits;
    this way there is no second compilation to pay for, nor to test.)

    Its parameters are the driver's, each dtype marker (a 1-D array) passed as the seven fields
    of numba's array structure; _native.cpp spells them out."""
    sig = (*argtypes, *(numba.typeof(m) for m in markers))
    driver.compile(sig)  # from numba's cache when it is there, as the Python path's first call
    cres = driver.overloads[sig]
    return cres.library.get_pointer_to_function(cres.fndesc.llvm_cfunc_wrapper_name)
