"""In-process alert rules: page on non-finite values and severe latency regressions, ticket on
drift; deduplicated per (rule, model, version) within a window and delivered to callbacks.

The same rules exist for Prometheus in ``deploy/prometheus/rules.yml`` (``NormkitNonFinite``,
``NormkitNormLatencyRegression``, ``NormkitActivationDrift``); this module is for processes
that have no Prometheus in front of them (notebooks, batch jobs, tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["Alert", "AlertRules", "SEVERITIES"]

log = logging.getLogger(__name__)

SEVERITIES = ("page", "ticket")
RULES = {"nonfinite": "page", "latency_regression": "page", "drift": "ticket"}


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
        log_alerts: also log new alerts (warning for page, info for ticket).
        clock: monotonic clock for the windows (tests pass a fake one).
    """

    def __init__(self, dedupe_seconds: float = 300.0,
                 callbacks: Iterable[Callable[[Alert], None]] = (),
                 latency_factor: float = 3.0, log_alerts: bool = True,
                 clock: Callable[[], float] = time.monotonic):
        if dedupe_seconds < 0:
            raise ValueError(f"dedupe_seconds must be >= 0, got {dedupe_seconds!r}")
        if latency_factor <= 1:
            raise ValueError(f"latency_factor must be > 1, got {latency_factor!r}")
        self.dedupe_seconds = float(dedupe_seconds)
        self.callbacks = list(callbacks)
        self.latency_factor = float(latency_factor)
        self.log_alerts = log_alerts
        self.clock = clock
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
                      [layer] if layer is not None else [], message, now)
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
