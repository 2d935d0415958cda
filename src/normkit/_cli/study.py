"""Train small models on the Python standard library's text and show what normalization does:
norm placement with and without warm-up (Xiong et al. 2020), LayerNorm vs RMSNorm vs Dynamic
Tanh vs none, BatchNorm's batch dependence vs LayerNorm's bitwise batch invariance, and an
LSTM with and without layer normalization (Ba et al. 2016) — several seeds each, with mean,
spread and a "within noise" verdict.

Writes DIR/results.json (schema-versioned), DIR/report.md with DIR/plots/*.png,
DIR/report.html (self-contained) and DIR/runs/*.jsonl (per-run telemetry).
On a 2-core CPU the default study takes about 7 min (434 s measured; the recorded run in
benchmarks/results/study-20261123.json took 430 s) and --quick about 15 s.

examples:
  normkit study --quick
  normkit study --out /tmp/study --seeds 0,1,2,3
  normkit study --experiments placement --steps 600 --lr 3e-3
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._args import int_list, names, positive_float, positive_int

HELP = "train small models and report what norm placement and type do (plots + HTML report)"

# Kept in sync with normkit.study.EXPERIMENTS (not imported: this module loads for --help).
_EXPERIMENTS = ("placement", "norms", "batch", "recurrent")


_experiments = names(_EXPERIMENTS)
_seeds = int_list(0, "seeds >= 0", "0,1,2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="tiny models, 2 seeds, few steps (about 15 s on a 2-core CPU): checks "
                        "the pipeline and batch dependence; too short for the training-dynamics "
                        "findings")
    p.add_argument("--out", type=Path, default=Path("study"), metavar="DIR",
                   help="output directory (default: ./study)")
    p.add_argument("--experiments", type=_experiments, metavar="LIST",
                   help=f"which experiments, from {','.join(_EXPERIMENTS)} (default: all)")
    p.add_argument("--seeds", type=_seeds, metavar="LIST",
                   help="seeds (default: 0,1,2; --quick: 0,1)")
    p.add_argument("--steps", type=positive_int, metavar="N",
                   help="training steps per transformer run (default: 300; --quick: 60)")
    p.add_argument("--lstm-steps", type=positive_int, metavar="N",
                   help="training steps per LSTM run (default: 300; --quick: 60)")
    p.add_argument("--lr", type=positive_float, metavar="LR",
                   help="peak learning rate of the transformer runs (default: 3e-3)")
    p.add_argument("--warmup-steps", type=int, metavar="N",
                   help="warm-up length of the warm-up runs (default: 100; --quick: 20)")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch threads (default: 1: these small models are dispatch-bound, "
                        "and one thread keeps timings steady on a shared machine); results are "
                        "reproducible for a given machine and thread count")
    p.add_argument("--record", action="store_true",
                   help="also copy results.json to benchmarks/results/study-<date>.json when "
                        "run inside a normkit checkout")


def config_from_args(args: argparse.Namespace):
    """The StudyConfig the flags describe (raises ValueError for a bad combination)."""
    from normkit.study import StudyConfig

    base = StudyConfig.quick() if args.quick else StudyConfig()
    return base.replace(experiments=args.experiments, seeds=args.seeds, steps=args.steps,
                        lstm_steps=args.lstm_steps, lr=args.lr,
                        warmup_steps=args.warmup_steps, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    import datetime as _dt
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from normkit._report import write_json_atomic
    from normkit.study import plan_runs, run_study, write_outputs

    from .._console import console, lit
    from ._out import error

    out = console()
    err = console(stderr=True)
    try:
        config = config_from_args(args)
    except ValueError as e:
        return error(err, "study", e)
    try:
        from normkit._report.plotting import require_matplotlib

        require_matplotlib()
    except ImportError as e:
        return error(err, "study", e)
    n_runs = len(plan_runs(config))
    out.print(f"[bold]normkit study[/bold] ({config.preset}): {n_runs} training runs, "
              f"experiments {', '.join(config.experiments)}, seeds "
              f"{','.join(map(str, config.seeds))}, {config.threads} threads → {lit(args.out)}")
    t0 = time.perf_counter()
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                  MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as progress:
        task = progress.add_task("loading text", total=None)

        def on_progress(done: int, total: int, label: str) -> None:
            progress.update(task, completed=done, total=total,
                            description=lit(f"{label:<26}"))

        doc = run_study(config, args.out, progress=on_progress)
        progress.update(task, description="plots and report")
        paths = write_outputs(doc, args.out)
    wall = time.perf_counter() - t0

    out.print(findings_table(doc))
    out.print(f"wall time {wall:.1f} s; results [bold]{lit(paths['results'])}[/bold], report "
              f"[bold]{lit(paths['html'])}[/bold] and {lit(paths['markdown'].name)}")
    if args.record:
        from normkit._provenance import find_repo_root

        root = find_repo_root()
        if root is None:
            err.print("[yellow]--record: not inside a normkit checkout; nothing recorded[/yellow]")
        else:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
            path = write_json_atomic(root / "benchmarks" / "results" / f"study-{stamp}.json", doc)
            out.print(f"recorded [bold]{lit(path)}[/bold]")
    return 0


# The colour of each verdict kind (the report's call-out colours).
_STYLE = {"ok": "green", "bad": "red", "warn": "yellow", "info": "dim"}


def findings_table(doc):
    """The findings as a rich table, in the words of the HTML report (one source:
    ``normkit.study.writeup.findings_rows``): claim, source, verdict, evidence."""
    from rich.table import Table

    from normkit._report.document import plain
    from normkit.study.writeup import QUICK_NOTE, findings_rows

    from .._console import lit

    table = Table(title="normkit study — findings", title_justify="left")
    for col in ("claim", "source", "verdict", "evidence"):
        table.add_column(col, overflow="fold")
    for claim, source, verdict, kind, evidence in findings_rows(doc):
        table.add_row(lit(plain(claim)), lit(plain(source)),
                      f"[{_STYLE[kind]}]{lit(verdict)}[/{_STYLE[kind]}]",
                      f"[dim]{lit(plain(evidence))}[/dim]")
    if doc["config"]["preset"] == "quick":
        table.caption = lit(plain(QUICK_NOTE))
        table.caption_justify = "left"
    return table
