"""The benchmark's clock: an adaptive timer (warm-up, ``inner`` calls per sample, samples to
fill a time budget, interleaved rounds) and its statistics; synchronised on the device."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["TimingPolicy", "Timing", "Timer", "CpuTimer", "CudaTimer", "timer_for"]


@dataclass(frozen=True)
class TimingPolicy:
    """How long to measure each (case, implementation).

    A measurement takes samples until it has ``min_reps`` of them *and* they add up to
    ``min_time_s``, but stops at ``max_time_s`` (never below ``floor_reps`` samples), so a
    1-second call on the biggest shape does not take 10 s.  ``rounds`` > 1 interleaves the
    implementations of a case (copy, torch, normkit, ..., copy, torch, ...) so slow drift of a
    shared machine hits them alike.
    """

    min_time_s: float = 0.2
    min_reps: int = 10
    max_time_s: float = 5.0
    floor_reps: int = 5
    warmup_reps: int = 3
    warmup_s: float = 0.05
    rounds: int = 4
    # A sample times `inner` back-to-back calls; inner grows until a sample lasts this long, so
    # perf_counter's ~0.1 µs overhead stays below 1% of a 4 µs call.
    min_sample_s: float = 20e-6

    def __post_init__(self):
        if not (self.min_time_s >= 0 and self.max_time_s >= self.min_time_s):
            raise ValueError(
                f"TimingPolicy: need 0 <= min_time_s <= max_time_s, got "
                f"{self.min_time_s} and {self.max_time_s}"
            )
        for name in ("min_reps", "floor_reps", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"TimingPolicy.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_reps < 0:
            raise ValueError(f"TimingPolicy.warmup_reps must be >= 0, got {self.warmup_reps}")

    @classmethod
    def quick(cls) -> TimingPolicy:
        return cls(
            min_time_s=0.025, min_reps=5, max_time_s=0.2, floor_reps=2, warmup_reps=2,
            warmup_s=0.005, rounds=3,
        )


@dataclass
class Timing:
    """Statistics of one measurement, in seconds per call."""

    median_s: float
    min_s: float
    q1_s: float
    q3_s: float
    iqr_s: float
    samples: int
    inner: int
    first_call_s: float  # the very first call: includes JIT / torch.compile work
    total_s: float  # wall time spent in this measurement, warm-up included

    @classmethod
    def from_samples(cls, per_call: Sequence[float], inner: int, first_call_s: float,
                     total_s: float) -> Timing:
        s = sorted(per_call)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(
            median_s=statistics.median(s),
            min_s=s[0],
            q1_s=q1,
            q3_s=q3,
            iqr_s=q3 - q1,
            samples=len(s),
            inner=inner,
            first_call_s=first_call_s,
            total_s=total_s,
        )


class Timer:
    """Adaptive timer.  Subclasses supply ``_time_calls(fn, n)``: the wall time of n calls of fn,
    finished (synchronised) on the device.  The policy logic lives here, shared by all devices.
    """

    def _time_calls(self, fn: Callable[[], object], n: int) -> float:
        raise NotImplementedError

    def prepare(self, fn: Callable[[], object], policy: TimingPolicy) -> _Prepared:
        """First call, warm-up, and the choice of ``inner`` and sample count."""
        t_start = time.perf_counter()
        first = self._time_calls(fn, 1)
        # Warm up by count *and* time: a handful of calls is not enough for a µs op (caches,
        # the branch predictor, and OpenMP workers that went to sleep and must be woken).
        # At least one: the first call may have been a JIT compile, useless as an estimate.
        warm = [self._time_calls(fn, 1)]
        while len(warm) < policy.warmup_reps or sum(warm) < policy.warmup_s:
            if sum(warm) > policy.max_time_s / 2:  # a huge call: warm enough already
                break
            warm.append(self._time_calls(fn, 1))
        est = max(statistics.median(warm[len(warm) // 2:]), 1e-9)  # the settled half
        inner = 1
        while est * inner < policy.min_sample_s and inner < 1 << 20:
            inner *= 2
        if inner > 1:  # re-estimate on a batch: single tiny calls overstate the per-call time
            est = max(self._time_calls(fn, inner) / inner, 1e-9)
        per_sample = est * inner
        want = max(policy.min_reps, math.ceil(policy.min_time_s / per_sample))
        cap = max(policy.floor_reps, math.floor(policy.max_time_s / per_sample))
        total = min(want, cap)
        # Spread over the rounds; a huge call with fewer samples than rounds sits some out.
        per_round = math.ceil(total / policy.rounds)
        return _Prepared(fn, inner, per_round, total, first, time.perf_counter() - t_start)

    def sample(self, prep: _Prepared) -> None:
        """One round: the next ``samples_per_round`` samples (fewer once the total is met)."""
        t0 = time.perf_counter()
        n = min(prep.samples_per_round, prep.samples_total - len(prep.per_call))
        for _ in range(n):
            prep.per_call.append(self._time_calls(prep.fn, prep.inner) / prep.inner)
        prep.total_s += time.perf_counter() - t0

    def measure(self, fn: Callable[[], object], policy: TimingPolicy) -> Timing:
        """Time one callable on its own (all rounds back to back)."""
        prep = self.prepare(fn, policy)
        for _ in range(policy.rounds):
            self.sample(prep)
        return prep.result()


@dataclass
class _Prepared:
    fn: Callable[[], object]
    inner: int
    samples_per_round: int
    samples_total: int
    first_call_s: float
    total_s: float
    per_call: list[float] = field(default_factory=list)

    def result(self) -> Timing:
        return Timing.from_samples(self.per_call, self.inner, self.first_call_s, self.total_s)


class CpuTimer(Timer):
    """``time.perf_counter`` around the calls; CPU ops are synchronous."""

    def _time_calls(self, fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0


class CudaTimer(Timer):
    """CUDA events around the calls, then a synchronize (GPU work is asynchronous; a host clock
    would time the launches, not the kernels).  Not exercised by CI, which has no GPU."""

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)

    def _time_calls(self, fn, n):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def timer_for(device: str | torch.device) -> Timer:
    kind = torch.device(device).type
    if kind == "cpu":
        return CpuTimer()
    if kind == "cuda":
        return CudaTimer(device)
    raise ValueError(f"no timer for device {str(device)!r}; supported: cpu, cuda")
