"""Render a telemetry run (the JSONL a ``normkit.monitor.JsonlExporter`` wrote) as one
self-contained HTML page: NaN/Inf events with the module where they started, alerts, per-layer
input mean and scale over time, latency, and drift against a saved baseline.  A markdown copy
and the PNG figures are written beside it.

examples:
  normkit report run.jsonl -o report.html
  normkit report run.jsonl --baseline baseline.json -o reports/today.html

exit codes: 0 written, 2 the run or baseline could not be read, or the report could not be
written (a one-line reason naming the file, and the line of the run where one is at fault).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "render a telemetry JSONL run (and its drift against a baseline) as an HTML report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="telemetry JSONL file (JsonlExporter output)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="baseline JSON (Baseline.save) to compute drift against")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.html"),
                        help="HTML file to write (default: report.html); the markdown and "
                             "figures go beside it")


def run(args: argparse.Namespace) -> int:
    from .._console import console, lit
    from .._report import write_report
    from ..monitor.report import build_telemetry_report

    out: Path = args.output
    if out.suffix.lower() != ".html":
        print(f"normkit report: --output must end in .html, got {out}", file=sys.stderr)
        return 2
    if out.is_dir():  # checked first: the figures and markdown would be written beside it
        print(f"normkit report: --output {out} is a directory, not an .html file",
              file=sys.stderr)
        return 2
    try:
        doc = build_telemetry_report(args.run, args.baseline)
    except (OSError, ValueError, KeyError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else e
        print(f"normkit report: cannot read the run or baseline: {what}"
              + (f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""),
              file=sys.stderr)
        return 2
    try:
        paths = write_report(doc, out.parent, stem=out.stem, image_dir=f"{out.stem}-plots")
    except OSError as e:  # e.filename: the file that failed (a figure is written first)
        print(f"normkit report: cannot write {out}: {e.strerror or e}"
              + (f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""),
              file=sys.stderr)
        return 2
    console(stderr=True).print(f"report: [bold]{lit(paths['html'])}[/bold] "
                               f"(markdown: {lit(paths['markdown'])})")
    return 0
