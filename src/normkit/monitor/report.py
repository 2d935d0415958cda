"""The telemetry run as a report document: ``normkit report RUN.jsonl [--baseline B.json]``.

Reads the records a ``normkit.monitor.JsonlExporter`` wrote (schema ``normkit.monitor``) and
builds a :class:`~normkit._report.Document`, which the shared renderer (``normkit._report``)
writes as HTML and markdown: health at a glance, NaN/Inf events with the module where they
started, the alert timeline, per-layer input mean and scale over time, latency, and drift of
the whole run against a saved ``Baseline``.  Everything shown is an aggregate the
exporter already wrote; the report never needs the model or the data.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

from .._report import Document, literal, literal_code
from .._report.plotting import new_figure, text_label, to_png
from ._schema import read_jsonl
from .drift import Baseline

__all__ = ["load_run", "build_telemetry_report"]

# How many layers get their own line in the over-time plots before the rest are left out (a
# 96-layer model would draw an unreadable tangle; the table below still lists every layer).
_MAX_LINES = 12


def load_run(path: str | os.PathLike) -> list[dict]:
    """The step records of a telemetry JSONL file, in file order (``read_jsonl``: torn or
    corrupt lines are skipped with a warning, every record is checked against the schema).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a normkit telemetry file, another schema version, a record that does
            not match the schema (the message names ``path:line`` and the field), or no step
            records.
    """
    steps = [rec for rec in read_jsonl(path) if rec["type"] == "step"]
    if not steps:
        raise ValueError(f"{path}: no step records (was the watched model ever run?)")
    return steps


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}g}"
    return str(v)


def _layer_order(steps: list[dict]) -> list[str]:
    """Layers in the order they first appear (execution order within a step)."""
    seen: dict[str, None] = {}
    for rec in steps:
        for name in rec.get("layers", {}):
            seen.setdefault(name)
    return list(seen)


def _series(steps, layers, key):
    """{layer: ([step], [value])} of summary[key] over the steps where it is known."""
    out = {}
    for name in layers:
        xs, ys = [], []
        for rec in steps:
            v = rec.get("summary", {}).get(name, {}).get(key)
            if v is not None and math.isfinite(v):
                xs.append(rec["step"])
                ys.append(v)
        if xs:
            out[name] = (xs, ys)
    return out


def _activation_figure(steps, layers) -> tuple[bytes, str] | None:
    """The input mean and scale of each layer over the steps: ``(png, alt text)``.  RMSNorm
    layers record their input's RMS and no mean, so a model without a mean statistic gets one
    panel, the scale, rather than an empty mean chart."""
    shown = layers[:_MAX_LINES]
    mean = _series(steps, shown, "input_mean")
    std = _series(steps, shown, "input_std")
    rms = {name: s for name, s in _series(steps, shown, "input_rms").items() if name not in std}
    scale = {**std, **rms}
    if not scale and not mean:
        return None
    scale_title = " / ".join(t for t, has in (("input std (LayerNorm)", std),
                                              ("input RMS (RMSNorm)", rms)) if has)
    panels = [(series, title) for series, title in ((mean, "input mean per layer"),
                                                    (scale, scale_title)) if series]
    fig, axes = new_figure(ncols=len(panels), width=5.6, height=3.6)
    for ax, (series, title) in zip(axes, panels, strict=True):
        for name in shown:
            if name in series:
                ax.plot(*series[name], label=text_label(name), linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[-1].legend(fontsize=7, loc="best")
    what = "input mean and scale" if mean else "input RMS"  # no mean: RMSNorm layers only
    return to_png(fig), f"{what} of each norm layer over steps"


def _alert_figure(steps) -> bytes | None:
    pts = [(rec["step"], a) for rec in steps for a in rec.get("alerts", [])]
    if not pts:
        return None
    rules = sorted({a["rule"] for _, a in pts})
    fig, (ax,) = new_figure(width=8.0, height=1.2 + 0.35 * len(rules))
    colours = {"page": "#D55E00", "ticket": "#E69F00"}
    for sev in ("page", "ticket"):
        xs = [s for s, a in pts if a["severity"] == sev]
        ys = [rules.index(a["rule"]) for _, a in pts if a["severity"] == sev]
        if xs:
            ax.scatter(xs, ys, color=colours[sev], label=sev, s=30, zorder=3)
    ax.set_yticks(range(len(rules)), [text_label(r) for r in rules])
    ax.set_ylim(-0.7, len(rules) - 0.3)
    first, last = steps[0]["step"], steps[-1]["step"]
    ax.set_xlim(first - 1, last + 1)
    ax.set_xlabel("step")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("alerts opened")
    return to_png(fig)


def _latency(steps, layers):
    """{layer: (calls, p50, p99)} over every recorded forward time."""
    times = defaultdict(list)
    for rec in steps:
        for name, ts in (rec.get("latency_seconds") or {}).items():
            times[name].extend(t for t in ts if t is not None)
    out = {}
    for name in layers:
        ts = sorted(times.get(name, ()))
        if ts:
            out[name] = (len(ts), ts[len(ts) // 2], ts[min(len(ts) - 1, int(0.99 * len(ts)))])
    return out


def build_telemetry_report(path: str | os.PathLike,
                           baseline: str | os.PathLike | None = None) -> Document:
    """The report of one telemetry JSONL file, optionally with drift against a baseline.

    Args:
        path: a ``JsonlExporter`` file.
        baseline: a ``Baseline.save`` JSON file; the run's merged per-layer statistics are
            compared against it (mean shift, variance ratio, PSI, KS against the default
            thresholds, raised where the row counts are small).  Without one, what the watch's
            own drift checks could not judge is still said.

    Returns:
        The Document (render with ``write_report`` or ``render_html``).
    """
    steps = load_run(path)
    layers = _layer_order(steps)
    models = sorted({(r["model"], r["version"]) for r in steps})
    ranks = sorted({str(r["rank"]) for r in steps})
    nonfinite = [(r, p, e) for r in steps for p, e in (r.get("nonfinite") or {}).items()
                 if e and (e.get("origin") or e.get("modules"))]
    alerts = [(r, a) for r in steps for a in r.get("alerts", [])]
    pages = [a for _, a in alerts if a["severity"] == "page"]

    doc = Document("normkit telemetry report",
                   literal(", ".join(f"{m} {v}" for m, v in models) + f" — {Path(path).name}"))
    span = steps[-1]["time_unix"] - steps[0]["time_unix"]
    doc.key_values([
        ("file", literal(path)),
        ("model / version", literal("; ".join(f"{m} / {v}" for m, v in models))),
        ("sampled steps", f"{len(steps)} (steps {steps[0]['step']}–{steps[-1]['step']}, "
                          f"every {steps[0].get('every')})"),
        ("ranks", ", ".join(ranks)),
        ("norm layers", str(len(layers))),
        ("time span", f"{span:.1f} s"),
    ])
    if nonfinite:
        r, p, e = nonfinite[0]
        n_steps = len({r["step"] for r, _, _ in nonfinite})
        doc.callout("bad", f"Non-finite values in {n_steps} sampled step(s); the first, at step "
                           f"{r['step']} ({p}), started in {literal_code(e.get('origin'))}.")
    elif pages:
        doc.callout("bad", f"{len(pages)} page alert(s) in this run.")
    elif alerts:
        doc.callout("warn", f"{len(alerts)} ticket alert(s) in this run; no NaN/Inf.")
    else:
        doc.callout("ok", "No NaN/Inf and no alerts in this run.")

    doc.heading("Non-finite values")
    if nonfinite:
        doc.paragraph("The origin is the first module, in execution order, that produced a "
                      "non-finite value from finite inputs; propagators only passed it on.  A "
                      "provisional origin is where a backward fault was first seen with only "
                      "the norm layers hooked; the next step hunted it module by module.")
        # One row per (pass, origin): a NaN that persists shows up in every later step, and a
        # row per step would bury a second, different origin under hundreds of repeats.
        groups: dict = {}
        for r, p, e in nonfinite:
            origin = e.get("origin")
            if origin and e.get("resolved") is False:
                origin += " (provisional)"
            g = groups.setdefault((p, origin), {"steps": [], "values": 0, "prop": [],
                                                "modules": 0})
            g["steps"].append(r["step"])
            g["values"] = max(g["values"], e.get("origin_values") or 0)
            g["modules"] = max(g["modules"], e.get("modules") or 0)
            g["prop"] = g["prop"] or (e.get("propagators") or [])
        rows = []
        for (p, origin), g in groups.items():
            prop = g["prop"]
            rows.append((g["steps"][0], g["steps"][-1], len(g["steps"]), p,
                         literal(origin or "–"), g["values"],
                         literal(", ".join(prop[:4]))
                         + (f" (+{len(prop) - 4})" if len(prop) > 4 else ""),
                         g["modules"]))
        doc.table(["first step", "last step", "sampled steps", "pass", "origin", "values",
                   "propagators", "modules"], rows, align=("r", "r", "r", "l", "l", "r", "l", "r"),
                  caption="values: non-finite values in the origin's output (max over steps); "
                          "modules: modules with non-finite output")
    else:
        doc.paragraph("None seen in any sampled step, forward or backward.")

    doc.heading("Alerts")
    if alerts:
        png = _alert_figure(steps)
        if png:
            doc.figure(png, "alerts.png", "alert timeline by rule and severity")
        doc.table(["step", "severity", "rule", "layer", "count", "message"],
                  [(r["step"], a["severity"], literal(a["rule"]), literal(a.get("layer") or "–"),
                    a["count"], literal(a.get("message", ""))) for r, a in alerts],
                  align=("r", "l", "l", "l", "r", "l"))
    else:
        doc.paragraph("No alert was opened.")

    _layers_section(doc, steps, layers, nonfinite)

    doc.heading("Drift against the baseline")
    checks = [r["drift"] for r in steps if r.get("drift")]
    if checks:  # the watch had a baseline: say what its last check could not judge
        blind = [(n, d.get("reason")) for n, d in checks[-1].items()
                 if d.get("evaluable") is False]
        doc.paragraph(f"The watch checked drift against its baseline {len(checks)} time(s); "
                      "its drift alerts are in the alerts above.")
        if blind:
            doc.callout("warn", _not_judged(blind, "at the watch's last check"))
    if baseline is None:
        if not checks:
            doc.paragraph("No baseline given (`--baseline B.json`).")
        return doc
    base = Baseline.load(baseline)
    live = Baseline.from_records(steps, source=str(path))  # the records read above
    results = base.drift(live.layers)
    judged = [r for r in results.values() if r.evaluable]
    doc.paragraph(f"Baseline {literal_code(Path(baseline).name)}: "
                  f"{literal(f'{base.model_name} {base.model_version}')}; the whole run is "
                  "merged and compared layer by layer (mean shift in baseline std, variance "
                  "ratio, PSI and KS of the per-row statistics, each against its limit at the "
                  "run's row counts).")
    drifted = [r for r in judged if r.drifted]
    if drifted:
        doc.callout("warn", f"{len(drifted)} of {len(judged)} layers drifted: "
                            + literal(", ".join(r.layer for r in drifted[:8])))
    elif judged:
        doc.callout("ok", f"No drift in any of the {len(judged)} compared layers.")
    blind = [(r.layer, r.reason) for r in results.values() if not r.evaluable]
    if blind:
        doc.callout("warn" if judged else "info", _not_judged(blind, "over the whole run"))
    if judged:
        doc.table(["layer", "rows", "mean shift", "variance ratio", "PSI", "KS", "crossed"],
                  [(literal(r.layer), r.rows, _fmt(r.mean_shift, 3), _fmt(r.variance_ratio, 3),
                    _fmt(r.psi, 3), _fmt(r.ks, 3), ", ".join(r.crossed) or "–")
                   for r in judged])
    return doc


def _last_finite(steps, name: str, keys: tuple[str, ...]) -> tuple[float, int] | None:
    """``(value, step)`` of the layer's last finite value of the first of ``keys`` it records
    (a NaN stops the statistics of every layer it reaches; the table shows what was before)."""
    for rec in reversed(steps):
        s = rec.get("summary", {}).get(name, {})
        v = next((s[k] for k in keys if s.get(k) is not None), None)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return v, rec["step"]
    return None


def _layers_section(doc: Document, steps, layers, nonfinite) -> None:
    """The per-layer figure and table: statistics of the last sampled step — or, for a layer
    the run's NaN/Inf reached, its last finite ones with their step, and where the NaN started."""
    doc.heading("Activations per layer")
    summaries = [s for rec in steps for s in rec.get("summary", {}).values()]
    has_mean = any(s.get("input_mean") is not None for s in summaries)
    fig = _activation_figure(steps, layers)
    if fig:
        png, alt = fig
        notes = [] if has_mean else [
            "RMSNorm layers record their input's RMS (the root of its mean square), not a mean: "
            "the RMS is what is plotted"]
        if len(layers) > _MAX_LINES:
            notes.append(f"the first {_MAX_LINES} of {len(layers)} layers; all are in the table")
        doc.figure(png, "activations.png", alt, "; ".join(notes))

    final = steps[-1]["step"]
    bad = {name: [rec["step"] for rec in steps
                  if rec.get("summary", {}).get(name, {}).get("nonfinite_rows")]
           for name in layers}
    any_bad = any(bad.values())
    columns = [("input mean", ("input_mean",))] if has_mean else []
    columns += [("input std/RMS", ("input_std", "input_rms")), ("|γ|", ("weight_norm",)),
                ("|Δγ|", ("weight_update_norm",)), ("|∇γ|", ("weight_grad_norm",))]
    lat = _latency(steps, layers)
    rows, older = [], False
    for name in layers:
        summary = next((rec["summary"][name] for rec in reversed(steps)
                        if name in rec.get("summary", {})), {})
        # the norm's kind ("layer", "batch", ...); older records only say "ln" or "rms"
        row = [literal(name), literal(summary.get("norm") or summary.get("kind", "–"))]
        for _header, keys in columns:
            value, step = _last_finite(steps, name, keys) or (None, final)
            older |= step != final
            row.append(_fmt(value) + ("" if step == final else f" (step {step})"))
        if any_bad:
            first, last = (bad[name] or [None])[0], (bad[name] or [None])[-1]
            row.append("–" if first is None else f"step {first}" if first == last
                       else f"steps {first}–{last}")
        _calls, p50, p99 = lat.get(name, (0, None, None))
        row.append("–" if p50 is None else f"{p50 * 1e6:.0f} / {p99 * 1e6:.0f}")
        rows.append(row)

    if nonfinite:
        r, p, e = nonfinite[0]
        doc.paragraph(f"Non-finite values from step {r['step']} ({p}), started in "
                      f"{literal_code(e.get('origin'))}; the statistics of a layer they reached "
                      "are its last finite ones.")
    headers = ["layer", "kind", *(h for h, _ in columns)]
    caption = [f"last sampled step ({final}), or where a step is given in brackets the last "
               "with a finite value" if older else f"last sampled step ({final})",
               "|Δγ| is γ's change since the previous sampled step (0 means frozen)",
               "latency over every recorded call"]
    if any_bad:
        headers.append("non-finite input")
        caption.append("non-finite input: the first and last sampled step with non-finite rows")
    if has_mean and any(s.get("kind") == "rms" for s in summaries):
        caption.append("RMSNorm layers have no input mean (–): their scale is the RMS")
    doc.table(headers + ["latency p50/p99 µs"], rows, caption="; ".join(caption))

def _not_judged(layers: list[tuple[str, str | None]], when: str) -> str:
    """The sentence naming the layers whose drift could not be judged, and why."""
    shown = literal("; ".join(f"{name} ({why or 'no reason recorded'})"
                              for name, why in layers[:8]))
    more = f"; and {len(layers) - 8} more" if len(layers) > 8 else ""
    return f"Drift could not be judged {when} for {len(layers)} layer(s): {shown}{more}."
