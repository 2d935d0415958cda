"""One training run: seed, build, train, evaluate, record — the same loop for every model."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._io import publish, temp_beside
from ..monitor import JsonlExporter, watch
from .config import StudyConfig
from .data import Corpus, fixed_batches, sample_batch
from .models import CharLSTM, TinyGPT

__all__ = ["RunSpec", "train_run", "build_model", "eval_loss", "TIMING_SKIP"]

# The first steps pay one-off costs (allocator growth, first-touch pages), so the per-step wall
# time is the median over the steps after these.
TIMING_SKIP = 5


@dataclass(frozen=True)
class RunSpec:
    """One training run.

    Attributes:
        model: "gpt" or "lstm".
        placement, norm: the transformer's norm placement and type (see ``models``); for the
            LSTM, norm is "layer" or "none".
        warmup: linear learning-rate warm-up, or the full rate from step 1.
        seed: seeds the initialization and the batch order.
    """

    model: str
    placement: str
    norm: str
    warmup: bool
    seed: int

    def canonical(self) -> RunSpec:
        """The same run under one name: a pre-LN model with no norm *is* the no-norm model."""
        if self.model == "gpt" and (self.placement == "none" or self.norm == "none"):
            return RunSpec("gpt", "none", "none", self.warmup, self.seed)
        return self

    @property
    def config_name(self) -> str:
        """The configuration, seed excluded (runs of different seeds share it)."""
        if self.model == "lstm":
            return "lstm-ln" if self.norm == "layer" else "lstm"
        wu = "warmup" if self.warmup else "nowarmup"
        if self.placement == "none":
            return f"nonorm-{wu}"
        return f"{self.placement}-{self.norm}-{wu}"

    @property
    def run_id(self) -> str:
        return f"{self.config_name}-s{self.seed}"


def build_model(spec: RunSpec, cfg: StudyConfig) -> torch.nn.Module:
    """The model ``spec`` names, initialized from ``torch.manual_seed(spec.seed)``."""
    torch.manual_seed(spec.seed)
    if spec.model == "lstm":
        return CharLSTM(layer_norm=spec.norm == "layer", hidden=cfg.lstm_hidden, emb=cfg.lstm_emb)
    if spec.model == "gpt":
        return TinyGPT(spec.placement, spec.norm, cfg.layers, cfg.dim, cfg.heads, cfg.context)
    raise ValueError(f"model must be 'gpt' or 'lstm', got {spec.model!r}")


def lr_at(step: int, peak: float, warmup_steps: int) -> float:
    """Linear warm-up from peak/warmup_steps to peak over ``warmup_steps`` steps, then constant
    (no decay, so the warm-up is the only difference between the paired runs)."""
    if warmup_steps <= 0:
        return peak
    return peak * min(1.0, step / warmup_steps)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches) -> float:
    """Mean cross-entropy (nats per byte) on ``batches``, in eval mode.

    Calls ``model.forward`` rather than ``model(...)``: under ``normkit.watch`` every call of the
    root module counts as a training step (and may be sampled), and validation passes are not
    steps.  The submodules' hooks still run, so the watch must have no open step (see
    ``train_run``: it flushes first).
    """
    was_training = model.training
    model.eval()
    try:
        losses = [float(F.cross_entropy(model.forward(x).flatten(0, 1), y.flatten()))
                  for x, y in batches]
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def _open_telemetry(model: torch.nn.Module, spec: RunSpec, path: Path, every: int):
    """``normkit.watch`` on ``model`` with a ``JsonlExporter`` writing to a temp file beside
    ``path`` (``normkit._io.temp_beside``, which also removes what a killed run left there):
    :func:`_close_telemetry` publishes it (rename), so a reader never sees a half run, and a
    re-run into the same directory replaces the file (the exporter itself appends)."""
    tmp = temp_beside(path)
    # model_name/model_version label every record: "<config>" / "s<seed>" (the run id).
    w = watch(model, model_name=spec.config_name, model_version=f"s{spec.seed}", every=every,
              exporters=[JsonlExporter(tmp)], backward=True)
    return w, tmp


def _close_telemetry(w, tmp: Path, path: Path | None) -> None:
    """Stop the watch (writes the last sampled step) and publish ``tmp`` as ``path``; with
    ``path`` None (the run failed) drop it."""
    try:
        w.stop()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if path is None:
        tmp.unlink(missing_ok=True)
    else:
        publish(tmp, path)


def train_run(spec: RunSpec, cfg: StudyConfig, corpus: Corpus, telemetry_path: Path | None,
              *, steps: int | None = None, on_step=None
              ) -> tuple[dict[str, Any], torch.nn.Module]:
    """Train ``spec``; return its record (JSON-ready; non-finite numbers become None) and the
    trained model.

    A run whose loss turns non-finite stops there and is marked ``diverged``.

    Args:
        spec: the run.
        cfg: the study configuration (model size, steps, learning rates, ...).
        corpus: the text.
        telemetry_path: where ``normkit.watch`` + ``JsonlExporter`` write the run's telemetry
            (schema ``normkit.monitor``; a step record every ``cfg.log_every`` steps, starting
            with step 1); None: no telemetry.
        steps: override the number of steps (the batch-dependence experiment trains briefly).
        on_step: ``on_step(step, total)`` after every step (the progress bar).

    Returns:
        ``(record, model)``; the record is ``{"run", "config", "seed", "steps", "loss",
        "grad_norm", "lr", "step_times_s", "val": [[step, loss], ...], "final_val_loss",
        "diverged", "diverged_at", "step_time_s", "wall_s", "telemetry"}`` and, for the LSTM,
        ``"loss_ema"``.  The per-step training numbers (loss, gradient norm, learning rate,
        wall time) live here; the telemetry file holds the per-layer statistics.
    """
    lstm = spec.model == "lstm"
    total = steps if steps is not None else (cfg.lstm_steps if lstm else cfg.steps)
    context = cfg.lstm_context if lstm else cfg.context
    peak = cfg.lstm_lr if lstm else cfg.lr
    warm = cfg.warmup_steps if spec.warmup else 0
    model = build_model(spec, cfg)
    model.train()
    # Adam with β2 = 0.98, as Xiong et al. 2020 train their Transformers.
    opt = torch.optim.Adam(model.parameters(), lr=peak, betas=(0.9, 0.98), eps=1e-9)
    gen = torch.Generator().manual_seed(10_000 + spec.seed)  # batch order: the seed's own
    val_batches = fixed_batches(corpus.val, cfg.eval_batches, cfg.batch, context)
    params = [p for p in model.parameters()]
    w = tmp = None
    if telemetry_path is not None:
        w, tmp = _open_telemetry(model, spec, telemetry_path, cfg.log_every)
    losses: list[float | None] = []
    grad_norms: list[float | None] = []
    lrs: list[float] = []
    times: list[float] = []
    val: list[list[float | None]] = []
    diverged_at = None
    t_run = time.perf_counter()
    try:
        for step in range(1, total + 1):
            x, y = sample_batch(corpus.train, cfg.batch, context, gen)
            lr = lr_at(step, peak, warm)
            for group in opt.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # The total gradient norm, measured and not clipped: clipping would hide the very
            # instability the placement experiment looks for.
            gn = float(torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])))
            opt.step()
            dt = time.perf_counter() - t0
            lv = loss.item()
            times.append(dt)
            lrs.append(lr)
            losses.append(lv if math.isfinite(lv) else None)
            grad_norms.append(gn if math.isfinite(gn) else None)
            if on_step is not None:
                on_step(step, total)
            if not math.isfinite(lv):
                diverged_at = step
                break
            if step % cfg.eval_every == 0 or step == total:
                if w is not None:
                    # Close the sampled step (its backward is done) so that the validation
                    # passes below, which run through the armed submodule hooks, add nothing
                    # to it.
                    w.flush()
                v = eval_loss(model, val_batches)
                val.append([step, v if math.isfinite(v) else None])
    except BaseException:
        if w is not None:
            _close_telemetry(w, tmp, None)  # an interrupted run leaves no telemetry file
        raise
    if w is not None:
        _close_telemetry(w, tmp, telemetry_path)
    wall = time.perf_counter() - t_run
    timed = times[TIMING_SKIP:] or times
    record: dict[str, Any] = {
        "run": spec.run_id,
        "config": spec.config_name,
        "seed": spec.seed,
        "steps": len(losses),
        "loss": losses,
        "grad_norm": grad_norms,
        "lr": lrs,
        "step_times_s": [round(t, 7) for t in times],  # 0.1 µs: far below the timer's noise
        "val": val,
        "final_val_loss": val[-1][1] if val and diverged_at is None else None,
        "diverged": diverged_at is not None,
        "diverged_at": diverged_at,
        "step_time_s": statistics.median(timed),
        "wall_s": wall,
        "telemetry": telemetry_path.name if telemetry_path is not None else None,
    }
    if lstm:
        record["loss_ema"] = ema(losses)
    return record, model


def ema(values: list[float | None], alpha: float = 0.1) -> list[float | None]:
    """Exponential moving average (α = 0.1, about a 10-step memory); None once a value is."""
    out: list[float | None] = []
    acc = None
    for v in values:
        if v is None:
            out.append(None)
            acc = None
            continue
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out
