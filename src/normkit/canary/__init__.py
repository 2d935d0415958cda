"""``normkit canary``: promote, hold or roll back a candidate model version from its live norm
telemetry.

    from normkit import canary
    v = canary.evaluate("candidate.jsonl", "baseline.json", serving="serving.jsonl")
    v.decision, v.reasons, v.exit_code, v.to_dict()
    d = canary.divergence(candidate_logits, serving_logits)   # shadow traffic: KL, top-1
    canary.evaluate(..., divergence=d)
    canary.sync_silence(v, "http://alertmanager:9093")   # silence while it holds, then expire

The rules, their defaults and why: ``_verdict``'s docstring and docs/canary.md.  Drift
statistics are ``normkit.monitor.drift``'s; nothing here re-implements them.
"""

from ._divergence import Divergence, divergence
from ._evidence import Evidence, PrometheusSource
from ._policy import DEFAULTS, POLICY_VERSION, Policy
from ._render import print_table, render
from ._silence import SILENCE_AUTHOR, sync_silence
from ._verdict import DECISIONS, NOT_ENOUGH_TRAFFIC, Reason, Verdict, evaluate

__all__ = [
    # the gate
    "evaluate",
    "Verdict",
    "Reason",
    "DECISIONS",
    "NOT_ENOUGH_TRAFFIC",
    "render",
    "print_table",
    # inputs
    "PrometheusSource",
    "Evidence",
    "Policy",
    "DEFAULTS",
    "POLICY_VERSION",
    # the rollout's Alertmanager silence
    "sync_silence",
    "SILENCE_AUTHOR",
    # shadow traffic
    "divergence",
    "Divergence",
]
