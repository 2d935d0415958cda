"""A stand-in for ``normkit.watch``: per-layer norm-input statistics and gradient norms, written
as schema-versioned JSONL records, one run per file.

THIS IS THE TELEMETRY SWAP POINT.  Until ``normkit.watch`` and
``normkit.monitor.JsonlExporter`` exist, the study records its runs through :class:`Probe`;
afterwards, :func:`open_probe` becomes::

    normkit.watch(model, exporters=[JsonlExporter(path)])

and nothing else in the study changes: the trainer only calls ``probe.step(...)`` and
``probe.close()``, and the plots read :func:`read_records` (whose record layout is the part the
exporter must match, or :func:`read_records` must translate).

Records (one JSON object per line, every record carries ``schema`` and ``run``):

* ``{"kind": "layer", "step", "layer", "type", "mean", "var", "absmax", "nonfinite"}`` — the
  statistics of the *input* of one norm layer (what the norm normalizes), over all its
  elements, on the logged step's forward pass;
* ``{"kind": "step", "step", "loss", "grad_norm", "lr", "step_time_s"}``;
* ``{"kind": "run", ...}`` once at the start: the run's configuration.

Only aggregates are recorded, never activations (DESIGN: telemetry carries no raw data).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["PROBE_SCHEMA", "Probe", "open_probe", "read_records"]

PROBE_SCHEMA = "normkit.study.probe/1"


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


class Probe:
    """Hooks the norm layers of ``model`` and writes per-step JSONL records to ``path``.

    Layer statistics cost a reduction over each norm input, so they are taken only on steps
    where :meth:`want` is true (every ``every`` steps, and the first step); the hooks do
    nothing on the other steps.  The file appears atomically on :meth:`close` (written to a
    temp file beside it, then renamed), so a reader never sees half a run.

    Args:
        model: the model to watch.
        path: the JSONL file to write.
        run: the run's id, stamped on every record.
        norm_types: module types whose inputs are recorded.
        every: record layer statistics every this many steps.
        config: the run's configuration, written in the first record.
    """

    def __init__(self, model: torch.nn.Module, path: str | os.PathLike, run: str,
                 norm_types: tuple[type, ...], every: int = 10, config: dict | None = None):
        self.path = Path(path)
        self.run = run
        self.every = max(1, int(every))
        self._active = False
        self._pending: list[dict[str, Any]] = []
        self._handles = []
        for name, module in model.named_modules():
            if isinstance(module, norm_types):
                self._handles.append(module.register_forward_pre_hook(self._hook(name, module)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                         dir=self.path.parent)
        self._file = os.fdopen(fd, "w", encoding="utf-8")
        self._write({"kind": "run", "config": config or {}})

    def _write(self, record: dict[str, Any]) -> None:
        record = {"schema": PROBE_SCHEMA, "run": self.run, **record}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")

    def _hook(self, name: str, module: torch.nn.Module):
        kind = type(module).__name__

        def hook(_module, args):
            if not self._active:
                return
            x = args[0].detach()
            xf = x.double()  # one reduction pass in float64: the stats, not the model's bits
            finite = torch.isfinite(xf)
            n_bad = int((~finite).sum())
            xf = torch.where(finite, xf, torch.zeros_like(xf))
            self._pending.append({
                "kind": "layer", "layer": name, "type": kind,
                "mean": _finite_or_none(float(xf.mean())),
                "var": _finite_or_none(float(xf.var(unbiased=False))),
                "absmax": _finite_or_none(float(xf.abs().max())) if xf.numel() else 0.0,
                "nonfinite": n_bad,
            })

        return hook

    def want(self, step: int) -> bool:
        """Whether ``step`` records layer statistics."""
        return step == 1 or step % self.every == 0

    def begin(self, step: int) -> None:
        """Call before the step's forward pass: arms the hooks when the step is recorded."""
        self._active = self.want(step)
        self._pending.clear()

    def step(self, step: int, loss: float, grad_norm: float, lr: float,
             step_time_s: float) -> None:
        """Call after the step's backward pass: writes the step record and the layer records
        collected during its forward pass."""
        for rec in self._pending:
            self._write({**rec, "step": step})
        self._pending.clear()
        self._active = False
        self._write({"kind": "step", "step": step, "loss": _finite_or_none(loss),
                     "grad_norm": _finite_or_none(grad_norm), "lr": lr,
                     "step_time_s": step_time_s})

    def close(self) -> Path:
        """Remove the hooks and publish the file (atomic rename).  Returns its path."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.chmod(self._tmp, 0o644)
            os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Remove the hooks and drop the partial file."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self._tmp)
        except OSError:
            pass

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def open_probe(model: torch.nn.Module, path: str | os.PathLike, run: str, every: int,
               config: dict) -> Probe:
    """The one place the study attaches telemetry to a model (see the module docstring)."""
    from .models import NORM_TYPES

    return Probe(model, path, run, NORM_TYPES, every=every, config=config)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one run's JSONL file; raises ValueError on an unknown schema."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("schema") != PROBE_SCHEMA:
                raise ValueError(f"{path}:{i}: schema {rec.get('schema')!r}, "
                                 f"expected {PROBE_SCHEMA!r}")
            out.append(rec)
    return out
