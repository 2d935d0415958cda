"""The JSONL exporter: one JSON line per sampled step, records of the ``normkit.monitor`` schema
(every field, and how a reader treats torn lines: the docstring of ``normkit.monitor._schema``,
whose ``read_jsonl`` reads them back)."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..._provenance import normkit_version
from .._schema import RECORD_SCHEMA, RECORD_SCHEMA_VERSION

__all__ = ["JsonlExporter"]

log = logging.getLogger(__name__)


class JsonlExporter:
    """Appends one JSON line per sampled step to ``path`` (schema: ``normkit.monitor._schema``).

    Args:
        path: the file (parent directories created).  An existing file is appended to, from a
            fresh line if its last one was torn (a writer killed mid-line); a header line is
            written when the file is new or empty.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        if self._f.tell() == 0:
            self._write({"type": "header", "schema": RECORD_SCHEMA,
                         "schema_version": RECORD_SCHEMA_VERSION, "created_unix": time.time(),
                         "normkit_version": normkit_version()})
        elif not self._ends_with_newline():
            log.warning("%s does not end with a newline (a writer stopped mid-line); appending "
                        "from a fresh line (readers skip a torn line)", self.path)
            self._f.write("\n")
            self._f.flush()

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _write(self, obj: dict) -> None:
        # One write per line: a crash leaves at most one torn last line, which readers skip.
        try:
            line = json.dumps(obj, separators=(",", ":"), allow_nan=False)
        except ValueError:  # a NaN/Inf slipped into a derived value: JSON has no such numbers
            line = json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False)
        self._f.write(line + "\n")
        self._f.flush()

    def export(self, record: dict) -> None:
        if self._f is None:
            raise ValueError(f"JsonlExporter({self.path}) is closed")
        self._write(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _finite(obj):
    """``obj`` with non-finite floats replaced by None."""
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
