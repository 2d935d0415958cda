"""A canary-analysis webhook for Flagger (or Argo Rollouts' web metric): POST where the
candidate's telemetry is, get ``normkit.canary.evaluate``'s verdict back.

    python deploy/canary/webhook.py --port 8787 [--addr 127.0.0.1] [--policy canary.yml]

Request: a JSON object — Flagger's webhook payload ``{"name", "namespace", "phase",
"metadata": {...}}`` (Flagger sends its ``metadata`` as string values), or the same keys at the
top level.  Keys: ``baseline`` (a baseline JSON path, required) and either ``candidate`` (a
watch JSONL path) or ``prometheus`` (a server URL) with ``since`` (Unix seconds, ISO 8601 or a
duration such as 15m), optional ``until``, and ``model`` and ``version``; optional
``serving`` (JSONL path) and ``policy`` (a policy file; default: ``--policy``, else the
built-in defaults).

Response: the verdict as JSON (``Verdict.to_dict``) with the status Flagger reads — it counts
any status above 202 as a failed check, and rolls the canary back after ``threshold`` failed
checks (it does not advance the canary's traffic while checks fail):

    200  promote
    425  hold: "Too Early" — not enough traffic yet, or a hold threshold crossed
    412  rollback: "Precondition Failed" — the candidate broke a rollback rule
    400  the request or its files could not be used ({"error": "..."}, one line)

For Argo Rollouts, a ``web`` metric with ``successCondition: result.decision == "promote"``
reads the same body.  The server binds to 127.0.0.1 unless told otherwise; it reads the paths
it is given, so expose it only to the rollout controller.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from normkit._cli.canary import parse_time
from normkit.canary import Policy, PrometheusSource, evaluate, render

STATUS = {"promote": 200, "hold": 425, "rollback": 412}
_KEYS = {"baseline", "candidate", "serving", "prometheus", "since", "until", "model", "version",
         "policy"}


def verdict_for(request: dict, default_policy: Policy | None = None) -> tuple[int, str]:
    """(HTTP status, JSON body) for one request (see the module docstring)."""
    if not isinstance(request, dict):
        raise ValueError("the request must be a JSON object")
    args = dict(request.get("metadata") or {}, **{k: v for k, v in request.items()
                                                 if k in _KEYS})
    if "baseline" not in args:
        raise ValueError("baseline: missing (a baseline JSON path)")
    if ("candidate" in args) == ("prometheus" in args):
        raise ValueError("give either candidate (a JSONL path) or prometheus (a URL)")
    if "prometheus" in args:
        missing = [k for k in ("since", "model", "version") if k not in args]
        if missing:
            raise ValueError(f"prometheus needs {', '.join(missing)}")
        until = args.get("until")
        candidate = PrometheusSource(args["prometheus"], parse_time(str(args["since"])),
                                     None if until is None else parse_time(str(until)),
                                     model=args["model"], version=args["version"])
        pick = {}
    else:
        candidate = args["candidate"]
        pick = {"model": args.get("model"), "version": args.get("version")}
    policy = args.get("policy") or default_policy
    verdict = evaluate(candidate, args["baseline"], args.get("serving"), policy, **pick)
    return STATUS[verdict.decision], render(verdict, "json")


def make_handler(default_policy: Policy | None):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            try:
                n = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(n) or b"{}")
                status, body = verdict_for(request, default_policy)
            except (OSError, ValueError, TypeError, KeyError, argparse.ArgumentTypeError) as e:
                msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
                status, body = 400, json.dumps({"error": msg.splitlines()[0] + where})
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):  # one line per request on stderr, as http.server
            sys.stderr.write(f"canary webhook: {fmt % args}\n")

    return Handler


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8787, help="port (0: a free one, printed)")
    p.add_argument("--addr", default="127.0.0.1", help="bind address (default: loopback)")
    p.add_argument("--policy", help="default policy file for requests that name none")
    args = p.parse_args(argv)
    try:
        policy = Policy.load(args.policy) if args.policy else None
    except (OSError, ValueError) as e:
        print(f"webhook: {e}", file=sys.stderr)
        return 2
    server = ThreadingHTTPServer((args.addr, args.port), make_handler(policy))
    print(f"normkit canary webhook on http://{args.addr}:{server.server_port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
