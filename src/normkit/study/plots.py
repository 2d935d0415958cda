"""The study's figures (matplotlib via ``normkit._report.plotting``), each returned as PNG
bytes.  Curves are the mean over seeds with a min–max band, smoothed by an EMA so that the
per-batch noise of a byte-level loss does not hide the trend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .._report.plotting import PALETTE, new_figure, to_png
from ..monitor import read_jsonl

__all__ = ["placement_figure", "grad_norm_figure", "activation_figure", "norms_figure",
           "batch_figure", "recurrent_figure", "telemetry_series"]

_LABEL = {"none": "no norm", "post": "post-LN", "pre": "pre-LN", "peri": "peri-LN",
          "layer": "LayerNorm", "rms": "RMSNorm", "dyt": "DyT"}


def _smooth(values: list[float | None], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(math.nan)
            continue
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def _band(ax, runs: list[dict], key: str, label: str, color: str, smooth: bool = True):
    """Mean over the runs' curves (up to the shortest) with a min–max band."""
    curves = [_smooth(r[key]) if smooth else [math.nan if v is None else v for v in r[key]]
              for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return
    n = max(len(c) for c in curves)
    curves = [c + [math.nan] * (n - len(c)) for c in curves]  # diverged runs stop early
    steps = list(range(1, n + 1))
    cols = list(zip(*curves, strict=True))
    mean = [_nanmean(c) for c in cols]
    lo = [_nanmin(c) for c in cols]
    hi = [_nanmax(c) for c in cols]
    ax.plot(steps, mean, color=color, label=label, lw=1.5)
    if len(curves) > 1:
        ax.fill_between(steps, lo, hi, color=color, alpha=0.18, lw=0)


def _finite(c):
    return [v for v in c if not math.isnan(v)]


def _nanmean(c):
    f = _finite(c)
    return sum(f) / len(f) if f else math.nan


def _nanmin(c):
    f = _finite(c)
    return min(f) if f else math.nan


def _nanmax(c):
    f = _finite(c)
    return max(f) if f else math.nan


def _runs(doc: dict, config: dict) -> list[dict]:
    return [doc["runs"][r] for r in config["runs"]]


def placement_figure(doc: dict[str, Any]) -> bytes:
    """Training loss vs step per placement; left without warm-up, right with."""
    ex = doc["experiments"]["placement"]
    fig, (a0, a1) = new_figure(2, 1, width=5.2)
    uni = doc["data"]["unigram_loss"]
    for ax, wu in ((a0, "nowarmup"), (a1, "warmup")):
        for i, p in enumerate(("none", "post", "pre", "peri")):
            name = f"nonorm-{wu}" if p == "none" else f"{p}-layer-{wu}"
            _band(ax, _runs(doc, ex["configs"][name]), "loss", _LABEL[p], PALETTE[i])
        ax.axhline(uni, color="grey", ls=":", lw=1, label="unigram")
        if wu == "warmup":
            ax.axvline(ex["warmup_steps"], color="grey", ls="--", lw=0.8)
        ax.set_title(f"{'with' if wu == 'warmup' else 'without'} warm-up (peak lr {ex['lr']:g})")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (nats/byte, EMA)")
        ax.set_ylim(top=uni + 1.0)
        ax.legend(fontsize=8)
    return to_png(fig)


def grad_norm_figure(doc: dict[str, Any]) -> bytes:
    """Total gradient norm vs step per placement (log scale)."""
    ex = doc["experiments"]["placement"]
    fig, (a0, a1) = new_figure(2, 1, width=5.2)
    for ax, wu in ((a0, "nowarmup"), (a1, "warmup")):
        for i, p in enumerate(("none", "post", "pre", "peri")):
            name = f"nonorm-{wu}" if p == "none" else f"{p}-layer-{wu}"
            _band(ax, _runs(doc, ex["configs"][name]), "grad_norm", _LABEL[p], PALETTE[i])
        ax.set_yscale("log")
        ax.set_title(f"gradient norm, {'with' if wu == 'warmup' else 'without'} warm-up")
        ax.set_xlabel("step")
        ax.set_ylabel("‖∇‖₂ (EMA)")
        ax.legend(fontsize=8)
    return to_png(fig)


def telemetry_series(path: str | Path, suffix: str = "") -> dict[str, tuple[list, list, list]]:
    """Per norm layer whose name ends with ``suffix``: ``(steps, input means, input stds)``
    over the sampled steps of a ``normkit.watch`` JSONL file (the step records' ``summary``;
    None, e.g. for a step whose inputs were all non-finite, becomes NaN)."""
    series: dict[str, tuple[list, list, list]] = {}
    for rec in read_jsonl(path):
        if rec.get("type") != "step":
            continue
        for layer, s in rec["summary"].items():
            if not layer.endswith(suffix):
                continue
            steps, means, stds = series.setdefault(layer, ([], [], []))
            steps.append(rec["step"])
            means.append(math.nan if s["input_mean"] is None else s["input_mean"])
            stds.append(math.nan if s["input_std"] is None else s["input_std"])
    return series


def activation_figure(doc: dict[str, Any], runs_dir: Path) -> bytes | None:
    """Per-layer mean and standard deviation of each block's first norm input (the residual
    stream for pre-/peri-LN, the attention sum for post-LN), from the runs' ``normkit.watch``
    telemetry (JSONL), for the runs without warm-up, first seed.  The no-norm model has no norm
    layer for the telemetry to watch and is left out.  None when no telemetry file has such
    a layer."""
    cfgs = doc["experiments"]["placement"]["configs"]
    seed = doc["config"]["seeds"][0]
    rows = []
    for p in ("none", "post", "pre", "peri"):
        name = "nonorm-nowarmup" if p == "none" else f"{p}-layer-nowarmup"
        rid = f"{name}-s{seed}"
        rec = doc["runs"].get(rid)
        if rid not in cfgs[name]["runs"] or rec is None or not rec.get("telemetry"):
            continue
        path = runs_dir / rec["telemetry"]
        if path.is_file():
            series = telemetry_series(path, ".norm1")
            if series:
                rows.append((p, series))
    if not rows:
        return None
    fig, axes = new_figure(2, len(rows), width=4.6, height=2.3)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    for r, (p, series) in enumerate(rows):
        n = max(len(series), 1)
        am, av = axes[2 * r], axes[2 * r + 1]
        for j, (layer, (steps, means, stds)) in enumerate(sorted(
                series.items(), key=lambda kv: int(kv[0].split(".")[1]))):
            color = cmap(j / max(n - 1, 1))
            label = f"block {layer.split('.')[1]}"
            am.plot(steps, means, color=color, lw=1.2, label=label)
            av.plot(steps, stds, color=color, lw=1.2, label=label)
        am.set_title(f"{_LABEL[p]}, no warm-up: input mean")
        av.set_title(f"{_LABEL[p]}, no warm-up: input std")
        av.set_yscale("log")
        for ax in (am, av):
            ax.set_xlabel("step")
        if r == 0:
            av.legend(fontsize=7, ncol=2)
    return to_png(fig)


def norms_figure(doc: dict[str, Any]) -> bytes:
    """Left: training loss per norm type (pre-LN, warm-up).  Right: time per training step and
    per norm op (forward+backward)."""
    ex = doc["experiments"]["norms"]
    fig, (a0, a1) = new_figure(2, 1, width=5.2)
    kinds = ("layer", "rms", "dyt", "none")
    for i, k in enumerate(kinds):
        _band(a0, _runs(doc, ex["configs"][ex["config_of_norm"][k]]), "loss",
              _LABEL.get(k, "no norm") if k != "none" else "no norm", PALETTE[i])
    a0.axhline(doc["data"]["unigram_loss"], color="grey", ls=":", lw=1, label="unigram")
    a0.set_ylim(top=doc["data"]["unigram_loss"] + 1.0)
    a0.set_title("pre-LN transformer, with warm-up")
    a0.set_xlabel("step")
    a0.set_ylabel("training loss (nats/byte, EMA)")
    a0.legend(fontsize=8)
    step_ms = [ex["configs"][ex["config_of_norm"][k]]["step_time_ms"] for k in kinds]
    xs = range(len(kinds))
    a1.bar(xs, [s["mean"] or 0 for s in step_ms], color=[PALETTE[i] for i in xs],
           yerr=[s["std"] or 0 for s in step_ms], capsize=3)
    a1.set_xticks(list(xs), [_LABEL.get(k, "no norm") if k != "none" else "no norm"
                             for k in kinds])
    a1.set_ylabel("ms per training step (median)")
    op = ex["op_time_us"]
    a1.set_title("time per step; norm op alone: " + ", ".join(
        f"{_LABEL[k]} {op[k]:.0f} µs" for k in ("layer", "rms", "dyt")), fontsize=8)
    return to_png(fig)


def batch_figure(doc: dict[str, Any]) -> bytes:
    """Largest output change of the norm layers when the same samples are evaluated in
    smaller batches, LayerNorm vs BatchNorm (train and eval mode); 0 is drawn at the floor."""
    ex = doc["experiments"]["batch"]
    fig, (ax,) = new_figure(1, 1, width=6.4, height=3.2)
    floor = 1e-12
    labels, vals, colors = [], [], []
    for i, (norm, mode) in enumerate((("layer", "train"), ("batch", "train"),
                                      ("layer", "eval"), ("batch", "eval"))):
        m = ex["models"].get(norm)
        if m is None:
            continue
        for b, v in m[mode]["norm_layers"].items():
            labels.append(f"{'LN' if norm == 'layer' else 'BN'} {mode}\nbatch {b}")
            vals.append(max(v["max_abs_diff"], floor))
            colors.append(PALETTE[i])
    ax.bar(range(len(vals)), vals, color=colors)
    for i, v in enumerate(vals):
        if v <= floor:
            ax.text(i, floor * 3, "0\nbitwise", ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(range(len(vals)), labels, fontsize=7)
    ax.set_ylabel(f"max |Δ output| vs batch {max(ex['batch_sizes'])}")
    ax.set_title("norm-layer output change with the batch size")
    return to_png(fig)


def recurrent_figure(doc: dict[str, Any]) -> bytes:
    """Smoothed training loss of the LSTM with and without layer normalization."""
    ex = doc["experiments"]["recurrent"]
    fig, (ax,) = new_figure(1, 1, width=6.4, height=3.4)
    for i, (name, label) in enumerate((("lstm", "LSTM"), ("lstm-ln", "LN-LSTM"))):
        _band(ax, _runs(doc, ex["configs"][name]), "loss", label, PALETTE[i])
    if ex["target_loss"] is not None:
        ax.axhline(ex["target_loss"], color="grey", ls="--", lw=1, label="target")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte, EMA)")
    ax.set_title("byte-level LSTM, with and without layer normalization")
    ax.legend(fontsize=8)
    return to_png(fig)
