"""The study's write-up: a :class:`normkit._report.Document` built from the results document
(what was run, the findings, tables and plots), written as ``report.md`` + PNGs and as one
self-contained ``report.html``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._report import Document, write_json_atomic, write_report
from . import plots
from .stats import NOISE_K

__all__ = ["build_document", "write_outputs", "findings_rows", "QUICK_NOTE"]

_PLACE = {"none": "no norm", "post": "post-LN", "pre": "pre-LN", "peri": "peri-LN"}
_NORM = {"layer": "LayerNorm", "rms": "RMSNorm", "dyt": "Dynamic Tanh", "none": "no norm",
         "batch": "BatchNorm"}


def _f(v, nd=3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _ms(s: dict, nd: int = 3) -> str:
    """mean ± std (or the single value) of a summary."""
    if s["mean"] is None:
        return "–"
    text = _f(s["mean"], nd) if s["std"] is None else f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"
    if s.get("n_missing"):
        text += f" ({s['n_missing']} missing)"
    return text


def _noise(c: dict, nd: int = 3) -> str:
    if c["diff"] is None:
        return "–"
    if c["within_noise"] is None:
        return f"{c['diff']:+.{nd}f} (one seed: no noise estimate)"
    verdict = "within noise" if c["within_noise"] else "beyond noise"
    return f"{c['diff']:+.{nd}f} ± {c['noise']:.{nd}f}: **{verdict}**"


# The findings' wording, shared by the report and the terminal summary of `normkit study`.
QUICK_NOTE = ("The quick preset trains tiny models for a few dozen steps: enough to check the "
              "pipeline and batch dependence, too short for the training-dynamics claims. Run "
              "`normkit study` (the default preset) for those; a recorded run is kept in "
              "`benchmarks/results/study-*.json`.")


def _verdict(f: dict) -> tuple[str, str]:
    if f["holds"] is None:
        return "not measured", "info"
    if not f["conclusive"]:
        return ("agrees (inconclusive at this scale)" if f["holds"]
                else "not shown (inconclusive at this scale)"), "warn"
    return ("reproduced", "ok") if f["holds"] else ("not reproduced", "bad")


def findings_rows(doc: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """One row per finding: ``(claim, source, verdict, kind, evidence)``, where ``kind`` is the
    verdict's call-out kind ("ok", "bad", "warn", "info")."""
    return [(f["claim"], f["source"], *_verdict(f), f["evidence"]) for f in doc["findings"]]


