"""A verdict as JSON, markdown or a terminal table; the decision heads each, so all three say
what the exit code says."""

from __future__ import annotations

import json
import math

from .._report.markdown import code_span, escape_text, table_cell
from ._verdict import Verdict

__all__ = ["render", "print_table"]

_COLUMNS = (("rows", "rows", "d"), ("mean_shift", "mean shift σ", ".3f"),
            ("variance_ratio", "var ratio", ".3f"), ("psi", "PSI", ".3f"), ("ks", "KS", ".3f"),
            ("output_std_ratio", "out std ratio", ".3f"),
            ("latency_p50", "p50 µs", "µs"), ("latency_p99", "p99 µs", "µs"))


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if spec == "µs":
        return f"{v * 1e6:.1f}"
    return format(v, spec)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _headline(v: Verdict) -> str:
    return f"{v.decision.upper()} — {v.model} {v.version}"


def _md(text) -> str:
    return table_cell(escape_text(str(text)))


def render(verdict: Verdict, fmt: str = "json") -> str:
    """``verdict`` as "json" (strict: an infinite value is the string "inf") or "markdown"."""
    if fmt == "json":
        return json.dumps(_finite(verdict.to_dict()), indent=2, allow_nan=False) + "\n"
    if fmt != "markdown":
        raise ValueError(f"render: fmt must be 'json' or 'markdown', got {fmt!r}")
    e = verdict.evidence
    lines = [f"## normkit canary: **{verdict.decision}** — {code_span(verdict.model)} "
             f"{code_span(verdict.version)}", "",
             f"Evidence: {e['steps']} sampled steps over {e['seconds']:.0f} s from "
             f"{code_span(e['source'])}; baseline {code_span(e['baseline'])}"
             + (f"; serving {code_span(e['serving'])}" if e["serving"] else "") + ".", ""]
    if verdict.reasons:
        lines += ["| decision | rule | layer | observed | threshold | against | message |",
                  "|---|---|---|---|---|---|---|"]
        for r in verdict.reasons:
            lines.append(f"| {r.decision} | {r.rule} | {_md(r.layer or '—')} | "
                         f"{_fmt(r.observed, '.4g')} | {_fmt(r.threshold, '.4g')} | "
                         f"{r.against or '—'} | {_md(r.message)} |")
    else:
        lines.append("No rule crossed: promote.")
    if verdict.layers:
        lines += ["", "| layer | " + " | ".join(h for _, h, _ in _COLUMNS) + " |",
                  "|---" * (len(_COLUMNS) + 1) + "|"]
        for name, row in verdict.layers.items():
            lines.append(f"| {_md(name)} | " + " | ".join(
                _fmt(row.get(k), spec) for k, _, spec in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


_STYLE = {"promote": "bold green", "hold": "bold yellow", "rollback": "bold red"}


def print_table(verdict: Verdict, out) -> None:
    """The terminal view on the Rich console ``out``: the decision, the reasons, the layers."""
    from rich.table import Table

    from .._console import lit

    s = _STYLE[verdict.decision]
    e = verdict.evidence
    out.print(f"[bold]normkit canary[/bold] {lit(verdict.model)} {lit(verdict.version)}: "
              f"[{s}]{verdict.decision.upper()}[/{s}] — {e['steps']} sampled steps over "
              f"{e['seconds']:.0f} s; baseline {lit(e['baseline'])}"
              + (f"; serving {lit(e['serving'])}" if e["serving"] else ""))
    if verdict.reasons:
        t = Table(title="reasons", title_justify="left")
        for col in ("decision", "rule", "layer", "observed", "threshold", "against", "message"):
            t.add_column(col, overflow="fold")
        for r in verdict.reasons:
            rs = _STYLE[r.decision]
            t.add_row(f"[{rs}]{r.decision}[/{rs}]", lit(r.rule), lit(r.layer or "–"),
                      _fmt(r.observed, ".4g"), _fmt(r.threshold, ".4g"), lit(r.against or "–"),
                      lit(r.message))
        out.print(t)
    else:
        out.print("[green]no rule crossed[/green]")
    if verdict.layers:
        t = Table(title="layers", title_justify="left")
        t.add_column("layer")
        for _, head, _ in _COLUMNS:
            t.add_column(head, justify="right")
        for name, row in verdict.layers.items():
            t.add_row(lit(name), *(_fmt(row.get(k), spec) for k, _, spec in _COLUMNS))
        out.print(t)
