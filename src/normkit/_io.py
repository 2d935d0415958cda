"""Atomic file writes: a temp file in the target's directory, fsync, ``os.replace`` — a reader
sees the old file or the new one, never half of one (DESIGN: errors and safety).

Temp files are named ``.<target name>.<host>-<pid>.<random>.tmp`` (host: 8 hex digits of a hash
of the host name), so that what a killed writer left behind can be told from what a live one is
writing:

* SIGTERM during a write, where SIGTERM would kill the process anyway (its default action): a
  handler, installed only for the duration of the write and in the main thread only (Python
  runs signal handlers there alone), removes this process's temp files of the target, restores
  the default action and re-raises the signal, so the process still dies of SIGTERM.  Where the
  program has its own SIGTERM handler (or ignores SIGTERM), it is left alone: the write goes
  on, and if the handler raises, the write's own clean-up removes the temp file.
* Anything else (SIGKILL, power loss, a SIGTERM in another thread): the next write to the same
  target removes the temp files of that target whose writer is gone — this host's, whose
  process no longer exists — and any untouched for ``STALE_AGE_S`` (a process id can be reused;
  another host's process cannot be asked).  The temp file of a live writer of the same target
  (another process, another thread) is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["write_bytes_atomic", "write_text_atomic", "write_json_atomic", "temp_beside",
           "publish"]

# A temp file untouched this long is stale whoever made it: no normkit write pauses for a day
# (a study's telemetry temp file is appended to at every logged step).
STALE_AGE_S = 24 * 3600

_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
# What follows ".<target name>." in our temp files' names (mkstemp's random part: [a-z0-9_]).
_TEMP_TAIL = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)\.[a-z0-9_]+\.tmp")


def _alive(pid: int) -> bool:
    """Whether a process of this host with this id exists (signal 0 checks, sends nothing)."""
    if os.name != "posix":  # elsewhere os.kill(pid, 0) would terminate it: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _temps_of(path: Path) -> Iterator[tuple[Path, str, int]]:
    """(temp file, host tag, pid) of each of our temp files for ``path``."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        m = _TEMP_TAIL.fullmatch(name[len(prefix):]) if name.startswith(prefix) else None
        if m is not None:
            yield path.parent / name, m["host"], int(m["pid"])


def _unlink(p: Path) -> None:
    with contextlib.suppress(OSError):
        p.unlink()


def _remove_stale_temps(path: Path) -> None:
    now = time.time()
    for tmp, host, pid in _temps_of(path):
        try:
            stale = ((host == _HOST and not _alive(pid))
                     or now - tmp.stat().st_mtime > STALE_AGE_S)
        except OSError:  # removed meanwhile (its writer finished, or another clean-up)
            continue
        if stale:
            _unlink(tmp)


def temp_beside(path: str | os.PathLike) -> Path:
    """Creates an empty temp file in ``path``'s directory (created if missing) to write the
    next version of ``path`` into, then ``publish`` it; removes the temp files earlier writes
    to ``path`` left behind first (module docstring).  Returns the temp file's path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp",
                               dir=path.parent)
    os.close(fd)
    return Path(tmp)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Makes the finished temp file ``tmp`` (from ``temp_beside``) the file ``path``: fsync,
    mode 0644 (mkstemp makes 0600; normkit's files are meant to be shared), ``os.replace``."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return Path(path)


@contextlib.contextmanager
def _sigterm_removes_temps(path: Path) -> Iterator[None]:
    """While the block runs, a SIGTERM that would kill the process removes its temp files of
    ``path`` first (module docstring)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def on_sigterm(signum, frame):
        for tmp, host, pid in _temps_of(path):
            if host == _HOST and pid == os.getpid():
                _unlink(tmp)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating the parent directory.  Returns the path.

    Raises:
        OSError: the file cannot be written; its ``filename`` is ``path`` (not the temp file).
    """
    path = Path(path)
    try:
        with _sigterm_removes_temps(path):
            tmp = temp_beside(path)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                publish(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
    except OSError as e:
        if e.errno is None:  # not the system's error: nothing to re-attribute
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as UTF-8 to ``path`` atomically.  Returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, doc: Any) -> Path:
    """Write ``doc`` as strict JSON (NaN/Inf rejected: they are not JSON) atomically.  The text
    is made before the file is touched, so an unserialisable doc leaves the old file alone."""
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)
