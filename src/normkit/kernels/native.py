"""The native eager entry point: ``_native.cpp``, built on first use, around numba cfuncs.

At a few rows the op is all overhead: torch's LayerNorm takes ~4 µs at M=1 on the CI machine,
our Python argument checks and allocation ~5 µs, and a Python ``autograd.Function`` costs the
autograd engine ~15 µs per backward more than a C++ node.  ``_native.cpp`` does what
``cpu.infer`` and ``functional._FastNorm`` do for the same calls, in C++, and launches the same
compiled row drivers through numba ``cfunc``s, so it gives the same bits (tested).

It is built with torch's C++ extension tooling (a C++ compiler and ninja), once per machine
and torch version, into the user cache, by a child process that a background thread starts on
the first CPU call: until it is ready, or where it cannot be built, the Python path serves
every call, so nothing waits on a compiler.  ``wait()`` blocks until the build is over (the
benchmark and the tests use it).

Opt-in (``NORMKIT_NATIVE=1``) until one open problem is understood: the cfuncs are compiled
specializations of their own, and under pytest-xdist, right after a kernel edit (two processes
compiling into one numba cache at once), their backward bits differed from the Python path's
in some runs; every single-process run and every later run agreed.  Bit equality between the
paths is what batch invariance rests on, so it is not the default until that is explained.
"""

from __future__ import annotations

import functools
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

import torch
from numba import cfunc, types

log = logging.getLogger("normkit")

__all__ = ["start", "wait", "status", "calls"]

_SOURCE = os.path.join(os.path.dirname(__file__), "_native.cpp")

_module = None  # the loaded extension, once built and configured
_error: str | None = None  # why there is none
_thread: threading.Thread | None = None
_start_lock = threading.Lock()

_i64 = types.int64
# The serial drivers' signatures without their dtype markers (see cpu._fwd_serial/_bwd_serial):
# the same argument types the Python path passes, so the cfuncs run the same specializations.
_FWD_SIG = types.void(_i64, _i64, types.boolean, _i64, types.float64, *[_i64] * 9)
_BWD_SIG = types.void(_i64, _i64, _i64, types.boolean, *[_i64] * 11)


def enabled() -> bool:
    """Opt-in for now (``NORMKIT_NATIVE=1``): see the module docstring."""
    return os.environ.get("NORMKIT_NATIVE", "0") == "1"


def start() -> None:
    """Begin building/loading the extension in the background (once per process)."""
    global _thread, _error
    with _start_lock:
        if _thread is not None or _module is not None or _error is not None:
            return
        if not enabled():
            _error = "off (NORMKIT_NATIVE=1 turns it on)"
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
        if not (os.path.exists(so) and os.path.getmtime(so) >= os.path.getmtime(_SOURCE)):
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
    """(module name, build directory): one per torch version, in the user cache."""
    name = "normkit_native_" + re.sub(r"\W", "_", torch.__version__)
    root = os.environ.get("NORMKIT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "normkit")
    return name, os.path.join(root, name)


def _compile():
    """Build the extension (torch's tooling: ninja and a C++ compiler) in a directory of this
    process's own, then move the library into place: processes that start together each build,
    and none ever loads a library another one is still writing."""
    from torch.utils.cpp_extension import load

    name, build = _location()
    os.makedirs(build, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".build-{os.getpid()}-", dir=build)
    try:
        load(name, [_SOURCE], build_directory=work, extra_cflags=["-O2"], verbose=False)
        os.replace(os.path.join(work, name + ".so"), os.path.join(build, name + ".so"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sync_limits(mod) -> None:
    from . import cpu

    mod.set_limits(cpu.PARALLEL_MIN_ELEMENTS, cpu._HUGE_MIN_ELEMENTS, cpu._MIN_BLOCK_ROWS,
                   cpu._MIN_BLOCK_ELEMENTS, cpu._MAX_BLOCKS)


def register(mod, key, plan) -> None:
    """Compile (or load from numba's cache) the cfuncs of one (x, γ, β) dtype plan and hand them
    to the extension.  ``plan`` is cpu's [fwd markers, entry, bwd markers, param dtype]."""
    from . import cpu

    fwd_markers, bwd_markers, param = plan[0], plan[2], plan[3]
    fwd, bwd = _cfuncs(fwd_markers, bwd_markers)
    stats = torch.float64 if key[0] == torch.float64 else torch.float32

    def par_fwd(*args):
        cpu._launch(cpu._fwd_serial, cpu._fwd_parallel, args[0] * args[1], args + fwd_markers,
                    fwd_markers)

    def par_bwd(*args):
        cpu._launch(cpu._bwd_serial, cpu._bwd_parallel, args[0] * args[2], args + bwd_markers,
                    bwd_markers)

    mod.register_plan(key[0], key[1], key[2], fwd.address, bwd.address, par_fwd, par_bwd, param,
                      stats)
    _KEEP.append((fwd, bwd))


_KEEP: list = []  # the cfunc objects own their machine code: keep them for the process


def _cfuncs(fm, bm):
    """The serial forward/backward drivers for these markers, as C functions.

    numba's cache key for a cfunc is its own code plus its closure constants — not the code of
    the functions it calls, which it compiles in.  So the closure holds the markers (one cache
    entry per dtype plan) and a digest of cpu.py (an edited kernel must never be served from a
    cfunc compiled before the edit: the two paths would no longer give the same bits).
    """
    from . import cpu

    XK, OK, WK, NK, SK = fm
    BX, BO, BW, BN, BS, BG = bm
    fwd_serial, bwd_serial = cpu._fwd_serial, cpu._bwd_serial
    kernels = _kernels_digest()

    @cfunc(_FWD_SIG, cache=cpu._CACHE)
    def fwd(m, n, rms, flags, eps, xa, xrs, ra, rrs, ha, ya, wa, ba, sa):  # pragma: no cover
        kernels  # noqa: B018 - in the closure, hence in the cache key
        fwd_serial(m, n, rms, flags, eps, xa, xrs, ra, rrs, ha, ya, wa, ba, sa, XK, OK, WK, NK,
                   SK)

    @cfunc(_BWD_SIG, cache=cpu._CACHE)
    def bwd(m, nblk, n, rms, flags, xa, dya, dha, dxa, wa, sa, pwa, pba, dwa,
            dba):  # pragma: no cover
        kernels  # noqa: B018 - in the closure, hence in the cache key
        bwd_serial(m, nblk, n, rms, flags, xa, dya, dha, dxa, wa, sa, pwa, pba, dwa, dba, BX, BO,
                   BW, BN, BS, BG)

    return fwd, bwd


@functools.cache
def _kernels_digest() -> str:
    from . import cpu

    with open(cpu.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
