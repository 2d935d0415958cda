"""What a watch judges its statistics against: the baseline (drift, latency regressions) and,
under torch.distributed, the other ranks (an all-reduce of each step's statistics).  A mixin of
``Watch``, which holds the state it reads (the module docstring of ``watch``)."""

from __future__ import annotations

import logging

import torch

from ._hunt import _merge_ranks
from ._stats import LayerStats, pack, unpack
from .alerts import Alert
from .drift import Baseline, DriftResult, warn_unjudged

log = logging.getLogger(__package__ + ".watch")


class _Judging:
    """Baselines, drift and the cross-rank reduction of a ``Watch``."""

    def baseline(self) -> Baseline:
        """A ``Baseline`` of everything seen so far."""
        return Baseline(self.model_name, self.model_version,
                        {n: s.copy() for n, s in self._totals.items()})

    def window_stats(self) -> dict[str, LayerStats]:
        """The sliding window (last ``window`` sampled steps) merged per layer."""
        out: dict[str, LayerStats] = {}
        for step in self._win:
            for n, s in step.items():
                if n in out:
                    out[n].merge(s)
                else:
                    out[n] = s.copy()
        return out

    def _check_baseline(self, new_alerts: list[Alert]) -> dict:
        live = self.window_stats()
        try:
            return self._judge_drift(live, new_alerts)
        except Exception as e:
            # Whatever the baseline holds (one built in code is not schema-checked), the step
            # keeps its record: drift is marked unavailable, and said once.
            reason = f"drift computation failed: {type(e).__name__}: {e}"
            if not self._drift_failure_said:
                self._drift_failure_said = True
                log.warning("normkit watch of %s %s: %s.  Records are still written, with drift "
                            "evaluable=false and this reason (said once).", self.model_name,
                            self.model_version, reason, exc_info=True)
            self.drift_results = {
                n: DriftResult(n, live[n].rows if n in live else 0, None, None, None, None, (),
                               evaluable=False, reason=reason)
                for n in self.layer_names}
            return self.drift_results

    def _judge_drift(self, live: dict[str, LayerStats], new_alerts: list[Alert]) -> dict:
        drift = self.baseline_ref.drift(live, self.thresholds)
        self.drift_results = drift
        warn_unjudged(drift, self._unjudged, f"{self.model_name} {self.model_version}")
        bad = [n for n, r in drift.items() if r.drifted]
        for n in bad:
            r = drift[n]
            a = self.rules.fire("drift", self.model_name, self.model_version, n,
                                f"layer {n} input drifted ({', '.join(r.crossed)})")
            if a is not None:
                new_alerts.append(a)
        f = self.rules.latency_factor
        for n, s in live.items():
            base = self.baseline_ref.layers.get(n)
            if base is None or base.hist_latency.n < 5 or s.hist_latency.n < 5:
                continue
            b50, l50 = base.hist_latency.quantile(0.5), s.hist_latency.quantile(0.5)
            if b50 > 0 and l50 > f * b50:
                a = self.rules.fire("latency_regression", self.model_name, self.model_version,
                                    n, f"layer {n} median forward {l50 * 1e6:.0f} µs > {f:g}x "
                                       f"baseline {b50 * 1e6:.0f} µs")
                if a is not None:
                    new_alerts.append(a)
        return drift

    def _reduce(self, layers: dict[str, LayerStats], fwd: dict, bwd: dict):
        """All-reduce the step's per-layer statistics across ranks (every rank must call)."""
        dist = torch.distributed
        for name in self.layer_names:
            layers.setdefault(name, self._new_stats(name))
        ordered = [layers[n] for n in self.layer_names]
        sums, mins, maxs = pack(ordered)
        flag = torch.tensor([float(fwd["origin"] is not None or bwd["origin"] is not None)],
                            dtype=torch.float64)
        sums = torch.cat([sums, flag])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        dist.all_reduce(mins, op=dist.ReduceOp.MIN)
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
        any_bad = sums[-1].item() > 0
        unpack(ordered, sums[:-1], mins, maxs)
        if any_bad:
            gathered: list = [None] * self._world
            dist.all_gather_object(gathered, (fwd, bwd))
            fwd, bwd = _merge_ranks(gathered)
        return fwd, bwd
