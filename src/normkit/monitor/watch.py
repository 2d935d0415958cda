"""``normkit.watch``: instrument every norm layer of a model, find where NaN/Inf start.

How it works, per step — one call of the root module's ``forward`` (``step="forward"``), or
every forward call up to the caller's ``Watch.step()`` (``"manual"``) or to the next
``optimizer.step()`` (``"optimizer"``, through torch's optimizer step hooks):

* The root module's forward pre-hook starts a step and decides whether it is *sampled*
  (``every=k``: every k-th step; ``every=0.01``: 1% of steps, seeded).  Unsampled steps cost two
  Python hook calls and one finiteness check of the root output; a non-finite root output on an
  unsampled step forces the next step to be sampled, so a persisting NaN gets its origin found.
  Further forward calls of a step (gradient accumulation) add to its statistics.
* On sampled steps the watch is *armed* and hunts the **origin** of NaN/Inf: the first module,
  in execution order, whose output (in backward: input gradient) is non-finite while its inputs
  (output gradients) are finite; the modules that pass it on are *propagators*.  How it does
  that cheaply, forward and backward, is the docstring of ``normkit.monitor._hunt``.
* Norm layers: input row statistics — for normkit layers the (mean, rstd) the kernel already
  computed, through ``_dispatch._set_stats_sink`` (no extra pass); for torch / Hugging Face
  norms a mean and a centred norm per row (two passes) — output mean/std, ‖γ‖/‖β‖ and their
  change since the previous sampled step, gradient norms of input and parameters, non-finite
  row counts, forward wall time (CPU wall time; on CUDA it is launch time — no synchronisation
  is added).
* The step record is completed at the next step's start (``"forward"``: backward has run by
  then), at the step's end (``Watch.step()``, ``optimizer.step()``) or at ``stop()``/``flush()``,
  merged into the totals and a sliding window, checked against the baseline and the alert
  rules, and handed to the exporters on a background thread.

Cost (``benchmarks/watch_overhead.py``, 6-block transformer training step on one CPU thread):
see the latest ``benchmarks/results/watch-overhead-*.json``.
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterable

import torch

from .. import _dispatch as _F
from ._export import _Exports
from ._hunt import (
    _check_recorded_calls,
    _first_tensor,
    _Hunting,
    _nonfinite,
    _remember,
    _resolve_step,
    _safe,
    _seen,
    _tensors,
    _vnorm,
)
from ._judge import _Judging
from ._norms import _affine, _row_stats, find_norms
from ._schema import RECORD_SCHEMA, RECORD_SCHEMA_VERSION
from ._stats import LayerStats, add_rows_many
from .alerts import Alert, AlertRules
from .drift import Baseline, DriftThresholds

__all__ = ["watch", "Watch", "find_norms", "STEPS", "RECORD_SCHEMA", "RECORD_SCHEMA_VERSION"]

# What a watch counts as a step (``watch(step=...)``).
STEPS = ("forward", "manual", "optimizer")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The watch
# ----------------------------------------------------------------------------------------------


class _Step:
    """What one sampled step collected so far."""

    __slots__ = ("number", "time", "layers", "fwd", "bwd", "t0", "shape", "latency", "rows",
                 "root_grad_bad", "lazy", "calls", "suspect", "hunt", "bw_end_queued",
                 "param_grad_bad")

    def __init__(self, number: int, lazy: bool = False, hunt: bool = True):
        self.number = number
        self.time = time.time()
        self.layers: dict[str, LayerStats] = {}
        self.fwd: list[tuple[str, bool, int]] = []  # (module, inputs finite, bad output values)
        self.bwd: list[tuple[str, bool, int]] = []  # (module, output grads finite, bad in-grads)
        self.t0: dict[int, list[float]] = {}
        self.shape: tuple[int | None, int | None] = (None, None)
        self.latency: dict[str, list[float]] = {}
        self.rows: list[tuple[LayerStats, torch.Tensor | None, torch.Tensor]] = []
        self.root_grad_bad: bool | None = None  # the gradient arriving at the model's output
        # Lazy forward hunt (steps with autograd on): module calls in hook order, as (name,
        # inputs, outputs), checked only if the forward turned out to produce a non-finite value.
        self.lazy = lazy
        self.calls: list[tuple] = []  # or (name, clean_in, bad) for a call checked at once
        self.suspect = False  # a norm layer saw a non-finite input or produced one
        self.hunt = hunt  # every leaf module's backward hooked (else: norm layers only)
        self.bw_end_queued = False
        self.param_grad_bad: str | None = None  # see Watch._backward_end


class Watch(_Hunting, _Judging):
    """The object ``normkit.watch`` returns; see ``watch`` for the arguments.

    Attributes:
        nonfinite_origin: qualified name of the module where the first non-finite value seen
            was produced ("<input>" if the model's input already had it, "<loss>" if the
            gradient arriving at the model did), or None.  A provisional placement (see
            ``backward_hunt``) stands until a hunting step resolves one.
        nonfinite_events: one dict per sampled step and pass with non-finite values:
            ``{"step", "pass", "origin", "origin_values", "origins", "propagators", "modules",
            "resolved"}``.
        drift_results: the latest {layer: DriftResult} against the baseline.
        layer_names: the watched norm layers, in registration order.
        step_by: what a step is: "forward", "manual" or "optimizer" (``watch(step=...)``).
        off: what is effectively off, and why (see the property).
    """

    def __init__(self, model: torch.nn.Module, *, model_name: str, model_version: str,
                 every: int | float = 1, exporters: Iterable = (),
                 baseline: Baseline | None = None, alerts: AlertRules | None = None,
                 reduce: str | None = None, thresholds: DriftThresholds | None = None,
                 window: int = 50, drift_every: int = 10, backward: bool = True, seed: int = 0,
                 background_export: bool = True, backward_hunt: str = "on_detect",
                 step: str = "forward", optimizer: torch.optim.Optimizer | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not model_name or not model_version:
            raise ValueError("model_name and model_version must be non-empty strings")
        if isinstance(every, bool) or not isinstance(every, (int, float)):
            raise TypeError(f"every must be an int >= 1 or a fraction in (0, 1], got {every!r}")
        if isinstance(every, float) and not (0 < every <= 1):
            raise ValueError(f"every as a fraction must be in (0, 1], got {every!r}")
        if isinstance(every, int) and every < 1:
            raise ValueError(f"every must be >= 1, got {every!r}")
        if reduce not in (None, "all"):
            raise ValueError(f"reduce must be None or 'all', got {reduce!r}")
        if window < 1 or drift_every < 1:
            raise ValueError("window and drift_every must be >= 1")
        if backward_hunt not in ("on_detect", "always"):
            raise ValueError(f"backward_hunt must be 'on_detect' or 'always', got "
                             f"{backward_hunt!r}")
        if not isinstance(step, str) or step not in STEPS:
            raise ValueError(f"step must be 'forward', 'manual' or 'optimizer', got {step!r}")
        if optimizer is not None and step != "optimizer":
            raise ValueError(f"optimizer= is for step='optimizer' (the watch counts a step per "
                             f"optimizer.step()); got step={step!r}")
        self.backward_hunt = backward_hunt
        self.step_by = step
        self.model = model
        self.model_name = str(model_name)
        self.model_version = str(model_version)
        self.every = every
        self.exporters = list(exporters)
        self.baseline_ref = baseline
        self.rules = alerts if alerts is not None else AlertRules()
        self.reduce = reduce
        self.thresholds = thresholds or DriftThresholds()
        self.window = window
        self.drift_every = drift_every
        self.backward = backward
        self._rng = random.Random(seed)

        self._norms = find_norms(model)
        self.layer_names = [n for n, *_ in self._norms]
        self._norm_of = {id(m): (n, kind, how, nd) for n, m, kind, how, nd, _ in self._norms}
        self._kinds = {n: (kind, info.kind) for n, _m, kind, _how, _nd, info in self._norms}
        self._module_names = {id(m): n for n, m in model.named_modules()}
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._rank, self._world = 0, 1
        self._dist = False
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._dist = True
            self._rank = torch.distributed.get_rank()
            self._world = torch.distributed.get_world_size()
        self.rank_label = "all" if (reduce == "all" and self._dist) else str(self._rank)

        self.nonfinite_origin: str | None = None
        self.nonfinite_events: list[dict] = []
        self.drift_results: dict = {}
        self._unjudged: set[str] = set()  # layers whose unjudgeable drift was logged
        self._drift_failure_said = False
        self.records = 0
        self._totals: dict[str, LayerStats] = {}
        self._win: deque[dict[str, LayerStats]] = deque(maxlen=window)
        self._prev_params: dict[tuple[str, str], torch.Tensor] = {}
        self._steps = 0
        self._open = False  # a step has begun (its first forward ran) and not ended
        self._sampled_steps = 0
        self._force = False
        self._cur: _Step | None = None
        self._cur_norm: str | None = None
        self._pending = None
        self._in_root = False
        self._sink_prev = None
        self._sink_set = False
        self._root_handles: list = []
        self._armed_handles: list = []
        self._hunt_next = False
        self._deferred: list[tuple[int, str, dict]] = []
        self._origin_resolved = False
        # What is effectively off: {what: (the layer it concerns, or None for all; why)}.
        # Written from the step thread and the export thread.
        self._off: dict[str, tuple[str | None, str]] = {}
        self._off_lock = threading.Lock()
        self._new_alerts: list[Alert] = []
        self._running = False
        self.background_export = background_export
        self._exports = _Exports(self.exporters, self._switch_off, self._switch_on)
        self._optimizer = None
        self._optimizer_hook = None
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # -- public --------------------------------------------------------------------------------

    @property
    def alerts(self) -> list[Alert]:
        """Every alert opened so far (deduplicated; see ``AlertRules``)."""
        return self.rules.alerts

    def start(self) -> Watch:
        """Installs the root hooks (idempotent); returns self."""
        if self._running:
            return self
        self._exports.start(self.background_export)
        self._root_handles = [
            self.model.register_forward_pre_hook(self._root_pre),
            self.model.register_forward_hook(self._root_post, always_call=True),
        ]
        self._running = True
        self._hook_optimizer()
        return self

    def step(self) -> None:
        """Ends the current step (``step="manual"``): the forward calls since the previous
        ``step()`` — however many, none included — are one step, whose record is completed now
        (call it after the backward).

        Raises:
            RuntimeError: the watch counts steps otherwise, or it is stopped.
        """
        if self.step_by != "manual":
            per = "root forward call" if self.step_by == "forward" else "optimizer.step()"
            raise RuntimeError(f"w.step() is for step='manual'; this watch counts a step per "
                               f"{per} (step={self.step_by!r})")
        if not self._running:
            raise RuntimeError("w.step() on a stopped watch")
        self._end_step()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Counts a step per ``optimizer.step()`` (``step="optimizer"``), through torch's
        ``register_step_post_hook``; the hook is removed at ``stop()``.  Attaching the same
        optimizer again changes nothing.

        Raises:
            ValueError: the watch counts steps otherwise, or another optimizer is attached (a
                watch counts the steps of one optimizer; call ``w.step()`` with
                ``step="manual"`` for several).
            TypeError: ``optimizer`` has no ``register_step_post_hook``.
        """
        if self.step_by != "optimizer":
            raise ValueError(f"attach_optimizer is for step='optimizer'; this watch has "
                             f"step={self.step_by!r}")
        if not callable(getattr(optimizer, "register_step_post_hook", None)):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (with "
                            f"register_step_post_hook), got {type(optimizer).__name__}")
        if optimizer is self._optimizer:
            return
        if self._optimizer is not None:
            raise ValueError("this watch already counts the steps of one optimizer; a watch "
                             "counts one optimizer's steps (for several, use step='manual' and "
                             "call w.step())")
        self._optimizer = optimizer
        self._switch_on("steps")
        if self._running:
            self._hook_optimizer()

    def _hook_optimizer(self) -> None:
        if self._optimizer is not None and self._optimizer_hook is None:
            self._optimizer_hook = self._optimizer.register_step_post_hook(self._optimizer_step)

    @_safe
    def _optimizer_step(self, optimizer, args, kwargs) -> None:
        self._end_step()

    def stop(self) -> None:
        """Completes the open step, removes every hook and closes the exporters (idempotent)."""
        if not self._running:
            return
        self.flush()
        sampling = self._sampling_off()
        if sampling is not None:
            self._switch_off("sampling", None, sampling)
        deferred, self._deferred = self._deferred, []
        for number, pname, res in deferred:  # no step came to hunt: alert as placed
            self._alert(pname, number, res, [])
        self._disarm()
        for h in self._root_handles:
            h.remove()
        self._root_handles = []
        if self._optimizer_hook is not None:
            self._optimizer_hook.remove()
            self._optimizer_hook = None
        self._unset_sink()
        self._running = False
        self._exports.close()

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def flush(self) -> None:
        """Completes the open sampled step now (normally done when the step ends); with
        ``step="manual"``/``"optimizer"`` the rest of that step is then not recorded."""
        if self._cur is not None:
            cur, self._cur = self._cur, None
            self._finish(cur)
        self._exports.drain()

    def emit(self, record: dict) -> None:
        """Hands ``record`` — one of another type than the watch's own "step" records, such as
        ``normkit.guard``'s "guard" records (schema: ``normkit.monitor._schema``) — to this
        watch's exporters, after the records already handed over (on the export thread when
        ``background_export``).

        Raises:
            RuntimeError: the watch is not running (its exporters are closed).
        """
        if not self._running:
            raise RuntimeError(f"the watch of {self.model_name} {self.model_version} is not "
                               "running")
        self._exports.submit(lambda: record, self._steps)

    @property
    def steps(self) -> int:
        """Steps counted so far, sampled or not (what a step is: ``step=``)."""
        return self._steps

    @property
    def dropped_records(self) -> int:
        """Records the background exporter thread had to drop (queue full)."""
        return self._exports.dropped

    def summary(self) -> dict[str, dict]:
        """Per-layer summaries over everything seen since start, as plain data: every watched
        layer (``steps`` 0 if never sampled) with ``LayerStats.summary``'s fields, plus ``off``:
        {what: why} for each detector that is effectively off for that layer — its backward
        statistics, an exporter, the sampling (see ``Watch.off``)."""
        off = self._off_entries()
        out = {}
        for name in self.layer_names:
            s = self._totals.get(name)
            d = (s if s is not None else self._new_stats(name)).summary()
            d["off"] = {what: why for what, (layer, why) in off.items() if layer in (None, name)}
            out[name] = d
        return out

    @property
    def off(self) -> dict[str, str]:
        """What is effectively off, and why, as {what: why}; empty when everything works.

        * ``"backward of <module>"``: that module's backward cannot be observed (a norm that
          returns its input modified in place; a graph reaching far beyond the call; hooks
          refused) — a norm layer keeps its forward statistics.
        * ``"exporter <i> (<class>)"``: the i-th exporter is disabled (``enabled`` False), its
          ``start()`` raised, or its last ``export`` raised; no record reaches it.
        * ``"sampling"``: ``every`` sampled at most one of the (two or more) steps run — e.g.
          ``every`` larger than the run — so statistics, drift and NaN/Inf origins cover
          hardly anything.

        Each is logged once, as a warning, when found (sampling: at ``stop()``; a failing
        ``export`` is the error already logged for it).
        """
        return {what: why for what, (_layer, why) in self._off_entries().items()}

    def _off_entries(self) -> dict[str, tuple[str | None, str]]:
        """``off`` with the layer each entry concerns (None: every layer)."""
        with self._off_lock:
            out = dict(self._off)
        sampling = self._sampling_off()
        if sampling is not None:
            out["sampling"] = (None, sampling)
        return out

    def _sampling_off(self) -> str | None:
        if self._steps < 2 or self._sampled_steps > 1:
            return None
        covered = "step 1 only" if self._sampled_steps else "no step"
        return (f"every={self.every!r} sampled {self._sampled_steps} of the {self._steps} steps "
                f"run: statistics, drift and NaN/Inf origins cover {covered}")

    def _switch_off(self, what: str, layer: str | None, why: str, warn: bool = True) -> None:
        """Records that ``what`` is effectively off (see ``off``); logs it once."""
        with self._off_lock:
            if what in self._off:
                return
            self._off[what] = (layer, why)
        if warn:
            log.warning("normkit watch of %s %s: %s is off: %s", self.model_name,
                        self.model_version, what, why)

    def _switch_on(self, what: str) -> None:
        """``what`` works again (an exporter whose export raised)."""
        if what in self._off:
            with self._off_lock:
                self._off.pop(what, None)

    # -- step lifecycle ------------------------------------------------------------------------

    def _sample_now(self) -> bool:
        if self._force:
            self._force = False
            return True
        if isinstance(self.every, float):
            return self._rng.random() < self.every
        return (self._steps - 1) % self.every == 0

    @_safe
    def _root_pre(self, module, args):
        if self._in_root:  # the root called re-entrantly: one step
            return
        self._in_root = True
        _seen.clear()
        if self.step_by == "forward" or not self._open:
            self._begin_step()
        elif self._cur is not None:  # a further forward of a sampled step (accumulation)
            self._set_sink()

    def _begin_step(self) -> None:
        if self._cur is not None:  # step="forward": the previous step ends here
            cur, self._cur = self._cur, None
            self._finish(cur)
        if self.step_by == "optimizer" and self._optimizer is None:
            self._switch_off("steps", None, "step='optimizer' but no optimizer is attached "
                                            "(pass optimizer= or call w.attach_optimizer(opt)): "
                                            "every forward call so far is one step")
        self._steps += 1
        self._open = True
        if self._sample_now():
            self._sampled_steps += 1
            hunt = self.backward_hunt == "always" or self._hunt_next
            self._hunt_next = False
            self._cur = _Step(self._steps, lazy=torch.is_grad_enabled(), hunt=hunt)
            self._arm()
            self._param_snapshot(self._cur)
            self._set_sink()
        elif self._armed_handles:
            self._disarm()

    def _end_step(self) -> None:
        """The end of a step (``step="manual"``/``"optimizer"``): its record is completed."""
        if not self._open:
            self._steps += 1  # a step without a forward call: counted, nothing to record
        self._open = False
        if self._cur is not None:
            cur, self._cur = self._cur, None
            self._finish(cur)

    @_safe
    def _root_post(self, module, args, output):
        if not self._in_root:
            return
        self._in_root = False
        self._unset_sink()
        self._cur_norm = None
        cur = self._cur
        if cur is not None and cur.lazy:
            _check_recorded_calls(cur, output)
        if cur is not None and self.backward and torch.is_grad_enabled():
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(functools.partial(self._root_grad, cur))
        if self._cur is None and self.reduce is None:
            try:
                if _nonfinite(_tensors(output)):
                    self._force = True  # find the origin on the next step
            except Exception:
                log.debug("root output check failed", exc_info=True)

    def _set_sink(self):
        if not self._sink_set:
            self._sink_prev = _F._set_stats_sink(self._sink)
            self._sink_set = True

    def _unset_sink(self):
        if self._sink_set:
            _F._set_stats_sink(self._sink_prev)
            self._sink_prev = None
            self._sink_set = False

    # -- hooks (installed while armed) ---------------------------------------------------------

    def _arm(self):
        if self._armed_handles:
            return
        hs = self._armed_handles
        for m in self.model.modules():
            if id(m) in self._norm_of:
                hs.append(m.register_forward_pre_hook(self._norm_pre))
                hs.append(m.register_forward_hook(self._norm_post))
            hs.append(m.register_forward_hook(self._any_post, with_kwargs=True))
        if self.backward:
            for name, m, *_, info in self._norms:
                for pname, p in _affine(m, info):
                    if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                        hs.append(p.register_post_accumulate_grad_hook(
                            self._param_grad_hook(name, pname)))

    def _disarm(self):
        for h in self._armed_handles:
            h.remove()
        self._armed_handles = []

    def _new_stats(self, name: str) -> LayerStats:
        kind, norm = self._kinds[name]
        return LayerStats(kind=kind, norm=norm)

    def _layer(self, name: str) -> LayerStats | None:
        cur = self._cur
        if cur is None:
            return None
        s = cur.layers.get(name)
        if s is None:
            s = cur.layers[name] = self._new_stats(name)
        return s

    @_safe
    def _norm_pre(self, module, args):
        cur = self._cur
        if cur is None or not self._in_root:  # a submodule called outside a step (validation)
            return
        name, kind, how, nd = self._norm_of[id(module)]
        s = self._layer(name)
        x = _first_tensor(args)
        if x is not None:
            if how == "last" or (how == "sink" and nd):  # normkit's GroupNorm: nd = 0
                s.batch_size = int(x.shape[0]) if x.dim() > 1 else 1
                s.seq_len = int(x.shape[1]) if x.dim() - nd >= 2 else None
            else:
                s.batch_size = int(x.shape[0])
            if cur.shape == (None, None):
                cur.shape = (s.batch_size, s.seq_len)
            if how in ("last", "channel"):
                cur.rows.append((s, *_row_stats(x, kind, how, nd)))
            elif how == "instance":
                cur.rows.append((s, *_row_stats(x, kind, "last", nd)))
            elif how == "group":
                g = module.num_groups
                rows = x.detach().float().reshape(x.shape[0] * g, -1)
                cur.rows.append((s, *_row_stats(rows, kind, "last", 1)))
        self._cur_norm = name if how == "sink" else None
        cur.t0.setdefault(id(module), []).append(time.perf_counter())

    @_safe
    def _sink(self, mean, rstd, eps, rms):
        # Ignored outside a watched norm module; processed in _norm_post, after the layer's
        # wall time is taken.
        if self._cur_norm is not None and self._cur is not None:
            self._pending = (mean, rstd, eps)
        if self._sink_prev is not None:  # the thread's observer before this one (a guard)
            self._sink_prev(mean, rstd, eps, rms)

    @_safe
    def _norm_post(self, module, args, output):
        cur = self._cur
        if cur is None or not self._in_root:  # a submodule called outside a step (validation)
            return
        t1 = time.perf_counter()
        starts = cur.t0.get(id(module))
        name, kind, how, nd = self._norm_of[id(module)]
        if starts:
            cur.latency.setdefault(name, []).append(t1 - starts.pop())
        self._cur_norm = None
        s = cur.layers[name]
        if self._pending is not None:
            mean, rstd, eps = self._pending
            self._pending = None
            # var (LN) or mean square (RMS) = 1/rstd² − eps; summarised at the step's end.
            cur.rows.append((s, mean, rstd.double().square().reciprocal_().sub_(eps)))
        y = _first_tensor(output)
        if y is not None:
            bad = s.add_output(y)
            _remember(y, bad)  # the hunt's check of this output is then free
            if bad:
                cur.suspect = True

    def _param_grad_hook(self, layer: str, pname: str):
        @_safe
        def hook(p):
            cur = self._cur
            if cur is None or layer not in cur.layers or p.grad is None:
                return
            setattr(cur.layers[layer], f"{pname}_grad_norm", _vnorm(p.grad))
        return hook

    def _param_snapshot(self, cur: _Step):
        """‖γ‖, ‖β‖ and their change since the previous sampled step (0 = frozen or dead).

        Batched with torch's foreach kernels (the ones optimizers use): 26 parameters cost five
        calls and one host transfer instead of ~130 small ops.
        """
        params, slots = [], []
        for name, m, *_, info in self._norms:
            cur.layers[name] = self._new_stats(name)
            for pname, p in _affine(m, info):
                if isinstance(p, torch.Tensor) and p.is_floating_point():
                    params.append(p.detach())
                    slots.append((name, pname))
        if not params:
            return
        with torch.no_grad():
            norms = torch._foreach_norm(params)
            prev = [self._prev_params.get(k) for k in slots]
            have = [i for i, (p, q) in enumerate(zip(params, prev, strict=True))
                    if q is not None and q.shape == p.shape and q.dtype == p.dtype]
            upd = []
            if have:
                upd = torch._foreach_norm(torch._foreach_sub([params[i] for i in have],
                                                             [prev[i] for i in have]))
            values = torch.stack([n.float() for n in norms] + [u.float() for u in upd]).tolist()
            have_set = set(have)
            for i, p in enumerate(params):
                q = prev[i]
                if i in have_set:
                    q.copy_(p)
                else:
                    self._prev_params[slots[i]] = p.clone()
        for (name, pname), v in zip(slots, values[:len(params)], strict=True):
            setattr(cur.layers[name], f"{pname}_norm", v)
        for i, v in zip(have, values[len(params):], strict=True):
            name, pname = slots[i]
            setattr(cur.layers[name], f"{pname}_update_norm", v)

    # -- completing a step ---------------------------------------------------------------------

    def _finish(self, cur: _Step) -> None:
        try:
            build = self._complete(cur)
        except Exception:
            log.exception("normkit watch failed to complete step %d; its record is lost",
                          cur.number)
            return
        if build is not None:
            self._exports.submit(build, cur.number)

    def _complete(self, cur: _Step) -> dict | None:
        add_rows_many(cur.rows)
        cur.rows = []
        for n, s in cur.layers.items():
            if s.rows or s.out_n or s.nonfinite_rows or n in cur.latency:
                s.steps = 1
            for t in cur.latency.get(n, ()):
                s.hist_latency.add(t)
        fwd, bwd = _resolve_step(cur)
        layers = {n: cur.layers[n] for n in self.layer_names if n in cur.layers}
        if bwd["origin"] is not None:
            # Keep hunting while the fault persists; an unresolved step is followed by a sampled
            # hunting step at once (not with reduce="all": every rank must sample alike).
            self._hunt_next = True
            if not bwd["resolved"] and self.reduce is None:
                self._force = True
        if self.reduce == "all" and self._dist:
            fwd, bwd = self._reduce(layers, fwd, bwd)
            if self._rank != 0:
                self._account(cur, layers, fwd, bwd, export=False)
                return None
        return self._account(cur, layers, fwd, bwd, export=True)

    def _account(self, cur, layers, fwd, bwd, export):
        for n, s in layers.items():
            if n in self._totals:
                self._totals[n].merge(s)
            else:
                self._totals[n] = s.copy()
        self._win.append(layers)
        self.records += 1
        new_alerts: list[Alert] = []
        self._report_origins(cur.number, fwd, bwd, export, new_alerts)
        new_alerts += self.rules.check_training(self.model_name, self.model_version, layers)
        drift = None
        if (export and self.baseline_ref is not None
                and self.records % self.drift_every == 0):
            drift = self._check_baseline(new_alerts)
        alerts = [a.to_dict() for a in new_alerts]  # now: their counts change later

        def build() -> dict:
            return self._record(cur, layers, fwd, bwd, drift, alerts)

        return build if export else None

    def _record(self, cur, layers, fwd, bwd, drift, alerts) -> dict:
        """The JSON record of a step (schema in ``normkit.monitor._schema``); built on the
        export thread from objects the step thread no longer changes."""
        record = {
            "type": "step",
            "schema": RECORD_SCHEMA,
            "schema_version": RECORD_SCHEMA_VERSION,
            "time_unix": cur.time,
            "model": self.model_name,
            "version": self.model_version,
            "rank": self.rank_label,
            "world_size": self._world,
            "step": cur.number,
            "every": self.every,
            "batch_size": cur.shape[0],
            "seq_len": cur.shape[1],
            "nonfinite": {"forward": fwd, "backward": bwd},
            "layers": {n: s.to_dict() for n, s in layers.items()},
            "summary": {n: s.summary(light=True) for n, s in layers.items()},
            "latency_seconds": {n: [round(t, 9) for t in v] for n, v in cur.latency.items()},
            "drift": None if drift is None else {n: r.to_dict() for n, r in drift.items()},
            "alerts": alerts,
        }
        return record



