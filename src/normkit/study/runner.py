"""Run the study: plan the training runs, run each once, analyse, write the outputs.

A run shared by two experiments runs once (the pre-LN LayerNorm model with warm-up is both a
placement and a norm-type configuration; pre-LN with no norm *is* the no-norm model).
"""

from __future__ import annotations

import copy
import datetime as _dt
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._provenance import machine_summary, versions
from .config import StudyConfig
from .data import fixed_batches, load_corpus
from .models import NORM_TYPES, PLACEMENTS, make_norm
from .stats import NOISE_K, compare, summarize
from .train import RunSpec, train_run

__all__ = ["SCHEMA", "SCHEMA_VERSION", "plan_runs", "run_study", "Progress"]

log = logging.getLogger(__name__)

SCHEMA = "normkit.study"
SCHEMA_VERSION = 1

NORM_KINDS = ("layer", "rms", "dyt", "none")
# A run "trained" when it got at least this fraction of the best configuration's improvement
# over the unigram loss (what a model that only learns byte frequencies reaches).  Relative, so
# the same rule reads the quick and the default preset.
TRAINED_FRACTION = 0.5

Progress = Callable[[int, int, str], None]


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def _placement_specs(cfg: StudyConfig) -> list[RunSpec]:
    return [RunSpec("gpt", p, "layer", w, s).canonical()
            for p in PLACEMENTS for w in (False, True) for s in cfg.seeds]


def _norm_specs(cfg: StudyConfig) -> list[RunSpec]:
    return [RunSpec("gpt", "pre", n, True, s).canonical() for n in NORM_KINDS for s in cfg.seeds]


def _lstm_specs(cfg: StudyConfig) -> list[RunSpec]:
    return [RunSpec("lstm", "-", n, False, s) for n in ("none", "layer") for s in cfg.seeds]


def _batch_specs(cfg: StudyConfig) -> list[RunSpec]:
    return [RunSpec("gpt", "pre", n, True, cfg.seeds[0]) for n in ("layer", "batch")]


def plan_runs(cfg: StudyConfig) -> list[RunSpec]:
    """The distinct full-length training runs the configured experiments need, in order."""
    specs: list[RunSpec] = []
    if "placement" in cfg.experiments:
        specs += _placement_specs(cfg)
    if "norms" in cfg.experiments:
        specs += _norm_specs(cfg)
    if "recurrent" in cfg.experiments:
        specs += _lstm_specs(cfg)
    return list(dict.fromkeys(specs))


