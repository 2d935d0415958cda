"""``normkit`` — the command-line entry point (``[project.scripts] normkit``).

Each command is a module ``normkit._cli.<name>`` that defines

* ``HELP``: a one-line description, shown by ``normkit --help``;
* ``add_arguments(parser)``: fills its ``argparse`` sub-parser;
* ``run(args) -> int``: does the work and returns the exit code.

Adding a command (``demo``, ``audit``, ``study``, ``report``, ``canary``) is adding its module
and its name to ``COMMANDS``.  Command modules import heavy things (torch kernels, onnx, rich
tables) inside ``run``, and ``import normkit`` imports nothing until a name is used, so
``normkit --help`` does not import torch (tests/test_cli_help.py).  What a command prints of
the user's (paths, names, messages) goes through ``normkit._console.lit``: it is never Rich markup.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .._provenance import normkit_version

COMMANDS = ("demo", "bench", "study", "audit", "report", "canary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normkit",
        description="normkit: fast, exact and observable layer normalization for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"normkit {normkit_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"normkit._cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code.

    Usage errors exit with code 2 (argparse's convention) and a one-line message, no traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
