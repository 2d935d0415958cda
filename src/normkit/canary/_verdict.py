"""The gate: a candidate's evidence against its baseline (and the serving model) → a verdict.

Rules, each tiered into hold and rollback thresholds (``Policy``):

* ``nonfinite.*`` — NaN/Inf in the candidate's norm inputs, outputs or steps: rollback at any
  amount of traffic (a non-finite value is a fault seen, not a statistic).
* ``evidence.*`` — fewer sampled steps, seconds, or rows of a layer than the policy asks:
  hold, "not enough traffic yet"; no statistical rule is judged on a window that is too small.
* ``drift.*`` — mean shift, variance change, PSI and KS of each layer's input against the
  baseline, by ``normkit.monitor.drift.compute_drift`` (its limits grow where rows are few).
* ``output.*`` — each layer's output mean (in baseline output stds) and std against the
  baseline: a norm's output is pinned by γ/β, so a changed eps or γ moves it.
* ``latency.*`` — p50/p99 of each layer's forward against the serving model's (and against the
  baseline's when it has timings), judged from ``min_latency_calls`` calls on both sides.
* ``divergence.*`` — KL and top-1 agreement against the serving model on shadow traffic.

Any rollback reason rolls back; else any hold reason holds; else the candidate is promoted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..monitor.drift import Baseline, DriftThresholds, compute_drift
from ._divergence import Divergence
from ._evidence import LayerEvidence, gather
from ._policy import Policy

__all__ = ["Reason", "Verdict", "evaluate", "NOT_ENOUGH_TRAFFIC", "DECISIONS"]

DECISIONS = ("promote", "hold", "rollback")
NOT_ENOUGH_TRAFFIC = "not enough traffic yet"
_EXIT = {"promote": 0, "hold": 1, "rollback": 1}


@dataclass(frozen=True)
class Reason:
    """Why the verdict is what it is: one rule on one layer (None: the whole model).

    Attributes:
        rule: the rule id, ``section.metric`` as in the policy (e.g. ``drift.psi``).
        decision: "hold" or "rollback".
        layer: the layer, or None.
        observed: the value seen; threshold: the value it reached (for ``evidence.*`` rules:
            the minimum it fell short of).
        against: what it was compared with: "baseline", "serving" or None.
        message: one line for people.
    """

    rule: str
    decision: str
    layer: str | None
    observed: float | None
    threshold: float | None
    against: str | None
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """The canary's answer.  ``decision`` is "promote", "hold" or "rollback"; ``exit_code`` is
    0 for promote and 1 otherwise (the CLI's, and a webhook's pass/fail)."""

    decision: str
    reasons: tuple[Reason, ...]
    model: str
    version: str
    evidence: dict
    layers: dict
    policy: dict

    @property
    def exit_code(self) -> int:
        return _EXIT[self.decision]

    def to_dict(self) -> dict:
        return {"schema": "normkit.canary", "schema_version": 1, "decision": self.decision,
                "exit_code": self.exit_code, "model": self.model, "version": self.version,
                "reasons": [r.to_dict() for r in self.reasons], "evidence": self.evidence,
                "layers": self.layers, "policy": self.policy}


def _tiered(out: list, rules: dict, rule: str, metric: str, value: float | None,
            layer: str | None, against: str | None, what: str, rollback_at: float | None = None,
            hold_at: float | None = None) -> None:
    """Appends a rollback or hold reason when ``value`` reaches the policy's thresholds
    (``rollback_at``/``hold_at`` override them: drift's limits at small row counts)."""
    if value is None:
        return
    down = metric == "top1_agreement"
    for decision in ("rollback", "hold"):
        th = (rollback_at if decision == "rollback" else hold_at) or rules[decision][metric]
        bad = (value <= th) if down else (value >= th or math.isnan(value))
        if bad:
            cmp = "≤" if down else "≥"
            out.append(Reason(f"{rule}.{metric}", decision, layer, value, th, against,
                              f"{what} {value:.4g} {cmp} {th:.4g}"
                              + (f" (against the {against})" if against else "")))
            return


def _out_moments(s) -> tuple[float, float] | None:
    if not s.out_n:
        return None
    m = s.out_sum / s.out_n
    return m, math.sqrt(max(s.out_sumsq / s.out_n - m * m, 0.0))


def _layer_rules(out: list, p: Policy, th: dict[str, DriftThresholds], name: str,
                 le: LayerEvidence, base, serving) -> dict:
    """The statistical rules of one layer (``th``: the drift thresholds of each tier);
    returns its row of observed values."""
    s = le.stats
    row: dict = {"rows": s.rows}
    if base is None:
        out.append(Reason("evidence.baseline", "hold", name, None, None, "baseline",
                          "the baseline has no statistics for this layer"))
    else:
        roll = compute_drift(name, base, s, th["rollback"])
        hold = compute_drift(name, base, s, th["hold"])
        if not roll.evaluable:
            live = base.rows >= p["evidence"]["min_rows"]  # else the baseline is short
            if live and s.nonfinite_rows:  # its rows are NaN/Inf: a rollback reason says so
                return row
            out.append(Reason("evidence.rows" if live else "evidence.baseline", "hold", name,
                              s.rows if live else base.rows, p["evidence"]["min_rows"],
                              "baseline", f"{NOT_ENOUGH_TRAFFIC}: {roll.reason}" if live
                              else roll.reason))
        else:
            change = None if roll.variance_ratio is None else abs(roll.variance_ratio - 1)
            psi = roll.psi if roll.psi is not None else le.psi
            ks = roll.ks if roll.ks is not None else le.ks
            row.update(mean_shift=roll.mean_shift, variance_ratio=roll.variance_ratio, psi=psi,
                       ks=ks)
            for metric, value, what in (("mean_shift", roll.mean_shift, "input mean shift (σ)"),
                                        ("variance_change", change, "input variance change"),
                                        ("psi", psi, "input PSI"), ("ks", ks, "input KS")):
                _tiered(out, p["drift"], "drift", metric, value, name, "baseline", what,
                        roll.limits.get(metric), hold.limits.get(metric))
            co, bo = _out_moments(s), _out_moments(base)
            if co and bo and bo[1] > 0:
                shift, std_change = abs(co[0] - bo[0]) / bo[1], abs(co[1] / bo[1] - 1)
                row.update(output_mean_shift=shift, output_std_ratio=co[1] / bo[1])
                _tiered(out, p["output"], "output", "mean_shift", shift, name, "baseline",
                        "output mean shift (σ)")
                _tiered(out, p["output"], "output", "std_change", std_change, name, "baseline",
                        "output std change")
    row.update(latency_p50=le.latency_p50, latency_p99=le.latency_p99)
    refs = [("serving", serving.layers.get(name) if serving else None)]
    if base is not None and base.hist_latency.n:
        refs.append(("baseline", LayerEvidence(base, *_quantiles(base))))
    need = max(1, p["evidence"]["min_latency_calls"])
    for against, ref in refs:
        if ref is None or min(le.latency_calls, ref.latency_calls) < need or \
                not (ref.latency_p50 and ref.latency_p99):
            continue  # too few timed calls on one side: latency is not judged
        for q in ("p50", "p99"):
            ratio = getattr(le, f"latency_{q}") / getattr(ref, f"latency_{q}")
            row[f"latency_{q}_ratio_{against}"] = ratio
            _tiered(out, p["latency"], "latency", f"{q}_ratio", ratio, name, against,
                    f"forward latency {q} ratio")
    return row


def _quantiles(s) -> tuple[float, float, int]:
    p50, p99 = s.hist_latency.quantiles((0.5, 0.99))
    return p50, p99, s.hist_latency.n


def evaluate(candidate, baseline, serving=None, policy=None, *,
             divergence: Divergence | None = None, model: str | None = None,
             version: str | None = None) -> Verdict:
    """Promote, hold or roll back a candidate model version from its live telemetry.

    Args:
        candidate: the candidate's telemetry over the canary window: a ``watch`` JSONL path,
            its records, or a ``PrometheusSource``.
        baseline: a ``normkit.monitor.Baseline`` (or the path of one) of the candidate
            version on known-good traffic.
        serving: optional, the serving model's telemetry over the same window (same kinds as
            ``candidate``): its latency is the reference for the candidate's.
        policy: a ``Policy``, a policy file path, or None (the defaults).
        divergence: optional ``divergence(candidate_logits, serving_logits)`` on shadow
            traffic, judged by the ``divergence.*`` rules.
        model, version: pick one model version from a JSONL window that holds several.

    Returns:
        A ``Verdict``.

    Raises:
        OSError / ValueError / TypeError: an input cannot be read or is not what is expected
            (the message names it).
    """
    if policy is None:
        policy = Policy()
    elif not isinstance(policy, Policy):
        policy = Policy.load(policy)
    if not isinstance(baseline, Baseline):
        baseline = Baseline.load(baseline)
    cand = gather(candidate, "candidate", model, version)
    serv = None if serving is None else gather(serving, "serving")
    ev = policy["evidence"]
    reasons: list[Reason] = []
    nf = policy["nonfinite"]
    bad_rows = sum(le.stats.nonfinite_rows for le in cand.layers.values())
    bad_out = sum(le.stats.out_nonfinite for le in cand.layers.values())
    for rule, value, limit, what in (
            ("nonfinite.steps", cand.nonfinite_steps, nf["max_steps"], "steps with NaN/Inf"),
            ("nonfinite.rows", bad_rows, nf["max_rows"], "norm input rows with NaN/Inf"),
            ("nonfinite.output_values", bad_out, nf["max_output_values"],
             "norm output values with NaN/Inf")):
        if value > limit:
            layers = [n for n, le in cand.layers.items()
                      if (le.stats.nonfinite_rows if rule == "nonfinite.rows" else
                          le.stats.out_nonfinite) > 0]
            first = layers[0] if layers and rule != "nonfinite.steps" else None
            reasons.append(Reason(rule, "rollback", first, value, limit, None,
                                  f"{what}: {value} > {limit}"
                                  + (f" (first layer: {first})" if first else "")))
    short = [(rule, have, need, unit) for rule, have, need, unit in (
        ("evidence.steps", cand.steps, ev["min_steps"], "sampled steps"),
        ("evidence.seconds", cand.seconds, ev["min_seconds"], "seconds"))
        if have < need]
    for rule, have, need, unit in short:
        reasons.append(Reason(rule, "hold", None, have, need, None,
                              f"{NOT_ENOUGH_TRAFFIC}: {have:g} {unit} of {need:g}"))
    layers: dict = {}
    tiers = {k: DriftThresholds(**policy["drift"][k], min_rows=ev["min_rows"],
                                alpha=policy["drift"]["alpha"]) for k in ("hold", "rollback")}
    if not short:
        for name in dict.fromkeys([*baseline.layers, *cand.layers]):
            le = cand.layers.get(name)
            if le is None:
                reasons.append(Reason("evidence.rows", "hold", name, 0, ev["min_rows"],
                                      "baseline", f"{NOT_ENOUGH_TRAFFIC}: the candidate has "
                                                  "no statistics for this layer"))
                continue
            layers[name] = _layer_rules(reasons, policy, tiers, name, le,
                                        baseline.layers.get(name), serv)
        if divergence is not None:
            for metric, value, what in (("kl", divergence.kl, "output KL (nats)"),
                                        ("top1_agreement", divergence.top1_agreement,
                                         "top-1 agreement")):
                _tiered(reasons, policy["divergence"], "divergence", metric, value, None,
                        "serving", what)
    decided = {r.decision for r in reasons}
    decision = "rollback" if "rollback" in decided else "hold" if decided else "promote"
    order = {"rollback": 0, "hold": 1}
    reasons.sort(key=lambda r: order[r.decision])
    evidence = {"steps": cand.steps, "seconds": cand.seconds,
                "nonfinite_steps": cand.nonfinite_steps, "source": cand.source,
                "serving": None if serv is None else serv.source,
                "baseline": f"{baseline.model_name} {baseline.model_version}",
                "divergence": None if divergence is None else divergence.to_dict()}
    return Verdict(decision, tuple(reasons), cand.model, cand.version, evidence, layers,
                   policy.to_dict())