def _total_steps(cfg: StudyConfig, specs: list[RunSpec]) -> int:
    n = sum(cfg.lstm_steps if s.model == "lstm" else cfg.steps for s in specs)
    if "batch" in cfg.experiments:
        n += len(_batch_specs(cfg)) * cfg.batch_train_steps
    return n


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def unigram_loss(data: torch.Tensor) -> float:
    """Entropy (nats) of the byte frequencies: the loss of a model that learns only those."""
    counts = torch.bincount(data.long(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def run_study(cfg: StudyConfig, out_dir: str | os.PathLike,
              progress: Progress | None = None) -> dict[str, Any]:
    """Run every configured experiment and return the results document (JSON-ready).

    Writes one telemetry JSONL file per training run into ``out_dir/runs/``
    (``normkit.watch`` + ``JsonlExporter``); the caller writes
    ``results.json`` and the report (see :func:`normkit.study.write_outputs`).

    Args:
        cfg: the study configuration.
        out_dir: the output directory.
        progress: ``progress(done_steps, total_steps, label)`` after every training step.
    """
    out_dir = Path(out_dir)
    runs_dir = out_dir / "runs"
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_summary(cfg.threads)
    try:
        corpus = load_corpus(cfg.train_bytes, cfg.val_bytes)
        specs = plan_runs(cfg)
        total = _total_steps(cfg, specs)
        done = 0

        def stepper(label: str):
            def on_step(step: int, _n: int) -> None:
                if progress is not None:
                    progress(done + step, total, label)
            return on_step

        records: dict[str, dict[str, Any]] = {}
        for spec in specs:
            rec, _model = train_run(spec, cfg, corpus, runs_dir / f"{spec.run_id}.jsonl",
                                    on_step=stepper(spec.run_id))
            records[spec.run_id] = rec
            done += cfg.lstm_steps if spec.model == "lstm" else cfg.steps
            if progress is not None:
                progress(done, total, spec.run_id)

        uni = unigram_loss(corpus.train)
        experiments: dict[str, Any] = {}
        if "placement" in cfg.experiments:
            experiments["placement"] = _placement(cfg, records, uni)
        if "norms" in cfg.experiments:
            experiments["norms"] = _norms(cfg, records, uni)
        if "batch" in cfg.experiments:
            batch_exp = {}
            for spec in _batch_specs(cfg):
                label = f"batch-check-{spec.norm}"
                _rec, model = train_run(spec, cfg, corpus, None, steps=cfg.batch_train_steps,
                                        on_step=stepper(label))
                done += cfg.batch_train_steps
                batch_exp[spec.norm] = batch_dependence(model, corpus, cfg)
            experiments["batch"] = _batch_summary(batch_exp, cfg)
        if "recurrent" in cfg.experiments:
            experiments["recurrent"] = _recurrent(cfg, records)
    finally:
        torch.set_num_threads(previous_threads)

    doc = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions(),
        "machine": machine,
        "machine_end": machine_summary(cfg.threads),
        "config": cfg.to_dict(),
        "data": {**corpus.describe(), "unigram_loss": uni},
        "experiments": experiments,
        "runs": records,
        "wall_s": time.perf_counter() - t_start,
    }
    doc["findings"] = findings(doc)
    return doc


# ----------------------------------------------------------------------------------------------
# Analyses
# ----------------------------------------------------------------------------------------------


def _config_summary(cfg: StudyConfig, specs: list[RunSpec], records: dict[str, dict]) -> dict:
    """Per configuration: the run ids and the seed statistics of the final validation loss,
    the per-step time and the largest gradient norm."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        entry = out.setdefault(spec.config_name, {
            "model": spec.model, "placement": spec.placement, "norm": spec.norm,
            "warmup": spec.warmup, "runs": []})
        if spec.run_id not in entry["runs"]:
            entry["runs"].append(spec.run_id)
    for entry in out.values():
        recs = [records[r] for r in entry["runs"]]
        entry["final_val_loss"] = summarize([r["final_val_loss"] for r in recs])
        entry["step_time_ms"] = summarize([r["step_time_s"] * 1e3 for r in recs])
        entry["max_grad_norm"] = summarize(
            [max((g for g in r["grad_norm"] if g is not None), default=None) for r in recs])
        entry["diverged"] = sum(r["diverged"] for r in recs)
    return out


def _mark_trained(configs: dict[str, dict], uni: float) -> float | None:
    """Mark each configuration's runs trained / not (see TRAINED_FRACTION); returns the
    threshold loss, or None when no configuration has a final loss."""
    best = min((c["final_val_loss"]["mean"] for c in configs.values()
                if c["final_val_loss"]["mean"] is not None), default=None)
    if best is None:
        return None
    threshold = uni - TRAINED_FRACTION * (uni - best)
    for c in configs.values():
        vals = c["final_val_loss"]["values"]
        c["trained"] = sum(v is not None and v <= threshold for v in vals)
        c["seeds"] = len(vals)
    return threshold


def _placement(cfg: StudyConfig, records: dict, uni: float) -> dict[str, Any]:
    configs = _config_summary(cfg, _placement_specs(cfg), records)
    threshold = _mark_trained(configs, uni)
    comparisons = {}
    for p in PLACEMENTS:
        name = "nonorm" if p == "none" else f"{p}-layer"
        a, b = configs[f"{name}-warmup"], configs[f"{name}-nowarmup"]
        # diff > 0: dropping the warm-up made the final loss worse
        comparisons[f"{p}: no warm-up vs warm-up"] = compare(a["final_val_loss"],
                                                              b["final_val_loss"])
    return {"configs": configs, "trained_threshold": threshold, "comparisons": comparisons,
            "lr": cfg.lr, "warmup_steps": cfg.warmup_steps}


def _op_time_us(kind: str, rows: int, dim: int, repeats: int = 7, inner: int = 20) -> float:
    """Median time (µs) of one forward+backward of the norm alone on (rows, dim) float32: the
    op-level view of the speed claim, free of the rest of the model's time.  ``kind`` is a
    normkit norm ("layer", "rms", "dyt") or torch's own ("torch-layer", "torch-rms"), the
    latter as a yardstick for normkit's modules."""
    torch.manual_seed(0)
    if kind == "torch-layer":
        norm = torch.nn.LayerNorm(dim)
    elif kind == "torch-rms":
        norm = torch.nn.RMSNorm(dim)
    else:
        norm = make_norm(kind, dim)
    x = torch.randn(rows, dim, requires_grad=True)
    g = torch.randn(rows, dim)
    for _ in range(3):  # JIT load and allocator warm-up
        norm(x).backward(g)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            norm(x).backward(g)
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def _norms(cfg: StudyConfig, records: dict, uni: float) -> dict[str, Any]:
    specs = _norm_specs(cfg)
    configs = _config_summary(cfg, specs, records)
    threshold = _mark_trained(configs, uni)
    name = {n: RunSpec("gpt", "pre", n, True, 0).canonical().config_name for n in NORM_KINDS}
    ln = configs[name["layer"]]
    comparisons = {}
    for n in ("rms", "dyt", "none"):
        other = configs[name[n]]
        comparisons[f"{n} vs layer: final val loss"] = compare(ln["final_val_loss"],
                                                               other["final_val_loss"])
        comparisons[f"{n} vs layer: step time (ms)"] = compare(ln["step_time_ms"],
                                                               other["step_time_ms"])
    rows = cfg.batch * cfg.context
    op_us = {n: _op_time_us(n, rows, cfg.dim)
             for n in ("layer", "rms", "dyt", "torch-layer", "torch-rms")}
    return {"configs": configs, "config_of_norm": name, "trained_threshold": threshold,
            "comparisons": comparisons, "op_time_us": op_us, "op_shape": [rows, cfg.dim]}


def _recurrent(cfg: StudyConfig, records: dict) -> dict[str, Any]:
    specs = _lstm_specs(cfg)
    configs = _config_summary(cfg, specs, records)
    finals = [records[s.run_id]["loss_ema"][-1] for s in specs]
    finite = [v for v in finals if v is not None]
    # The target every run reaches: the worst final smoothed training loss of all the runs.
    # Steps-to-target then compares how fast each run gets to a level all of them attain.
    target = max(finite) if finite else None
    for entry in configs.values():
        steps = []
        for rid in entry["runs"]:
            curve = records[rid]["loss_ema"]
            hit = None
            if target is not None:
                hit = next((i + 1 for i, v in enumerate(curve)
                            if v is not None and v <= target), None)
            steps.append(hit)
        entry["steps_to_target"] = summarize(steps)
    comparison = compare(configs["lstm-ln"]["steps_to_target"], configs["lstm"]["steps_to_target"])
    loss_cmp = compare(configs["lstm-ln"]["final_val_loss"], configs["lstm"]["final_val_loss"])
    return {"configs": configs, "target_loss": target, "target_rule":
            "the highest final smoothed (EMA, alpha 0.1) training loss among the runs",
            "comparisons": {"steps to target: lstm vs lstm-ln": comparison,
                            "final val loss: lstm vs lstm-ln": loss_cmp}}


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    d = (a.double() - b.double()).abs()
    return {"max_abs_diff": float(d.max()), "bitwise_equal": bool(torch.equal(a, b)),
            "frac_elements_differ": float((a != b).double().mean())}


@torch.no_grad()
def batch_dependence(model: torch.nn.Module, corpus, cfg: StudyConfig) -> dict[str, Any]:
    """Evaluate ``model`` on the same sequences in batches of each of ``cfg.batch_sizes`` and
    compare with the largest batch, at two levels:

    * ``norm_layers``: every norm layer, given the exact input it saw in the largest batch,
      split into smaller batches (the layer's own batch dependence, nothing else mixed in);
    * ``model``: the logits of the whole model (which also includes the matmuls' own
      batch-shape dependent rounding).

    In ``train`` mode (BatchNorm uses the batch's statistics, as during training or a model
    served in train mode) and ``eval`` mode (running statistics).  ``train_eval_gap`` is the
    largest logit difference between the two modes on the same batch.
    """
    big = max(cfg.batch_sizes)
    x, _ = fixed_batches(corpus.val, 1, big, cfg.context, seed=4321)[0]
    out: dict[str, Any] = {"reference_batch": big}
    logits = {}
    for mode in ("train", "eval"):
        m = copy.deepcopy(model)  # train-mode BatchNorm updates running stats; keep the original
        m.train(mode == "train")
        captured: list[tuple[str, torch.nn.Module, torch.Tensor]] = []
        hooks = [mod.register_forward_pre_hook(
                     lambda mod_, args, name=name, sink=captured: sink.append(
                         (name, mod_, args[0].clone())))
                 for name, mod in m.named_modules() if isinstance(mod, NORM_TYPES)]
        full = m(x)
        for h in hooks:
            h.remove()
        logits[mode] = full
        res: dict[str, Any] = {"model": {}, "norm_layers": {}}
        for b in cfg.batch_sizes:
            if b == big:
                continue
            parts = torch.cat([m(x[i:i + b]) for i in range(0, big, b)])
            res["model"][str(b)] = _diff(parts, full)
            worst = None
            for name, mod, inp in captured:
                ref = mod(inp)
                split = torch.cat([mod(inp[i:i + b]) for i in range(0, big, b)])
                d = _diff(split, ref)
                d["layer"] = name
                if worst is None or d["max_abs_diff"] > worst["max_abs_diff"] or (
                        not d["bitwise_equal"] and worst["bitwise_equal"]):
                    worst = d
            res["norm_layers"][str(b)] = {
                **(worst or {"max_abs_diff": 0.0, "bitwise_equal": True,
                             "frac_elements_differ": 0.0, "layer": None}),
                "layers_checked": len(captured),
                "all_bitwise_equal": all(
                    torch.equal(torch.cat([mod(inp[i:i + b]) for i in range(0, big, b)]),
                                mod(inp)) for _n, mod, inp in captured),
            }
        out[mode] = res
    out["train_eval_gap"] = float((logits["train"].double() - logits["eval"].double()).abs().max())
    return out


def _batch_summary(per_norm: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {"models": per_norm, "batch_sizes": list(cfg.batch_sizes),
            "train_steps": cfg.batch_train_steps}


# ----------------------------------------------------------------------------------------------
# Findings: the papers' claims, checked against this run
# ----------------------------------------------------------------------------------------------

# Training-dynamics findings need the default preset's length; the quick preset still computes
# them but marks them inconclusive.
_DYNAMICS = {"xiong_postln_needs_warmup", "xiong_preln_without_warmup", "rmsnorm_matches_ln",
             "rmsnorm_faster", "dyt_matches_ln", "ba_ln_lstm_faster"}


def _fmt(v: float | None, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def _finding(fid, experiment, source, claim, holds, evidence, preset) -> dict[str, Any]:
    conclusive = holds is not None and not (preset == "quick" and fid in _DYNAMICS)
    return {"id": fid, "experiment": experiment, "source": source, "claim": claim,
            "holds": holds, "conclusive": conclusive, "evidence": evidence}


def findings(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The qualitative claims of the papers in FACTS.md, each with ``holds`` (True, False or
    None when not measured) and ``conclusive`` (False for the quick preset's training-dynamics
    claims, which need longer runs to show)."""
    ex = doc["experiments"]
    preset = doc["config"]["preset"]
    out = []
    if "placement" in ex:
        c = ex["placement"]["configs"]
        post_nw, post_w = c["post-layer-nowarmup"], c["post-layer-warmup"]
        pre_nw = c["pre-layer-nowarmup"]
        cmp_post = ex["placement"]["comparisons"]["post: no warm-up vs warm-up"]
        holds = None
        if cmp_post["diff"] is not None:
            holds = cmp_post["diff"] > 0 and cmp_post["within_noise"] is False
        out.append(_finding(
            "xiong_postln_needs_warmup", "placement", "Xiong et al. 2020",
            "post-LN trains badly without learning-rate warm-up at a high learning rate",
            holds,
            f"final val loss post-LN without warm-up {_fmt(post_nw['final_val_loss']['mean'])} "
            f"vs with {_fmt(post_w['final_val_loss']['mean'])} (noise ±{_fmt(cmp_post['noise'])}); "
            f"trained without warm-up in {post_nw.get('trained', 0)}/{post_nw.get('seeds', 0)} "
            f"seeds, with warm-up in {post_w.get('trained', 0)}/{post_w.get('seeds', 0)}",
            preset))
        cmp_pre = compare(post_nw["final_val_loss"], pre_nw["final_val_loss"])
        holds = None
        if pre_nw.get("seeds"):
            holds = (pre_nw["trained"] == pre_nw["seeds"] and cmp_pre["diff"] is not None
                     and cmp_pre["diff"] < 0 and cmp_pre["within_noise"] is False)
        out.append(_finding(
            "xiong_preln_without_warmup", "placement", "Xiong et al. 2020",
            "pre-LN trains without warm-up (and beats post-LN without warm-up)",
            holds,
            f"pre-LN without warm-up trained in {pre_nw.get('trained', 0)}/"
            f"{pre_nw.get('seeds', 0)} seeds, final val loss "
            f"{_fmt(pre_nw['final_val_loss']['mean'])} vs post-LN's "
            f"{_fmt(post_nw['final_val_loss']['mean'])}",
            preset))
    if "norms" in ex:
        n = ex["norms"]
        cmps = n["comparisons"]
        c_loss = cmps["rms vs layer: final val loss"]
        holds = None if c_loss["diff"] is None else bool(
            c_loss["within_noise"] or c_loss["diff"] < 0)
        out.append(_finding(
            "rmsnorm_matches_ln", "norms", "Zhang & Sennrich 2019",
            "RMSNorm reaches a loss comparable to LayerNorm's", holds,
            f"final val loss difference RMSNorm − LayerNorm {_fmt(c_loss['diff'])} "
            f"(noise ±{_fmt(c_loss['noise'])})", preset))
        op = n["op_time_us"]
        c_t = cmps["rms vs layer: step time (ms)"]
        holds = op["rms"] < op["layer"]
        out.append(_finding(
            "rmsnorm_faster", "norms", "Zhang & Sennrich 2019",
            "RMSNorm takes less time than LayerNorm (7–64% in the paper)", holds,
            f"norm op fwd+bwd on {n['op_shape'][0]}×{n['op_shape'][1]}: RMSNorm "
            f"{op['rms']:.1f} µs vs LayerNorm {op['layer']:.1f} µs "
            f"({100 * (1 - op['rms'] / op['layer']):+.0f}% time saved); whole training step "
            f"difference {_fmt(c_t['diff'], 2)} ms (noise ±{_fmt(c_t['noise'], 2)} ms)", preset))
        c_dyt = cmps["dyt vs layer: final val loss"]
        holds = None if c_dyt["diff"] is None else bool(
            c_dyt["within_noise"] or c_dyt["diff"] < 0)
        out.append(_finding(
            "dyt_matches_ln", "norms", "Zhu et al. 2025",
            "Dynamic Tanh matches LayerNorm", holds,
            f"final val loss difference DyT − LayerNorm {_fmt(c_dyt['diff'])} "
            f"(noise ±{_fmt(c_dyt['noise'])})", preset))
    if "batch" in ex:
        models = ex["batch"]["models"]
        ln = models.get("layer")
        bn = models.get("batch")
        if ln is not None:
            eq = all(v["all_bitwise_equal"] for v in ln["train"]["norm_layers"].values()) and \
                all(v["all_bitwise_equal"] for v in ln["eval"]["norm_layers"].values())
            worst_model = max(v["max_abs_diff"] for v in ln["train"]["model"].values())
            out.append(_finding(
                "ln_batch_invariant", "batch", "Ba et al. 2016 / normkit's contract",
                "LayerNorm's output for a sample does not depend on the batch (bitwise)", eq,
                f"every LayerNorm layer bitwise equal at batch sizes "
                f"{', '.join(ln['train']['norm_layers'])} vs {ln['reference_batch']}: {eq}; "
                f"whole-model logits differ by at most {worst_model:.2e} (matmul rounding)",
                preset))
        if bn is not None:
            diffs = [v["max_abs_diff"] for v in bn["train"]["norm_layers"].values()]
            dep = all(d > 0 for d in diffs)
            out.append(_finding(
                "bn_batch_dependent", "batch", "Ba et al. 2016",
                "BatchNorm's output for a sample depends on the batch it is in (training mode)",
                dep,
                f"largest BatchNorm output change vs batch {bn['reference_batch']}: "
                + ", ".join(f"batch {b}: {v['max_abs_diff']:.3g}"
                            for b, v in bn["train"]["norm_layers"].items())
                + f"; train/eval-mode logit gap {bn['train_eval_gap']:.3g}", preset))
    if "recurrent" in ex:
        r = ex["recurrent"]
        cmp_s = r["comparisons"]["steps to target: lstm vs lstm-ln"]
        holds = None if cmp_s["diff"] is None else bool(
            cmp_s["diff"] > 0 and cmp_s["within_noise"] is False)
        s_ln = r["configs"]["lstm-ln"]["steps_to_target"]["mean"]
        s_pl = r["configs"]["lstm"]["steps_to_target"]["mean"]
        out.append(_finding(
            "ba_ln_lstm_faster", "recurrent", "Ba et al. 2016",
            "layer normalization makes an LSTM converge in fewer steps", holds,
            f"steps to the target loss {_fmt(r['target_loss'])}: LN-LSTM {_fmt(s_ln, 0)}, "
            f"LSTM {_fmt(s_pl, 0)} (noise ±{_fmt(cmp_s['noise'], 0)})", preset))
    return out


__all__ += ["findings", "batch_dependence", "unigram_loss", "NOISE_K", "TRAINED_FRACTION"]
