"""Promote, hold or roll back a candidate model version from its live norm telemetry: NaN/Inf,
input drift against its baseline (mean shift, variance, PSI, KS), output distribution, and
norm latency against the serving model.  Thresholds: a versioned policy file (docs/canary.md).

examples:
  normkit canary candidate.jsonl --baseline baseline.json
  normkit canary candidate.jsonl --baseline baseline.json --serving serving.jsonl --format json
  normkit canary --baseline baseline.json --prometheus http://127.0.0.1:9090 --since 15m \\
      --model lm --version v8 --policy canary.yml --output verdict.md

--since and --until: Unix seconds, an ISO 8601 time, or a duration before now (30s, 15m, 2h,
1d, 1h30m).

exit codes: 0 promote, 1 hold or roll back (the reasons say which and why), 2 could not run
(a one-line reason naming the file or argument).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HELP = "promote, hold or roll back a candidate from its telemetry against a baseline"



def parse_time(text: str, now: float | None = None) -> float:
    """Unix seconds from ``text``: a number, an ISO 8601 time (UTC unless it says), or a
    duration before ``now`` such as 15m or 1h30m (``--silence-for``'s syntax)."""
    from ..monitor.alertmanager import parse_duration  # one duration syntax with --silence-for

    now = time.time() if now is None else now
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return now - parse_duration(text).total_seconds()
    except ValueError:
        pass
    from datetime import datetime, timezone

    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}; Unix seconds, an ISO 8601 time or a duration such as "
            "15m or 1h30m") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("candidate", nargs="?", type=Path, metavar="CANDIDATE.jsonl",
                   help="the candidate's telemetry (a watch JsonlExporter file); leave out "
                        "with --prometheus")
    p.add_argument("--baseline", type=Path, required=True, metavar="BASELINE.json",
                   help="the candidate version's baseline (Baseline.save)")
    p.add_argument("--serving", type=Path, metavar="SERVING.jsonl",
                   help="the serving model's telemetry over the same window (its latency is "
                        "the reference)")
    p.add_argument("--prometheus", metavar="URL",
                   help="read the candidate from this Prometheus server's HTTP API instead")
    p.add_argument("--since", type=parse_time, metavar="T",
                   help="start of the window (with --prometheus)")
    p.add_argument("--until", type=parse_time, metavar="T",
                   help="end of the window (with --prometheus; default: now)")
    p.add_argument("--model", help="the candidate's model label (needed with --prometheus; "
                                   "picks one model from a JSONL file holding several)")
    p.add_argument("--version", dest="model_version",
                   help="the candidate's version label (as --model)")
    p.add_argument("--policy", type=Path, metavar="FILE",
                   help="thresholds: a versioned YAML or JSON policy (default: the built-in "
                        "one, docs/canary.md)")
    p.add_argument("--format", choices=("table", "json", "markdown"), default="table",
                   help="output format on stdout (default: table)")
    p.add_argument("--silence", metavar="URL",
                   help="an Alertmanager's base URL: while the verdict is hold, silence the "
                        "candidate version's alerts (model and version labels) for "
                        "--silence-for from now; on promote or roll back, expire that silence")
    p.add_argument("--silence-for", default="30m", metavar="DURATION",
                   help="how long a hold's silence lasts unless renewed by the next run "
                        "(default 30m; Alertmanager's units ms, s, m, h, d, w)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="also write the verdict to FILE (JSON, or markdown for a .md path), "
                        "atomically")


def _candidate(args):
    """The candidate source from the arguments, or a usage message (str)."""
    if args.prometheus is None:
        if args.candidate is None:
            return "give the candidate's CANDIDATE.jsonl, or --prometheus URL"
        if args.since is not None or args.until is not None:
            return "--since and --until need --prometheus"
        return args.candidate
    if args.candidate is not None:
        return f"give either CANDIDATE.jsonl ({args.candidate}) or --prometheus, not both"
    missing = [o for o, v in (("--since", args.since), ("--model", args.model),
                              ("--version", args.model_version)) if v is None]
    if missing:
        return f"--prometheus needs {', '.join(missing)}"
    from ..canary import PrometheusSource

    try:
        return PrometheusSource(args.prometheus, args.since, args.until, model=args.model,
                                version=args.model_version)
    except ValueError as e:
        return str(e)


def run(args: argparse.Namespace) -> int:
    from .._console import console
    from .._io import write_text_atomic
    from ..canary import evaluate, print_table, render
    from ._out import error

    err = console(stderr=True)
    candidate = _candidate(args)
    if isinstance(candidate, str):
        return error(err, "canary", candidate)
    try:
        verdict = evaluate(candidate, args.baseline, args.serving, args.policy,
                           model=args.model, version=args.model_version)
    except (OSError, ValueError, TypeError, KeyError) as e:
        what = e.strerror if isinstance(e, OSError) and e.strerror else e
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
        return error(err, "canary", f"could not run: {str(what).splitlines()[0]}{where}")
    if args.output is not None:
        fmt = "markdown" if args.output.suffix.lower() in (".md", ".markdown") else "json"
        try:
            write_text_atomic(args.output, render(verdict, fmt))
        except OSError as e:
            return error(err, "canary", f"cannot write {args.output}: {e.strerror or e}")
    if args.silence is not None:
        _sync_silence(verdict, args.silence, args.silence_for, err)
    try:
        if args.format == "table":
            print_table(verdict, console(width=160))
        else:
            sys.stdout.write(render(verdict, args.format))
        sys.stdout.flush()
    except BrokenPipeError:  # `normkit canary ... | head`: the reader left; keep the verdict
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return verdict.exit_code


def _sync_silence(verdict, url: str, duration: str, err) -> None:
    """The rollout's silence in step with the verdict, said on stderr (stdout is the verdict's);
    a failure is said too, and the verdict (and its exit code) stands."""
    from .._console import lit
    from ..canary import sync_silence
    from ..monitor.alertmanager import AlertmanagerError

    try:
        done = sync_silence(verdict, url, duration)
    except (AlertmanagerError, ValueError) as e:
        err.print(f"normkit canary: warning: silence not updated: {lit(e)}", soft_wrap=True)
        return
    which = f"{lit(verdict.model)} {lit(verdict.version)}"
    if done["id"]:
        err.print(f"normkit canary: silence {done['id']} open for {which} ({lit(duration)})",
                  soft_wrap=True)
    for silence_id in done["expired"]:
        err.print(f"normkit canary: silence {silence_id} for {which} expired", soft_wrap=True)
