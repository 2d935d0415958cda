"""The benchmark on a terminal: a progress bar while the grid runs, then the results table
and the bar check, printed with Rich; used by ``normkit bench``, ``normkit demo`` and
``benchmarks/run_cpu.py``.  The harness itself (:mod:`normkit.bench`) does not print.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .._console import console, lit
from . import BAR_MAX_SLOWDOWN, config_notes, run_bench, write_json_atomic

__all__ = ["run_and_print", "results_table"]


def run_and_print(config, json_path: str | Path, out=None, err=None) -> dict[str, Any]:
    """Run ``config`` with a progress bar (on ``err``), print the table and bar check (on
    ``out``), write the JSON to ``json_path``; returns the result document."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out = out or console()
    err = err or console(stderr=True)
    n_cases = len(config.cases())
    out.print(
        f"[bold]normkit bench[/bold]: {n_cases} cases on {config.device} "
        f"(backend {config.backend}); peers: {', '.join(config.peers) or 'none'}"
    )
    for note in config_notes(config):
        out.print(f"  [dim]note:[/dim] {lit(note)}")

    t0 = time.perf_counter()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("starting", total=n_cases)

        def on_progress(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, description=lit(f"{label:<28}"))

        doc = run_bench(config, progress=on_progress)
    wall = time.perf_counter() - t0

    out.print(results_table(doc))
    _print_bar(out, doc["bar"])
    path = write_json_atomic(json_path, doc)
    out.print(f"wall time {wall:.1f} s; results written to [bold]{lit(path)}[/bold]")
    return doc


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.1f}µs"
    if s < 1:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.2f}s"


def _fmt_ratio(v: float | None, good: float | None = None, ok: float | None = None) -> str:
    if v is None:
        return "–"
    text = f"{v:.2f}"
    if good is not None and v >= good:
        return f"[green]{text}[/green]"
    if ok is not None:
        return f"[yellow]{text}[/yellow]" if v >= ok else f"[red]{text}[/red]"
    return text


def _cell_time(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "–"
    if "error" in rec:
        return "[red]error[/red]"
    if "skipped" in rec:
        return "[dim]–[/dim]"
    text = _fmt_time(rec.get("median_s"))
    return f"[yellow]{text}~[/yellow]" if rec.get("noisy") else text


_SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}


