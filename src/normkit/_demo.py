"""``normkit demo``: the whole library on one small model, end to end, in a few minutes.

1. Train a byte-level pre-LN transformer built from normkit norms on the text of Python's
   standard library, with telemetry on (JSONL, and a Prometheus endpoint on 127.0.0.1).
2. Serve validation text and save what the norms saw as a versioned baseline.
3. Serve shifted traffic (base64 blobs instead of source code): the drift alert (ticket).
4. Corrupt one weight with an Inf: the NaN alert (page), naming the layer where it started.
5. Canary two candidate versions on live telemetry (``normkit canary``): a healthy one is
   promoted, one whose eps was changed at run time is rolled back; then a runtime guard on the
   serving model trips on an Inf in one γ and falls back to the previous version.
6. Audit the trained model for release (ONNX export parity included).
7. Benchmark the kernels (``normkit bench --quick``).
8. Tie it together in ``<out>/report.html`` (plus the telemetry report of the serving run).

Everything is seeded; the phases share one console and one progress bar.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["DemoConfig", "run_demo"]

log = logging.getLogger(__name__)

MODEL_NAME = "demo-gpt"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``quick()`` is the test suite's cut."""

    train_steps: int = 300
    layers: int = 4
    dim: int = 128
    heads: int = 4
    context: int = 64
    batch: int = 16
    lr: float = 2e-3
    serve_steps: int = 24
    every: int = 1
    bench: bool = True
    # The benchmark's grid: ``None`` is ``normkit bench --quick``; else ``BenchConfig`` fields
    # (lists for its tuples, and ``timing`` as ``TimingPolicy`` fields), JSON-ready for demo.json.
    bench_grid: dict[str, Any] | None = None
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        # normkit bench --ops ln,rms --dtypes float32 --M 256 --N 512 --no-backward
        #               --peers torch,copy --min-time 0.05
        return cls(train_steps=40, layers=2, dim=64, serve_steps=12, bench=True,
                   bench_grid={"ops": ["ln", "rms"], "dtypes": ["float32"], "Ms": [256],
                               "Ns": [512], "bwd_ops": [], "peers": ["torch", "copy"],
                               "timing": {"min_time_s": 0.05}})

    def __post_init__(self):
        for name in ("train_steps", "layers", "dim", "heads", "context", "batch", "serve_steps",
                     "every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _shifted(val: torch.Tensor) -> torch.Tensor:
    """The drifted traffic: the same validation text, base64-encoded (a client that starts
    sending encoded blobs) — another byte distribution, still valid input."""
    return torch.frombuffer(bytearray(base64.b64encode(val.numpy().tobytes())),
                            dtype=torch.uint8)


def run_demo(out_dir: str | Path, config: DemoConfig = DemoConfig(), console=None) -> dict:
    """Run the demo, writing into ``out_dir``; returns a JSON-ready summary.

    The summary holds: ``train`` (losses), ``metrics_url``, ``baseline``, ``drift_alerts``,
    ``nan_origin``, ``page_alerts``, ``audit`` (finding counts and ok), ``bench`` (JSON path)
    and ``report`` (HTML path).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from normkit import canary
    from normkit.audit import audit
    from normkit.monitor import AlertRules, JsonlExporter, PrometheusExporter, watch
    from normkit.study.data import fixed_batches, load_corpus, sample_batch
    from normkit.study.models import TinyGPT

    from ._console import console as new_console
    from ._console import lit
    from ._io import write_text_atomic

    console = console or new_console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config
    summary: dict[str, Any] = {"config": dict(cfg.__dict__)}
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    corpus = load_corpus(max_train_bytes=2_000_000, max_val_bytes=200_000)
    model = TinyGPT("pre", "layer", layers=cfg.layers, dim=cfg.dim, heads=cfg.heads,
                    context=cfg.context)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)

    # One rule set for the whole demo: alerts are printed as they open (not logged twice).
    rules = AlertRules(dedupe_seconds=3600, callbacks=[announcer(console)], log_alerts=False)

    progress = Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    phases = ("train", "baseline", "drift", "nan", "canary", "audit", "bench", "report")
    with progress:
        overall = progress.add_task("[bold]normkit demo", total=len(phases))

        # 1. Training with telemetry ------------------------------------------------------
        prom = PrometheusExporter(port=0, addr="127.0.0.1")
        summary["metrics_url"] = prom.url
        console.print(f"Prometheus metrics of the training run: [bold]{lit(prom.url)}[/bold]")
        task = progress.add_task("1/8 training a pre-LN transformer", total=cfg.train_steps)
        losses = []
        with watch(model, model_name=MODEL_NAME, model_version="1", every=cfg.every,
                   exporters=[JsonlExporter(out / "train.jsonl"), prom], alerts=rules):
            model.train()
            for step in range(cfg.train_steps):
                x, y = sample_batch(corpus.train, cfg.batch, cfg.context, gen)
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                progress.update(task, completed=step + 1,
                                description=f"1/8 training (loss {losses[-1]:.2f})")
        summary["train"] = {"steps": cfg.train_steps, "loss_first": losses[0],
                            "loss_last": losses[-1], "loss": losses}
        progress.advance(overall)

        # 2. Serving normal traffic: the baseline -------------------------------------------
        model.eval()
        val_batches = fixed_batches(corpus.val, cfg.serve_steps, cfg.batch, cfg.context,
                                    seed=cfg.seed + 1)
        task = progress.add_task("2/8 serving, capturing a baseline", total=len(val_batches))
        serve_log = out / "serve.jsonl"
        with torch.no_grad(), watch(model, model_name=MODEL_NAME, model_version="1",
                                    exporters=[JsonlExporter(serve_log)], alerts=rules) as w:
            for i, (x, _) in enumerate(val_batches):
                model(x)
                progress.update(task, completed=i + 1)
        baseline = w.baseline()
        baseline.save(out / "baseline.json")
        summary["baseline"] = str(out / "baseline.json")
        progress.advance(overall)

        # 3. Shifted traffic: drift (ticket) ----------------------------------------------
        shifted = _shifted(corpus.val)
        drift_batches = fixed_batches(shifted, cfg.serve_steps, cfg.batch, cfg.context,
                                      seed=cfg.seed + 2)
        task = progress.add_task("3/8 serving shifted traffic", total=len(drift_batches))
        live_log = out / "live.jsonl"
        with torch.no_grad(), watch(
                model, model_name=MODEL_NAME, model_version="1", baseline=baseline,
                exporters=[JsonlExporter(live_log)], alerts=rules,
                window=max(2, cfg.serve_steps // 3), drift_every=2) as w:
            for i, (x, _) in enumerate(drift_batches):
                model(x)
                progress.update(task, completed=i + 1)

            # 4. A corrupted weight: NaN (page) -------------------------------------------
            task = progress.add_task("4/8 corrupting one weight with Inf", total=1)
            target = model.blocks[len(model.blocks) // 2].mlp.fc
            saved = target.weight[0, 0].item()
            target.weight[0, 0] = math.inf
            try:
                model(val_batches[0][0])
            finally:
                target.weight[0, 0] = saved
            progress.update(task, completed=1)
        # Read after the watch stopped: a step's record (origin, alerts) is finished when the
        # next step starts or the watch stops.
        pages = [a for a in w.alerts if a.severity == "page"]
        origin = w.nonfinite_origin
        progress.advance(overall)
        progress.advance(overall)
        drift_alerts = [a for a in w.alerts if a.rule == "drift"]
        summary["drift_alerts"] = [a.to_dict() for a in drift_alerts]
        summary["page_alerts"] = [a.to_dict() for a in pages]
        summary["nan_origin"] = origin
        summary["nan_injected_at"] = _name_of(model, target)

        # 5. Canary: promote a healthy candidate, roll back a broken one -------------------
        task = progress.add_task("5/8 canary: two candidate versions", total=len(CANDIDATES))
        summary["canary"] = []
        for i, (version, what, fault) in enumerate(CANDIDATES):
            log_path = out / f"canary-{version}.jsonl"
            batches = fixed_batches(corpus.val, cfg.serve_steps, cfg.batch, cfg.context,
                                    seed=cfg.seed + 3 + i)
            with torch.no_grad(), fault(model), watch(
                    model, model_name=MODEL_NAME, model_version=version,
                    exporters=[JsonlExporter(log_path)]):
                for x, _ in batches:
                    model(x)
            verdict = canary.evaluate(log_path, baseline)
            verdict_path = out / f"canary-{version}.json"
            write_text_atomic(verdict_path, canary.render(verdict, "json"))
            summary["canary"].append({"version": version, "candidate": what,
                                      "decision": verdict.decision, "path": str(verdict_path),
                                      "reasons": [r.message for r in verdict.reasons[:3]]})
            colour = "green" if verdict.decision == "promote" else "red"
            console.print(f"canary {lit(version)} ({lit(what)}): "
                          f"[bold {colour}]{verdict.decision.upper()}[/bold {colour}]"
                          + (f" — {lit(verdict.reasons[0].message)}" if verdict.reasons else ""),
                          soft_wrap=True)
            progress.update(task, completed=i + 1)
        summary["guard"] = _guard_falls_back(model, baseline, val_batches[0][0])
        g = summary["guard"]
        console.print(f"guard: {g['healthy_trips']} trips on healthy traffic; Inf in "
                      f"{lit(g['fault'])}: [bold red]TRIPPED[/bold red] — {lit(g['first_trip'])}"
                      f"; fell back to the previous version: {g['fell_back']}", soft_wrap=True)
        progress.advance(overall)

        # 6. Audit ----------------------------------------------------------------------------
        task = progress.add_task("6/8 auditing for release", total=1)
        report = audit(model, val_batches[0][0][:4])
        report_path = report.write(out / "audit.json")
        report.write(out / "audit.md", "markdown")
        summary["audit"] = {"ok": report.ok(fail_on="error"), "path": str(report_path),
                            "counts": _counts(report)}
        progress.update(task, completed=1)
        progress.advance(overall)

        # 7. Benchmark ------------------------------------------------------------------------
        summary["bench"] = None
        if cfg.bench:
            task = progress.add_task("7/8 benchmarking the kernels", total=1)
            summary["bench"] = str(_bench(out / "bench.json", cfg.bench_grid, progress))
            progress.update(task, completed=1)
        progress.advance(overall)

        # 8. Reports -------------------------------------------------------------------------
        task = progress.add_task("8/8 writing the report", total=1)
        summary["wall_s"] = time.perf_counter() - t_start
        summary["report"] = str(_write_reports(out, summary, report, live_log))
        progress.update(task, completed=1)
        progress.advance(overall)
    from ._io import write_json_atomic

    write_json_atomic(out / "demo.json", {"schema": "normkit.demo", "schema_version": 1,
                                          **{k: v for k, v in summary.items()
                                             if k != "train"},
                                          "train": summary["train"]})
    return summary


def _eps_changed(model):
    from normkit import faults

    return faults.eps(model, 1e-2)


# The canary's candidates: (version, what it is, the fault it is served under).
CANDIDATES = (
    ("2", "healthy: the same weights on fresh traffic", lambda model: contextlib.nullcontext()),
    ("3", "eps changed from 1e-5 to 1e-2 at run time", _eps_changed),
)


def _guard_falls_back(model, baseline, x) -> dict:
    """``normkit.guard`` on the serving model with the previous version (a copy) as fallback:
    a healthy call passes, then an Inf in one γ trips it and the call is answered by the copy."""
    import copy

    from normkit import faults
    from normkit.guard import Guard

    previous = copy.deepcopy(model)
    layer = "blocks.0.norm1"
    g = Guard(model, baseline=baseline, action="fallback", fallback=previous)
    quiet = logging.getLogger("normkit.guard")  # the demo says it in one line of its own
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            healthy = g(x)
            healthy_trips = sum(g.trips.values())
            with faults.nonfinite(model, layer, where="weight", value=math.inf):
                y = g(x)
            fell_back = bool(torch.equal(y, previous(x)) and torch.equal(healthy, y))
    finally:
        g.remove()
        quiet.setLevel(level)
    trips = list(g.trips.items())  # in the order the layers ran: the first is where it starts
    return {"fault": f"{layer}.weight", "healthy_trips": healthy_trips,
            "trips": [{"layer": la, "check": c, "action": a, "calls": n}
                      for (la, c, a), n in trips],
            "first_trip": f"{trips[0][0][1]} at {trips[0][0][0]}" if trips else "",
            "fell_back": fell_back}


def announcer(console):
    """An ``AlertRules`` callback printing each alert as it opens (its message literally: it
    names modules)."""
    from ._console import lit

    def announce(alert) -> None:
        colour = "red" if alert.severity == "page" else "yellow"
        console.print(f"[bold {colour}]{alert.severity.upper()}[/bold {colour}] "
                      f"{lit(alert.rule)}: {lit(alert.message)}", soft_wrap=True)

    return announce


def _name_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _counts(report) -> dict[str, int]:
    counts = {"info": 0, "warning": 0, "error": 0}
    for f in report.findings:
        counts[f.severity] += 1
    return counts


def _bench(json_path: Path, grid: dict[str, Any] | None, progress) -> Path:
    """``normkit bench`` in this process, its table printed above the demo's progress bar (its
    own bar goes to a silent console: rich shows one live display per console)."""
    import io

    from rich.console import Console

    from .bench import BenchConfig, TimingPolicy
    from .bench._terminal import run_and_print

    if grid is None:
        config = BenchConfig.quick_grid()
    else:
        config = BenchConfig(**{**grid, "timing": TimingPolicy(**grid.get("timing", {}))})
    run_and_print(config, json_path, out=progress.console, err=Console(file=io.StringIO()))
    return json_path


def _write_reports(out: Path, summary: dict, audit_report, live_log: Path) -> Path:
    """``report.html`` (the demo) and ``telemetry.html`` (the serving run with drift)."""
    import json

    from ._report import Document, literal, literal_code, write_report
    from ._report.plotting import new_figure, to_png
    from .monitor.report import build_telemetry_report

    tele = build_telemetry_report(live_log, out / "baseline.json")
    write_report(tele, out, stem="telemetry", image_dir="telemetry-plots")

    doc = Document("normkit demo", f"{MODEL_NAME}: train, watch, drift, NaN, audit, bench — "
                                   f"{summary['wall_s']:.0f} s")
    doc.key_values([
        ("telemetry (train)", "train.jsonl; Prometheus at " + summary["metrics_url"]),
        ("baseline", "baseline.json"),
        ("serving telemetry", "live.jsonl → telemetry.html"),
        ("canary", ", ".join(f"canary-{v}.json" for v, _, _ in CANDIDATES)),
        ("audit", "audit.json, audit.md"),
        ("benchmark", "bench.json" if summary["bench"] else "skipped"),
    ])

    doc.heading("1. Training with telemetry")
    tr = summary["train"]
    fig, (ax,) = new_figure(width=6.4, height=3.0)
    ax.plot(range(1, len(tr["loss"]) + 1), tr["loss"], linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title("training loss")
    doc.figure(to_png(fig), "train-loss.png", "training loss per step")
    doc.paragraph(f"{tr['steps']} steps; loss {tr['loss_first']:.2f} → {tr['loss_last']:.2f}. "
                  "Every norm layer was watched: input mean/variance from the kernel's own "
                  "statistics, γ/β norms and updates, gradient norms, NaN/Inf, latency.")

    doc.heading("2–3. Baseline and drift")
    drift = summary["drift_alerts"]
    if drift:
        layers = sorted({la for a in drift for la in (a.get("layers") or [a.get("layer")]) if la})
        doc.callout("warn", f"Ticket: {len(drift)} drift alert(s) on shifted traffic "
                            f"(base64 blobs instead of source); layers: "
                            f"{literal(', '.join(layers[:6]))}"
                            f"{' …' if len(layers) > 6 else ''}.")
    else:
        doc.callout("info", "No drift alert fired on the shifted traffic.")
    doc.paragraph("Per-layer detail, drift table and plots: `telemetry.html`.")

    doc.heading("4. A non-finite value and where it started")
    origin, injected = summary["nan_origin"], summary["nan_injected_at"]
    kind = "bad" if summary["page_alerts"] else "warn"
    doc.callout(kind, f"Page: Inf written into {literal_code(injected + '.weight')}; telemetry "
                      f"named the origin {literal_code(origin)}"
                + (" — the right module." if origin == injected else "."))

    doc.heading("5. Canary: promote or roll back a candidate version")
    doc.paragraph("Each candidate served fresh validation traffic under `watch`; `normkit "
                  "canary` compared its telemetry with the baseline (drift, NaN/Inf, output "
                  "distribution) and gave its verdict (canary-*.json).")
    for c in summary["canary"]:
        ok = c["decision"] == "promote"
        doc.callout("ok" if ok else "bad",
                    f"Version {literal_code(c['version'])} ({literal(c['candidate'])}): "
                    f"**{c['decision']}**"
                    + (f" — {literal(c['reasons'][0])}" if c["reasons"] else "") + ".")

    g = summary["guard"]
    doc.callout("ok" if g["fell_back"] else "bad",
                f"Guard: {g['healthy_trips']} trips on healthy traffic; with an Inf in "
                f"{literal_code(g['fault'])} it tripped ({literal(g['first_trip'])}) and the "
                "call was answered by the previous version"
                + (", output for output." if g["fell_back"] else " — but not exactly."))

    doc.heading("6. Release audit")
    c = summary["audit"]["counts"]
    doc.callout("ok" if summary["audit"]["ok"] else "bad",
                f"{'passes' if summary['audit']['ok'] else 'fails'} the release gate "
                f"(errors {c['error']}, warnings {c['warning']}, info {c['info']}).")
    rows = [(f.id, f.severity, literal(f.layer or "–"), literal(f.message))
            for f in audit_report.findings if f.severity != "info"][:20]
    if rows:
        doc.table(["id", "severity", "layer", "message"], rows, align=("l", "l", "l", "l"))

    doc.heading("7. Kernel benchmark")
    if summary["bench"]:
        data = json.loads(Path(summary["bench"]).read_text())
        rows = []
        for r in data["results"]:
            nk = r["impls"].get("normkit", {})
            rows.append((r["op"], r["pass"], r["dtype"], f"{r['M']}×{r['N']}",
                         f"{nk.get('median_s', float('nan')) * 1e6:.1f}",
                         f"{nk.get('speedup_vs_torch', float('nan')):.2f}×",
                         f"{nk.get('copy_fraction', float('nan')):.2f}"))
        doc.table(["op", "pass", "dtype", "M×N", "normkit µs", "vs torch", "of copy"], rows,
                  align=("l", "l", "l", "r", "r", "r", "r"))
    else:
        doc.paragraph("Skipped.")
    paths = write_report(doc, out, stem="report", image_dir="report-plots")
    return paths["html"]
