"""The whole library on one small model, in a few minutes on a laptop CPU: train a pre-LN
transformer built from normkit norms on Python's standard library with telemetry on (JSONL and
a Prometheus endpoint on 127.0.0.1), save a baseline, serve shifted traffic (drift alert),
corrupt a weight (NaN alert with its origin layer), canary two candidate versions (one promoted,
one rolled back) and trip a serving guard that falls back to the previous version, audit the
model for release (ONNX parity included), benchmark the kernels, and write
normkit-demo/report.html.

examples:
  normkit demo
  normkit demo --quick -o /tmp/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "train, watch, break, audit and benchmark a small transformer; write a report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=Path("normkit-demo"),
                        help="output directory (default: ./normkit-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller model, fewer steps and a one-point benchmark (about "
                             "25 s on a 2-core CPU)")
    parser.add_argument("--no-bench", action="store_true", help="skip the kernel benchmark")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from normkit._demo import DemoConfig, run_demo

    from .._console import console

    con = console()
    config = DemoConfig.quick() if args.quick else DemoConfig()
    if args.no_bench:
        config = dataclasses.replace(config, bench=False)
    print_summary(con, run_demo(args.output, config, con))
    return 0


def print_summary(con, summary: dict) -> None:
    """The demo's closing lines on ``con``: loss, alerts, the NaN origin, the canary's verdicts,
    the guard, audit, report path."""
    from .._console import lit

    con.print()
    con.print(f"[bold]normkit demo[/bold] done in {summary['wall_s']:.0f} s")
    con.print(f"  loss {summary['train']['loss_first']:.2f} → "
              f"{summary['train']['loss_last']:.2f} over {summary['train']['steps']} steps")
    con.print(f"  drift alerts (ticket): {len(summary['drift_alerts'])}")
    con.print(f"  NaN alert (page): origin [bold]{lit(summary['nan_origin'])}[/bold] "
              f"(Inf injected into {lit(summary['nan_injected_at'])})")
    verdicts = ", ".join(f"version {c['version']} {c['decision']}" for c in summary["canary"])
    con.print(f"  canary: {lit(verdicts)}")
    g = summary["guard"]
    con.print(f"  guard: tripped on {lit(g['fault'])}, fell back to the previous version: "
              f"{g['fell_back']}")
    a = summary["audit"]
    con.print(f"  audit: {'pass' if a['ok'] else 'FAIL'} — {lit(a['counts'])}")
    con.print(f"  report: [bold]{lit(summary['report'])}[/bold]")