def build_document(doc: dict[str, Any], runs_dir: Path | None = None) -> Document:
    """The report of a results document; ``runs_dir`` holds the runs' telemetry JSONL files
    (``normkit.watch`` + ``JsonlExporter``, for the activation plot; skipped when absent)."""
    cfg = doc["config"]
    ex = doc["experiments"]
    d = Document(
        "normkit study",
        f"preset {cfg['preset']} · {len(cfg['seeds'])} seeds · {doc['created_utc']} · "
        f"wall time {doc['wall_s'] / 60:.1f} min")

    d.heading("Findings")
    d.paragraph("Each row is a claim from the literature, checked on this run. A difference is "
                f"**beyond noise** when the means differ by more than {NOISE_K:g} standard "
                "errors of the difference over seeds (Welch); with 2–3 seeds this is a rough "
                "screen, not a significance test.")
    d.table(("claim", "source", "verdict", "evidence"),
            [(claim, source, verdict, evidence)
             for claim, source, verdict, _kind, evidence in findings_rows(doc)],
            align=("l", "l", "l", "l"))
    if cfg["preset"] == "quick":
        d.callout("warn", QUICK_NOTE)

    d.heading("Setup")
    data = doc["data"]
    m = doc["machine"]
    d.key_values([
        ("data", f"Python {data['python']} standard library ({data['source']}): "
                 f"{data['files']['train']} train / {data['files']['val']} validation files, "
                 f"{data['bytes']['train']:,} / {data['bytes']['val']:,} bytes, byte-level; "
                 f"split by SHA-256 of the path (1 in {data['val_buckets']} to validation)"),
        ("unigram loss", f"{data['unigram_loss']:.3f} nats/byte (a model that learns only "
                         "byte frequencies)"),
        ("transformer", f"{cfg['layers']} layers, width {cfg['dim']}, {cfg['heads']} heads, "
                        f"context {cfg['context']}, batch {cfg['batch']}, {cfg['steps']} steps, "
                        f"Adam (β2 0.98), peak lr {cfg['lr']:g}, warm-up "
                        f"{cfg['warmup_steps']} steps (linear) or none, no clipping"),
        ("LSTM", f"hidden {cfg['lstm_hidden']}, embedding {cfg['lstm_emb']}, context "
                 f"{cfg['lstm_context']}, {cfg['lstm_steps']} steps, lr {cfg['lstm_lr']:g}"),
        ("seeds", ", ".join(str(s) for s in cfg["seeds"])),
        ("machine", f"{m['platform']}, {m['cpu_count']} CPUs, torch threads "
                    f"{m['torch_threads']}, load average at start "
                    f"{m['loadavg'] and m['loadavg'][0]}, at end "
                    f"{doc['machine_end']['loadavg'] and doc['machine_end']['loadavg'][0]}"),
        ("versions", ", ".join(f"{k} {v}" for k, v in doc["versions"].items())),
    ])

    if "placement" in ex:
        p = ex["placement"]
        d.heading("Placement: where the norm sits (Xiong et al. 2020)")
        d.paragraph("The same decoder-only transformer with LayerNorm after each residual add "
                    "(post-LN), before each sub-layer (pre-LN), on both sides (peri/sandwich) or "
                    f"absent, trained at a high peak learning rate ({p['lr']:g}) with and "
                    "without warm-up. \"Trained\" counts seeds whose final validation loss got "
                    "at least half of the best configuration's gain over the unigram loss "
                    f"(threshold {_f(p['trained_threshold'])}).")
        rows = []
        for pl in ("none", "post", "pre", "peri"):
            for wu in ("nowarmup", "warmup"):
                name = f"nonorm-{wu}" if pl == "none" else f"{pl}-layer-{wu}"
                c = p["configs"][name]
                rows.append((_PLACE[pl], "yes" if wu == "warmup" else "no",
                             _ms(c["final_val_loss"]), f"{c['trained']}/{c['seeds']}",
                             str(c["diverged"]), _ms(c["max_grad_norm"], 1)))
        d.table(("placement", "warm-up", "final val loss", "trained", "diverged",
                 "max grad norm"), rows)
        d.table(("comparison", "Δ final val loss (no warm-up − warm-up)"),
                [(k, _noise(v)) for k, v in p["comparisons"].items()], align=("l", "l"))
        d.figure(plots.placement_figure(doc), "placement_loss.png",
                 "training loss vs step per placement, with and without warm-up",
                 "Training loss per placement (mean over seeds, band = min–max).")
        d.figure(plots.grad_norm_figure(doc), "placement_grad_norm.png",
                 "gradient norm vs step per placement",
                 "Total gradient norm per step (log scale), unclipped.")
        if runs_dir is not None:
            png = plots.activation_figure(doc, runs_dir)
            if png is not None:
                d.figure(png, "placement_activations.png",
                         "per-layer mean and variance of the norm inputs over training",
                         "Mean and standard deviation of each block's first norm input, "
                         "from the runs' telemetry (normkit.watch JSONL in runs/), first "
                         "seed, no warm-up; the no-norm model has no norm layer to watch.")

    if "norms" in ex:
        n = ex["norms"]
        d.heading("Norm type: LayerNorm, RMSNorm, Dynamic Tanh, none")
        d.paragraph("The pre-LN transformer with warm-up, with each norm in every norm "
                    "position. Step time is the median wall time of a full training step; the "
                    "op time is the norm alone (forward+backward on "
                    f"{n['op_shape'][0]}×{n['op_shape'][1]} float32), which isolates the "
                    "norm's own cost from the matmuls that dominate a small model's step. "
                    "Runs execute one after another, so load from other processes on the "
                    "machine shifts whole runs' step times (see the load averages under "
                    "Setup); the op times are measured back to back and are the steadier "
                    "comparison.")
        rows = []
        for k in ("layer", "rms", "dyt", "none"):
            c = n["configs"][n["config_of_norm"][k]]
            op = n["op_time_us"].get(k)
            rows.append((_NORM[k], _ms(c["final_val_loss"]), f"{c['trained']}/{c['seeds']}",
                         _ms(c["step_time_ms"], 1), "–" if op is None else f"{op:.1f}"))
        d.table(("norm", "final val loss", "trained", "ms / step", "op µs (fwd+bwd)"), rows)
        d.paragraph("For scale, torch's own modules on the same shape: "
                    f"`torch.nn.LayerNorm` {n['op_time_us']['torch-layer']:.1f} µs, "
                    f"`torch.nn.RMSNorm` {n['op_time_us']['torch-rms']:.1f} µs.")
        d.table(("comparison", "Δ (other − LayerNorm)"),
                [(k, _noise(v, 2 if "time" in k else 3)) for k, v in n["comparisons"].items()],
                align=("l", "l"))
        d.figure(plots.norms_figure(doc), "norm_types.png",
                 "training loss per norm type and time per step",
                 "Loss per norm type (mean over seeds) and the time per training step.")

    if "batch" in ex:
        b = ex["batch"]
        d.heading("Batch dependence: BatchNorm vs LayerNorm")
        d.paragraph(f"A pre-norm transformer with BatchNorm (over the channels, statistics over "
                    f"all tokens of the batch) and one with LayerNorm, each trained "
                    f"{b['train_steps']} steps, then fed the same {max(b['batch_sizes'])} "
                    "validation sequences in batches of "
                    + ", ".join(str(s) for s in b["batch_sizes"])
                    + ". Norm layers: every norm layer given exactly the input it saw in the "
                    "largest batch, split into smaller batches. Model: the whole model's logits "
                    "(which also carry the matmuls' batch-shape rounding).")
        rows = []
        for norm in ("layer", "batch"):
            mres = b["models"].get(norm)
            if mres is None:
                continue
            for mode in ("train", "eval"):
                for bs, v in mres[mode]["norm_layers"].items():
                    mv = mres[mode]["model"][bs]
                    rows.append((_NORM[norm], mode, bs,
                                 "yes" if v["all_bitwise_equal"] else "no",
                                 f"{v['max_abs_diff']:.3g}",
                                 "yes" if mv["bitwise_equal"] else "no",
                                 f"{mv['max_abs_diff']:.3g}"))
        d.table(("norm", "mode", "batch", "norm layers bitwise equal", "norm max |Δ|",
                 "logits bitwise equal", "logits max |Δ|"), rows)
        for norm in ("layer", "batch"):
            mres = b["models"].get(norm)
            if mres is not None:
                d.paragraph(f"{_NORM[norm]}: largest logit difference between train-mode and "
                            f"eval-mode evaluation of the same batch: "
                            f"{mres['train_eval_gap']:.3g}.")
        d.figure(plots.batch_figure(doc), "batch_dependence.png",
                 "norm output change with batch size, LayerNorm vs BatchNorm",
                 "Largest change of a norm layer's output when its samples come in smaller "
                 "batches (log scale; 0 = bitwise equal).")

    if "recurrent" in ex:
        r = ex["recurrent"]
        d.heading("Recurrent: LSTM with and without layer normalization (Ba et al. 2016)")
        d.paragraph("A one-layer byte-level LSTM; the LN variant normalizes the input and "
                    "recurrent gate pre-activations separately and the cell state (Ba et al. "
                    "eq. 20–22). Both run the same Python cell. Target loss: "
                    f"{_f(r['target_loss'])} ({r['target_rule']}).")
        rows = []
        for name, label in (("lstm", "LSTM"), ("lstm-ln", "LN-LSTM")):
            c = r["configs"][name]
            rows.append((label, _ms(c["steps_to_target"], 0), _ms(c["final_val_loss"]),
                         _ms(c["step_time_ms"], 1)))
        d.table(("model", "steps to target", "final val loss", "ms / step"), rows)
        d.table(("comparison", "Δ (LSTM − LN-LSTM)"),
                [(k, _noise(v, 0 if "steps" in k else 3)) for k, v in r["comparisons"].items()],
                align=("l", "l"))
        d.figure(plots.recurrent_figure(doc), "recurrent_loss.png",
                 "LSTM training loss with and without layer normalization",
                 "Training loss (mean over seeds, band = min–max) and the target.")

    d.heading("Files")
    d.paragraph("`results.json` holds every number above and every run's per-step loss, "
                "gradient norm, learning rate and step time (schema `" + doc["schema"]
                + f"` version {doc['schema_version']}); `runs/*.jsonl` holds each "
                "run's telemetry as written by `normkit.watch` with a `JsonlExporter` (schema "
                "`normkit.monitor`; every norm layer's input and output statistics, γ/β and "
                "gradient norms and non-finite counts, every "
                f"{cfg['log_every']} steps from step 1) — `normkit report runs/RUN.jsonl` "
                "reads it.")
    return d


def write_outputs(doc: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``results.json``, ``report.md`` (+ ``plots/*.png``) and ``report.html`` into
    ``out_dir``, each atomically.  Returns the paths."""
    out = Path(out_dir)
    report = build_document(doc, out / "runs")
    footer = (f"normkit {doc['versions']['normkit']} · torch {doc['versions']['torch']} · "
              f"schema {doc['schema']}/{doc['schema_version']}")
    paths = write_report(report, out, stem="report", image_dir="plots", footer=footer)
    doc["outputs"] = {"report_md": paths["markdown"].name, "report_html": paths["html"].name,
                      "plots": [f"plots/{p.name}" for p in paths["images"]],
                      "runs": sorted(f"runs/{r['telemetry']}" for r in doc["runs"].values()
                                     if r.get("telemetry"))}
    results = write_json_atomic(out / "results.json", doc)
    return {"results": results, **paths}
