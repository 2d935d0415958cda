"""Where a result came from: normkit's version, the machine, the checkout — in one place.

``__version__`` is the version of this code (``pyproject.toml`` reads it from here, so the
installed distribution and the code agree); ``normkit_version()`` is what records, reports,
metrics and result files carry.  The benchmark, the study, the audit and ``normkit --version``
describe their run with the functions below.

Imports nothing of normkit, and nothing heavy at import: torch and numpy are imported by the
functions that describe them, so every layer may ask (``normkit --help`` imports this without
torch).  No description carries the hostname, on purpose.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = [
    "__version__",
    "normkit_version",
    "dist_version",
    "versions",
    "usable_cores",
    "machine_info",
    "machine_summary",
    "find_repo_root",
    "git_commit",
]

__version__ = "0.1.0"


def normkit_version() -> str:
    """The version of the normkit code that is running (not of whatever distribution pip
    installed under that name: a checkout on ``PYTHONPATH`` reports its own)."""
    return __version__


def dist_version(dist: str) -> str | None:
    """The installed version of the distribution ``dist``, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str]:
    """normkit's, torch's and Python's versions."""
    import torch

    return {"normkit": normkit_version(), "torch": torch.__version__,
            "python": sys.version.split()[0]}


def usable_cores() -> int:
    """The cores this process may run on (its affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _read(path: str | os.PathLike) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cpuinfo() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": []}
    text = _read("/proc/cpuinfo")
    if text:
        for line in text.splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and val.strip():
                info["model"] = val.strip()
            elif key == "flags":
                have = set(val.split())
                info["flags"] = [f for f in ("avx", "avx2", "fma", "f16c", "avx512f",
                                             "avx512bw", "avx512_bf16", "avx512_fp16",
                                             "amx_bf16") if f in have]
                break
    return info


def find_repo_root(start: str | os.PathLike | None = None) -> Path | None:
    """The normkit checkout containing ``start`` (default: cwd), or None."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        pyproject = d / "pyproject.toml"
        if pyproject.is_file() and (d / "benchmarks").is_dir():
            text = _read(pyproject) or ""
            if 'name = "normkit"' in text:
                return d
    return None


def git_commit(root: Path | None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout at ``root``, or None (no checkout, no git)."""
    if root is None or not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        # --no-optional-locks: a plain `git status` may rewrite the index; a benchmark must not.
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status",
                                "--porcelain"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return {
        "commit": head.stdout.strip() or None,
        "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
    }


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare two benchmark result files: CPU, cores, memory, library
    versions, threads, OS, the normkit checkout."""
    import numpy
    import torch

    meminfo = _read("/proc/meminfo") or ""
    mem_gb = None
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            mem_gb = round(int(line.split()[1]) / 2**20, 1)
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:
        capability = None
    env_keys = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                "MKL_NUM_THREADS", "NORMKIT_CPU_ISA", "NORMKIT_STREAM_MIN_MB",
                "NORMKIT_CPU_POOL_MB", "THP_MEM_ALLOC_ENABLE",
                "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD")
    cuda = None
    if torch.cuda.is_available():
        cuda = {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return {
        "cpu": _cpuinfo(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gb": mem_gb,
        "transparent_hugepage": thp.strip() if thp else None,
        "os": {"system": platform.system(), "release": platform.release(),
               "platform": platform.platform()},
        "python": {"version": platform.python_version(),
                   "implementation": platform.python_implementation()},
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads(),
                  "interop_threads": torch.get_num_interop_threads(),
                  "cpu_capability": capability},
        "cuda": cuda,
        "numpy": numpy.__version__,
        "onnxruntime": dist_version("onnxruntime"),
        "normkit": {"version": normkit_version(), "git": git_commit(find_repo_root())},
        "env": {k: os.environ[k] for k in env_keys if k in os.environ},
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def machine_summary(torch_threads: int) -> dict[str, Any]:
    """The short description the study records at its start and end: platform, processor,
    cores, the threads torch was given, and the load average (a busy machine explains a slow
    run)."""
    load = None
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        pass
    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "torch_threads": torch_threads, "loadavg": load}