def results_table(doc: dict[str, Any]):
    """One row per case: normkit's time, GB/s, fraction of copy and speed-up vs torch, then the
    peers' times side by side."""
    from rich.table import Table

    peers = doc["config"]["peers"]
    min_sp = 1.0 / BAR_MAX_SLOWDOWN
    table = Table(
        title="normkit bench — median time per call; ×copy = copy time / normkit time, "
        "×torch = torch time / normkit time",
        title_justify="left",
    )
    for col, just in [("op", "left"), ("pass", "left"), ("dtype", "left"), ("M", "right"),
                      ("N", "right"), ("normkit", "right"), ("GB/s", "right"),
                      ("×copy", "right"), ("×torch", "right")]:
        table.add_column(col, justify=just)
    if "torch" in peers:
        table.add_column("torch", justify="right")
    if "compile" in peers:
        table.add_column("compile", justify="right")
        table.add_column("×compile", justify="right")
    if "onnxruntime" in peers:
        table.add_column("ORT", justify="right")
    if "copy" in peers:
        table.add_column("copy", justify="right")
    if "clone" in peers:
        table.add_column("×clone", justify="right")

    results = doc["results"]
    errors = []
    for i, r in enumerate(results):
        impls = r["impls"]
        nk = impls.get("normkit", {})
        if "error" in nk:
            where = f"{r['op']} {r['pass']} {r['dtype']} {r['M']}x{r['N']}"
            errors.append(f"{where}: {nk['error']}")
        dtype = _SHORT_DTYPE.get(r["dtype"], r["dtype"])
        row = [r["op"], r["pass"], dtype, str(r["M"]), str(r["N"]), _cell_time(nk),
               "–" if nk.get("gbps") is None else f"{nk['gbps']:.1f}",
               _fmt_ratio(nk.get("copy_fraction")),
               _fmt_ratio(nk.get("speedup_vs_torch"), good=1.0, ok=min_sp)]
        if "torch" in peers:
            row.append(_cell_time(impls.get("torch")))
        if "compile" in peers:
            comp = impls.get("compile", {})
            row.append(_cell_time(comp))
            vs = None
            if comp.get("median_s") and nk.get("median_s"):
                vs = comp["median_s"] / nk["median_s"]
            row.append(_fmt_ratio(vs, good=1.0, ok=min_sp))
        if "onnxruntime" in peers:
            row.append(_cell_time(impls.get("onnxruntime")))
        if "copy" in peers:
            row.append(_cell_time(impls.get("copy")))
        if "clone" in peers:
            row.append(_fmt_ratio(nk.get("clone_fraction")))
        nxt = results[i + 1] if i + 1 < len(results) else None
        section_end = nxt is not None and (nxt["op"], nxt["pass"]) != (r["op"], r["pass"])
        table.add_row(*row, end_section=section_end)
    notes = []
    if any(rec.get("noisy") for r in results for rec in r["impls"].values()):
        notes.append("~ noisy: median > 1.5 × the fastest sample (a busy machine); re-run to "
                     "confirm")
    if errors:
        more = f" (+{len(errors) - 5} more in the JSON)" if len(errors) > 5 else ""
        notes.append("[red]normkit errors:[/red] " + lit("; ".join(errors[:5]) + more))
    for name in ("compile", "onnxruntime"):
        errs = {r["impls"][name]["error"] for r in results
                if "error" in r["impls"].get(name, {})}
        if errs:
            notes.append(f"[red]{name} failed:[/red] " + lit("; ".join(sorted(errs)[:2])))
    if notes:
        table.caption = "\n".join(notes)
        table.caption_justify = "left"
    return table


def _print_bar(out, bar: dict[str, Any]) -> None:
    """The bar check: each 4096x4096 point against its thresholds, the grid minimum, the
    verdict."""
    points = bar["points"]
    worst = bar["worst_speedup"]
    if not points and worst is None:
        return
    out.print("[bold]bar check[/bold] "
              f"(4096x4096 {'/'.join(bar['dtypes'])}: fwd ≥ 0.75 of copy, fused fwd ≥ 0.70, "
              f"bwd ≥ 0.50; everywhere ≥ {bar['speedup_needed']:.3f}× torch)")

    def mark(ok):
        return "[dim]?[/dim]" if ok is None else ("[green]ok[/green]" if ok else "[red]FAIL[/red]")

    for p in points:
        if p.get("error"):
            out.print(f"  {p['op']:<7} {p['pass']} {p['dtype']:<8}  [red]error[/red]: "
                      f"{lit(p['error'])}")
            continue
        cf = "–" if p["copy_fraction"] is None else f"{p['copy_fraction']:.2f}"
        sp = "–" if p["speedup_vs_torch"] is None else f"{p['speedup_vs_torch']:.2f}"
        cl = "" if p["clone_fraction"] is None else f"of clone {p['clone_fraction']:.2f}"
        if p.get("copy_fraction_out") is not None:
            cl += f"  with out=: of copy {p['copy_fraction_out']:.2f}"
        out.print(f"  {p['op']:<7} {p['pass']} {p['dtype']:<8}  of copy {cf:>5} "
                  f"(≥ {p['copy_fraction_needed']:.2f}) {mark(p['copy_ok'])}   "
                  f"vs torch {sp:>5} {mark(p['speedup_ok'])}   [dim]{cl}[/dim]")
    if worst is not None:
        ok = worst["speedup_vs_torch"] >= bar["speedup_needed"]
        out.print(f"  grid minimum vs torch: {worst['speedup_vs_torch']:.2f} at {worst['op']} "
                  f"{worst['pass']} {worst['dtype']} {worst['M']}x{worst['N']} {mark(ok)}")
    if bar["ok"] is not None:
        out.print("  overall: " + ("[green]meets the bar[/green]" if bar["ok"]
                                   else "[red]below the bar[/red]"))
