"""``NormkitCallback``: ``normkit.watch`` around a Hugging Face ``Trainer.train()``.

    trainer = Trainer(model=model, args=args, train_dataset=ds)
    NormkitCallback(exporters=[JsonlExporter("run.jsonl")], audit=True).install(trainer)
    trainer.train()

Importing this module imports transformers (``pip install "normkit[hf]"``); ``import normkit``
never imports it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._io import write_text_atomic
from ..audit import audit as run_audit
from ..convert import convert as run_convert
from ..monitor import watch

try:
    from transformers import TrainerCallback
except ImportError as e:  # only this module needs it; ``import normkit`` never imports it
    raise ImportError('normkit.integrations.hf needs transformers (and accelerate, for the '
                      'Trainer): pip install "normkit[hf]"') from e

__all__ = ["NormkitCallback", "LOG_STATS"]

log = logging.getLogger(__name__)

# The per-layer statistics of ``Watch.summary()`` put into the Trainer's logs, as
# ``normkit/<layer>/<stat>`` (the exporters carry every statistic; a log line stays readable).
LOG_STATS = ("input_std", "input_rms", "output_std", "grad_input_norm", "weight_grad_norm",
             "nonfinite_rows", "grad_nonfinite_rows")


def _plain_optimizer(opt):
    """The torch optimizer inside the Trainer's (accelerate's ``AcceleratedOptimizer`` keeps it
    as ``.optimizer`` and has no step hooks of its own)."""
    while opt is not None and "_optimizer_step_post_hooks" not in vars(opt) \
            and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


class NormkitCallback(TrainerCallback):
    """Watches a ``Trainer.train()``: a ``normkit.watch`` from ``on_train_begin`` to the
    end of training that counts a step per optimizer step (``watch(step="optimizer")``;
    with gradient accumulation, the micro-batches of one optimizer step are one step, and
    the step numbers are the Trainer's ``global_step``), and its summary in the Trainer's
    logs, so the reporters the Trainer uses (TensorBoard, MLflow, W&B, the console) get it.

    Keys added to every log (``on_log``): ``normkit/steps`` (steps watched),
    ``normkit/nonfinite_events``, ``normkit/alerts``, ``normkit/off`` (detectors off), and
    per layer ``normkit/<layer>/<stat>`` for ``LOG_STATS`` (over the run so far).  With
    ``audit``: ``normkit/audit_ok`` (1.0 when no finding is an error), ``normkit/audit_errors``
    and ``normkit/audit_warnings``, in the Trainer's last log (its ``train_runtime`` one),
    the audit itself in ``<output_dir>/normkit-audit.json``, handed to every exporter with a
    ``log_artifact`` (``MlflowExporter`` uploads it to its run).  The watch stops before the
    audit (which copies the model).  ``Trainer.state.log_history`` gets the same keys.

    One callback watches one ``train()`` (its exporters are closed at the end).  Add it with
    ``install(trainer)``: the Trainer calls callbacks in list order and puts its
    reporters first, so a callback added with ``callbacks=[...]`` or ``add_callback`` would
    add its keys after they have logged.

    Args:
        model_name, model_version: the watch's labels; default the model's class name and
            the Trainer's ``run_name`` (else "train").
        exporters: the watch's exporters (closed at the end of training).
        every: sample every k-th optimizer step (see ``normkit.watch``).
        convert: ``normkit.convert`` the model in place before training (its parameters stay
            the same objects, so the Trainer's optimizer keeps working).
        audit: False; True: ``normkit.audit`` the final model; a dict: also the keyword
            arguments for it (e.g. ``{"checks": ["inventory", "epsilon"]}``).
        watch_kwargs: further ``normkit.watch`` arguments (baseline, alerts, ...).

    Attributes:
        watch: the ``Watch`` (None before training).
        audit_report: the ``AuditReport`` (None without ``audit``).
    """

    def __init__(self, *, model_name: str | None = None, model_version: str | None = None,
                 exporters: Iterable = (), every: int | float = 1, convert: bool = False,
                 audit: bool | dict[str, Any] = False,
                 watch_kwargs: dict[str, Any] | None = None):
        if not isinstance(audit, (bool, dict)):
            raise TypeError(f"audit must be True, False or a dict of normkit.audit "
                            f"arguments, got {type(audit).__name__}")
        kw = dict(watch_kwargs or {})
        taken = {"model_name", "model_version", "exporters", "every", "step",
                 "optimizer"} & set(kw)
        if taken:
            raise ValueError(f"watch_kwargs must not set {sorted(taken)}: they are "
                             f"NormkitCallback's own arguments or its step semantics")
        self.model_name, self.model_version = model_name, model_version
        self.exporters = list(exporters)
        self.every = every
        self.convert = bool(convert)
        self.audit = audit
        self.watch_kwargs = kw
        self.watch = None
        self.audit_report = None
        self._ended = False

    def install(self, trainer) -> NormkitCallback:
        """Puts this callback first in ``trainer``'s callbacks, before its reporters;
        returns it."""
        cbs = trainer.callback_handler.callbacks
        if self in cbs:
            cbs.remove(self)
        cbs.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("NormkitCallback: the Trainer passed no model to "
                             "on_train_begin")
        if self.convert and run_convert(model) is not model:
            raise ValueError("NormkitCallback(convert=True): the model itself is a norm "
                             "layer; convert it before building the Trainer")
        name = self.model_name or type(model).__name__
        version = self.model_version or getattr(args, "run_name", None) or "train"
        self._ended = False
        self.watch = watch(model, model_name=name, model_version=str(version),
                           exporters=self.exporters, every=self.every, step="optimizer",
                           optimizer=_plain_optimizer(optimizer), **self.watch_kwargs)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self.watch is None or self._ended or logs is None:
            return  # (after training: an evaluate() log is not the watch's)
        extra = self._summary()
        if "train_runtime" in logs:  # the Trainer's last log, right before on_train_end
            extra.update(self._end(args, model))
        logs.update(extra)
        entry = state.log_history[-1] if state.log_history else None
        if entry is not None and entry.get("step") == state.global_step:
            entry.update(extra)  # the Trainer's copy of this very log

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.watch is None or self._ended:
            return
        extra = {**self._summary(), **self._end(args, model)}
        state.log_history.append({**extra, "step": state.global_step})

    def _summary(self) -> dict[str, float]:
        w = self.watch
        out = {"normkit/steps": float(w.steps),
               "normkit/nonfinite_events": float(len(w.nonfinite_events)),
               "normkit/alerts": float(len(w.alerts)), "normkit/off": float(len(w.off))}
        for layer, s in w.summary().items():
            for k in LOG_STATS:
                v = s.get(k)
                if v is not None:
                    out[f"normkit/{layer}/{k}"] = float(v)
        return out

    def _end(self, args, model) -> dict[str, float]:
        """The end of training: the watch stops (its hooks off the model, which the audit
        copies), then the audit, whose file goes to the exporters that take artifacts."""
        self._ended = True
        self.watch.stop()
        if self.audit is False or model is None:
            return {}
        try:
            return self._audit(args, model)
        except Exception:  # the training is done: a failing audit must not fail it
            log.exception("normkit audit of the trained model failed; no verdict is logged")
            return {}

    def _audit(self, args, model) -> dict[str, float]:
        kw = self.audit if isinstance(self.audit, dict) else {}
        report = self.audit_report = run_audit(model, **kw)
        path = Path(getattr(args, "output_dir", None) or ".") / "normkit-audit.json"
        write_text_atomic(path, json.dumps(report.to_dict(), indent=2))
        for e in self.exporters:
            if callable(getattr(e, "log_artifact", None)):
                try:
                    e.log_artifact(path)
                except Exception:
                    log.exception("%s could not take %s; the verdict is still logged",
                                  type(e).__name__, path)
        counts = report.counts()
        log.info("normkit audit of the trained model: %s (%s)",
                 "ok" if report.ok() else "errors", os.fspath(path))
        return {"normkit/audit_ok": float(report.ok()),
                "normkit/audit_errors": float(counts.get("error", 0)),
                "normkit/audit_warnings": float(counts.get("warning", 0))}
