"""In-process alert rules: page on non-finite values, severe latency regressions and exploding
γ/β; ticket on drift, gradient-norm spikes, vanishing gradients and frozen γ/β; deduplicated
per (rule, model, version) within a window and delivered to callbacks.  Every alert links its
runbook page (``Alert.runbook_url``, under ``docs/runbooks/``).

The same rules exist for Prometheus in ``deploy/prometheus/rules.yml`` (``NormkitNonFinite``,
``NormkitNormLatencyRegression``, ``NormkitActivationDrift``, ``NormkitGradNormSpike``,
``NormkitVanishingGradients``, ``NormkitNormParamsFrozen``, ``NormkitNormParamsExploding``),
with the same thresholds and runbook links; this module is for processes that have no
Prometheus in front of them (notebooks, batch jobs, tests).  Prometheus judges "sustained" over
minutes, this module over consecutive sampled steps (``TrainingLimits.sustain``).
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Alert", "AlertRules", "TrainingLimits", "SEVERITIES", "RULES", "RUNBOOKS",
           "RUNBOOK_BASE", "runbook_url"]

log = logging.getLogger(__name__)

SEVERITIES = ("page", "ticket")
# rule -> severity; deploy/README.md says why each is a page or a ticket.
RULES = {"nonfinite": "page", "latency_regression": "page", "drift": "ticket",
         "grad_spike": "ticket", "grad_vanishing": "ticket", "affine_frozen": "ticket",
         "affine_exploding": "page"}
# rule -> its runbook page under docs/runbooks/ (the Prometheus alert of the same rule links
# the same page).
RUNBOOKS = {"nonfinite": "nonfinite.md", "latency_regression": "latency-regression.md",
            "drift": "drift.md", "grad_spike": "grad-spike.md",
            "grad_vanishing": "vanishing-gradients.md", "affine_frozen": "params-frozen.md",
            "affine_exploding": "params-exploding.md"}

# Where the runbook pages are published; deploy/prometheus/rules.yml spells the same base.
# A fork or an internal mirror sets NORMKIT_RUNBOOK_BASE once (and replaces it in rules.yml).
RUNBOOK_BASE = "https://github.com/normkit/normkit/blob/main/docs/runbooks/"


def runbook_url(page: str) -> str:
    """The URL of ``docs/runbooks/<page>``: ``$NORMKIT_RUNBOOK_BASE`` (read at each call) or
    ``RUNBOOK_BASE``, followed by ``page``."""
    base = os.environ.get("NORMKIT_RUNBOOK_BASE") or RUNBOOK_BASE
    return base.rstrip("/") + "/" + page


@dataclass(frozen=True)
class TrainingLimits:
    """Thresholds of the training-health rules, checked per norm layer on each sampled step
    that has the numbers (gradients: steps with a backward; updates: from the second sampled
    step).  The defaults are the ones ``deploy/prometheus/rules.yml`` uses.

    Attributes:
        spike_factor: ``grad_spike`` when the layer's input-gradient norm exceeds this factor
            times its own median over the last ``history`` sampled steps (10: an order of
            magnitude; ordinary step-to-step noise stays within 2-3x).
        vanish_ratio: ``grad_vanishing`` when the layer's input-gradient norm is below this
            fraction of the largest layer's in the same step (1e-3: three orders of magnitude).
        frozen_ratio: ``affine_frozen`` when γ (or β) gets a non-zero gradient but its change
            since the previous sampled step is below this fraction of its norm (1e-7: below
            float32's resolution, 1.2e-7, so not a single bit moved) on ``history`` sampled
            steps in a row — not ``sustain``: with gradient accumulation most steps
            legitimately have no optimizer step.
        explode_factor: ``affine_exploding`` when ‖γ‖ (or ‖β‖) exceeds this factor times its
            smallest value over ``history``, counted from at least 1 (β starts at zero).
        history: sampled steps of each layer's own history kept (the spike median and the
            exploding minimum; a spike needs at least ``sustain`` of them first), and the
            sampled steps in a row γ/β must stay unchanged to count as frozen.
        sustain: consecutive sampled steps the spike, vanishing and exploding conditions must
            hold before they alert (one odd step is noise; Prometheus waits 5-15 minutes
            instead).
    """

    spike_factor: float = 10.0
    vanish_ratio: float = 1e-3
    frozen_ratio: float = 1e-7
    explode_factor: float = 10.0
    history: int = 50
    sustain: int = 5

    def __post_init__(self):
        for name in ("spike_factor", "explode_factor"):
            if not getattr(self, name) > 1:
                raise ValueError(f"TrainingLimits.{name} must be > 1, got {getattr(self, name)!r}")
        for name in ("vanish_ratio", "frozen_ratio"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"TrainingLimits.{name} must be in (0, 1), got "
                                 f"{getattr(self, name)!r}")
        for name in ("history", "sustain"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainingLimits.{name} must be an int >= 1, got {v!r}")
        if self.sustain > self.history:
            raise ValueError(f"TrainingLimits.sustain ({self.sustain}) must be <= history "
                             f"({self.history})")


@dataclass
class Alert:
    """One deduplicated alert.

    Attributes:
        severity: "page" or "ticket".
        rule: "nonfinite", "latency_regression" or "drift".
        layer: the layer (or module, for non-finite origins) of the first event.
        model, version: the group the alert belongs to.
        count: events folded into this alert within its dedupe window.
        first_seen, last_seen: wall-clock times (seconds since the epoch).
        layers: every layer/module named by the folded events, in first-seen order.
        message: a one-line description of the first event.
        runbook_url: the rule's runbook page (see ``runbook_url``).
    """

    severity: str
    rule: str
    layer: str | None
    model: str
    version: str
    count: int
    first_seen: float
    last_seen: float
    layers: list[str] = field(default_factory=list)
    message: str = ""
    runbook_url: str = ""
    _opened: float = 0.0  # monotonic time the window opened (not exported)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class AlertRules:
    """Classifies events, deduplicates them and delivers new alerts.

    Args:
        dedupe_seconds: events of the same (rule, model, version) within this window after an
            alert opened are folded into it (``count``, ``last_seen``, ``layers``) and not
            delivered again (default 300 s).
        callbacks: called with each *new* Alert; a failing callback is logged, never raised.
        latency_factor: page when a norm layer's recent median forward latency exceeds the
            baseline's median by this factor (default 3.0: severe, not jitter).
        training: the thresholds of the training-health rules (``check_training``);
            default ``TrainingLimits()``.
        log_alerts: also log new alerts (warning for page, info for ticket).
        clock: monotonic clock for the windows (tests pass a fake one).
    """

    def __init__(self, dedupe_seconds: float = 300.0,
                 callbacks: Iterable[Callable[[Alert], None]] = (),
                 latency_factor: float = 3.0, log_alerts: bool = True,
                 clock: Callable[[], float] = time.monotonic,
                 training: TrainingLimits | None = None):
        if dedupe_seconds < 0:
            raise ValueError(f"dedupe_seconds must be >= 0, got {dedupe_seconds!r}")
        if latency_factor <= 1:
            raise ValueError(f"latency_factor must be > 1, got {latency_factor!r}")
        self.dedupe_seconds = float(dedupe_seconds)
        self.callbacks = list(callbacks)
        self.latency_factor = float(latency_factor)
        self.log_alerts = log_alerts
        self.clock = clock
        self.training = training if training is not None else TrainingLimits()
        self._history: dict[tuple[str, str, str], _History] = {}
        self.alerts: list[Alert] = []
        self._open: dict[tuple[str, str, str], Alert] = {}

    def fire(self, rule: str, model: str, version: str, layer: str | None,
             message: str = "") -> Alert | None:
        """Records an event; returns the new Alert if one was opened, else None (folded)."""
        severity = RULES[rule]
        key = (rule, model, version)
        now = self.clock()
        wall = time.time()
        cur = self._open.get(key)
        if cur is not None and now - cur._opened < self.dedupe_seconds:
            cur.count += 1
            cur.last_seen = wall
            if layer is not None and layer not in cur.layers:
                cur.layers.append(layer)
            return None
        alert = Alert(severity, rule, layer, model, version, 1, wall, wall,
                      [layer] if layer is not None else [], message,
                      runbook_url(RUNBOOKS[rule]), now)
        self._open[key] = alert
        self.alerts.append(alert)
        if self.log_alerts:
            log.log(logging.WARNING if severity == "page" else logging.INFO,
                    "normkit %s alert %s (%s %s): %s", severity, rule, model, version, message)
        for cb in self.callbacks:
            try:
                cb(alert)
            except Exception:
                log.exception("normkit alert callback %r failed", cb)
        return alert

    def check_training(self, model: str, version: str, layers: Mapping[str, object]) -> list[Alert]:
        """Checks one sampled step's per-layer numbers against ``training`` (``TrainingLimits``)
        and fires ``grad_spike``, ``grad_vanishing``, ``affine_frozen`` and
        ``affine_exploding`` for conditions that held ``sustain`` steps in a row (``history``
        for ``affine_frozen``).

        Args:
            model, version: the group the step belongs to (each layer keeps its own history
                per group).
            layers: {layer: stats} with the ``LayerStats`` attributes ``grad_input_norm``,
                ``weight_norm``/``bias_norm``, ``weight_update_norm``/``bias_update_norm`` and
                ``weight_grad_norm``/``bias_grad_norm`` (None where the step has no number;
                non-finite numbers are the ``nonfinite`` rule's business and are skipped).

        Returns:
            The Alerts this step opened.
        """
        lim = self.training
        grads = {n: s.grad_input_norm for n, s in layers.items() if _finite(s.grad_input_norm)}
        top = max(grads.values(), default=0.0)
        opened = []
        for name, s in layers.items():
            h = self._history.get((model, version, name))
            if h is None:
                h = self._history[(model, version, name)] = _History(lim.history)
            hits: dict[str, str] = {}
            g = grads.get(name)
            if g is not None:
                if len(h.grads) >= lim.sustain:
                    med = statistics.median(h.grads)
                    if g > lim.spike_factor * med:
                        hits["grad_spike"] = (f"layer {name} input-gradient norm {g:.3g} > "
                                              f"{lim.spike_factor:g}x its median {med:.3g}")
                if top > 0 and g < lim.vanish_ratio * top:
                    hits["grad_vanishing"] = (f"layer {name} input-gradient norm {g:.3g} < "
                                              f"{lim.vanish_ratio:g}x the largest layer's "
                                              f"{top:.3g}")
                h.grads.append(g)
            for slot, sym in (("weight", "γ"), ("bias", "β")):
                norm = getattr(s, f"{slot}_norm")
                if not _finite(norm):
                    continue
                upd, grad = getattr(s, f"{slot}_update_norm"), getattr(s, f"{slot}_grad_norm")
                if (_finite(upd) and _finite(grad) and grad > 0 and norm > 0
                        and upd < lim.frozen_ratio * norm):
                    hits.setdefault("affine_frozen", f"layer {name} {sym} gets gradients "
                                                     f"(norm {grad:.3g}) but does not change "
                                                     f"(update {upd:.3g}, norm {norm:.3g})")
                # The all-time minimum bounds the recent one from below: only a norm over 10x
                # it needs the window's minimum (a min over 50 values per layer and step was
                # most of this method's time).
                lowest = h.lowest[slot] = min(h.lowest[slot], norm)
                if norm > lim.explode_factor * max(lowest, 1.0):
                    floor = max(min(h.norms[slot], default=norm), 1.0)
                    if norm > lim.explode_factor * floor:
                        hits.setdefault("affine_exploding", f"layer {name} ‖{sym}‖ {norm:.3g} > "
                                                            f"{lim.explode_factor:g}x its recent "
                                                            f"minimum {floor:.3g}")
                h.norms[slot].append(norm)
            for rule in _TRAINING_RULES:
                h.streak[rule] = h.streak[rule] + 1 if rule in hits else 0
                if h.streak[rule] >= (lim.history if rule == "affine_frozen" else lim.sustain):
                    a = self.fire(rule, model, version, name, hits[rule])
                    if a is not None:
                        opened.append(a)
        return opened


_TRAINING_RULES = ("grad_spike", "grad_vanishing", "affine_frozen", "affine_exploding")


class _History:
    """One layer's recent numbers (finite only) and how many steps in a row each training rule's
    condition held."""

    __slots__ = ("grads", "norms", "lowest", "streak")

    def __init__(self, n: int):
        self.grads: deque[float] = deque(maxlen=n)
        self.norms = {"weight": deque(maxlen=n), "bias": deque(maxlen=n)}
        self.lowest = {"weight": math.inf, "bias": math.inf}  # all-time minimum of norms
        self.streak = dict.fromkeys(_TRAINING_RULES, 0)


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)