def watch(model: torch.nn.Module, *, model_name: str, model_version: str,
          every: int | float = 1, exporters: Iterable = (), baseline: Baseline | None = None,
          alerts: AlertRules | None = None, reduce: str | None = None,
          thresholds: DriftThresholds | None = None, window: int = 50, drift_every: int = 10,
          backward: bool = True, seed: int = 0, background_export: bool = True,
          backward_hunt: str = "on_detect", step: str = "forward",
          optimizer: torch.optim.Optimizer | None = None) -> Watch:
    """Watch every norm layer of ``model``: statistics, NaN/Inf origin, drift, alerts.

    Use as a context manager (``with normkit.watch(model, ...) as w:``) or keep the returned,
    already started object and call ``w.stop()``.

    Args:
        model: the root module (its forward calls are what is watched).
        model_name, model_version: the labels every record, metric and alert carries.
        every: int k: sample every k-th step (the first step is sampled); float f in (0, 1]:
            sample a fraction f of steps (serving), drawn from a generator seeded by ``seed``.
            A watch that sampled at most one of its steps lists "sampling" in ``Watch.off``.
        exporters: ``PrometheusExporter``, ``TensorBoardExporter``, ``JsonlExporter`` or any
            object with ``export(record)`` and ``close()``, optionally ``start()`` (called by
            ``start()``) and ``enabled``; closed by ``stop()``.  One whose ``start()`` raises or
            whose ``enabled`` is False gets no records; a failing ``export`` is logged once and
            never breaks the step; each is listed in ``Watch.off`` while so.
        baseline: a ``Baseline`` to check drift (every ``drift_every`` sampled steps, over the
            last ``window`` sampled steps) and latency against.
        alerts: an ``AlertRules`` (dedupe window, callbacks); default: log only, 300 s windows.
        reduce: None (each rank exports its own statistics with its rank label) or "all"
            (statistics are all-reduced across ranks and rank 0 exports them, rank="all";
            every rank must sample the same steps — keep ``every``/``seed`` equal).
        thresholds: ``DriftThresholds`` (default: mean shift 0.05 σ, variance 10%, PSI 0.2,
            KS 0.2).
        window, drift_every: drift window length and evaluation period, in sampled steps.
        backward: observe backward too (gradient norms, backward NaN origin).  Nothing is
            wrapped: in-place ops on a watched module's output work as unwatched, and the
            gradients are the same bits.
        seed: seed of the fractional sampler.
        background_export: run the exporters on a background thread (default), so the step
            never waits for them; ``flush()`` and ``stop()`` wait until every record is out.
        backward_hunt: "on_detect" (default): the backward of the norm layers only is observed,
            whose input gradients are checked anyway; when a gradient goes non-finite between
            two norms, the event is recorded with ``resolved: False`` and the next step is
            sampled with every leaf module observed, which names the exact module if the fault
            persists.  "always": every leaf observed on every sampled step — the exact module
            at once, even for a one-step fault, for about 1% more step time.
        step: what one step is — the unit ``every`` samples and the number every exporter
            receives.  "forward" (default): each call of the model's forward.  "manual": the
            forward calls up to ``Watch.step()``, however many (a ``step()`` with none between
            counts a step with no record).  "optimizer": the forward calls up to the next
            ``optimizer.step()`` (gradient accumulation: 4 forwards and one optimizer step are
            one step), counted through torch's ``Optimizer.register_step_post_hook``; an
            optimizer step skipped by a ``GradScaler`` is not counted.
        optimizer: the optimizer whose steps count (``step="optimizer"``), or attach it later
            with ``Watch.attach_optimizer``; until one is, the watch is listed in ``off``
            ("steps") and all forward calls belong to one step.

    Returns:
        The started ``Watch``.
    """
    return Watch(model, model_name=model_name, model_version=model_version, every=every,
                 exporters=exporters, baseline=baseline, alerts=alerts, reduce=reduce,
                 thresholds=thresholds, window=window, drift_every=drift_every,
                 backward=backward, seed=seed, background_export=background_export,
                 backward_hunt=backward_hunt, step=step, optimizer=optimizer).start()
