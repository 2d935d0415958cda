"""``normkit.guard``: a runtime guard for serving, on the statistics the norm kernels produce.

    guarded = normkit.guard.guard(model, baseline=Baseline.load("baseline.json"),
                                  action="fallback", fallback=previous_model)
    logits = guarded(tokens)   # the model's output, or previous_model's if a check tripped

``Guard`` wraps a model's forward.  Per call it checks every normkit norm layer of the model
and the model's output:

* ``nonfinite``: a NaN/Inf in the layer's output — from a non-finite input row (its rstd is
  NaN), a non-finite γ/β, or, where the output is read, its float32 sum — or in the model's
  output (layer ``"<output>"``).
* ``rstd``: a row's rstd (``rsqrt(var + eps)``, RMSNorm ``rsqrt(mean(x²) + eps)``) below the
  lower bound — the row's std above its reciprocal: activations exploded — or above the upper
  bound — a row with (almost) no variance left: a constant or dead input that normalization
  then amplifies.
* ``scale``: a row's scale (std, RMSNorm RMS) outside the range the baseline saw for the layer,
  widened by ``scale_tolerance``.

How it stays cheap (``benchmarks/guard_overhead.py``; docs/guard.md has the figure): the
kernels already compute each row's rstd, and hand it to a statistics sink
(``normkit._dispatch._set_stats_sink``) — the one ``normkit.watch`` reads — so the guard reads
no activation for ``rstd`` and ``scale``, and none for ``nonfinite`` where the statistics and
γ/β vouch for the output.  Per norm layer call it launches one reduction, the rstd vector's
minimum and maximum, written into one small per-thread buffer; per call one pass over the
model's output, the largest |γ| and |β| of the layers (torch's foreach norm) and one host
transfer; the verdict is taken on the host.

Bounds (see docs/guard.md for the reasoning): ``rstd_bounds=(1e-4, None)``: a row whose std
(RMS) reaches 1e4 trips (a 256-wide row gets there only with values past float16's largest,
65504); ``None`` as the upper bound is the layer's own ceiling
``1/sqrt(2·eps)``, reached when a row's variance (mean square) is at most ``eps``.
``scale_tolerance=2.0``: twice the widest row scale the baseline saw, or half its narrowest.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _dispatch
from .monitor import Baseline, Watch, find_norms
from .monitor._hunt import _tensors
from .monitor._schema import RECORD_SCHEMA, RECORD_SCHEMA_VERSION

__all__ = ["Guard", "GuardTripped", "Trip", "guard", "CHECKS", "ACTIONS"]

log = logging.getLogger(__name__)

CHECKS = ("nonfinite", "rstd", "scale")
ACTIONS = ("raise", "fallback", "record")
OUTPUT = "<output>"  # the layer name of the model's own output in a nonfinite trip


@dataclass(frozen=True)
class Trip:
    """One check that failed on one call.

    Attributes:
        layer: the norm layer's qualified name in the wrapped model, or ``"<output>"``.
        check: one of ``CHECKS``.
        value: what was seen: nonfinite: the NaN/Inf met — the output's float32 sum, the rstd
            of a non-finite input row, or the largest |γ| or |β|; rstd: the smallest or largest
            rstd; scale: the largest or smallest row scale.
        limit: the bound it crossed (None for nonfinite).
    """

    layer: str
    check: str
    value: float
    limit: float | None

    def describe(self) -> str:
        if self.check == "nonfinite":
            return f"layer {self.layer!r}: non-finite output ({self.value} met)"
        if self.check == "rstd":
            if self.value < self.limit:
                return (f"layer {self.layer!r}: rstd {self.value:.3g} below {self.limit:.3g} "
                        f"(a row's std above {1 / self.limit:.3g}: activations exploded)")
            return (f"layer {self.layer!r}: rstd {self.value:.3g} above {self.limit:.3g} (a row "
                    "with almost no variance: constant or dead input)")
        side = "above the baseline's largest" if self.value > self.limit else \
            "below the baseline's smallest"
        return (f"layer {self.layer!r}: row scale {self.value:.3g} {side} row scale with the "
                f"tolerance ({self.limit:.3g})")


class GuardTripped(RuntimeError):
    """Raised by a ``Guard`` with ``action="raise"`` when a check trips.

    Attributes:
        layer, check, value, limit: those of the first trip (in execution order).
        trips: every ``Trip`` of the call.
    """

    def __init__(self, trips: list[Trip]):
        first = trips[0]
        self.trips = trips
        self.layer, self.check, self.value, self.limit = (first.layer, first.check, first.value,
                                                          first.limit)
        more = f" (and {len(trips) - 1} more: " + "; ".join(
            f"{t.layer} {t.check}" for t in trips[1:]) + ")" if len(trips) > 1 else ""
        super().__init__(f"normkit guard tripped: check {first.check!r} on "
                         f"{first.describe()}{more}")


class _Call:
    """What one guarded forward collects, in the calling thread.

    Row i of ``buf`` (float32, on the tensors' device) holds layer call i's [output sum (where
    read), smallest rstd, largest rstd], then one row per floating tensor of the model's output
    [sum, -, -].  The ops write into it (``out=``): no small tensor per layer call stays alive
    among the forward's large activations, and nothing is gathered at the end.  The buffer is
    the thread's, reused by its next call; ``tolist()`` brings it to the host in one transfer.
    """

    __slots__ = ("layer", "n", "buf", "names", "eps", "read", "quiet", "prev")

    def __init__(self, buf: torch.Tensor | None, prev):
        self.layer: str | None = None  # the norm layer running now
        self.n = 0  # rows of buf used
        self.buf = buf
        self.names: list[str] = []  # per norm layer call, in execution order
        self.eps: list[float | None] = []  # per layer call: eps, None when no statistics came
        self.read: list[bool] = []  # per layer call: its output was summed (row's column 0)
        self.quiet: list[str] = []  # layers that ran without handing statistics over
        self.prev = prev  # the thread's sink before this call (a watch's), called on

    def row(self, device: torch.device) -> torch.Tensor:
        """Row n of the buffer, on ``device`` (grown or moved as needed)."""
        buf = self.buf
        if buf is None or buf.device != device or self.n == buf.shape[0]:
            new = torch.zeros(max(16, 2 * (0 if buf is None else buf.shape[0])), 3,
                              dtype=torch.float32, device=device)
            if buf is not None:
                new[:self.n].copy_(buf[:self.n])
            self.buf = buf = new
        return buf[self.n]


def _sum_into(out: torch.Tensor, t: torch.Tensor) -> None:
    """The float32 sum of every value of ``t`` into the 0-d ``out`` (a float16 sum of 1000
    values of 100 would overflow; float64 input is summed in float64, then rounded)."""
    t = t.detach()
    if t.dtype == torch.float64:
        out.copy_(t.sum())
    else:
        torch.sum(t, dim=list(range(t.dim())), dtype=torch.float32, out=out)


def _check_bounds(rstd_bounds) -> tuple[float, float | None]:
    try:
        low, high = rstd_bounds
    except (TypeError, ValueError):
        raise TypeError(f"rstd_bounds must be a pair (low, high), got {rstd_bounds!r}") from None
    for name, v in (("low", low), ("high", high)):
        if v is None and name == "high":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
            raise ValueError(f"rstd_bounds {name} must be a number >= 0"
                             f"{' or None' if name == 'high' else ''}, got {v!r}")
    if high is not None and high <= low:
        raise ValueError(f"rstd_bounds must have low < high, got {rstd_bounds!r}")
    return float(low), None if high is None else float(high)


class Guard(torch.nn.Module):
    """Wraps ``model``'s forward with per-call checks of its norm layers (module docstring).

    Args:
        model: the model to guard; its norm layers must be normkit's (``normkit.convert``
            turns torch and Hugging Face norms into them): the checks read the statistics
            normkit's kernels produce.  Other norm layers are not checked (listed in ``off``).
        baseline: a ``normkit.monitor.Baseline`` (or the path of a saved one) of this model's
            norm layers; enables the ``scale`` check.  Layers it has no rows for, or holds
            statistics of another kind for, are not scale-checked (listed in ``off``).
        action: what a tripped call does: ``"raise"`` ``GuardTripped`` naming the layer, the
            check and the value; ``"fallback"``: return ``fallback(*args, **kwargs)`` instead
            of the model's output; ``"record"``: count it and return the model's output.
        fallback: a callable taking the model's arguments (a safe model, the previous
            version); required with ``action="fallback"``, refused otherwise.  It is not
            registered as a submodule (``.to()``/``.eval()`` on the guard do not reach it).
        rstd_bounds: (low, high): a row with rstd below ``low`` or above ``high`` trips
            ``rstd``; ``high=None`` is each layer's own ceiling ``1/sqrt(2·eps)`` (the row's
            variance, RMSNorm mean square, at most eps); 0 and ``math.inf`` turn a side off.
        scale_tolerance: factor >= 1; with a baseline, a row scale above the baseline's
            largest × it, or below its smallest / it, trips ``scale``.
        watch: a running ``normkit.watch`` of this model: each tripped call then also becomes
            a ``"guard"`` record handed to its exporters (JSONL; Prometheus counts it in
            ``normkit_guard_trips_total``), labelled with the watch's model and version.

    Attributes:
        layers: the guarded norm layers' qualified names, in registration order.
        trips: ``Counter`` {(layer, check, action): tripped calls}.
        calls: guarded calls so far.
        off: {what: why} for what is not checked (see the arguments).
    """

    def __init__(self, model: torch.nn.Module, *, baseline: Baseline | str | os.PathLike |
                 None = None, action: str = "raise", fallback: Callable | None = None,
                 rstd_bounds: tuple[float, float | None] = (1e-4, None),
                 scale_tolerance: float = 2.0, watch: Watch | None = None):
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if action == "fallback" and not callable(fallback):
            raise TypeError("action='fallback' needs fallback=<a callable taking the model's "
                            f"arguments>, got {fallback!r}")
        if action != "fallback" and fallback is not None:
            raise ValueError(f"fallback is only used with action='fallback' (action is "
                             f"{action!r})")
        self._low, self._high = _check_bounds(rstd_bounds)
        if (isinstance(scale_tolerance, bool) or not isinstance(scale_tolerance, (int, float))
                or not scale_tolerance >= 1 or math.isinf(scale_tolerance)):
            raise ValueError(f"scale_tolerance must be a finite number >= 1, got "
                             f"{scale_tolerance!r}")
        if isinstance(baseline, (str, os.PathLike)):
            baseline = Baseline.load(baseline)
        if baseline is not None and not isinstance(baseline, Baseline):
            raise TypeError(f"baseline must be a normkit.monitor.Baseline or a path, got "
                            f"{type(baseline).__name__}")
        if watch is not None and not isinstance(watch, Watch):
            raise TypeError(f"watch must be what normkit.watch returns, got "
                            f"{type(watch).__name__}")
        self.model = model
        self.action = action
        self.baseline = baseline
        self.watch = watch
        self.scale_tolerance = float(scale_tolerance)
        self.__dict__["fallback"] = fallback  # a callable, not a submodule (see Args)
        self.off: dict[str, str] = {}
        self.trips: Counter = Counter()
        self.calls = 0
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._said: set[str] = set()
        self._handles: list = []
        self._posts: list = []  # (module, handle) of the output hooks, kept last (forward)
        self._scale_range: dict[str, tuple[float, float]] = {}
        guarded = []
        self._affine: list[tuple[str, torch.Tensor]] = []  # (layer, γ or β) of guarded layers
        for name, m, kind, how, _nd, info in find_norms(model):
            if how != "sink":
                self.off[name] = (f"a {type(m).__name__}, not a normkit norm: convert the "
                                  "model first (normkit.convert)")
                continue
            guarded.append(name)
            self._affine += [(name, t) for t in (getattr(m, a) for a in (info.weight, info.bias)
                                                 if a) if isinstance(t, torch.Tensor)]
            post = m.register_forward_hook(self._post)
            self._posts.append((m, post))
            self._handles += [m.register_forward_pre_hook(self._pre(name)), post]
            if baseline is not None:
                self._scale_from(baseline, name, kind)
        if not guarded:
            self.remove()
            raise ValueError(f"model ({type(model).__name__}) has no normkit norm layer to "
                             "guard" + (f" ({', '.join(self.off)} are not normkit's: convert "
                                        "the model first, normkit.convert(model))"
                                        if self.off else ""))
        self.layers = guarded
        if self.off:
            log.warning("normkit guard of %s: not checked: %s", type(model).__name__,
                        "; ".join(f"{k}: {v}" for k, v in self.off.items()))

    def _scale_from(self, baseline: Baseline, name: str, kind: str) -> None:
        s = baseline.layers.get(name)
        if s is None or s.hist_scale.n == 0:
            self.off[f"scale of {name}"] = "the baseline has no rows for this layer"
        elif s.kind != kind:
            self.off[f"scale of {name}"] = (f"the baseline holds {s.kind!r} statistics for it, "
                                            f"the layer computes {kind!r}")
        else:
            h = s.hist_scale
            self._scale_range[name] = (h.lo / self.scale_tolerance, h.hi * self.scale_tolerance)

    def remove(self) -> None:
        """Removes the guard's hooks from the model's norm layers: the model is as before it
        was wrapped, and the guard passes calls through unchecked."""
        for h in self._handles:
            h.remove()
        self._handles, self._posts = [], []

    def _keep_last(self) -> None:
        """Moves each output hook behind hooks registered after it (torch runs forward hooks in
        registration order): the guard sees what the layer finally returns, also when a hook
        added later changes it (a fault injected at run time)."""
        for m, h in self._posts:
            hooks = m._forward_hooks
            if next(reversed(hooks), None) != h.id:
                hooks.move_to_end(h.id)

    # -- per layer ----------------------------------------------------------------------------

    def _pre(self, name: str):
        def hook(module, args):
            call = getattr(self._tls, "call", None)
            if call is not None:
                call.layer = name
        return hook

    def _post(self, module, args, output):
        call = getattr(self._tls, "call", None)
        if call is None or call.layer is None:
            return
        ys = _tensors(output)
        if ys:
            y = ys[0]
            row = call.row(y.device)
            stats = len(call.eps) > len(call.names)
            # The output is read only where its statistics and γ/β cannot vouch for it: no
            # statistics came, float16 may overflow (65504), or another hook on the layer may
            # have changed what it returns.  Else a NaN/Inf in it shows as a non-finite rstd
            # (a non-finite input row) or a non-finite γ/β.  Reading costs a pass over the
            # output: ~3% of the benchmark's serving step for its 13 layers.
            read = not stats or y.dtype == torch.float16 or len(module._forward_hooks) > 1
            if read:
                _sum_into(row[0], y)
            if not stats:
                call.eps.append(None)
                call.quiet.append(call.layer)
            call.names.append(call.layer)
            call.read.append(read)
            call.n += 1
        elif len(call.eps) > len(call.names):  # statistics but no output: forget them
            call.eps.pop()
        call.layer = None

    def _sink(self, mean, rstd, eps, rms):
        call = getattr(self._tls, "call", None)
        if call is None:
            return
        if call.layer is not None and rstd.numel():
            row = call.row(rstd.device)
            if rstd.dtype == torch.float32:
                torch.aminmax(rstd, out=(row[1], row[2]))
            else:  # float64 statistics (float64 input)
                row[1:].copy_(torch.stack(torch.aminmax(rstd)))
            if len(call.eps) > len(call.names):  # a second op in the layer: the last counts
                call.eps[-1] = eps
            else:
                call.eps.append(eps)
        if call.prev is not None:
            call.prev(mean, rstd, eps, rms)

    # -- per call -----------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if not self._handles or getattr(self._tls, "call", None) is not None:
            return self.model(*args, **kwargs)  # removed, or re-entered (the model calls itself)
        self._keep_last()
        call = self._tls.call = _Call(getattr(self._tls, "buf", None), None)
        call.prev = _dispatch._set_stats_sink(self._sink)
        try:
            output = self.model(*args, **kwargs)
            for t in _tensors(output):
                _sum_into(call.row(t.device)[0], t)
                call.n += 1
        finally:
            _dispatch._set_stats_sink(call.prev)
            self._tls.call = None
            self._tls.buf = call.buf
        with self._lock:
            self.calls += 1
            number = self.calls
        trips = self._verdict(call)
        if not trips:
            return output
        self._count(trips, number)
        if self.action == "raise":
            raise GuardTripped(trips)
        if self.action == "fallback":
            return self.fallback(*args, **kwargs)
        return output

    def _verdict(self, call: _Call) -> list[Trip]:
        """The call's trips, in execution order, from one host transfer."""
        if not call.n:
            return []
        flat = call.buf[:call.n].reshape(-1)
        if self._affine:
            with torch.no_grad():  # max |γ|, max |β|: NaN/Inf when any entry is
                peaks = torch._foreach_norm([t for _, t in self._affine], math.inf)
            flat = torch.cat([flat, *(t.reshape(1).to(flat.device, flat.dtype) for t in peaks)])
        values = flat.tolist()
        k = 3 * call.n
        bad_affine = {}
        for (name, _), v in zip(self._affine, values[k:], strict=True):
            if not math.isfinite(v):
                bad_affine.setdefault(name, v)
        if call.quiet:
            self._say([f"statistics of {n}" for n in call.quiet],
                      "the layer ran without handing over statistics (under torch.compile, or "
                      "a backend that reports none): only its nonfinite check runs")
        trips: dict[tuple[str, str], Trip] = {}

        def trip(layer, check, value, limit):
            trips.setdefault((layer, check), Trip(layer, check, value, limit))

        for i, (name, eps, read) in enumerate(zip(call.names, call.eps, call.read,
                                                  strict=True)):
            total, rmin, rmax = values[3 * i:3 * i + 3]
            stats = eps is not None
            # rstd NaN: a NaN/Inf in an input row; 0: a row whose variance (mean square) is
            # infinite, an Inf in an RMSNorm row; inf: a constant row with eps 0.  Each makes
            # the output row non-finite.
            finite = stats and math.isfinite(rmin) and math.isfinite(rmax) and rmin > 0
            if read and not math.isfinite(total):
                trip(name, "nonfinite", total, None)
            elif stats and not finite:
                trip(name, "nonfinite", next((v for v in (rmin, rmax) if not math.isfinite(v)),
                                             math.inf), None)
            elif name in bad_affine:
                trip(name, "nonfinite", bad_affine[name], None)
            if not finite:
                continue
            high = self._high if self._high is not None else \
                1 / math.sqrt(2 * eps) if eps > 0 else math.inf
            if rmin < self._low:
                trip(name, "rstd", rmin, self._low)
            elif rmax > high:
                trip(name, "rstd", rmax, high)
            rng = self._scale_range.get(name)
            if rng is not None:
                # scale = sqrt(1/rstd² − eps): the largest scale has the smallest rstd.
                smax = math.sqrt(max(1 / rmin ** 2 - eps, 0.0))
                smin = math.sqrt(max(1 / rmax ** 2 - eps, 0.0)) if rmax > 0 else math.inf
                if smax > rng[1]:
                    trip(name, "scale", smax, rng[1])
                elif smin < rng[0]:
                    trip(name, "scale", smin, rng[0])
        bad = [v for v in values[3 * len(call.names):k:3] if not math.isfinite(v)]
        if bad:
            trip(OUTPUT, "nonfinite", bad[0], None)
        return list(trips.values())

    def _count(self, trips: list[Trip], number: int) -> None:
        with self._lock:
            for t in trips:
                self.trips[(t.layer, t.check, self.action)] += 1
        for t in trips:
            key = f"{t.layer} {t.check}"
            if key not in self._said:  # once per layer and check: a persisting fault must
                self._said.add(key)    # not flood the log (every trip is counted)
                log.warning("normkit guard (%s): %s", self.action, t.describe())
        if self.watch is not None:
            self._emit(trips, number)

    def _emit(self, trips: list[Trip], number: int) -> None:
        w = self.watch
        record = {
            "type": "guard",
            "schema": RECORD_SCHEMA,
            "schema_version": RECORD_SCHEMA_VERSION,
            "time_unix": time.time(),
            "model": w.model_name,
            "version": w.model_version,
            "rank": w.rank_label,
            "call": number,
            "action": self.action,
            "trips": [{"layer": t.layer, "check": t.check, "value": t.value, "limit": t.limit}
                      for t in trips],
        }
        try:
            w.emit(record)
        except Exception as e:  # telemetry never breaks the serving step
            self._say(["telemetry"], f"the watch refused the guard's record ({e}); trips are "
                                     "still counted in Guard.trips")

    def _say(self, whats: list[str], why: str) -> None:
        """Lists ``whats`` in ``off`` with the reason; logs those not listed yet, once."""
        new = [w for w in whats if w not in self.off]
        if new:
            self.off.update(dict.fromkeys(new, why))
            log.warning("normkit guard of %s: %s: %s", type(self.model).__name__,
                        ", ".join(new), why)


def guard(model: torch.nn.Module, **kwargs) -> Guard:
    """``Guard(model, **kwargs)``: the model's forward wrapped with the guard's checks (see
    ``Guard`` for the arguments)."""
    return Guard(model, **kwargs)
